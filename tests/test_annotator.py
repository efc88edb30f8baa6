import hashlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from metsflow.active_learning.annotator import AnnotatorNoise, apply_noise, simulate_batch
from metsflow.active_learning.labelstore import LabelStore
from metsflow.active_learning.status import format_status, round_status
from metsflow.core import io, labels

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
SHAPE = (16, 16, 12)


def _truth():
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[2:10, 2:10, 2:10] = labels.EDEMA  # a large lesion (512 mm3) ...
    data[4:8, 4:8, 4:8] = labels.ENHANCING
    data[5:7, 5:7, 5:7] = labels.NECROSIS
    data[13, 13, 10] = labels.ENHANCING  # ... and a 1-voxel metastasis far away
    return data


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    oracle, references = {}, {}
    for study_id in ("S1", "S2", "S3"):
        folder = tmp_path / "phantom" / study_id
        io.save_nifti(folder / "t1c.nii.gz", rng.random(SHAPE), AFFINE, dtype=np.float32)
        io.save_nifti(folder / "label.nii.gz", _truth(), AFFINE, dtype=np.uint8)
        oracle[study_id] = folder / "label.nii.gz"
        references[study_id] = folder / "t1c.nii.gz"
    return oracle, references


def _array(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_confirmed_labels_equal_oracle_with_provenance(tmp_path, cohort):
    oracle, references = cohort
    store = LabelStore(tmp_path / "labels")
    result = simulate_batch(["S1", "S2"], oracle, store, 1, references).set_index("study_id")
    assert result["result"].tolist() == ["confirmed", "confirmed"]
    assert result[["refined_version", "confirmed_version"]].values.tolist() == [[1, 2], [1, 2]]
    for study_id in ("S1", "S2"):
        np.testing.assert_array_equal(_array(store.confirmed(study_id)), _truth())
        history = store.history(study_id)
        assert [(h["stage"], h["reviewer"]) for h in history] == [
            ("refined", "sim-trainee"),
            ("confirmed", "sim-neuroradiologist"),
        ]
        assert history[0]["source"] == "round_1"
        assert [h["via"] for h in history] == ["simulated", "simulated"]
    assert store.status("S3") == "none"


def test_already_confirmed_skipped_missing_and_bad_reported(tmp_path, cohort):
    oracle, references = cohort
    store = LabelStore(tmp_path / "labels")
    simulate_batch(["S1"], oracle, store, 1, references)
    before = hashlib.sha256(store.confirmed("S1").read_bytes()).hexdigest()
    # S2's ground truth is on another grid; S4 has none.
    io.save_nifti(oracle["S2"], _truth(), np.diag([1.0, 1.0, 2.0, 1.0]), dtype=np.uint8)
    result = simulate_batch(
        ["S1", "S2", "S3", "S4"],
        oracle,
        store,
        2,
        references,
        noise={"boundary_prob": 1.0},
    ).set_index("study_id")
    assert result.loc["S1", "result"] == "skipped"
    assert result.loc["S2", "result"] == "rejected" and "affine" in result.loc["S2", "problem"]
    assert result.loc["S3", "result"] == "confirmed"
    assert result.loc["S4", "result"] == "missing"
    assert hashlib.sha256(store.confirmed("S1").read_bytes()).hexdigest() == before
    assert len(store.versions("S1")) == 2 and store.versions("S2") == []


def test_brats_oracle_converted(tmp_path, cohort):
    oracle, references = cohort
    io.save_nifti(oracle["S1"], labels.from_internal(_truth(), "brats"), AFFINE, dtype=np.uint8)
    store = LabelStore(tmp_path / "labels")
    simulate_batch(["S1"], oracle, store, 1, references, convention="brats")
    np.testing.assert_array_equal(_array(store.confirmed("S1")), _truth())


def test_noise_drops_small_lesions_and_moves_boundaries_deterministically():
    truth = _truth()
    rng = np.random.default_rng(0)
    dropped, stats = apply_noise(truth, (1, 1, 1), AnnotatorNoise(drop_prob=1.0), rng)
    assert stats["lesions_dropped"] == 1 and stats["changed_voxels"] == 1
    assert dropped[13, 13, 10] == 0
    np.testing.assert_array_equal(dropped[:12], truth[:12])  # the large lesion is kept

    eroded, _ = apply_noise(
        truth,
        (1, 1, 1),
        AnnotatorNoise(boundary_prob=1.0, erode_fraction=1.0),
        np.random.default_rng(0),
    )
    assert (eroded > 0).sum() < (truth > 0).sum()
    assert eroded[13, 13, 10] == 1  # never eroded away entirely
    grown, _ = apply_noise(
        truth,
        (1, 1, 1),
        AnnotatorNoise(boundary_prob=1.0, erode_fraction=0.0),
        np.random.default_rng(0),
    )
    assert (grown > 0).sum() > (truth > 0).sum()
    assert set(np.unique(grown[truth == 0])) <= {0, labels.EDEMA, labels.ENHANCING}
    assert grown[1, 5, 5] == labels.EDEMA  # grown voxel takes the nearest lesion label

    noise = AnnotatorNoise(boundary_prob=0.5, drop_prob=0.5, small_lesion_mm3=5)
    a, _ = apply_noise(truth, (1, 1, 1), noise, np.random.default_rng(3))
    b, _ = apply_noise(truth, (1, 1, 1), noise, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="drop_prob"):
        AnnotatorNoise(drop_prob=2)
    with pytest.raises(ValueError, match="unknown"):
        AnnotatorNoise.from_config({"typo": 1})


def test_noisy_simulation_is_reproducible(tmp_path, cohort):
    oracle, references = cohort
    noise = {"boundary_prob": 1.0, "drop_prob": 1.0, "small_lesion_mm3": 5.0}
    confirmed = []
    for name in ("a", "b"):
        store = LabelStore(tmp_path / name)
        result = simulate_batch(["S1"], oracle, store, 1, references, noise=noise, seed=5)
        assert result.loc[0, "lesions_dropped"] == 1 and result.loc[0, "changed_voxels"] > 1
        confirmed.append(_array(store.confirmed("S1")))
    np.testing.assert_array_equal(*confirmed)
    assert not np.array_equal(confirmed[0], _truth())


def test_round_status_and_text(tmp_path, cohort):
    oracle, references = cohort
    results = tmp_path / "results"
    store = LabelStore(tmp_path / "labels")
    io.write_json(
        results / "rounds" / "round_0" / "evaluation" / "summary.json",
        {"round": 0, "mean_dice": 0.61234, "n_train": 10},
    )
    selection = pd.DataFrame(
        {
            "study_id": ["S1", "S2", "S3"],
            "patient_id": ["P1", "P2", "P3"],
            "score": [0.9, 0.5, 0.1],
            "rank": [1, 2, 3],
            "strategy": ["lesion_aware"] * 3,
        }
    )
    io.write_table(results / "rounds" / "round_1" / "selection.tsv", selection)
    (results / "rounds" / "round_2").mkdir(parents=True)
    simulate_batch(["S1"], oracle, store, 1, references)
    store.import_label("S2", oracle["S2"], "refined", "trainee A", references["S2"])

    frame = round_status(results, store)
    assert frame["round"].tolist() == [0, 1, 2]
    row = frame.set_index("round").loc[1]
    assert (row["batch_size"], row["pending"], row["refined"], row["confirmed"]) == (3, 1, 1, 1)
    assert row["strategy"] == "lesion_aware"
    assert frame.set_index("round").loc[0, "mean_dice"] == pytest.approx(0.61234)

    text = format_status(frame)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["round", "strategy", "batch", "pending"]
    assert lines[1].split()[:8] == ["0", "-", "-", "-", "-", "-", "10", "0.612"]
    assert lines[2].split()[:7] == ["1", "lesion_aware", "3", "1", "1", "1", "-"]
    assert "not evaluated yet" in lines[2]
    assert "selection not run yet" in lines[3]
    assert lines[-1] == "total: 3 studies selected, 1 confirmed, 1 awaiting review"
    assert "no rounds yet" in format_status(round_status(tmp_path / "empty", store))
    # Read-only callers can pass a path; a missing store just means nothing labelled yet.
    assert round_status(results, tmp_path / "no-store").set_index("round").loc[1, "pending"] == 3
