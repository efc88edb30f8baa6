"""What every layout reader shares (``scan``'s BraTS and per-date readers, ``bids``, ``dicom``):
the problem report, the sheet frame they return, the root check and the id pattern of the sheet
schema. Kept apart so that ``bids`` no longer imports ``scan``'s private helpers (an import
cycle: ``scan`` dispatches to ``bids``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from metsflow.cohort.sheet import SHEET_COLUMNS
from metsflow.core import ids

log = logging.getLogger("metsflow.cohort.scan")

ID_PATTERN = ids.SAFE_ID  # the sheet schema's id pattern (metsflow.core.ids owns the check)


class ScanReport:
    """Problems found while scanning: kept for the caller and logged as warnings."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[str] = []

    def add(self, path: Path, problem: str) -> None:
        inside = path != self.root and path.is_relative_to(self.root)
        text = f"{path.relative_to(self.root) if inside else path}: {problem}"
        self.problems.append(text)
        log.warning("scan %s: %s", self.root, text)


def sheet_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows (with a `_sort` key) as a sheet frame: patients in order, time points sorted."""
    frame = pd.DataFrame(rows, columns=[*SHEET_COLUMNS, "_sort"])
    frame = frame.sort_values(["patient_id", "_sort"], kind="stable").drop(columns="_sort")
    return frame.fillna("").reset_index(drop=True)


def check_root(root: str | os.PathLike) -> Path:
    """The dataset folder as an absolute path; a clear error when it is not a folder."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist or is not a folder")
    return root
