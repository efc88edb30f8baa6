"""Inference speed levers (metsflow.infer): equal output, error handling of the overlap."""

from __future__ import annotations

import pytest
import torch
from test_infer import make_checkpoint
from test_models import make_prep_study

from metsflow.infer import (
    ensemble_predict,
    lever_settings,
    load_ensemble,
    overlapped,
    predict_items,
)


@pytest.mark.parametrize("enabled", [True, False])
def test_overlapped_keeps_order_and_reports_each_failure_against_its_item(enabled):
    written = []

    def load(item):
        if item == 2:
            raise ValueError("unreadable")
        return item * 10

    def write(result):
        if result == 40:
            raise OSError("disk full")
        written.append(result)

    out = list(overlapped([1, 2, 3, 4, 5], load, lambda i, x: x, write, enabled=enabled))
    assert [item for item, _, _ in out] == [1, 2, 3, 4, 5]
    assert [result for _, result, _ in out] == [10, None, 30, None, 50]
    assert isinstance(out[1][2], ValueError) and isinstance(out[3][2], OSError)
    assert written == [10, 30, 50]
    assert list(overlapped([], load, lambda i, x: x, write, enabled=enabled)) == []


def test_auto_levers_are_on_for_cuda_only():
    cpu = lever_settings({}, torch.device("cpu"))
    assert cpu == {
        "amp": False,
        "channels_last": False,
        "skip_outside_brain": True,
        "prefetch": True,
        "inference_mode": True,
    }
    assert lever_settings({"amp": "auto", "channels_last": "auto"}, torch.device("cuda"))["amp"]
    assert lever_settings({"amp": True}, torch.device("cpu"))["amp"]


def test_skipping_windows_outside_the_brain_leaves_brain_voxels_unchanged(tmp_path):
    nets, _ = load_ensemble(
        [make_checkpoint(tmp_path / "a.pt", 0), make_checkpoint(tmp_path / "b.pt", 1)],
        device="cpu",
    )
    torch.manual_seed(0)
    image = torch.randn(2, 32, 32, 32)
    brain = torch.zeros(32, 32, 32, dtype=torch.bool)
    brain[2:14, 3:12, 20:30] = True  # most windows hold no brain voxel
    # TTA: the mask is flipped with the image; sw_batch 3 mixes kept and skipped windows
    params = {"patch_size": [16] * 3, "overlap": 0.0, "sw_batch_size": 3, "tta": True}
    full, full_entropy = ensemble_predict(nets, image, {**params, "skip_outside_brain": False})
    skipped, skipped_entropy = ensemble_predict(nets, image, params, brain=brain.numpy())
    torch.testing.assert_close(skipped[:, brain], full[:, brain], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skipped_entropy[brain], full_entropy[brain], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(skipped[:, ~brain], full[:, ~brain])  # windows were skipped


def test_levers_on_and_off_give_the_same_labels(tmp_path):
    items = [make_prep_study(tmp_path / "prep", f"S{i}", seed=i) for i in range(2)]
    ckpt = [make_checkpoint(tmp_path / "a.pt", 0)]
    off = dict.fromkeys(("skip_outside_brain", "prefetch", "inference_mode"), False)
    base = {"overlap": 0.25, "sw_batch_size": 2}
    rows_off = predict_items(ckpt, items, tmp_path / "off", {**base, **off}, "cpu")
    rows_on = predict_items(ckpt, items, tmp_path / "on", base, "cpu")
    for a, b in zip(rows_off, rows_on, strict=True):
        assert a["study_id"] == b["study_id"]
        assert a["lesion_count"] == b["lesion_count"]
        assert a["uncertainty_entropy"] == pytest.approx(b["uncertainty_entropy"], abs=1e-5)
