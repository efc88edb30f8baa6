"""Settings of one review server: which results folder, label store and sheet it serves.

With ``metsflow review serve --workers N`` (N > 1) uvicorn starts N worker processes that
import the app by name, so the settings travel to them as JSON in an environment variable
(``to_json`` / ``from_json``; ``app.app_from_env`` reads it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from metsflow.review_server.db import review_db_path


@dataclass
class ReviewConfig:
    """``results``/``label_store`` as in the workflow config. ``sheet``: the study sheet; when
    given, saved labels are checked against each study's own native T1c from the sheet (as
    ``metsflow al import`` does) and only cohort study ids are accepted; without it, against
    the package's byte-for-byte copy of it (``image_t1c.nii.gz``, what ``import_batch`` uses
    by default). ``round``: serve this round's batch instead of the newest one."""

    results: Path
    label_store: Path
    sheet: Path | None = None
    round: int | None = None
    secure_cookies: bool = False

    def __post_init__(self):
        self.results = Path(self.results)
        self.label_store = Path(self.label_store)
        self.sheet = None if self.sheet is None else Path(self.sheet)
        self._cohort = None

    def to_json(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})

    @classmethod
    def from_json(cls, text: str) -> ReviewConfig:
        return cls(**json.loads(text))

    @property
    def db_path(self) -> Path:
        return review_db_path(self.label_store)

    def cohort(self):
        if self.sheet is None:
            return None
        if self._cohort is None:
            from metsflow.cohort.sheet import read_sheet

            self._cohort = read_sheet(self.sheet)
        return self._cohort

    def known_studies(self) -> set[str] | None:
        cohort = self.cohort()
        return None if cohort is None else set(cohort.by_id)

    def reference_for(self, study_id: str, package_t1c: Path) -> Path:
        cohort = self.cohort()
        if cohort is not None and study_id in cohort.by_id:
            return Path(cohort.by_id[study_id].t1c)
        return package_t1c
