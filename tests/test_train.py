"""Training: learning, reproducibility, resume after a kill, fine-tuning (tiny CPU networks)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _tiny_models import (
    ALL_AUGMENTATIONS,
    assert_same_weights,
    fast_params,
    make_prep_study,
    weights,
)

from metsflow.models import train
from metsflow.models.networks import load_checkpoint, read_checkpoint


# Every random augmentation on, so the reproducibility tests exercise their RNG streams.
@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    return [make_prep_study(root, f"S{i}", seed=i) for i in range(4)]


def test_short_training_lowers_loss(studies, tmp_path):
    out, log_path = tmp_path / "model.pt", tmp_path / "train_log.tsv"
    params = fast_params(iterations=24, log_interval=4, val_interval=12)
    result = train.train_model(
        studies[:3], studies[3:], params, out, log_path=log_path, device="cpu"
    )

    log = pd.read_csv(log_path, sep="\t")
    assert list(log.columns) == ["iteration", "loss", "lr", "val_dice", "seconds"]
    assert log["iteration"].tolist() == [4, 8, 12, 16, 20, 24]
    assert log["loss"].iloc[-1] < 0.9 * log["loss"].iloc[0]
    assert log["lr"].is_monotonic_decreasing  # poly schedule
    assert log["val_dice"].notna().tolist() == [False, False, True, False, False, True]
    assert 0 <= result["best_val_dice"] <= 1 and result["iterations"] == 24
    assert result["final_loss"] == pytest.approx(log["loss"].iloc[-1], rel=1e-4)

    network, meta = load_checkpoint(out, params["channels"], "multiclass")
    assert meta["training_study_ids"] == ["S0", "S1", "S2"]
    assert meta["validation_study_ids"] == ["S3"] and meta["iteration"] == 24
    assert meta["params"]["optimizer"] == "adam" and meta["patch_size"] == [16, 16, 16]
    assert not train.resume_path(out).exists()


def test_val_interval_zero_trains_without_validating(studies, tmp_path, monkeypatch):
    def no_validation(*args, **kwargs):
        raise AssertionError("validated although val_interval is 0")

    monkeypatch.setattr(train, "validate", no_validation)
    out, log_path = tmp_path / "model.pt", tmp_path / "train_log.tsv"
    params = fast_params(iterations=4, log_interval=2, val_interval=0)
    result = train.train_model(
        studies[:3], studies[3:], params, out, log_path=log_path, device="cpu"
    )

    log = pd.read_csv(log_path, sep="\t")
    assert log["iteration"].tolist() == [2, 4] and log["val_dice"].isna().all()
    assert np.isnan(result["best_val_dice"]) and result["iterations"] == 4
    # The held-out studies are still recorded with the model (evaluate_round scores them).
    _, meta = load_checkpoint(out, params["channels"], "multiclass")
    assert meta["validation_study_ids"] == ["S3"]


def test_same_seed_gives_same_weights(studies, tmp_path):
    params = fast_params(iterations=3, **ALL_AUGMENTATIONS)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train.train_model(
            studies[:3], [], {**params, "seed": seed}, tmp_path / f"{name}.pt", device="cpu"
        )
    assert_same_weights(weights(tmp_path / "a.pt"), weights(tmp_path / "b.pt"))
    a, c = weights(tmp_path / "a.pt"), weights(tmp_path / "c.pt")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_after_kill_matches_uninterrupted_run(studies, tmp_path, monkeypatch):
    params = fast_params(iterations=6, checkpoint_interval=3, val_interval=3, **ALL_AUGMENTATIONS)
    reference = tmp_path / "reference.pt"
    train.train_model(
        studies[:3], studies[3:], params, reference, log_path=tmp_path / "ref.tsv", device="cpu"
    )

    out, log_path = tmp_path / "model.pt", tmp_path / "log.tsv"
    real_step, calls = train._train_step, {"n": 0}

    def killed_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("job killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "_train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.train_model(studies[:3], studies[3:], params, out, log_path=log_path, device="cpu")
    monkeypatch.setattr(train, "_train_step", real_step)
    assert train.resume_path(out).exists() and not out.exists()

    result = train.train_model(
        studies[:3], studies[3:], params, out, log_path=log_path, device="cpu"
    )
    assert result["resumed_from"] == 3 and result["iterations"] == 6
    assert_same_weights(weights(reference), weights(out))
    assert not train.resume_path(out).exists()
    resumed_log = pd.read_csv(log_path, sep="\t")
    reference_log = pd.read_csv(tmp_path / "ref.tsv", sep="\t")
    assert resumed_log["iteration"].tolist() == list(range(1, 7))  # no duplicated rows
    np.testing.assert_allclose(resumed_log["loss"], reference_log["loss"])
    np.testing.assert_allclose(resumed_log["val_dice"], reference_log["val_dice"])


def test_resume_state_of_another_run_is_ignored(studies, tmp_path, monkeypatch):
    params = fast_params(iterations=4, checkpoint_interval=2)
    out = tmp_path / "model.pt"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    real_step, calls = train._train_step, {"n": 0}

    def killed_at_step_3(*args, **kwargs):
        calls["n"] += 1
        return killed() if calls["n"] == 3 else real_step(*args, **kwargs)

    monkeypatch.setattr(train, "_train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.train_model(studies[:3], [], params, out, device="cpu")
    monkeypatch.setattr(train, "_train_step", real_step)
    assert train.resume_path(out).exists()
    # Different training studies: the state belongs to another run and must not be used.
    result = train.train_model(studies[:2], [], params, out, device="cpu")
    assert result["resumed_from"] == 0 and result["iterations"] == 4


def test_finetune_from_checkpoint(studies, tmp_path):
    base = tmp_path / "base.pt"
    train.train_model(studies[:2], [], fast_params(iterations=2), base, device="cpu")
    out = tmp_path / "finetuned.pt"
    result = train.train_model(
        studies[2:],
        [],
        fast_params(iterations=2, learning_rate=1e-3),
        out,
        init_checkpoint=base,
        device="cpu",
    )
    assert result["iterations"] == 2
    meta = read_checkpoint(out)["meta"]
    assert meta["finetuned_from"]["training_study_ids"] == ["S0", "S1"]
    assert meta["training_study_ids"] == ["S2", "S3"]
    assert meta["params"]["learning_rate"] == 1e-3
    b, f = weights(base), weights(out)
    assert any(not torch.equal(b[k], f[k]) for k in b)  # it did train on from the base weights
    with pytest.raises(ValueError, match="channels"):
        train.train_model(
            studies,
            [],
            fast_params(iterations=1, channels=["t1c"]),
            tmp_path / "x.pt",
            init_checkpoint=base,
            device="cpu",
        )


def test_small_volume_whole_mode_segresnet_tversky(tmp_path):
    # A volume smaller than the patch along z is padded; missing sequences and no prior -> zeros.
    items = [
        make_prep_study(
            tmp_path, f"T{i}", seed=10 + i, sequences=("t1c",), n_lesions=1, shape=(24, 24, 12)
        )
        for i in range(2)
    ]
    params = fast_params(
        arch="segresnet",
        init_filters=8,
        label_mode="whole",
        loss="tversky_bce",
        channels=["t1c", "flair", "prior"],
        iterations=2,
        val_interval=2,
        optimizer="sgd",
        learning_rate=1e-2,
    )
    result = train.train_model(items[:1], items[1:], params, tmp_path / "m.pt", device="cpu")
    assert np.isfinite(result["final_loss"]) and result["iterations"] == 2
    network, meta = load_checkpoint(tmp_path / "m.pt", ["t1c", "flair", "prior"], "whole")
    assert meta["arch"] == "segresnet" and meta["num_classes"] == 2


def test_bad_params_are_refused(studies, tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        train.train_model(
            studies, [], fast_params(optimizer="lbfgs"), tmp_path / "m.pt", device="cpu"
        )
    with pytest.raises(ValueError, match="no training studies"):
        train.train_model([], [], fast_params(), tmp_path / "m.pt", device="cpu")
