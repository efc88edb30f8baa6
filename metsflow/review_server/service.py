"""State shared by the requests of one review server, and the error its endpoints answer with.

``ReviewApp`` holds the settings, the catalog of served studies and the label store, and
answers a study's state (status from ``policy.status_of``, assignee, latest version) and
whether a user may see it. ``HTTPError`` is raised anywhere below an endpoint and turned into
one JSON answer ``{"detail": ..., **extra}`` by the endpoint wrappers (``auth.api``).
``ReviewApp.defer`` runs what a request need not wait for (derived figures of a save) after it,
in one background thread.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import nibabel as nib
from starlette.responses import JSONResponse

from metsflow.active_learning.labelstore import LabelStore
from metsflow.review_server import db, policy
from metsflow.review_server.catalog import Catalog, StudyEntry
from metsflow.review_server.config import ReviewConfig

log = logging.getLogger(__name__)


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, **extra):
        self.status, self.detail, self.extra = status, detail, extra

    @classmethod
    def refused(cls, refusal: policy.Refusal) -> HTTPError:
        """The answer to a policy refusal (a conflict says ``confirmed``: the editor then
        offers to download the edit instead of retrying)."""
        extra = {"confirmed": True} if refusal.kind is policy.Kind.CONFLICT else {}
        return cls(refusal.kind.value, refusal.reason, **extra)


def json_response(status: int, body: dict) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


@lru_cache(maxsize=1024)
def _reference_header(path: str, mtime_ns: int, size: int) -> nib.Nifti1Image:
    """The reference image opened once per file version (its header; callers read only its
    shape and affine): nibabel's load and header checks were ~5 ms of a 1 mm save's CPU."""
    return nib.load(path)


class ReviewApp:
    """State shared by the requests of one server: settings, catalog, label store."""

    def __init__(self, config: ReviewConfig):
        self.config = config
        self.db_path = db.init_db(config.db_path)
        self.catalog = Catalog(config.results, config.round)
        self.store = LabelStore(config.label_store, known_studies=config.known_studies())
        # One thread for work a request need not wait for (``defer``): one at a time, so it
        # never takes more than one core from the requests.
        self._deferred = ThreadPoolExecutor(max_workers=1, thread_name_prefix="review-deferred")

    def defer(self, fn, *args) -> None:
        """Run ``fn(*args)`` after the current request, in the background thread; a failure is
        logged (what is deferred is derived, never the only copy of anything)."""

        def run():
            try:
                fn(*args)
            except Exception:
                log.exception("deferred %s failed", getattr(fn, "__name__", fn))

        self._deferred.submit(run)

    def wait_deferred(self) -> None:
        """Return once everything deferred so far has run (one thread: first in, first out)."""
        self._deferred.submit(lambda: None).result()

    def reference(self, entry: StudyEntry) -> Path:
        return self.config.reference_for(entry.study_id, entry.t1c)

    def reference_image(self, entry: StudyEntry) -> nib.Nifti1Image:
        """The reference opened lazily (header only): the store needs its shape and affine,
        and the image itself was checked when the pipeline read it. Not decoding the voxels
        made a 128^3 save 2.4x faster (0.43 -> 0.18 s)."""
        path = self.reference(entry)
        try:
            stat = path.stat()
            return _reference_header(str(path), stat.st_mtime_ns, stat.st_size)
        except (OSError, nib.filebasedimages.ImageFileError) as exc:
            raise HTTPError(500, f"reference image {path} unreadable: {exc}") from exc

    def entry(self, study_id: str) -> StudyEntry:
        entry = self.catalog.get(study_id)
        if entry is None:
            raise HTTPError(404, f"study {study_id!r} is not in the review batch")
        return entry

    def state(self, con, entry: StudyEntry, assignment: dict | None = None) -> dict:
        versions = self.store.versions(entry.study_id)
        if assignment is None:
            assignment = db.assignments(con).get(entry.study_id, {})
        status = policy.status_of({v["stage"] for v in versions}, bool(assignment.get("sent_back")))
        return {
            "status": str(status),
            "assigned_to": assignment.get("username"),
            "latest_version": versions[-1]["version"] if versions else 0,
            "latest_stage": versions[-1]["stage"] if versions else None,
        }

    def decide(
        self, con, user: dict, entry: StudyEntry, action: policy.Action = policy.Action.VIEW
    ) -> dict:
        """The study's state if ``user`` may do ``action`` on it, else the policy's refusal
        as an ``HTTPError`` (403 for a trainee's foreign study, 409 once confirmed, ...)."""
        state = self.state(con, entry)
        refusal = policy.decide(
            action,
            user["role"],
            state["status"],
            mine=state["assigned_to"] == user["username"],
            latest_stage=state["latest_stage"],
            study_id=entry.study_id,
        )
        if refusal is not None:
            raise HTTPError.refused(refusal)
        return state

    def visible(self, con, user: dict, entry: StudyEntry) -> dict:
        """The study's state if ``user`` may see it; 403 for a trainee's foreign study."""
        return self.decide(con, user, entry, policy.Action.VIEW)

    def visible_entry(self, user: dict, study_id: str) -> StudyEntry:
        """The catalog entry of ``study_id`` when ``user`` may see it (404 / 403 otherwise): what
        every read-only study route (images, labels, assists) checks first."""
        entry = self.entry(study_id)
        with db.connect(self.db_path) as con:
            self.visible(con, user, entry)
        return entry

    def last_comment(self, con, study_id: str) -> str:
        found = [c for c in db.comments(con, study_id) if c["kind"] == "send_back"]
        return found[-1]["text"] if found else ""
