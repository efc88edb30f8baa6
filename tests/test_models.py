"""Networks, losses, the input contract, checkpoints and patient-level splits.

``make_prep_study`` and ``tiny_params`` live in ``_tiny_models`` (shared with test_train,
test_infer and the other model tests).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _tiny_models import AFFINE, SHAPE, make_prep_study, tiny_params

from metsflow.cohort.splits import patient_holdout, patient_kfold
from metsflow.core import labels as lab
from metsflow.core.io import StudyError, save_nifti
from metsflow.models.networks import (
    NestedRegionDiceLoss,
    build_loss,
    build_network,
    checkpoint_meta,
    dynunet_plan,
    encode_target,
    load_checkpoint,
    load_study_input,
    save_checkpoint,
)


# ---------------------------------------------------------------------------------------------
# networks and losses
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["dynunet", "segresnet"])
@pytest.mark.parametrize("label_mode,classes", [("multiclass", 4), ("whole", 2)])
def test_network_output_shape_and_channels(arch, label_mode, classes):
    channels = ["t1c", "t1", "prior"]
    net = build_network(
        tiny_params(arch=arch, label_mode=label_mode, channels=channels, init_filters=8)
    )
    out = net(torch.zeros(1, len(channels), 32, 32, 32))
    assert out.shape == (1, classes, 32, 32, 32)
    with pytest.raises(RuntimeError):  # the wrong number of input channels is refused
        net(torch.zeros(1, len(channels) + 1, 32, 32, 32))


def test_dynunet_plan_follows_nnunet():
    kernels, strides = dynunet_plan([96, 96, 96], [1, 1, 1])
    # 96 -> 48 -> 24 -> 12 -> 6: one more halving would give 3 < 4 voxels
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 4 and len(kernels) == 5
    # Anisotropic spacing: the coarse axis is not downsampled and gets 1-wide kernels first.
    kernels, strides = dynunet_plan([64, 64, 32], [1, 1, 3], max_levels=4)
    assert strides[1] == [2, 2, 1] and kernels[0] == [3, 3, 1]
    with pytest.raises(ValueError, match="divisible"):
        dynunet_plan([36, 36, 36], [1, 1, 1])


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="channels"):
        build_network(tiny_params(channels=["t1c", "dwi"]))
    with pytest.raises(ValueError, match="label_mode"):
        build_network(tiny_params(label_mode="brats"))
    with pytest.raises(ValueError, match="arch"):
        build_network(tiny_params(arch="unetr"))


@pytest.mark.parametrize("loss", ["dice_ce", "tversky_bce"])
@pytest.mark.parametrize("label_mode,classes", [("multiclass", 4), ("whole", 2)])
def test_losses_are_finite_with_gradients(loss, label_mode, classes):
    loss_fn = build_loss({"loss": loss, "label_mode": label_mode})
    logits = torch.randn(2, classes, 8, 8, 8, requires_grad=True)
    target = torch.randint(0, classes, (2, 1, 8, 8, 8))
    value = loss_fn(logits, target)
    value.backward()
    assert torch.isfinite(value) and value.ndim == 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # A perfect, confident prediction scores lower than a random one.
    perfect = torch.nn.functional.one_hot(target[:, 0], classes).permute(0, 4, 1, 2, 3) * 20.0
    assert loss_fn(perfect, target) < value
    # Patches without any foreground still give a finite loss.
    assert torch.isfinite(loss_fn(torch.randn(2, classes, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8)))


def test_tversky_bce_penalises_missed_lesion_more_than_false_positive():
    loss_fn = build_loss({"loss": "tversky_bce", "label_mode": "whole"})
    target = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    target[..., 2:6, 2:6, 2:6] = 1
    wrong = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    missed = target.clone()
    missed[..., 2:6, 2:6, 2:4] = 0  # 32 lesion voxels missed
    extra = target.clone()
    extra[..., 0:2, 2:6, 2:6] = 1  # 32 background voxels called lesion

    def logits(pred):
        return torch.cat([(pred == 0).float(), (pred == 1).float()], dim=1) * 10.0

    assert loss_fn(logits(missed), target) > loss_fn(logits(extra), target)
    assert loss_fn(logits(wrong), target) > loss_fn(logits(missed), target)


# ---------------------------------------------------------------------------------------------
# input contract
# ---------------------------------------------------------------------------------------------
def test_missing_sequence_is_zero_filled_and_prior_is_binary(tmp_path):
    item = make_prep_study(tmp_path, "s1", sequences=("t1c", "flair"))
    prior = np.zeros(SHAPE, dtype=np.uint8)
    prior[10:14, 10:14, 10:14] = lab.NECROSIS
    prior[20:22, 20:22, 20:22] = lab.EDEMA
    prior[30, 30, 30] = lab.ENHANCING
    save_nifti(tmp_path / "prior.nii.gz", prior, AFFINE, np.uint8)
    item["prior"] = str(tmp_path / "prior.nii.gz")

    inp = load_study_input(item, ["t1c", "t2", "prior", "flair"], with_label=True)
    image = inp["image"]
    assert image.shape == (4, *SHAPE) and image.dtype == np.float32
    assert np.all(image[1] == 0)  # t2 is missing
    assert np.abs(image[0]).sum() > 0 and np.abs(image[3]).sum() > 0
    # prior channel: whole lesion (enhancing + necrosis) of the prior, edema excluded
    np.testing.assert_array_equal(image[2], lab.whole_lesion(prior))
    assert inp["label"].dtype == np.uint8 and set(np.unique(inp["label"])) <= {0, 1, 2, 3}
    np.testing.assert_allclose(inp["affine"], AFFINE)

    item["prior"] = None
    assert np.all(load_study_input(item, ["prior"])["image"] == 0)


def test_input_off_grid_or_bad_labels_names_the_study(tmp_path):
    item = make_prep_study(tmp_path, "s2", sequences=("t1c", "flair"))
    save_nifti(Path(item["prep_dir"]) / "flair.nii.gz", np.zeros((20, 20, 20)), AFFINE, np.float32)
    with pytest.raises(StudyError, match="s2.*flair is not on the t1c grid"):
        load_study_input(item, ["t1c", "flair"])
    item = make_prep_study(tmp_path, "s3", sequences=("t1c",))
    save_nifti(item["label"], np.full(SHAPE, 7), AFFINE, np.uint8)
    with pytest.raises(StudyError, match="s3.*not internal labels"):
        load_study_input(item, ["t1c"], with_label=True)


def test_encode_target_whole_mode_drops_edema():
    label = np.array([0, 1, 2, 3], dtype=np.uint8)
    np.testing.assert_array_equal(encode_target(label, "whole"), [0, 1, 0, 1])
    np.testing.assert_array_equal(encode_target(label, "multiclass"), label)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["dynunet", "segresnet"])
def test_checkpoint_round_trip_weights_only(tmp_path, arch):
    params = tiny_params(arch=arch, init_filters=8, label_mode="whole")
    torch.manual_seed(1)
    net = build_network(params)
    meta = checkpoint_meta(params, iteration=5, training_study_ids=["a", "b"])
    path = tmp_path / "model.pt"
    save_checkpoint(path, net, meta)
    assert not [p for p in tmp_path.iterdir() if p.name != "model.pt"]  # no temp file left

    raw = torch.load(path, weights_only=True)  # plain data only: the safe loader accepts it
    assert raw["meta"]["label_convention"] == "internal"
    loaded, meta2 = load_checkpoint(path, ["t1c", "flair"], "whole")
    assert meta2["arch"] == arch and meta2["num_classes"] == 2
    assert meta2["training_study_ids"] == ["a", "b"] and meta2["iteration"] == 5
    assert meta2["normalisation"] == "zscore-brain" and "monai" in meta2["versions"]
    x = torch.randn(1, 2, 32, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_checkpoint_refuses_mismatch_and_garbage(tmp_path):
    params = tiny_params()
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_network(params), checkpoint_meta(params))
    with pytest.raises(ValueError, match="channels"):
        load_checkpoint(path, expect_channels=["flair", "t1c"])  # order matters
    with pytest.raises(ValueError, match="label_mode"):
        load_checkpoint(path, expect_label_mode="whole")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a metsflow checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": build_network(params).state_dict()}, foreign)
    with pytest.raises(ValueError, match="not a metsflow checkpoint"):
        load_checkpoint(foreign)
    nifti = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), nifti)
    with pytest.raises(ValueError, match="not a metsflow checkpoint"):
        load_checkpoint(nifti)


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
def _cohort(n_patients=11, seed=3):
    rng = np.random.default_rng(seed)
    mapping = {}
    for p in range(n_patients):
        for t in range(int(rng.integers(1, 6))):
            mapping[f"P{p:02d}_T{t}"] = f"P{p:02d}"
    return mapping


def test_patient_kfold_has_no_leakage_and_covers_every_study():
    mapping = _cohort()
    folds = patient_kfold(mapping, k=4, seed=7)
    assert len(folds) == 4
    seen = []
    for train, val in folds:
        assert not {mapping[s] for s in train} & {mapping[s] for s in val}
        assert set(train) | set(val) == set(mapping) and not set(train) & set(val)
        seen += val
    assert sorted(seen) == sorted(mapping)  # every study in exactly one validation fold
    sizes = [len(v) for _, v in folds]
    assert max(sizes) - min(sizes) <= 5  # balanced by study count (max 5 studies a patient)
    # deterministic and independent of the mapping's order
    assert patient_kfold(dict(reversed(list(mapping.items()))), 4, 7) == [
        (
            [s for s in reversed(list(mapping)) if s in set(tr)],
            [s for s in reversed(list(mapping)) if s in set(va)],
        )
        for tr, va in folds
    ]
    assert patient_kfold(mapping, 4, 8) != folds
    with pytest.raises(ValueError):
        patient_kfold({"a": "P1", "b": "P1"}, k=2)


def test_patient_holdout():
    mapping = _cohort()
    train, val = patient_holdout(mapping, 0.3, seed=1)
    assert not {mapping[s] for s in train} & {mapping[s] for s in val}
    assert set(train) | set(val) == set(mapping)
    assert len({mapping[s] for s in val}) == round(0.3 * 11)
    assert patient_holdout(mapping, 0.3, seed=1) == (train, val)
    # at least one patient on each side
    t, v = patient_holdout({"a": "P1", "b": "P2"}, 0.9, seed=0)
    assert len(t) == 1 and len(v) == 1


def test_region_dice_rewards_lesion_in_the_right_region():
    """The nested-region term: putting the lesion core in the edema class is penalised beyond
    the per-class terms, and weight 0 gives the plain per-class loss."""
    target = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    target[0, 0, 2:6, 2:6, 2:6] = 2  # edema
    target[0, 0, 3:5, 3:5, 3:5] = 1  # enhancing core

    def logits_for(labels):
        return torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 4, 1, 2, 3) * 20.0

    core_as_edema = target.clone()
    core_as_edema[target == 1] = 2
    with_regions = build_loss({"loss": "dice_ce", "label_mode": "multiclass"})
    plain = build_loss({"loss": "dice_ce", "label_mode": "multiclass", "region_loss_weight": 0})
    assert not isinstance(plain, NestedRegionDiceLoss)
    assert isinstance(with_regions, NestedRegionDiceLoss)
    extra_wrong = with_regions(logits_for(core_as_edema), target) - plain(
        logits_for(core_as_edema), target
    )
    extra_right = with_regions(logits_for(target), target) - plain(logits_for(target), target)
    # The whole-lesion region (1 + 3) is missed entirely: its Dice term is ~1, halved by the mean.
    assert extra_wrong > 0.45
    assert extra_right < 1e-3
    # Binary mode has a single lesion class: no region term.
    assert not isinstance(build_loss({"label_mode": "whole"}), NestedRegionDiceLoss)


def test_model_section_defaults_and_keys_come_from_model_settings():
    from metsflow.core import config
    from metsflow.core.settings import ModelSettings
    from metsflow.models.networks import MODEL_DEFAULTS, network_spec

    assert ModelSettings.defaults() == MODEL_DEFAULTS
    assert "channels" not in MODEL_DEFAULTS and "patch_size" not in MODEL_DEFAULTS
    # The schema's closed key list of ``model`` is the dataclass fields.
    schema_keys = set(config._schema()["properties"]["model"]["properties"])
    assert schema_keys == {f for f in ModelSettings.__dataclass_fields__}
    # A spec from the required keys alone equals one with every default spelled out.
    minimal = {"channels": ["t1c"], "patch_size": [32, 32, 32]}
    explicit = ModelSettings.from_dict(minimal).as_dict()
    assert network_spec(minimal) == network_spec(explicit)
    assert network_spec(minimal)["kwargs"]["filters"][0] == MODEL_DEFAULTS["filters"][0]
