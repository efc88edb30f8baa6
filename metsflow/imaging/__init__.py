"""Imaging: per-study preprocessing, brain masks, registration to the previous time point and label priors."""
