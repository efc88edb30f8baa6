"""Detection levers (issue #23): lesion-balanced sampling, the instance-aware loss, the
high-sensitivity stage-1 proposals handed to stage 2, and their config keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_models import make_prep_study, tiny_params
from monai.transforms import RandCropByPosNegLabeld

from metsflow.core import config as config_schema
from metsflow.core import labels as lab
from metsflow.models import cascade, train
from metsflow.models.networks import InstanceDiceLoss, build_loss
from metsflow.models.sampling import LesionInstancesd, RandLesionCropd, lesion_weights

PATCH = [8, 8, 8]


@pytest.fixture(scope="module")
def two_lesions():
    """A 48^3 study: a 12^3 lesion (1,728 voxels) and a single-voxel one, far apart."""
    lesion = np.zeros((1, 48, 48, 48), dtype=np.uint8)
    lesion[0, 4:16, 4:16, 4:16] = 1
    lesion[0, 40, 40, 40] = 1
    data = {
        "image": np.random.default_rng(0).normal(size=(1, 48, 48, 48)).astype(np.float32),
        "label": lesion.copy(),
        "lesion": lesion,
        "brain": np.ones_like(lesion),
    }
    return data


def small_lesion_share(crop, data, draws=200) -> float:
    hits = 0
    for seed in range(draws):
        crop.set_random_state(seed=seed)
        patch = crop(data)[0]
        label = np.asarray(patch["label"])
        hits += bool(label.any() and label.sum() == 1)
    return hits / draws


def test_lesion_instances_lists_each_lesion(two_lesions):
    out = LesionInstancesd()(two_lesions)
    sizes = sorted(len(v) for v in out["lesion_instance_indices"])
    assert sizes == [1, 12**3]
    assert len(out["brain_indices"]) == 48**3


def test_lesion_weights_favour_small_lesions():
    np.testing.assert_allclose(lesion_weights([1, 1000], 0.0), [0.5, 0.5])
    np.testing.assert_allclose(lesion_weights([1, 1000], 1.0), [1000 / 1001, 1 / 1001])


def test_lesion_sampling_centres_small_lesions_as_often_as_large(two_lesions):
    data = LesionInstancesd()(two_lesions)
    keys = ["image", "label"]
    lesion_crop = RandLesionCropd(keys, PATCH, pos=1.0, neg=0.0, size_power=0.0)
    weighted = RandLesionCropd(keys, PATCH, pos=1.0, neg=0.0, size_power=1.0)
    # The MONAI crop it replaces: uniform over lesion voxels, 1 in 1,729 on the small lesion.
    voxel_crop = RandCropByPosNegLabeld(
        keys, label_key="label", spatial_size=PATCH, pos=1.0, neg=0.0, num_samples=1
    )
    assert 0.35 < small_lesion_share(lesion_crop, data) < 0.65
    assert small_lesion_share(weighted, data) > 0.95
    assert small_lesion_share(voxel_crop, dict(two_lesions)) < 0.05
    patch = lesion_crop(data)[0]
    assert tuple(patch["image"].shape) == (1, *PATCH)
    assert "lesion_instance_indices" not in patch


def test_lesion_sampling_negatives_and_lesionless_studies(two_lesions):
    data = LesionInstancesd()(two_lesions)
    empty = LesionInstancesd()({**two_lesions, "lesion": np.zeros_like(two_lesions["lesion"])})
    crop = RandLesionCropd(["image", "label"], PATCH, pos=1.0, neg=0.0)
    crop.set_random_state(seed=1)
    assert tuple(crop(empty)[0]["image"].shape) == (1, *PATCH)  # brain-centred instead
    negative = RandLesionCropd(["image", "label"], PATCH, pos=0.0, neg=1.0)
    share = np.mean(
        [
            bool(np.asarray(negative.set_random_state(seed=s)(data)[0]["label"]).any())
            for s in range(50)
        ]
    )
    assert share < 0.3  # brain-centred: the lesions fill < 2% of the volume


def test_training_runs_with_both_levers(tmp_path, monkeypatch):
    losses = []

    def spy(*args, **kwargs):
        losses.append(build_loss(*args, **kwargs))
        return losses[-1]

    monkeypatch.setattr(train, "build_loss", spy)
    studies = [make_prep_study(tmp_path, f"S{i}", seed=i) for i in range(2)]
    params = tiny_params(
        patch_size=[16, 16, 16],
        optimizer="adam",
        learning_rate=3e-3,
        iterations=4,
        val_interval=0,
        sampling="lesion",
        lesion_size_power=1.0,
        instance_loss_weight=1.0,
    )
    result = train.train_model(studies, [], params, tmp_path / "m.pt", device="cpu")
    assert result["iterations"] == 4 and np.isfinite(result["final_loss"])
    assert isinstance(losses[0], InstanceDiceLoss)  # train.instance_loss_weight reaches the loss
    with pytest.raises(ValueError, match="unknown sampling"):
        train._cache_transform(["t1c"], "whole", [16, 16, 16], "voxels")


def _logits_for(fg: np.ndarray) -> torch.Tensor:
    """Two-class logits whose foreground probability is ~``fg`` (0/1)."""
    fg = torch.from_numpy(fg.astype(np.float32))
    return torch.stack([-40 * (fg - 0.5), 40 * (fg - 0.5)])[None]


def test_instance_loss_charges_a_missed_small_lesion_like_a_large_one():
    target = np.zeros((1, 1, 32, 32, 32), dtype=np.uint8)
    target[0, 0, 2:18, 2:18, 2:18] = 1  # 4,096 voxels
    target[0, 0, 28, 28, 28] = 1  # 1 voxel
    missed_small = target[0, 0].copy()
    missed_small[28, 28, 28] = 0
    params = {"label_mode": "whole", "channels": ["t1c"], "patch_size": [32] * 3}
    base = build_loss(params)
    blob = build_loss(params, instance_loss_weight=1.0)
    assert isinstance(blob, InstanceDiceLoss)
    # A training run carries the weight in its train settings (TrainSettings).
    run = train.training_params(params, {"instance_loss_weight": 1.0}, [1, 1, 1], 0, 0)
    assert isinstance(build_loss(run), InstanceDiceLoss)
    assert not isinstance(build_loss(run.model), InstanceDiceLoss)
    t = torch.from_numpy(target)

    def cost(loss):
        return float(loss(_logits_for(missed_small), t) - loss(_logits_for(target[0, 0]), t))

    assert cost(base) < 0.05  # batch Dice + CE hardly notice the missed voxel
    assert cost(blob) > 0.4  # one of two lesions missed: half the instance term
    empty = torch.zeros_like(t)
    assert float(blob(_logits_for(np.zeros((32, 32, 32))), empty)) == pytest.approx(
        float(base(_logits_for(np.zeros((32, 32, 32))), empty))
    )


def test_proposal_threshold_reaches_the_asked_sensitivity():
    peaks = [0.9] * 49 + [0.2]
    high = cascade.proposal_threshold(peaks, 0.98)
    assert high["threshold"] == 0.5 and high["proposal_sensitivity"] == pytest.approx(0.98)
    every = cascade.proposal_threshold(peaks, 1.0)
    assert every["threshold"] == pytest.approx(0.2) and every["proposal_sensitivity"] == 1.0
    floor = cascade.proposal_threshold([0.9, 0.0], 1.0)
    assert floor["threshold"] == cascade.PROPOSAL_FLOOR
    assert floor["proposal_sensitivity"] == 0.5
    assert cascade.proposal_threshold([], 0.98)["n_reference"] == 0


def test_lesion_peak_probabilities():
    ref = np.zeros((10, 10, 10), bool)
    ref[1:3, 1:3, 1:3] = True
    ref[7, 7, 7] = True
    prob = np.zeros((10, 10, 10), np.float32)
    prob[2, 2, 2], prob[7, 7, 7] = 0.8, 0.25
    np.testing.assert_allclose(cascade.lesion_peak_probabilities(prob, ref), [0.8, 0.25])


class _KeepAll(torch.nn.Module):
    """A stage-2 classifier that keeps every candidate."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(5.0))

    def forward(self, x):
        return self.bias.expand(len(x), 1)


@pytest.mark.parametrize("high_sensitivity", [False, True])
def test_high_sensitivity_proposals_let_stage2_recover_a_lesion(high_sensitivity):
    shape = (24, 24, 24)
    pred = np.zeros(shape, np.uint8)
    pred[4:7, 4:7, 4:7] = lab.ENHANCING
    fg = np.zeros(shape, np.float32)
    fg[4:7, 4:7, 4:7] = 0.9
    fg[16:18, 16:18, 16:18] = 0.3  # a lesion stage 1 scored below 0.5
    params = {**cascade.DEFAULTS, "crop_size": [8, 8, 8], "proposal_threshold": 0.2}
    if high_sensitivity:
        params["proposal_sensitivity"] = 0.98
    meta = {"params": params, "threshold": 0.5}
    image = np.zeros((1, *shape), np.float32)
    out, candidates = cascade.filter_prediction(pred, image, fg, _KeepAll(), meta)
    assert len(candidates) == (2 if high_sensitivity else 1)
    assert (out[16:18, 16:18, 16:18] == lab.ENHANCING).all() == high_sensitivity
    np.testing.assert_array_equal(out[4:7, 4:7, 4:7], lab.ENHANCING)  # not grown, not lost


def test_config_accepts_the_lever_keys():
    import yaml

    config = yaml.safe_load(Path("config/config.yaml").read_text())
    config["train"].update(
        sampling="lesion", lesion_size_power=0.5, instance_loss_weight=1.0, init_checkpoint=None
    )
    config["train"].setdefault("stage2", {})["proposal_sensitivity"] = 0.98
    assert not config_schema.problems(config)
    config["train"]["sampling"] = "voxels"
    config["train"]["stage2"]["proposal_sensitivity"] = 1.5
    found = config_schema.problems(config)
    assert len(found) == 2 and any("sampling" in p for p in found)


def test_status_and_report_show_the_cascade_ceiling(tmp_path):
    from metsflow.active_learning.status import cascade_status
    from metsflow.core.io import write_json
    from metsflow.core.layout import Layout
    from metsflow.evaluation.report import cascade_ceiling

    layout = Layout(tmp_path)
    assert cascade_status(tmp_path) == ""
    lost = [{"size_bin": "< 3 mm"}, {"size_bin": "< 3 mm"}, {"size_bin": "3-10 mm"}]
    summary = {
        "proposal_sensitivity": 0.981,
        "sensitivity_after": 0.9,
        "fp_per_patient_after": 0.75,
        "lost_lesions": lost,
    }
    write_json(layout.stage2_summary(1), summary)
    table = cascade_ceiling([{"round": 1, **summary}])
    lost_columns = [c for c in table.columns if c.startswith("lost ")]
    assert table.loc[0, lost_columns].tolist() == [2, 1, 0]
    text = cascade_status(tmp_path)
    assert "0.981" in text and "0.75" in text
    assert text.splitlines()[-1].split()[-3:] == ["2", "1", "0"]


def test_suggestions_number_the_high_sensitivity_proposals():
    """With proposal_sensitivity the candidates are components of fg_prob >= threshold: the
    review suggestion map (postprocess._candidate_map) numbers those, not the argmax's."""
    from metsflow.models.postprocess import _candidate_map

    shape = (24, 24, 24)
    pred = np.zeros(shape, np.uint8)
    pred[4:7, 4:7, 4:7] = lab.ENHANCING
    fg = np.zeros(shape, np.float32)
    fg[4:7, 4:7, 4:7] = 0.9
    fg[16:18, 16:18, 16:18] = 0.3
    params = {**cascade.DEFAULTS, "crop_size": [8, 8, 8], "proposal_threshold": 0.2}
    argmax_meta = {"params": params, "threshold": 0.5}
    high_meta = {"params": {**params, "proposal_sensitivity": 0.98}, "threshold": 0.5}
    assert _candidate_map(pred, fg, argmax_meta).max() == 1
    components = _candidate_map(pred, fg, high_meta)
    _, candidates = cascade.filter_prediction(
        pred, np.zeros((1, *shape)), fg, _KeepAll(), high_meta
    )
    assert components.max() == len(candidates) == 2
    for cand in candidates:
        assert components[cand.centroid] == cand.index
