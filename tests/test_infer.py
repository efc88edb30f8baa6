"""Shard inference: outputs on the prep grid, uncertainty rows, ensembles, TTA, failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch
from _tiny_models import AFFINE, SHAPE, make_checkpoint, make_prep_study

from metsflow.core import labels as lab
from metsflow.core.io import StudyError, save_nifti
from metsflow.models.infer import (
    load_ensemble,
    normalised_entropy,
    predict_items,
    sliding_window_predict,
    uncertainty_scores,
)


@pytest.mark.parametrize("label_mode", ["multiclass", "whole"])
def test_predict_items_writes_outputs_on_prep_grid(tmp_path, label_mode):
    items = [make_prep_study(tmp_path / "prep", f"S{i}", seed=i) for i in range(2)]
    ckpts = [make_checkpoint(tmp_path / f"f{i}.pt", i, label_mode=label_mode) for i in range(2)]
    out_root = tmp_path / "pred"
    rows = predict_items(ckpts, items, out_root, {"overlap": 0.25, "sw_batch_size": 2}, "cpu")

    assert [r["study_id"] for r in rows] == ["S0", "S1"]
    for item, row in zip(items, rows, strict=True):
        ref = nib.load(Path(item["prep_dir"]) / "t1c.nii.gz")
        brain = nib.load(Path(item["prep_dir"]) / "brain_mask.nii.gz").get_fdata() > 0
        pred_img = nib.load(out_root / item["study_id"] / "pred.nii.gz")
        prob_img = nib.load(out_root / item["study_id"] / "fg_prob.nii.gz")
        for img in (pred_img, prob_img):
            assert img.shape == ref.shape
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
        assert pred_img.get_data_dtype() == np.uint8 and prob_img.get_data_dtype() == np.float32
        pred, prob = np.asanyarray(pred_img.dataobj), np.asanyarray(prob_img.dataobj)
        allowed = {0, 1, 2, 3} if label_mode == "multiclass" else {0, 1}
        assert set(np.unique(pred)) <= allowed
        assert not pred[~brain].any() and not prob[~brain].any()  # restricted to the brain
        assert prob.min() >= 0 and prob.max() <= 1 + 1e-6
        # argmax is not background only where p(background) <= 0.5
        assert np.all(prob[pred > 0] >= 0.5 - 1e-5)

        lesion = lab.whole_lesion(pred)
        _, count = cc3d.connected_components(lesion, connectivity=26, return_N=True)
        assert row["lesion_count"] == count
        assert row["lesion_volume_mm3"] == pytest.approx(lesion.sum() * 1.0)  # 1 mm voxels
        entropies = json.loads(row["lesion_entropies"])
        assert len(entropies) == count and all(0 <= e <= 1 for e in entropies)
        assert 0 <= row["uncertainty_entropy"] <= 1 and 0 <= row["uncertainty_lesion"] <= 1
        assert row["seconds"] >= 0


def test_uncertainty_scores_on_known_probabilities():
    shape = (12, 12, 12)
    probs = np.zeros((4, *shape), dtype=np.float32)
    probs[0] = 1.0  # certain background
    pred = np.zeros(shape, dtype=np.uint8)
    # lesion A: 8 voxels, certain enhancing; lesion B: 1 voxel, uniform over the 4 classes
    probs[:, 1:3, 1:3, 1:3] = np.array([0, 1, 0, 0])[:, None, None, None]
    pred[1:3, 1:3, 1:3] = lab.ENHANCING
    probs[:, 8, 8, 8] = 0.25
    pred[8, 8, 8] = lab.NECROSIS
    pred[5, 5, 5] = lab.EDEMA  # edema is not lesion
    brain = np.ones(shape, dtype=bool)
    scores = uncertainty_scores(probs, pred, brain, voxel_mm3=2.0)
    assert scores["lesion_count"] == 2
    assert scores["lesion_volume_mm3"] == pytest.approx(9 * 2.0)
    assert json.loads(scores["lesion_entropies"]) == pytest.approx([0.0, 1.0], abs=1e-4)
    assert scores["uncertainty_lesion"] == pytest.approx(1 / 9, abs=1e-4)
    assert scores["uncertainty_entropy"] == pytest.approx(1 / 12**3, abs=1e-5)
    empty = uncertainty_scores(probs, np.zeros(shape, np.uint8), brain, 1.0)
    assert empty["lesion_count"] == 0 and empty["uncertainty_lesion"] == 0.0
    assert json.loads(empty["lesion_entropies"]) == []


def test_tta_is_mirror_equivariant_and_ensemble_averages(tmp_path):
    nets, meta = load_ensemble(
        [make_checkpoint(tmp_path / f"f{i}.pt", i) for i in range(2)], device="cpu"
    )
    image = torch.randn(2, 16, 16, 16)
    flipped = torch.flip(image, (1, 3))
    params = {"patch_size": meta["patch_size"], "overlap": 0.5}
    plain = sliding_window_predict(nets[0], image, params, "cpu")
    assert plain.shape == (4, 16, 16, 16)
    torch.testing.assert_close(plain.sum(0), torch.ones(16, 16, 16))
    # Averaging over all 8 mirrorings makes the prediction equivariant to mirroring the input.
    tta = {**params, "tta": True}
    torch.testing.assert_close(
        sliding_window_predict(nets[0], flipped, tta, "cpu"),
        torch.flip(sliding_window_predict(nets[0], image, tta, "cpu"), (1, 3)),
        atol=1e-5,
        rtol=0,
    )
    no_tta = torch.flip(sliding_window_predict(nets[0], flipped, params, "cpu"), (1, 3))
    assert not torch.allclose(no_tta, plain, atol=1e-5)  # without TTA it is not
    both = sliding_window_predict(nets, image, params, "cpu")
    second = sliding_window_predict(nets[1], image, params, "cpu")
    torch.testing.assert_close(both, (plain + second) / 2)


def test_ensemble_members_must_agree(tmp_path):
    a = make_checkpoint(tmp_path / "a.pt", 0)
    b = make_checkpoint(tmp_path / "b.pt", 1, channels=["t1c", "t2"])
    with pytest.raises(ValueError, match="disagree on channels"):
        load_ensemble([a, b], device="cpu")
    c = make_checkpoint(tmp_path / "c.pt", 1, spacing=[2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="disagree on spacing"):
        load_ensemble([a, c], device="cpu")
    with pytest.raises(ValueError, match="channels"):
        load_ensemble([a], expect_channels=["t1c"], device="cpu")


def test_missing_sequence_and_prior_channel(tmp_path):
    item = make_prep_study(tmp_path / "prep", "F1", sequences=("t1c",))
    prior = np.zeros(SHAPE, np.uint8)
    prior[18:22, 18:22, 18:22] = lab.ENHANCING
    prior_path = tmp_path / "reg" / "F1" / "prior.nii.gz"
    save_nifti(prior_path, prior, AFFINE, np.uint8)
    item["prior"] = str(prior_path)
    ckpt = make_checkpoint(tmp_path / "m.pt", 0, channels=["t1c", "flair", "prior"])
    rows = predict_items([ckpt], [item], tmp_path / "pred", {"overlap": 0.25}, "cpu")
    assert rows[0]["study_id"] == "F1" and math.isfinite(rows[0]["uncertainty_entropy"])
    with pytest.raises(ValueError, match="channels"):  # caller expects other channels
        predict_items([ckpt], [item], tmp_path / "pred", {"channels": ["t1c"]}, "cpu")


def test_failing_study_is_named_and_others_go_on(tmp_path):
    good = make_prep_study(tmp_path / "prep", "GOOD", seed=1)
    bad = make_prep_study(tmp_path / "prep", "BAD", seed=2)
    (Path(bad["prep_dir"]) / "t1c.nii.gz").write_bytes(b"\x1f\x8b truncated")
    ensemble = load_ensemble([make_checkpoint(tmp_path / "m.pt", 0)], device="cpu")
    with pytest.raises(StudyError, match="BAD") as info:
        predict_items(ensemble, [bad, good], tmp_path / "pred", {"overlap": 0.25}, "cpu")
    assert info.value.study_id == "BAD"
    errors = []
    rows = predict_items(
        ensemble, [bad, good], tmp_path / "pred", {"overlap": 0.25}, "cpu", on_error=errors.append
    )
    assert [r["study_id"] for r in rows] == ["GOOD"]
    assert [e.study_id for e in errors] == ["BAD"]
    assert not (tmp_path / "pred" / "BAD" / "pred.nii.gz").exists()


def test_unchanged_models_reuse_previous_predictions(tmp_path):
    """A round that kept the previous round's models (stop criterion) copies its predictions;
    any changed model byte, or missing previous outputs, means segmenting again."""
    from metsflow.core.layout import Layout
    from metsflow.jobs.infer import _copy_study_outputs, _reusable_predictions
    from metsflow.jobs.manifest import write_manifest

    layout = Layout(tmp_path / "results")
    old_root, new_root = Path(layout.prediction_root(0)), Path(layout.prediction_root(1))
    old_model, new_model = tmp_path / "old.pt", tmp_path / "new.pt"
    old_model.write_bytes(b"weights")
    new_model.write_bytes(b"weights")
    for study in ("s1", "s2"):
        layout.prediction_dir(0, study).mkdir(parents=True)
        layout.study_prediction(0, study).write_bytes(study.encode())
    manifest = Path(layout.prediction_manifest(0, "g0000"))
    rows = [
        {"study_id": "s1", "patient_id": "p1", "status": "ok", "problem": "", "seconds": 1.0},
        {"study_id": "s2", "patient_id": "p2", "status": "failed", "problem": "x", "seconds": 0},
    ]
    write_manifest(manifest, rows)
    previous = {"models": [str(old_model)], "round": 0, "manifest": str(manifest)}

    reusable = _reusable_predictions(layout, previous, [str(new_model)])
    assert set(reusable) == {"s1"} and reusable["s1"]["status"] == "ok"  # failed: redo
    _copy_study_outputs(old_root / "s1", new_root / "s1")
    assert layout.study_prediction(1, "s1").read_bytes() == b"s1"
    assert not list(new_root.glob(".*partial"))

    new_model.write_bytes(b"weights, fine-tuned")
    assert _reusable_predictions(layout, previous, [str(new_model)]) == {}
    assert _reusable_predictions(layout, None, [str(new_model)]) == {}
    manifest.unlink()
    assert _reusable_predictions(layout, previous, [str(old_model)]) == {}


def test_fold_ensemble_reports_disagreement_single_model_does_not(tmp_path):
    """Disagreement = entropy of the mean - mean member entropy (mutual information): zero for
    identical members, positive for different ones, absent for a single model."""
    from metsflow.models.infer import ensemble_predict

    items = [make_prep_study(tmp_path / "prep", "S0", seed=0)]
    a, b = make_checkpoint(tmp_path / "a.pt", 0), make_checkpoint(tmp_path / "b.pt", 1)
    params = {"overlap": 0.25, "sw_batch_size": 2}

    (single,) = predict_items([a], items, tmp_path / "p1", params, "cpu")
    assert "uncertainty_disagreement" not in single
    (twins,) = predict_items([a, a], items, tmp_path / "p2", params, "cpu")
    assert twins["uncertainty_disagreement"] == pytest.approx(0.0, abs=1e-5)
    (folds,) = predict_items([a, b], items, tmp_path / "p3", params, "cpu")
    assert 0.0 < folds["uncertainty_disagreement"] <= 1.0

    nets, meta = load_ensemble([a, b], device="cpu")
    image = torch.randn(2, 16, 16, 16)
    probs, member_entropy = ensemble_predict(nets, image, {"patch_size": [16] * 3}, "cpu")
    assert member_entropy.shape == (16, 16, 16)
    # Jensen: the entropy of the mean is never below the mean entropy.
    assert torch.all(torch.from_numpy(normalised_entropy(probs.numpy())) >= member_entropy - 1e-5)
