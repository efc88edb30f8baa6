"""Cohort: the study sheet and its readers (BraTS, per-date, BIDS, DICOM), the plan and splits, the phantom, the run's preflight, exports and the cost model."""
