"""Review assists on the server: the model's second opinion and the previous scan, per study.

What the export wrote (``metsflow.active_learning.assists``: ``assists.json`` and the uint8
volumes beside the pre-segmentation) is served as is, to reviewers who may see the study:

- ``GET /api/studies/{id}/assists``: the "Possible lesions" (stage-1 candidates that stage 2
  dropped, highest stage-2 score first), the URLs of the volumes the editor loads, and, for a
  follow-up, each lesion of the pre-segmentation marked *new* or *persisting* (with its volume
  change) and the previous lesions that are *gone*, matched by
  ``metsflow.evaluation.longitudinal.match_previous`` (the longitudinal tables' rule: largest
  overlap after growing the previous lesions by ``match_margin_mm``; the export matches them,
  ``active_learning.assists.previous_matching``);
- ``GET /api/studies/{id}/assists/{name}``: one of those volumes (gzip NIfTI, uint8). The
  suggestions and the probability map are boxes of the T1c grid (the export crops them); the
  answer above gives each volume's ``offsets`` (its first voxel on the T1c grid, from the two
  headers), so the editor places a box voxel for voxel.

Accept/dismiss decisions travel with the save, in the ``X-Metsflow-Assists`` header (JSON,
the body being the label itself), and are kept in the saved version's provenance
(``assist_provenance``) with per-size-bin counts, which ``metsflow al status`` sums per round.

The routes are built by ``assist_routes`` from the app's own endpoint wrapper (session, role,
CSRF) so this module needs nothing else from the app.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from starlette.routing import Route

from metsflow.active_learning.assists import previous_matching, size_bin_counts
from metsflow.core import io
from metsflow.core.layout import (
    ASSISTS_NAME,
    PREVIOUS_LABEL_NAME,
    PREVIOUS_T1C_NAME,
    REVIEW_PROB_NAME,
    REVIEW_SUGGESTIONS_NAME,
)

ASSIST_HEADER = "x-metsflow-assists"
# URL name -> file in the study's package folder.
VOLUMES = {
    "suggestions": REVIEW_SUGGESTIONS_NAME,
    "probability": REVIEW_PROB_NAME,
    "previous_label": PREVIOUS_LABEL_NAME,
    "previous_t1c": PREVIOUS_T1C_NAME,
}
VERDICTS = ("accepted", "dismissed")
MAX_HEADER_CHARS = 16 * 1024
EDIT_COUNTERS = ("deleted", "relabelled", "grown", "shrunk")


def read_assists(folder: Path) -> dict:
    """The study's ``assists.json`` (an empty description when the export wrote none)."""
    path = folder / ASSISTS_NAME
    if not path.is_file():
        return {"suggestions": [], "probability": False, "previous": None, "problems": []}
    return io.read_json(path)


@functools.lru_cache(maxsize=128)
def _matching(preseg: str, preseg_mtime: int, previous: str, previous_mtime: int) -> dict:
    return previous_matching(nib.load(preseg), np.asanyarray(nib.load(previous).dataobj))


def lesion_status(entry) -> dict:
    """Per lesion of the pre-segmentation (catalog id -> new/persisting) and the gone lesions;
    empty when the study has no previous scan. The export matched them (``matching`` in
    ``assists.json``); a package exported before that is matched here, once."""
    previous = entry.folder / PREVIOUS_LABEL_NAME
    if not previous.is_file():
        return {"lesions": {}, "gone": []}
    matching = read_assists(entry.folder).get("matching")
    if matching is not None:
        return matching
    return _matching(
        str(entry.presegmentation),
        entry.presegmentation.stat().st_mtime_ns,
        str(previous),
        previous.stat().st_mtime_ns,
    )


def grid_offset(path: Path, t1c: nib.spatialimages.SpatialImage) -> list[int] | None:
    """The voxel of the T1c grid where the volume at ``path`` starts, when it is a box of that
    grid (same axes and spacing, an integer shift, inside it); None otherwise. Headers only."""
    image = nib.load(str(path))
    affine, reference = np.asarray(image.affine), np.asarray(t1c.affine)
    if not np.allclose(affine[:3, :3], reference[:3, :3], atol=1e-4):
        return None
    shift = np.linalg.solve(reference[:3, :3], affine[:3, 3] - reference[:3, 3])
    start = np.rint(shift)
    stop = start + np.asarray(image.shape[:3])
    if not np.allclose(shift, start, atol=1e-2) or start.min() < 0:
        return None
    if np.any(stop > np.asarray(t1c.shape[:3])):
        return None
    return [int(v) for v in start]


def study_assists(entry, url) -> dict:
    """The body of ``GET /api/studies/{id}/assists``; ``url(tail)`` makes a study URL."""
    info = read_assists(entry.folder)
    problems = list(info.get("problems", []))
    t1c = nib.load(str(entry.t1c))
    volumes, offsets = {}, {}
    for name, filename in VOLUMES.items():
        path = entry.folder / filename
        if not path.is_file():
            continue
        offset = grid_offset(path, t1c)
        if offset is None:  # the export writes them on the T1c grid: a foreign file
            problems.append(f"{filename} is not on the T1c grid: left out")
            continue
        volumes[name], offsets[name] = url(f"assists/{name}"), offset
    matching = lesion_status(entry)
    return {
        "suggestions": info.get("suggestions", []),
        "volumes": volumes,
        "offsets": offsets,
        "previous": info.get("previous"),
        "lesion_status": {str(k): v for k, v in matching["lesions"].items()},
        "gone": matching["gone"],
        "problems": problems,
    }


def assist_provenance(header: str | None, entry) -> dict | None:
    """The editor's accept/dismiss decisions and lesion edits sent with a save, checked against
    the study's suggestions: ``{"suggestions": {id: verdict}, "suggestions_by_size_bin": ...,
    "edits": {...}}``, or None when nothing was sent. Raises ValueError naming the problem."""
    if not header:
        return None
    if len(header) > MAX_HEADER_CHARS:
        raise ValueError(f"{ASSIST_HEADER} longer than {MAX_HEADER_CHARS} characters")
    try:
        sent = json.loads(header)
    except ValueError as exc:
        raise ValueError(f"{ASSIST_HEADER} is not JSON: {exc}") from exc
    if not isinstance(sent, dict):
        raise ValueError(f"{ASSIST_HEADER} must be a JSON object")
    rows = read_assists(entry.folder).get("suggestions", [])
    known = {str(r["id"]) for r in rows}
    decisions = sent.get("suggestions", {}) or {}
    if not isinstance(decisions, dict):
        raise ValueError("suggestions must map suggestion ids to accepted/dismissed")
    problems = [
        f"suggestion {k!r}: {'unknown id' if str(k) not in known else f'verdict {v!r}'}"
        for k, v in decisions.items()
        if str(k) not in known or v not in VERDICTS
    ]
    edits = sent.get("edits", {}) or {}
    if not isinstance(edits, dict):
        problems.append("edits must be an object of counters")
        edits = {}
    problems += [
        f"edit counter {k!r}"
        for k, v in edits.items()
        if k not in EDIT_COUNTERS or not isinstance(v, int) or isinstance(v, bool) or v < 0
    ]
    if problems:
        raise ValueError(f"{ASSIST_HEADER}: " + "; ".join(problems))
    decisions = {str(k): v for k, v in decisions.items()}
    return {
        "suggestions": decisions,
        "suggestions_by_size_bin": size_bin_counts(rows, decisions),
        "edits": {k: int(v) for k, v in edits.items()},
    }


def assist_routes(prefix: str, api, http_error, file_response) -> list[Route]:
    """The assist routes, wrapped by the app's ``api`` decorator (session, visibility)."""

    @api(csrf=False)
    def assists(app, request, user, payload):
        entry = app.visible_entry(user, request.path_params["study_id"])
        return study_assists(entry, lambda tail: f"/api/studies/{entry.study_id}/{tail}")

    @api(csrf=False)
    def assist_volume(app, request, user, payload):
        entry = app.visible_entry(user, request.path_params["study_id"])
        name = request.path_params["name"]
        path = entry.folder / VOLUMES[name] if name in VOLUMES else None
        if path is None or not path.is_file():
            raise http_error(404, f"study {entry.study_id} has no {name!r} assist")
        return file_response(path)

    return [
        Route(prefix + "/assists", assists, methods=["GET"]),
        Route(prefix + "/assists/{name}", assist_volume, methods=["GET"]),
    ]
