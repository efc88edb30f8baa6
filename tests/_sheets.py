"""``write_sheet``: a study sheet of given patients (time points per patient, which are labelled),
paths not on disk, read back as a cohort: for the plan and candidate tests."""

from __future__ import annotations

import pandas as pd

from metsflow.cohort.sheet import read_sheet


def write_sheet(path, patients: dict[str, int], labelled: set[str]):
    rows = []
    for patient, n in patients.items():
        for t in range(n):
            rows.append(
                {
                    "patient_id": patient,
                    "study_id": f"{patient}_T{t}",
                    "timepoint": t,
                    "t1": "",
                    "t1c": f"{patient}/{t}/t1c.nii.gz",
                    "t2": "",
                    "flair": "",
                    "label": f"{patient}/{t}/seg.nii.gz" if patient in labelled else "",
                }
            )
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return read_sheet(path)
