"""Review server API (Starlette TestClient): security, roles, concurrency, provenance, queues."""

import gzip
import importlib.util
import io as _io
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from argon2 import PasswordHasher
from starlette.testclient import TestClient

from metsflow.active_learning.labelstore import LabelStore
from metsflow.cli import main as cli_main
from metsflow.core import io
from metsflow.review_server import db
from metsflow.review_server.app import create_app
from metsflow.review_server.assign import balanced_assignment
from metsflow.review_server.auth import COOKIE_NAME
from metsflow.review_server.config import ReviewConfig
from metsflow.review_server.dashboard import TSV_COLUMNS

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "bench_review_load", REPO / "benchmarks" / "bench_review_load.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_review_load"] = bench
_spec.loader.exec_module(bench)

SHAPE = (24, 24, 24)
UPLOAD = {"Content-Type": "application/octet-stream"}
PASSWORD = "correct horse battery"
USERS = {"alice": "trainee", "bob": "trainee", "nora": "neuroradiologist", "adam": "admin"}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A round-1 review package of 6 studies (patients of 3, 1 and 2 studies) and a template
    review database with the four accounts (argon2 hashing once, not per test)."""
    root = tmp_path_factory.mktemp("batch")
    selection = bench.write_review_batch(root / "results", 6, SHAPE, durable=False)
    template = root / "template.sqlite3"
    # Cheap argon2 parameters for the test accounts only: verification follows the parameters
    # stored in each hash, so logins take ~1 ms instead of ~0.5 s on a loaded 2-core machine.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db, "_HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        for name, role in USERS.items():
            db.add_user(template, name, PASSWORD, role)
    return root / "results", selection, template


@pytest.fixture
def server(batch, tmp_path):
    results, selection, template = batch
    config = ReviewConfig(results=results, label_store=tmp_path / "labels")
    shutil.copy(template, config.db_path)
    app = create_app(config)
    return app, config, selection


def _browser(app):
    """A client that, like the review pages in a browser, sends the server's own Origin."""
    return TestClient(app, headers={"Origin": "http://testserver"})


def _client(app, username=None):
    client = _browser(app)
    if username:
        answer = client.post("/api/login", json={"username": username, "password": PASSWORD})
        assert answer.status_code == 200, answer.text
        client.headers["X-CSRF-Token"] = answer.json()["csrf_token"]
    return client


def _nifti(data, affine=bench.AFFINE, compress=True, dtype=np.uint8):
    raw = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine).to_bytes()
    return gzip.compress(raw) if compress else raw


def _label(value=1):
    data = bench.presegmentation(SHAPE)
    data[0:2, 0:2, 0:2] = value
    return data


def _save(client, study_id, body, base_version=0, **params):
    return client.post(
        f"/api/studies/{study_id}/save",
        params={"base_version": base_version, **params},
        content=body,
        headers=UPLOAD,
    )


def _assign_all(app, username="alice"):
    admin = _client(app, "adam")
    for patient in ("P001", "P002", "P003"):
        answer = admin.post("/api/assign", json={"patient_id": patient, "username": username})
        assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------------- authentication


def test_anonymous_gets_401_on_api_and_redirect_on_pages(server):
    app, _, _ = server
    client = _client(app)
    for path in (
        "/api/me",
        "/api/queue",
        "/api/studies/S0001",
        "/api/studies/S0001/image/t1c",
        "/api/studies/S0001/label",
        "/api/studies/S0001/presegmentation",
        "/api/dashboard",
        "/api/dashboard.tsv",
    ):
        assert client.get(path).status_code == 401, path
    assert _save(client, "S0001", _nifti(_label())).status_code == 401
    assert client.post("/api/studies/S0001/confirm", json={"base_version": 0}).status_code == 401
    for page in ("/", "/study/S0001"):
        answer = client.get(page, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")


def test_login_sets_hardened_cookie_and_regenerates_the_session_id(server):
    app, _, _ = server
    client = _browser(app)
    client.cookies.set(COOKIE_NAME, "attacker-chosen-id", domain="testserver.local")
    answer = client.post("/api/login", json={"username": "alice", "password": PASSWORD})
    assert answer.status_code == 200 and answer.json()["role"] == "trainee"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=") and "attacker-chosen-id" not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie
    first = client.cookies.get(COOKIE_NAME)
    assert first != "attacker-chosen-id" and len(first) >= 32
    # logging in again from the same browser gives a new id and kills the old one
    client.post("/api/login", json={"username": "alice", "password": PASSWORD})
    second = client.cookies.get(COOKIE_NAME)
    assert second != first
    stale = _browser(app)
    stale.cookies.set(COOKIE_NAME, first, domain="testserver.local")
    assert stale.get("/api/me").status_code == 401
    # a fixed id planted before login never becomes a session
    planted = _browser(app)
    planted.cookies.set(COOKIE_NAME, "attacker-chosen-id", domain="testserver.local")
    assert planted.get("/api/me").status_code == 401


def test_secure_cookie_flag_is_configurable(batch, tmp_path):
    results, _, template = batch
    config = ReviewConfig(results=results, label_store=tmp_path / "labels", secure_cookies=True)
    shutil.copy(template, config.db_path)
    # Secure cookies mean HTTPS: the server then takes POSTs from an https Origin only.
    app = create_app(config)
    login = {"json": {"username": "alice", "password": PASSWORD}}
    assert _browser(app).post("/api/login", **login).status_code == 403
    https = "https://testserver"
    client = TestClient(app, base_url=https, headers={"Origin": https})
    answer = client.post("/api/login", **login)
    assert "Secure" in answer.headers["set-cookie"]


def test_wrong_password_is_401_and_repeated_failures_are_throttled_429(server):
    app, _, _ = server
    client = _browser(app)
    for _ in range(db.LOGIN_FAILURES_ALLOWED):
        answer = client.post("/api/login", json={"username": "alice", "password": "wrong-pass"})
        assert answer.status_code == 401
    # locked for the window even with the right password; other users are not affected
    answer = client.post("/api/login", json={"username": "alice", "password": PASSWORD})
    assert answer.status_code == 429 and "too many failed logins" in answer.json()["detail"]
    assert (
        client.post("/api/login", json={"username": "bob", "password": PASSWORD}).status_code == 200
    )
    unknown = client.post("/api/login", json={"username": "nobody", "password": PASSWORD})
    assert unknown.status_code == 401


def test_state_changing_requests_without_csrf_token_are_403(server):
    app, _, _ = server
    _assign_all(app)
    client = _client(app, "alice")
    token = client.headers.pop("X-CSRF-Token")
    assert client.post("/api/studies/S0001/open", json={}).status_code == 403
    assert _save(client, "S0001", _nifti(_label())).status_code == 403
    assert client.post("/api/logout", json={}).status_code == 403
    client.headers["X-CSRF-Token"] = token[:-2] + "xx"
    answer = client.post("/api/studies/S0001/open", json={})
    assert answer.status_code == 403 and "CSRF" in answer.json()["detail"]
    client.headers["X-CSRF-Token"] = token
    assert client.post("/api/studies/S0001/open", json={}).status_code == 200
    assert LabelStore(app.state.review.config.label_store).versions("S0001") == []


def test_logout_ends_the_session(server):
    app, _, _ = server
    client = _client(app, "nora")
    assert client.post("/api/logout", json={}).status_code == 200
    assert client.get("/api/me").status_code == 401


# ---------------------------------------------------------------------- roles


def test_trainee_cannot_confirm_send_back_assign_or_see_the_dashboard(server):
    app, _, _ = server
    _assign_all(app)
    client = _client(app, "alice")
    assert _save(client, "S0001", _nifti(_label())).status_code == 200
    answer = _save(client, "S0001", _nifti(_label()), base_version=1, confirm=1)
    assert answer.status_code == 403 and "neuroradiologist" in answer.json()["detail"]
    assert client.post("/api/studies/S0001/confirm", json={"base_version": 1}).status_code == 403
    assert client.post("/api/studies/S0001/send_back", json={"comment": "x"}).status_code == 403
    assert (
        client.post("/api/assign", json={"study_id": "S0001", "username": "alice"}).status_code
        == 403
    )
    assert client.get("/api/dashboard").status_code == 403
    store = LabelStore(app.state.review.config.label_store)
    assert [v["stage"] for v in store.versions("S0001")] == ["refined"]


def test_trainee_only_sees_and_edits_studies_assigned_to_them(server):
    app, _, _ = server
    _assign_all(app, "bob")
    client = _client(app, "alice")
    assert client.get("/api/queue").json()["items"] == []
    assert client.get("/api/studies/S0001").status_code == 403
    assert client.get("/api/studies/S0001/image/t1c").status_code == 403
    assert _save(client, "S0001", _nifti(_label())).status_code == 403
    assert LabelStore(app.state.review.config.label_store).versions("S0001") == []


def test_the_editor_downloads_the_int16_view_copy_of_a_float_image(server):
    app, _, _ = server
    _assign_all(app, "alice")
    client = _client(app, "alice")
    entry = app.state.review.entry("S0001")
    view = entry.folder / "view_t1c.nii.gz"
    assert nib.load(str(entry.t1c)).get_data_dtype() == np.float32  # the package's copy
    assert nib.load(str(view)).get_data_dtype() == np.int16
    answer = client.get("/api/studies/S0001/image/t1c")
    assert answer.status_code == 200 and answer.content == view.read_bytes()


def test_admin_override_needs_a_reason_and_makes_a_new_version(server):
    app, config, _ = server
    _assign_all(app)
    _save(_client(app, "alice"), "S0001", _nifti(_label()))
    nora = _client(app, "nora")
    assert nora.post("/api/studies/S0001/confirm", json={"base_version": 1}).status_code == 200
    admin = _client(app, "adam")
    body = _nifti(_label(3))
    assert (
        admin.post("/api/studies/S0001/override", content=body, headers=UPLOAD).status_code == 400
    )
    blank = admin.post(
        "/api/studies/S0001/override", params={"reason": "  "}, content=body, headers=UPLOAD
    )
    assert blank.status_code == 400 and "reason" in blank.json()["detail"]
    assert _save(admin, "S0001", body, base_version=2).status_code == 403
    assert (
        nora.post(
            "/api/studies/S0001/override", params={"reason": "x"}, content=body, headers=UPLOAD
        ).status_code
        == 403
    )
    answer = admin.post(
        "/api/studies/S0001/override",
        params={"reason": "missed necrosis"},
        content=body,
        headers=UPLOAD,
    )
    assert answer.status_code == 200 and answer.json() == {"version": 3, "stage": "confirmed"}
    record = LabelStore(config.label_store).history("S0001")[-1]
    assert record["override"] is True and record["reason"] == "missed necrosis"
    assert record["reviewer"] == "adam" and record["via"] == "web"


# ---------------------------------------------------------------------- bad input


def test_unknown_or_traversal_study_ids_are_404(server):
    app, _, _ = server
    client = _client(app, "adam")
    for path in (
        "/api/studies/S9999",
        "/api/studies/..",
        "/api/studies/..%2F..%2Fetc%2Fpasswd",
        "/api/studies/S0001%2F..%2FS0002",
        "/api/studies/..%2Flabels/label",
        "/api/studies/S0001/image/..%2Fmanifest.csv",
        "/api/studies/S0001/image/seg",
        "/study/S9999",
        "/study/..%2F..%2Fetc",
    ):
        assert client.get(path).status_code == 404, path
    nora = _client(app, "nora")
    assert _save(nora, "..", _nifti(_label())).status_code == 404
    assert _save(nora, "S0001%2F..%2F..%2Fx", _nifti(_label())).status_code == 404
    assert _save(nora, "S9999", _nifti(_label())).status_code == 404


def test_upload_that_is_not_nifti_is_400(server):
    app, config, _ = server
    nora = _client(app, "nora")
    for body in (b"hello, this is not an image" * 40, gzip.compress(b"\0" * 2000), b"\x1f\x8bxx"):
        answer = _save(nora, "S0001", body)
        assert answer.status_code == 400 and "not a NIfTI" in answer.json()["detail"], answer.text
    assert _save(nora, "S0001", b"").status_code == 400
    assert LabelStore(config.label_store).versions("S0001") == []


def test_upload_on_the_wrong_grid_is_400_naming_the_shapes(server):
    app, config, _ = server
    nora = _client(app, "nora")
    answer = _save(nora, "S0001", _nifti(np.zeros((24, 24, 20))))
    assert answer.status_code == 400
    assert "grid mismatch" in answer.json()["detail"] and "(24, 24, 20)" in answer.json()["detail"]
    shifted = bench.AFFINE.copy()
    shifted[0, 3] = 5.0
    answer = _save(nora, "S0001", _nifti(_label(), affine=shifted))
    assert answer.status_code == 400 and "affine" in answer.json()["detail"]
    answer = _save(nora, "S0001", _nifti(np.zeros((24, 24, 24, 2))))
    assert answer.status_code == 400 and "3D" in answer.json()["detail"]
    assert LabelStore(config.label_store).versions("S0001") == []


def test_upload_with_values_outside_internal_labels_is_400(server):
    app, config, _ = server
    nora = _client(app, "nora")
    bad = _label()
    bad[5, 5, 5] = 7
    answer = _save(nora, "S0001", _nifti(bad))
    assert answer.status_code == 400 and "{7}" in answer.json()["detail"]
    fractional = _label().astype(np.float32)
    fractional[5, 5, 5] = 1.5
    answer = _save(nora, "S0001", _nifti(fractional, dtype=np.float32))
    assert answer.status_code == 400 and "1.5" in answer.json()["detail"]
    assert LabelStore(config.label_store).versions("S0001") == []
    # uncompressed and float32 uploads with internal values are fine
    ok = _save(nora, "S0001", _nifti(_label().astype(np.float32), compress=False, dtype=np.float32))
    assert ok.status_code == 200, ok.text


def test_upload_larger_than_the_volume_is_413_without_reading_it(server):
    app, config, _ = server
    nora = _client(app, "nora")
    limit = 24**3 * 4 + 64 * 1024
    answer = _save(nora, "S0001", b"\0" * (limit + 1))
    assert answer.status_code == 413 and "larger than a label" in answer.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(limit // 4096 + 2):
            yield b"\0" * 4096

    streamed = nora.post(
        "/api/studies/S0001/save", params={"base_version": 0}, content=chunks(), headers=UPLOAD
    )
    assert streamed.status_code == 413
    # a small gzip whose header claims a huge volume is refused from the header alone
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.uint8)
    bomb = gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 100_000)
    answer = _save(nora, "S0001", bomb)
    assert answer.status_code == 400 and "(2000, 2000, 2000)" in answer.json()["detail"]
    assert LabelStore(config.label_store).versions("S0001") == []


# ---------------------------------------------------------------------- concurrency


def test_stale_save_is_409_naming_who_saved_in_between(server):
    app, config, _ = server
    _assign_all(app)
    alice, nora = _client(app, "alice"), _client(app, "nora")
    assert alice.get("/api/studies/S0001").json()["latest_version"] == 0
    assert nora.get("/api/studies/S0001").json()["latest_version"] == 0
    assert _save(alice, "S0001", _nifti(_label(1))).json() == {"version": 1, "stage": "refined"}
    answer = _save(nora, "S0001", _nifti(_label(2)), base_version=0, confirm=1)
    assert answer.status_code == 409
    body = answer.json()
    assert body["saved_by"] == ["alice"] and body["version"] == 1
    assert "alice" in body["detail"]
    assert _save(alice, "S0001", _nifti(_label(2)), base_version=1).status_code == 200
    assert _save(alice, "S0001", b"x", base_version="one").status_code == 400
    assert [v["version"] for v in LabelStore(config.label_store).versions("S0001")] == [1, 2]


def test_confirmed_label_is_read_only_for_everyone(server):
    app, config, _ = server
    _assign_all(app)
    alice, nora = _client(app, "alice"), _client(app, "nora")
    _save(alice, "S0002", _nifti(_label()))
    assert nora.post("/api/studies/S0002/confirm", json={"base_version": 1}).status_code == 200
    for client, params in ((alice, {}), (nora, {}), (nora, {"confirm": 1})):
        answer = _save(client, "S0002", _nifti(_label(3)), base_version=2, **params)
        assert answer.status_code == 409 and answer.json()["confirmed"] is True
    again = nora.post("/api/studies/S0002/confirm", json={"base_version": 2})
    assert again.status_code == 409
    assert nora.post("/api/studies/S0002/send_back", json={"comment": "redo"}).status_code == 409
    detail = alice.get("/api/studies/S0002").json()
    assert detail["status"] == "confirmed" and not detail["can_edit"]
    stages = [v["stage"] for v in LabelStore(config.label_store).versions("S0002")]
    assert stages == ["refined", "confirmed"]


# ---------------------------------------------------------------------- the workflow


def test_refine_send_back_refine_confirm_flow_with_provenance(server):
    app, config, _ = server
    admin = _client(app, "adam")
    assert admin.post("/api/assign/auto", json={}).json()["assigned"] == {"alice": 3, "bob": 3}
    alice = _client(app, "alice")
    mine = [i["study_id"] for i in alice.get("/api/queue").json()["items"]]
    study_id = mine[0]
    detail = alice.get(f"/api/studies/{study_id}").json()
    assert detail["can_edit"] and not detail["can_confirm"] and detail["save_stage"] == "refined"
    assert detail["label_url"].endswith("/presegmentation") and set(detail["images"]) == {
        "t1c",
        "flair",
    }
    t1c = alice.get(detail["images"]["t1c"])
    assert t1c.status_code == 200 and t1c.headers["content-type"] == "application/gzip"
    assert nib.Nifti1Image.from_bytes(gzip.decompress(t1c.content)).shape == SHAPE

    assert alice.post(f"/api/studies/{study_id}/open", json={}).status_code == 200
    assert _save(alice, study_id, _nifti(_label(1))).json() == {"version": 1, "stage": "refined"}
    nora = _client(app, "nora")
    queue = nora.get("/api/queue").json()["items"]
    assert [i["study_id"] for i in queue] == [study_id] and queue[0]["status"] == "refined"
    answer = nora.post(f"/api/studies/{study_id}/send_back", json={"comment": "edema missed at L"})
    assert answer.status_code == 200
    item = next(i for i in alice.get("/api/queue").json()["items"] if i["study_id"] == study_id)
    assert item["status"] == "sent_back" and item["comment"] == "edema missed at L"
    alice.post(f"/api/studies/{study_id}/open", json={})
    assert _save(alice, study_id, _nifti(_label(2)), base_version=1).json()["version"] == 2
    nora.post(f"/api/studies/{study_id}/open", json={})
    detail = nora.get(f"/api/studies/{study_id}").json()
    assert detail["can_confirm"] and detail["status"] == "refined" and detail["latest_version"] == 2
    assert detail["comments"][0]["author"] == "nora"
    answer = nora.post(f"/api/studies/{study_id}/confirm", json={"base_version": 2})
    assert answer.json() == {"version": 3, "stage": "confirmed"}

    store = LabelStore(config.label_store)
    history = store.history(study_id)
    assert [(r["stage"], r["reviewer"], r["via"]) for r in history] == [
        ("refined", "alice", "web"),
        ("refined", "alice", "web"),
        ("confirmed", "nora", "web"),
    ]
    assert all(isinstance(r["review_seconds"], float) and r["review_seconds"] >= 0 for r in history)
    assert history[0]["source"].endswith("round_0/model/model.pt/round_1")
    confirmed = np.asanyarray(nib.load(str(store.confirmed(study_id))).dataobj)
    assert np.array_equal(confirmed, _label(2))
    # The edit from the pre-segmentation is logged after each save has answered.
    app.state.review.wait_deferred()
    with db.connect(config.db_path) as con:
        edits = {e["version"]: e["detail"] for e in db.events(con, ("edit",))}
    assert sorted(edits) == [1, 2, 3]
    assert edits[1]["voxels_changed"] == 8 and edits[1]["changed_enhancing"] == 8
    assert edits[3]["changed_edema"] == 8 and edits[3]["lesions_added"] == 0
    assert "8 voxels changed" in edits[3]["summary"]
    served = nora.get(f"/api/studies/{study_id}/label")
    assert np.array_equal(
        np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(served.content)).dataobj),
        _label(2),
    )


def test_assignment_is_balanced_and_keeps_patients_together(server):
    studies = [(f"S{i}", f"P{i // 3}") for i in range(10)] + [("X1", "Q"), ("X2", "Q")]
    result = balanced_assignment(studies, ["t1", "t2", "t3"])
    patients = {}
    for study_id, patient in studies:
        patients.setdefault(patient, set()).add(result[study_id])
    assert all(len(owners) == 1 for owners in patients.values())
    loads = [list(result.values()).count(t) for t in ("t1", "t2", "t3")]
    assert max(loads) - min(loads) <= 3 and sum(loads) == 12
    # new studies of an assigned patient stay with that trainee; existing ones never move
    later = balanced_assignment(studies + [("S10", "P0")], ["t1", "t2", "t3"], result)
    assert later == {"S10": result["S0"]}

    app, _, _ = server
    admin = _client(app, "adam")
    admin.post("/api/assign/auto", json={})
    answer = admin.post("/api/assign", json={"patient_id": "P001", "username": "bob"})
    assert answer.json()["assigned"] == ["S0001", "S0002", "S0003"]
    items = _client(app, "bob").get("/api/queue").json()["items"]
    assert {"S0001", "S0002", "S0003"} <= {i["study_id"] for i in items}
    refused = admin.post("/api/assign", json={"patient_id": "P001", "username": "nora"})
    assert refused.status_code == 400 and "not a trainee" in refused.json()["detail"]


def test_lesion_list_largest_first_with_uncertain_flags(server, batch):
    app, _, _ = server
    client = _client(app, "adam")
    detail = client.get("/api/studies/S0001").json()
    lesions = detail["lesions"]
    assert [lesion["id"] for lesion in lesions] == [1, 2]
    big, small = lesions
    assert big["voxels"] > small["voxels"] == 8
    assert big["label"] == 2 and small["label"] == 1  # edema outweighs the enhancing core
    assert small["volume_ml"] == pytest.approx(8 * 1.2 / 1000)
    assert small["centroid_vox"] == [21.5, 21.5, 21.5]
    assert small["centroid_mm"] == pytest.approx([21.5, 21.5, 25.8])
    # no fg_prob map: the size rule flags the small lesion only
    assert detail["uncertainty_source"] == "size_rule"
    assert small["uncertain"] and not big["uncertain"]

    # with the model's probability map: confident core, p = 0.5 on the small lesion
    results = batch[0]
    prob = np.where(bench.presegmentation(SHAPE) > 0, 0.99, 0.0).astype(np.float32)
    prob[20:, 20:, 20:] = 0.5
    target = results / "rounds" / "round_0" / "predictions" / "S0002" / "fg_prob.nii.gz"
    io.save_nifti(target, prob, bench.AFFINE, dtype=np.float32)
    try:
        detail = client.get("/api/studies/S0002").json()
    finally:
        target.unlink()
    assert detail["uncertainty_source"] == "fg_prob"
    big, small = detail["lesions"]
    assert small["uncertain"] and small["mean_entropy"] == pytest.approx(1.0)
    assert not big["uncertain"] and big["mean_entropy"] < 0.1


def test_dashboard_and_review_times_tsv(server):
    app, _, _ = server
    _assign_all(app)
    alice, nora = _client(app, "alice"), _client(app, "nora")
    for study_id in ("S0001", "S0002"):
        alice.post(f"/api/studies/{study_id}/open", json={})
        _save(alice, study_id, _nifti(_label()))
    nora.post("/api/studies/S0001/open", json={})
    nora.post("/api/studies/S0001/confirm", json={"base_version": 1})
    admin = _client(app, "adam")
    data = admin.get("/api/dashboard").json()
    assert data["round"] == 1
    assert data["totals"] == {
        "pending": 4,
        "refined": 1,
        "sent_back": 0,
        "confirmed": 1,
        "total": 6,
    }
    people = {r["username"]: r for r in data["reviewers"]}
    assert people["alice"]["refined"] == 2 and people["alice"]["assigned"] == 6
    assert people["nora"]["confirmed"] == 1 and people["alice"]["median_seconds"] is not None
    (round_1,) = data["rounds"]
    assert round_1["round"] == "1" and (round_1["refined"], round_1["confirmed"]) == (2, 1)
    tsv = admin.get("/api/dashboard.tsv")
    assert tsv.headers["content-type"].startswith("text/tab-separated-values")
    lines = tsv.text.splitlines()
    assert lines[0].split("\t") == TSV_COLUMNS
    rows = [dict(zip(TSV_COLUMNS, line.split("\t"), strict=True)) for line in lines[1:]]
    assert [(r["study_id"], r["reviewer"], r["stage"]) for r in rows] == [
        ("S0001", "alice", "refined"),
        ("S0002", "alice", "refined"),
        ("S0001", "nora", "confirmed"),
    ]
    assert all(float(r["review_seconds"]) >= 0 and r["opened_at"] for r in rows)
    assert {r["round"] for r in rows} == {"1"} and rows[0]["patient_id"] == "P001"


def test_al_status_reports_web_review_progress(server, batch, capsys):
    app, config, _ = server
    _assign_all(app)
    alice = _client(app, "alice")
    alice.post("/api/studies/S0001/open", json={})
    _save(alice, "S0001", _nifti(_label()))
    _client(app, "nora").post("/api/studies/S0003/send_back", json={"comment": "look again"})
    args = ["al", "status", "--results", str(batch[0]), "--labels", str(config.label_store)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "web review: 6 studies assigned to 1 trainees, 1 sent back; 1 refined and 0 " in out
    assert "median review time" in out


def test_cli_user_add_list_assign_and_export_times(batch, tmp_path, monkeypatch, capsys):
    results = batch[0]
    labels = tmp_path / "labels"
    common = ["--results", str(results), "--labels", str(labels), "--sheet", ""]
    monkeypatch.setattr(sys, "stdin", _io.StringIO("a-long-password\n"))
    assert cli_main(["review", "user", "add", "tina", "--role", "trainee", *common]) == 0
    monkeypatch.setattr(sys, "stdin", _io.StringIO("short\n"))
    assert cli_main(["review", "user", "add", "tom", "--role", "trainee", *common]) == 2
    assert "at least 8 characters" in capsys.readouterr().err
    assert cli_main(["review", "user", "list", *common]) == 0
    assert "tina\ttrainee" in capsys.readouterr().out
    assert cli_main(["review", "assign", *common]) == 0
    assert "6 unassigned studies assigned: tina 6" in capsys.readouterr().out
    assert cli_main(["review", "assign", "--to", "nobody", "--study", "S0001", *common]) == 2
    out = tmp_path / "times.tsv"
    assert cli_main(["review", "export-times", "--out", str(out), *common]) == 0
    assert out.read_text().splitlines() == ["\t".join(TSV_COLUMNS)]
    # the database sits beside the label store folder, not in it
    assert (tmp_path / "labels.review.sqlite3").is_file()
    assert not list(labels.glob("*.sqlite3"))


def test_catalog_serves_the_newest_round_and_the_final_qa_sample(tmp_path):
    from metsflow.review_server.catalog import Catalog

    results = tmp_path / "results"
    bench.write_review_batch(results, 1, 8, round_index=1, durable=False)
    bench.write_review_batch(results, 2, 8, round_index=2, durable=False)
    other = tmp_path / "other"
    bench.write_review_batch(other, 3, 8, round_index=4, durable=False)
    (results / "final").mkdir()
    (other / "rounds" / "round_4" / "review").rename(results / "final" / "qa_review")
    catalog = Catalog(results)
    studies = catalog.studies()
    assert catalog.round == 2 and catalog.batch_names() == ["round_2", "final"]
    assert {s: e.batch for s, e in studies.items()} == {
        "S0001": "round_2",  # in both: the round's batch wins
        "S0002": "round_2",
        "S0003": "final",
    }
    assert studies["S0003"].round == 4 and set(studies["S0003"].images) == {"t1c", "flair"}
    assert Catalog(results, round_index=1).studies().keys() == {"S0001", "S0002", "S0003"}
    assert Catalog(results, round_index=1).get("S0001").batch == "round_1"
