"""Inference speed levers (metsflow.models.infer): each lever's output equals the plain path's, error
handling of the overlap and of a failed compile."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys

import pytest
import torch
from _tiny_models import make_checkpoint, make_prep_study
from conftest import REPO

from metsflow.models import infer
from metsflow.models.infer import (
    COMPILE_MIN_STUDIES,
    ensemble_predict,
    lever_settings,
    load_ensemble,
    overlapped,
    predict_items,
    resolve_levers,
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


def test_auto_levers_are_on_for_cuda_only_and_compile_for_large_cpu_shards():
    cpu = lever_settings({}, torch.device("cpu"))
    assert cpu == {
        "amp": False,
        "channels_last": False,  # no study count: not an inference job (training validation)
        "skip_outside_brain": True,
        "prefetch": True,
        "inference_mode": True,
        "compile": False,  # the number of studies is unknown: counted as few
        "fast_norm": False,  # follows channels_last
        "heap_reuse": False,  # process-wide: inference jobs only
    }
    assert lever_settings({"amp": "auto", "channels_last": "auto"}, torch.device("cuda"))["amp"]
    assert lever_settings({"amp": True}, torch.device("cpu"))["amp"]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert lever_settings({}, cpu, COMPILE_MIN_STUDIES)["compile"]
    assert not lever_settings({}, cpu, COMPILE_MIN_STUDIES - 1)["compile"]
    assert not lever_settings({}, cuda, 1000)["compile"]
    assert not lever_settings({"compile": False}, cpu, 1000)["compile"]
    assert lever_settings({"compile": True}, cpu, 1)["compile"]
    # channels-last: on for CPU inference jobs (with compile, or eager with fast_norm)
    assert lever_settings({"compile": False}, cpu, 1)["channels_last"]
    assert lever_settings({"compile": False}, cpu, 1)["fast_norm"]
    assert lever_settings({}, cuda)["channels_last"]
    assert not lever_settings({"channels_last": False}, cpu, 1000)["channels_last"]
    # fast_norm: on CPU with channels-last (it acts on channels-last inputs only)
    assert lever_settings({}, cpu, COMPILE_MIN_STUDIES)["fast_norm"]
    assert not lever_settings({}, cuda)["fast_norm"]
    assert not lever_settings({"channels_last": False}, cpu, 1000)["fast_norm"]
    assert not lever_settings({"fast_norm": False}, cpu, 1000)["fast_norm"]
    assert lever_settings({}, cuda, 1)["heap_reuse"] and lever_settings({}, cpu, 1)["heap_reuse"]
    assert not lever_settings({"heap_reuse": False}, cpu, 1)["heap_reuse"]
    resolved = resolve_levers({"overlap": 0.5}, cpu, COMPILE_MIN_STUDIES)
    assert resolved.overlap == 0.5 and resolved.compile is True
    assert lever_settings(resolved, cpu)["compile"]  # stays resolved downstream


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


def _two_networks(tmp_path):
    return load_ensemble(
        [make_checkpoint(tmp_path / "a.pt", 0), make_checkpoint(tmp_path / "b.pt", 1)],
        device="cpu",
    )[0]


def _plain_and_lever(nets, lever: dict, **extra):
    torch.manual_seed(0)
    image = torch.randn(2, 40, 36, 20)
    # 3 x 3 x 1 windows of 16^3 at overlap 0.25 and sw_batch 2: full batches and a partial one
    params = {"patch_size": [16] * 3, "overlap": 0.25, "sw_batch_size": 2, **extra}
    off = dict.fromkeys(infer.LEVERS, False)
    plain = ensemble_predict(nets, image, {**params, **off})
    with_lever = ensemble_predict(nets, image, {**params, **off, **lever})
    return plain, with_lever


@pytest.mark.parametrize("lever", ["inference_mode", "channels_last"])
def test_each_fp32_lever_gives_the_plain_probabilities(tmp_path, lever):
    (plain, plain_entropy), (ours, ours_entropy) = _plain_and_lever(
        _two_networks(tmp_path), {lever: True}, tta=True
    )
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_entropy, plain_entropy, rtol=1e-4, atol=1e-5)


def test_fast_norm_gives_the_plain_probabilities_and_keeps_the_state_dict(tmp_path):
    nets = _two_networks(tmp_path)
    before = {k: v.clone() for k, v in nets[0].state_dict().items()}
    (plain, plain_entropy), (ours, ours_entropy) = _plain_and_lever(
        nets, {"channels_last": True, "fast_norm": True}, tta=True
    )
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_entropy, plain_entropy, rtol=1e-4, atol=1e-5)
    norms = [m for m in nets[0].modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(type(m) is infer._ChannelsLastInstanceNorm3d for m in norms)
    after = nets[0].state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # with autograd (training) the switched modules are nn.InstanceNorm3d's own forward
    x = torch.randn(2, norms[0].num_features, 6, 5, 4).to(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    norms[0](x).sum().backward()
    assert x.grad is not None


@pytest.mark.slow
def test_compiled_networks_give_the_plain_probabilities(tmp_path):
    # A real inductor build (~40 s cold on 2 cores): slow-marked. Only the combination that CPU
    # inference jobs compile (lever_settings: compile brings channels-last and fast_norm); the
    # bare compile as a second case cost the suite another 13 s.
    levers = {"compile": True, "channels_last": True, "fast_norm": True}
    nets = _two_networks(tmp_path)
    (plain, plain_entropy), (ours, ours_entropy) = _plain_and_lever(nets, levers)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_entropy, plain_entropy, rtol=1e-4, atol=1e-5)
    assert all(infer._COMPILED in net.__dict__ for net in nets)
    assert all(k.startswith("_metsflow") is False for k in nets[0].state_dict())


def test_a_failed_compile_falls_back_to_eager_with_equal_output(tmp_path, monkeypatch, caplog):
    calls = []

    def broken_compile(network, **kwargs):
        def run(windows):
            calls.append(len(windows))
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    nets = _two_networks(tmp_path)
    with caplog.at_level(logging.WARNING, logger="metsflow.models.infer"):
        (plain, _), (ours, _) = _plain_and_lever(nets, {"compile": True})
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    # one failed attempt per network (full batches of 2 only), then eager for good
    assert calls == [2, 2]
    assert "torch.compile failed" in caplog.text
    for net in nets:
        net.__dict__.pop(infer._COMPILED)


_KEPT = """
import os, sys
import numpy as np
if sys.argv[1] == "on":
    from metsflow.core.runtime import reuse_freed_memory
    assert reuse_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
np.ones(1 << 24, dtype=np.float32)  # 64 MiB, touched and freed
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc")
def test_heap_reuse_keeps_a_freed_buffer_mapped_for_the_next_one():
    """Without the lever a freed 64 MiB buffer is unmapped (the next forward pass faults its
    pages in again); with it the block stays in the process for reuse."""
    kept = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", _KEPT, mode],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            ).stdout
        )
        for mode in ("off", "on")
    }
    assert kept["off"] < 8 << 20, kept
    assert kept["on"] > 60 << 20, kept
