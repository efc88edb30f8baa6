import gzip
import hashlib
import stat
import threading

import nibabel as nib
import numpy as np
import pytest

from metsflow.active_learning import labelstore
from metsflow.active_learning.labelstore import LabelImportError, LabelStore
from metsflow.core import io
from metsflow.core.io import LabelStoreWriteError, guard_not_in_store

AFFINE = np.array(
    [[1.0, 0, 0, -4.0], [0, 1.0, 0, -5.0], [0, 0, 1.2, 3.0], [0, 0, 0, 1]], dtype=float
)
SHAPE = (8, 8, 6)


def _label(value=1, seed=0):
    rng = np.random.default_rng(seed)
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[2:5, 2:5, 1:4] = value
    data[rng.integers(0, 8), rng.integers(0, 8), 5] = 2
    return data


@pytest.fixture
def study(tmp_path):
    reference = tmp_path / "in" / "t1c.nii.gz"
    io.save_nifti(reference, np.random.default_rng(0).random(SHAPE), AFFINE, dtype=np.float32)
    return reference


def _write(tmp_path, name, data, affine=AFFINE, dtype=np.uint8):
    path = tmp_path / "in" / name
    io.save_nifti(path, data, affine, dtype=dtype)
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_refine_then_confirm_with_provenance_and_read_only_file(tmp_path, study):
    store = LabelStore(tmp_path / "labels", known_studies=["S1", "S2"])
    assert store.status("S1") == "none" and store.confirmed("S1") is None
    refined = _write(tmp_path, "refined.nii.gz", _label(1))
    v1 = store.import_label("S1", refined, "refined", "trainee A", study, source="model_r0/round_1")
    assert v1 == 1 and store.status("S1") == "refined"
    assert store.confirmed("S1") is None
    assert store.latest("S1").name == "v001_refined.nii.gz"

    confirmed = _write(tmp_path, "confirmed.nii.gz", _label(3))
    v2 = store.import_label("S1", confirmed, "confirmed", "Dr B", nib.load(str(study)))
    assert v2 == 2 and store.status("S1") == "confirmed"
    path = store.confirmed("S1")
    assert path.name == "v002_confirmed.nii.gz" and store.latest("S1") == path
    assert store.all_confirmed() == {"S1": path}

    stored = nib.load(str(path))
    np.testing.assert_array_equal(np.asanyarray(stored.dataobj), _label(3))
    assert stored.get_data_dtype() == np.uint8
    np.testing.assert_allclose(stored.affine, AFFINE)
    assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0  # no write bit for anyone

    history = store.history("S1")
    assert [(h["version"], h["stage"], h["reviewer"]) for h in history] == [
        (1, "refined", "trainee A"),
        (2, "confirmed", "Dr B"),
    ]
    assert history[0]["source"] == "model_r0/round_1"
    assert history[1]["sha256"] == _sha(path)
    assert history[1]["submitted_sha256"] == _sha(confirmed)
    assert history[1]["timestamp"] and history[1]["override"] is False


def test_a_label_in_the_stores_form_is_kept_byte_for_byte_any_other_is_normalised(tmp_path, study):
    store = LabelStore(tmp_path / "labels")
    # What the editor sends (the T1c's header with uint8 voxels, gzip) and the store's own
    # versions: stored as they are.
    header = nib.load(str(study)).header.copy()
    header.set_data_dtype(np.uint8)
    as_sent = tmp_path / "in" / "as_sent.nii.gz"
    sent = nib.Nifti1Image(_label(1), None, header).to_bytes()
    as_sent.write_bytes(gzip.compress(sent, compresslevel=1))  # not how nibabel compresses
    # Any other form is re-encoded: int16, uncompressed, no qform, scaled voxels (1 stored as 2).
    int16 = _write(tmp_path, "int16.nii.gz", _label(1), dtype=np.int16)
    plain = _write(tmp_path, "plain.nii", _label(1))
    no_qform = tmp_path / "in" / "no_qform.nii.gz"
    nib.save(nib.Nifti1Image(_label(1), AFFINE), no_qform)  # sform code 2, qform code 0
    ones = (_label(1) > 0).astype(np.uint8)
    scaled = nib.Nifti1Image(ones, AFFINE)
    scaled.set_qform(AFFINE, code=1)
    raw = bytearray(scaled.to_bytes())
    raw[112:116] = np.float32(2.0).tobytes()  # scl_slope (nibabel resets it when saving)
    (tmp_path / "in" / "scaled.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    cases = {
        "S1": (as_sent, True, _label(1)),
        "S2": (int16, False, _label(1)),
        "S3": (plain, False, _label(1)),
        "S4": (no_qform, False, _label(1)),
        "S5": (tmp_path / "in" / "scaled.nii.gz", False, ones * 2),
    }
    for study_id, (path, kept, expected) in cases.items():
        store.import_label(study_id, path, "refined", "A", study)
        record = store.history(study_id)[-1]
        assert (record["sha256"] == record["submitted_sha256"]) is kept, study_id
        stored = nib.load(str(store.latest(study_id)))
        assert stored.get_data_dtype() == np.uint8 and stored.shape == SHAPE
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), expected)
        assert stored.header["sform_code"] > 0 and stored.header["qform_code"] > 0
        np.testing.assert_allclose(stored.header.get_qform(), AFFINE, atol=1e-5)
        np.testing.assert_array_equal(stored.affine, nib.load(str(study)).affine)
    # A version confirmed unchanged (the server's confirm) is copied, not re-encoded.
    store.import_label("S1", store.latest("S1"), "confirmed", "Dr B", study)
    assert _sha(store.latest("S1")) == store.history("S1")[0]["sha256"]


def test_confirmed_label_cannot_be_replaced_but_override_adds_a_version(tmp_path, study):
    store = LabelStore(tmp_path / "labels")
    store.import_label("S1", _write(tmp_path, "a.nii.gz", _label(1)), "confirmed", "Dr B", study)
    first = store.confirmed("S1")
    first_sha = _sha(first)
    other = _write(tmp_path, "b.nii.gz", _label(3))
    for stage in ("refined", "confirmed"):
        with pytest.raises(LabelImportError, match="already has a confirmed label"):
            store.import_label("S1", other, stage, "Dr C", study)
    with pytest.raises(LabelImportError, match="reason"):
        store.import_label("S1", other, "confirmed", "Dr C", study, override=True)
    assert [v["version"] for v in store.versions("S1")] == [1]

    v2 = store.import_label(
        "S1", other, "confirmed", "Dr C", study, override=True, reason="missed necrosis"
    )
    assert v2 == 2
    assert store.confirmed("S1").name == "v002_confirmed.nii.gz"
    assert first.exists() and _sha(first) == first_sha  # the old version is kept, unchanged
    assert store.history("S1")[-1]["reason"] == "missed necrosis"
    assert store.history("S1")[-1]["override"] is True


@pytest.mark.parametrize(
    ("data", "affine", "dtype", "match"),
    [
        (np.zeros((8, 8, 5)), AFFINE, np.uint8, "shape"),
        (_label(1), AFFINE + np.diag([0, 0, 0.01, 0]), np.uint8, "affine"),
        (_label(1) * 4, AFFINE, np.uint8, "values"),
        (_label(1) * 1.5, AFFINE, np.float32, "values"),
    ],
    ids=["shape", "affine", "value_4", "fractional"],
)
def test_bad_labels_rejected_and_nothing_stored(tmp_path, study, data, affine, dtype, match):
    store = LabelStore(tmp_path / "labels")
    bad = _write(tmp_path, "bad.nii.gz", data, affine=affine, dtype=dtype)
    with pytest.raises(LabelImportError, match=match) as error:
        store.import_label("S1", bad, "refined", "trainee A", study)
    assert error.value.study_id == "S1" and "S1" in str(error.value)
    assert store.versions("S1") == [] and store.history("S1") == []


def test_tiny_affine_difference_and_float_labels_accepted(tmp_path, study):
    store = LabelStore(tmp_path / "labels")
    data = _label(2).astype(np.float32)
    path = _write(tmp_path, "f.nii.gz", data, affine=AFFINE + 1e-4, dtype=np.float32)
    assert store.import_label("S1", path, "refined", "trainee A", study) == 1
    stored = nib.load(str(store.latest("S1")))
    assert stored.get_data_dtype() == np.uint8
    np.testing.assert_allclose(stored.affine, AFFINE)  # stored on the reference grid


def test_request_errors(tmp_path, study):
    store = LabelStore(tmp_path / "labels", known_studies=["S1"])
    good = _write(tmp_path, "g.nii.gz", _label(1))
    with pytest.raises(LabelImportError, match="unknown study"):
        store.import_label("S9", good, "refined", "trainee A", study)
    with pytest.raises(LabelImportError, match="reviewer"):
        store.import_label("S1", good, "refined", "  ", study)
    with pytest.raises(LabelImportError, match="stage"):
        store.import_label("S1", good, "approved", "trainee A", study)
    with pytest.raises(LabelImportError, match="missing"):
        store.import_label("S1", tmp_path / "nope.nii.gz", "refined", "trainee A", study)
    with pytest.raises(LabelImportError, match="folder name"):
        LabelStore(tmp_path / "x").import_label("../S1", good, "refined", "trainee A", study)
    assert store.studies() == []


def test_stale_version_number_never_collides(tmp_path, study, monkeypatch):
    """An importer that computed its version before another claimed it gets the next one."""
    store = LabelStore(tmp_path / "labels")
    store.import_label("S1", _write(tmp_path, "a.nii.gz", _label(1)), "refined", "A", study)
    original = store.versions("S1")[0]["path"]
    original_sha = _sha(original)

    calls = []
    real_next = LabelStore._next_version

    def stale_then_real(self, folder):
        calls.append(1)
        return 1 if len(calls) == 1 else real_next(self, folder)

    monkeypatch.setattr(LabelStore, "_next_version", stale_then_real)
    version = store.import_label(
        "S1", _write(tmp_path, "b.nii.gz", _label(3)), "confirmed", "B", study
    )
    assert version == 2 and len(calls) == 2
    assert _sha(original) == original_sha
    assert [v["version"] for v in store.versions("S1")] == [1, 2]


def test_concurrent_importers_get_distinct_versions(tmp_path, study):
    store = LabelStore(tmp_path / "labels")
    paths = [_write(tmp_path, f"c{i}.nii.gz", _label(1, seed=i)) for i in range(4)]
    versions, errors = [], []

    def work(path):
        try:
            versions.append(
                LabelStore(tmp_path / "labels").import_label("S1", path, "refined", "A", study)
            )
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(versions) == [1, 2, 3, 4]
    assert len(store.history("S1")) == 4
    assert sorted(h["submitted_sha256"] for h in store.history("S1")) == sorted(
        _sha(p) for p in paths
    )


def test_foreign_file_is_not_overwritten(tmp_path, study):
    store = LabelStore(tmp_path / "labels")
    folder = tmp_path / "labels" / "S1"
    folder.mkdir(parents=True)
    (folder / "v001_confirmed.nii.gz").write_bytes(b"hand-copied")
    # A hand-copied file counts as a confirmed version: the store refuses to add to it...
    with pytest.raises(LabelImportError, match="confirmed"):
        store.import_label("S1", _write(tmp_path, "a.nii.gz", _label(1)), "refined", "A", study)
    version = store.import_label(
        "S1",
        _write(tmp_path, "a.nii.gz", _label(1)),
        "confirmed",
        "B",
        study,
        override=True,
        reason="replace hand-copied file",
    )
    # ...and never reuses its name.
    assert version == 2
    assert (folder / "v001_confirmed.nii.gz").read_bytes() == b"hand-copied"


def test_guard_and_torn_history_line(tmp_path, study):
    store = LabelStore(tmp_path / "labels")
    with pytest.raises(LabelStoreWriteError):
        guard_not_in_store(tmp_path / "labels" / "S1" / "pred.nii.gz")
    guard_not_in_store(tmp_path / "results" / "pred.nii.gz")  # outside: fine
    assert store.contains(tmp_path / "labels" / "S1") and not store.contains(tmp_path / "results")

    store.import_label("S1", _write(tmp_path, "a.nii.gz", _label(1)), "refined", "A", study)
    history = tmp_path / "labels" / "S1" / labelstore.HISTORY_NAME
    with open(history, "a") as handle:
        handle.write('{"version": 2, "sta')  # a crash in mid-append
    with pytest.warns(UserWarning, match="torn"):
        assert [h["version"] for h in store.history("S1")] == [1]
    # The next import starts a fresh line: its record is intact.
    store.import_label("S1", _write(tmp_path, "b.nii.gz", _label(2)), "refined", "A", study)
    with pytest.warns(UserWarning, match="torn"):
        assert [h["version"] for h in store.history("S1")] == [1, 2]
