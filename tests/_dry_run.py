"""Dry-run helpers for the planning tests and benchmarks/bench_planning.py.

- ``dry_run_job_counts``: jobs per rule from the 'Job stats' table of ``snakemake -n`` output.
- ``synthetic_oracle``: a placeholder oracle sheet, so the simulated annotator plans every round
  of a synthetic cohort (``metsflow.cohort.sheet.synthetic_sheet``) with one tiny label file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from metsflow.core.io import save_nifti, write_table


def dry_run_job_counts(stdout: str) -> dict[str, int]:
    """Jobs per rule (and ``total``) from the 'Job stats' table of ``snakemake -n`` output;
    empty when the output has no such table."""
    counts: dict[str, int] = {}
    if "Job stats:" not in stdout:
        return counts
    for line in stdout.split("Job stats:", 1)[1].splitlines()[3:]:
        match = re.match(r"^(\S+)\s+(\d+)\s*$", line)
        if not match:
            if counts:
                break
            continue
        counts[match.group(1)] = int(match.group(2))
    return counts


def synthetic_oracle(sheet: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """An oracle sheet answering every study of ``sheet`` with one empty placeholder label
    beside it, for dry runs with the simulated annotator (the parse-time check of
    ``metsflow.cohort.preflight`` needs the listed files to exist; a dry run reads none)."""
    out_path = Path(out_path)
    placeholder = out_path.with_name("placeholder_label.nii.gz")
    # a valid (empty) label: the parse-time check reads each oracle label's header
    save_nifti(placeholder, np.zeros((2, 2, 2)), np.eye(4), dtype=np.uint8)
    study_ids = pd.read_csv(sheet, sep="\t", dtype=str, usecols=["study_id"]).study_id
    write_table(out_path, pd.DataFrame({"study_id": study_ids, "label": placeholder.name}))
    return out_path
