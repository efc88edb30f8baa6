"""Review assists: the dropped candidates, the quantised probability map and the previous scan
in the review package; the server's /assists answer (new / persisting / gone) and the
accept/dismiss decisions kept with the saved version."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from _review_assists_data import FOLLOW_UP, write_assisted_batch
from argon2 import PasswordHasher
from starlette.testclient import TestClient

from metsflow.active_learning.assists import quantise_probability
from metsflow.active_learning.status import suggestion_status
from metsflow.core import labels
from metsflow.core.layout import (
    ASSISTS_NAME,
    PRESEGMENTATION_NAME,
    PREVIOUS_LABEL_NAME,
    PREVIOUS_T1C_NAME,
    REVIEW_PROB_NAME,
    REVIEW_SUGGESTIONS_NAME,
    Layout,
)
from metsflow.evaluation.longitudinal import match_previous
from metsflow.models.cascade import Candidate, dropped_candidates
from metsflow.review_server import db
from metsflow.review_server.app import create_app
from metsflow.review_server.assists import grid_offset
from metsflow.review_server.config import ReviewConfig

SHAPE = (28, 26, 24)
AFFINE = np.array(
    [[0.0, 0.0, -2.0, 30.0], [-2.0, 0.0, 0.0, 20.0], [0.0, -2.0, 0.0, 25.0], [0, 0, 0, 1]]
)  # voxel axes P, I, L: not RAS
PASSWORD = "correct horse battery"


def _images():
    rng = np.random.default_rng(0)
    head = np.zeros(SHAPE, bool)
    head[3:-3, 3:-3, 3:-3] = True
    t1c = np.where(head, 0.5 + 0.5 * rng.random(SHAPE), 0).astype(np.float32)
    preseg = np.zeros(SHAPE, np.uint8)
    preseg[6:12, 6:12, 6:12] = labels.ENHANCING
    preseg[8:10, 8:10, 8:10] = labels.NECROSIS
    preseg[18:20, 18:20, 16:18] = labels.ENHANCING  # small: new at the follow-up
    return t1c, t1c[::-1].copy(), preseg


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("assists")
    t1c, flair, preseg = _images()
    made = write_assisted_batch(root, t1c, flair, AFFINE, preseg)
    template = root / "users.sqlite3"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db, "_HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        db.add_user(template, "tina", PASSWORD, "trainee")
        db.add_user(template, "adam", PASSWORD, "admin")
    return {**made, "template": template, "preseg": preseg}


def test_dropped_candidates_keeps_only_the_rejected_ones_best_first():
    components = np.zeros((6, 6, 6), np.int32)
    components[0, 0, 0], components[2, 2, 2], components[4, 4, 4:6] = 1, 2, 3
    cands = [
        Candidate("S", 1, (0, 0, 0), 1, 0.9, score=0.8),  # kept (>= 0.5)
        Candidate("S", 2, (2, 2, 2), 1, 0.7, score=0.2),
        Candidate("S", 3, (4, 4, 4), 2, 0.6, score=0.3),
    ]
    ids, rows = dropped_candidates(components, cands, 0.5)
    assert [r["stage2_score"] for r in rows] == [0.3, 0.2]
    assert ids[4, 4, 4] == ids[4, 4, 5] == 1 and ids[2, 2, 2] == 2 and ids[0, 0, 0] == 0


def test_quantised_probability_floors_the_noise():
    q = quantise_probability(np.array([0.0, 0.01, 0.5, 1.0]))
    assert q.dtype == np.uint8 and q.tolist() == [0, 0, 128, 255]


def test_match_previous_marks_new_persisting_and_gone():
    current = np.zeros((10, 10, 10), bool)
    previous = np.zeros_like(current)
    current[1:3, 1:3, 1:3] = True  # persisting (overlaps after a 1-voxel margin)
    previous[3:5, 1:3, 1:3] = True
    current[7, 7, 7] = True  # new
    previous[7, 1, 7] = True  # gone
    components, matched, _, gone = match_previous(current, previous, 1, margin_voxels=1)
    assert sorted(v is None for v in matched.values()) == [False, True]
    assert len(gone) == 1


def _start(img) -> np.ndarray:
    """The T1c voxel where a (cropped) assist volume starts, from its affine."""
    shift = np.linalg.solve(AFFINE[:3, :3], img.affine[:3, 3] - AFFINE[:3, 3])
    assert np.allclose(img.affine[:3, :3], AFFINE[:3, :3]) and np.allclose(shift, np.rint(shift))
    return np.rint(shift).astype(int)


def _on_t1c_grid(img) -> np.ndarray:
    """A cropped assist volume placed back on the T1c grid through its affine."""
    full = np.zeros(SHAPE, np.uint8)
    box = tuple(slice(a, a + n) for a, n in zip(_start(img), img.shape, strict=True))
    full[box] = np.asarray(img.dataobj)
    return full


def test_grid_offset_places_a_box_of_the_t1c_grid_and_refuses_anything_else(tmp_path):
    t1c = nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE)
    cases = {
        "full": t1c,
        "box": t1c.slicer[2:5, 3:9, 1:4],
        "half_voxel": nib.Nifti1Image(np.zeros((3, 3, 3)), AFFINE @ _shift(0.5, 0, 0)),
        "outside": nib.Nifti1Image(np.zeros((3, 3, 3)), AFFINE @ _shift(SHAPE[0] - 2, 0, 0)),
        "finer": nib.Nifti1Image(np.zeros((3, 3, 3)), AFFINE @ np.diag([0.5, 1, 1, 1])),
    }
    found = {}
    for name, image in cases.items():
        nib.save(image, tmp_path / f"{name}.nii.gz")
        found[name] = grid_offset(tmp_path / f"{name}.nii.gz", t1c)
    assert found == {
        "full": [0, 0, 0],
        "box": [2, 3, 1],
        "half_voxel": None,
        "outside": None,
        "finer": None,
    }


def _shift(*voxels) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = voxels
    return shift


def test_package_carries_assists_on_the_native_grid(batch):
    folder = batch["review_dir"] / FOLLOW_UP
    info = json.loads((folder / ASSISTS_NAME).read_text())
    assert info["problems"] == []
    rows = info["suggestions"]
    assert [r["stage2_score"] for r in rows] == [0.41, 0.12]
    assert rows[0]["voxels"] == int(batch["suggestion_a"].sum())
    assert {r["size_bin"] for r in rows} <= {"lt3mm", "3to10mm", "ge10mm"}
    # Suggestions and probability map: boxes around what they hold, placed by their affine.
    ids = nib.load(folder / REVIEW_SUGGESTIONS_NAME)
    assert ids.get_data_dtype() == np.uint8 and np.prod(ids.shape) < np.prod(SHAPE)
    assert np.array_equal(_on_t1c_grid(ids) == 1, batch["suggestion_a"])
    assert np.array_equal(_on_t1c_grid(ids) == 2, batch["suggestion_b"])
    prob_img = nib.load(folder / REVIEW_PROB_NAME)
    prob = _on_t1c_grid(prob_img)
    assert prob_img.get_data_dtype() == np.uint8 and np.prod(prob_img.shape) < np.prod(SHAPE)
    assert prob[batch["suggestion_a"]].min() == 153  # 0.6 * 255
    assert np.array_equal(
        prob > 0, (batch["preseg"] > 0) | batch["suggestion_a"] | batch["suggestion_b"]
    )
    # The previous label came through the real ANTs propagation (identity transforms): exact.
    previous = np.asarray(nib.load(folder / PREVIOUS_LABEL_NAME).dataobj)
    assert np.array_equal(previous, batch["previous_label"])
    assert nib.load(folder / PREVIOUS_T1C_NAME).get_data_dtype() == np.uint8
    assert info["previous"] == {"study_id": "S01", "label_source": "confirmed"}
    # Matched against the previous label at export (the server answers from it).
    matching = info["matching"]
    assert matching["lesions"]["1"]["status"] == "persisting"
    assert matching["lesions"]["2"] == {"status": "new"} and len(matching["gone"]) == 1
    # The pre-segmentation stays read-only with the assists around it.
    assert not (folder / PRESEGMENTATION_NAME).stat().st_mode & 0o200


@pytest.fixture
def client(batch, tmp_path):
    config = ReviewConfig(results=batch["results"], label_store=tmp_path / "labels")
    shutil.copy(batch["template"], config.db_path)
    app = create_app(config)
    admin = _login(app, "adam")
    assert admin.post("/api/assign", json={"patient_id": "P01", "username": "tina"}).is_success
    return _login(app, "tina"), config


def _login(app, username):
    # The server takes a POST only from its own origin (tests/test_review_hardening.py).
    client = TestClient(app, headers={"Origin": "http://testserver"})
    answer = client.post("/api/login", json={"username": username, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    client.headers["X-CSRF-Token"] = answer.json()["csrf_token"]
    return client


def test_assists_answer_lists_suggestions_and_lesion_status(client, batch):
    tina, _ = client
    body = tina.get(f"/api/studies/{FOLLOW_UP}/assists").json()
    assert [s["id"] for s in body["suggestions"]] == [1, 2]
    assert set(body["volumes"]) == {"suggestions", "probability", "previous_label", "previous_t1c"}
    study = tina.get(f"/api/studies/{FOLLOW_UP}").json()
    by_size = {lesion["id"]: lesion for lesion in study["lesions"]}
    status = body["lesion_status"]
    assert status["1"]["status"] == "persisting" and status["1"]["volume_change_pct"] == 0.0
    assert status["2"]["status"] == "new" and by_size[2]["voxels"] == 8
    assert len(body["gone"]) == 1
    volume = tina.get(body["volumes"]["probability"])
    assert volume.status_code == 200
    # A box of the T1c grid; the answer says where it starts (the editor places it so).
    box = nib.Nifti1Image.from_bytes(gzip.decompress(volume.content))
    assert np.prod(box.shape) < np.prod(SHAPE)
    assert body["offsets"]["probability"] == _start(box).tolist()
    assert body["offsets"]["previous_label"] == [0, 0, 0]
    assert tina.get(f"/api/studies/{FOLLOW_UP}/assists/../manifest").status_code == 404
    assert tina.get(f"/api/studies/{FOLLOW_UP}/assists/presegmentation").status_code == 404


def _save(client, label, header=None):
    body = gzip.compress(nib.Nifti1Image(label.astype(np.uint8), AFFINE).to_bytes())
    headers = {"Content-Type": "application/octet-stream"}
    if header is not None:
        headers["X-Metsflow-Assists"] = header
    return client.post(
        f"/api/studies/{FOLLOW_UP}/save", params={"base_version": 0}, content=body, headers=headers
    )


def test_decisions_are_kept_with_the_saved_version(client, batch):
    tina, config = client
    label = batch["preseg"].copy()
    label[batch["suggestion_a"]] = labels.ENHANCING
    decisions = {"suggestions": {"1": "accepted", "2": "dismissed"}, "edits": {"deleted": 1}}
    answer = _save(tina, label, json.dumps(decisions))
    assert answer.status_code == 200, answer.text
    history = tina.get(f"/api/studies/{FOLLOW_UP}").json()["history"]
    assists = history[-1]["assists"]
    assert assists["suggestions"] == {"1": "accepted", "2": "dismissed"}
    assert assists["edits"] == {"deleted": 1}
    bins = assists["suggestions_by_size_bin"]
    assert sum(b["accepted"] for b in bins.values()) == 1
    assert sum(b["offered"] for b in bins.values()) == 2
    # `al status` sums them per round and size bin.
    selection = Layout(batch["results"]).selection(1)
    pd.DataFrame({"study_id": [FOLLOW_UP, "S01"]}).to_csv(selection, sep="\t", index=False)
    text = suggestion_status(batch["results"], config.label_store)
    rows = [line.split() for line in text.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1"] * len(bins)
    assert sum(int(r[3]) for r in rows) == 1 and sum(int(r[4]) for r in rows) == 1


def test_bad_decisions_are_refused_listing_every_problem(client, batch):
    tina, _ = client
    header = json.dumps({"suggestions": {"7": "accepted", "1": "maybe"}, "edits": {"x": 1}})
    answer = _save(tina, batch["preseg"], header)
    assert answer.status_code == 400
    detail = answer.json()["detail"]
    assert "'7': unknown id" in detail and "verdict 'maybe'" in detail and "'x'" in detail


def test_export_job_finds_the_registered_previous_study_and_its_best_label(tmp_path):
    """The follow-up's previous scan is the study it was registered to (registration manifest),
    its label the confirmed one when the store has it, else the model's (marked)."""
    from metsflow.cohort.sheet import Study
    from metsflow.jobs.active_learning import ReviewExport, review_assist_inputs

    layout = Layout(tmp_path / "results")
    index = {
        s: Study("P1", s, f"t{o}", o, None, tmp_path / f"{s}.nii.gz")
        for o, s in enumerate(["A", "B", "C"])
    }
    reg = layout.registered_dir("C")
    reg.mkdir(parents=True)
    (reg / "inverse_warp.nii.gz").write_bytes(b"")
    manifest = Path(layout.stage_manifest("registered"))
    manifest.parent.mkdir(parents=True, exist_ok=True)
    # B failed preprocessing: C was registered to A.
    pd.DataFrame({"study_id": ["A", "C"], "reference_study": ["", "A"]}).to_csv(
        manifest, sep="\t", index=False
    )
    prediction = layout.study_prediction(0, "A")
    prediction.parent.mkdir(parents=True)
    prediction.write_bytes(b"")
    job = ReviewExport(1, 0, "", [], "m", str(tmp_path / "out"), str(tmp_path / "labels"))
    inputs = review_assist_inputs(layout, job, index)
    assert inputs("A").previous is None
    previous = inputs("C").previous
    assert previous.study_id == "A" and previous.label_source == "model"
    assert previous.label == prediction and previous.reg_dir == reg
