"""Detection levers (issue #23): lesion-balanced sampling, hard-negative crops on what a
reviewer deleted from the presegmentation, the instance-aware loss, the high-sensitivity stage-1
proposals handed to stage 2, and their config keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _tiny_models import make_prep_study, tiny_params
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.transforms import RandCropByPosNegLabeld

from metsflow.core import config as config_schema
from metsflow.core import labels as lab
from metsflow.models import cascade, train
from metsflow.models.networks import InstanceDiceLoss, build_loss
from metsflow.models.sampling import (
    VOXEL_UNIFORM,
    LesionInstancesd,
    RandLesionCropd,
    false_positive_mask,
    lesion_weights,
)

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
    params["proposal_sensitivity"] = 0.98 if high_sensitivity else None
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
        sampling="lesion",
        lesion_size_power=0.5,
        instance_loss_weight=1.0,
        init_checkpoint=None,
        hard_negative_fraction=0.5,
    )
    config["train"].setdefault("stage2", {})["proposal_sensitivity"] = 0.98
    assert not config_schema.problems(config)
    config["train"]["sampling"] = "voxels"
    config["train"]["stage2"]["proposal_sensitivity"] = 1.5
    config["train"]["hard_negative_fraction"] = 1.2
    found = config_schema.problems(config)
    assert len(found) == 3 and any("sampling" in p for p in found)
    assert any("hard_negative_fraction" in p for p in found)


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
    review suggestion map (cascade.proposal_components, which postprocess asks) numbers those,
    not the argmax's."""
    shape = (24, 24, 24)
    pred = np.zeros(shape, np.uint8)
    pred[4:7, 4:7, 4:7] = lab.ENHANCING
    fg = np.zeros(shape, np.float32)
    fg[4:7, 4:7, 4:7] = 0.9
    fg[16:18, 16:18, 16:18] = 0.3
    params = {
        **cascade.DEFAULTS,
        "crop_size": [8, 8, 8],
        "proposal_threshold": 0.2,
        "proposal_sensitivity": None,
    }
    argmax_meta = {"params": params, "threshold": 0.5}
    high_meta = {"params": {**params, "proposal_sensitivity": 0.98}, "threshold": 0.5}
    assert cascade.proposal_components(pred, fg, argmax_meta).max() == 1
    components = cascade.proposal_components(pred, fg, high_meta)
    _, candidates = cascade.filter_prediction(
        pred, np.zeros((1, *shape)), fg, _KeepAll(), high_meta
    )
    assert components.max() == len(candidates) == 2
    for cand in candidates:
        assert components[cand.centroid] == cand.index


# ---------------------------------------------------------------- hard negatives (issue #23)
def _hard_negative_study(box: tuple[slice, ...], shape=(32, 32, 32)) -> dict:
    """A study with one 4^3 lesion in a corner, a brain that leaves a 2-voxel rim, and a
    hard-negative mask filling ``box``."""
    lesion = np.zeros((1, *shape), dtype=np.uint8)
    lesion[0, 2:6, 2:6, 2:6] = 1
    brain = np.zeros_like(lesion)
    brain[0, 2:-2, 2:-2, 2:-2] = 1
    hard = np.zeros_like(lesion)
    hard[(0, *box)] = 1
    return {
        "image": np.zeros((1, *shape), dtype=np.float32),
        "label": lesion.copy(),
        "lesion": lesion,
        "brain": brain,
        "hard_negatives": hard,
    }


def _draws(crop, data, n):
    """(kind, centre before the shift that fits the patch) of ``n`` seeded draws."""
    out = []
    for seed in range(n):
        crop.set_random_state(seed=seed)
        crop(data)
        out.append((crop.kind, crop.drawn_centre))
    return out


_corner = st.integers(0, 28)


@settings(max_examples=25, deadline=None)
@given(lo=st.tuples(_corner, _corner, _corner), size=st.integers(1, 4), pos=st.floats(0, 3))
def test_every_negative_crop_centres_on_the_hard_negatives_at_fraction_1(lo, size, pos):
    box = tuple(slice(a, a + size) for a in lo)
    study = _hard_negative_study(box)
    data = LesionInstancesd()(study)
    assert len(data["hard_negative_indices"]) == int(study["hard_negatives"].sum())
    crop = RandLesionCropd(["image", "label"], PATCH, pos=pos, neg=1.0, hard_negative_fraction=1)
    draws = _draws(crop, data, 40)
    negatives = [centre for kind, centre in draws if kind != "lesion"]
    assert negatives and all(kind in ("lesion", "hard_negative") for kind, _ in draws)
    assert all(study["hard_negatives"][(0, *c)] for c in negatives)


def test_hard_negative_fraction_splits_the_negatives_and_0_changes_nothing():
    study = _hard_negative_study((slice(20, 24),) * 3)
    data = LesionInstancesd()(study)
    keys = ["image", "label"]
    half = _draws(
        RandLesionCropd(keys, PATCH, pos=0.0, neg=1.0, hard_negative_fraction=0.5), data, 200
    )
    share = np.mean([kind == "hard_negative" for kind, _ in half])
    assert 0.38 < share < 0.62
    # Fraction 0: the very patches of a crop that never heard of hard negatives.
    without = {k: v for k, v in study.items() if k != "hard_negatives"}
    plain = _draws(RandLesionCropd(keys, PATCH, pos=1.0, neg=1.0), LesionInstancesd()(without), 60)
    off = _draws(RandLesionCropd(keys, PATCH, pos=1.0, neg=1.0, hard_negative_fraction=0), data, 60)
    assert off == plain and {kind for kind, _ in off} == {"lesion", "brain"}


def test_a_study_without_hard_negatives_falls_back_to_brain_centres():
    study = _hard_negative_study((slice(20, 24),) * 3)
    for data in (
        {k: v for k, v in study.items() if k != "hard_negatives"},  # no mask at all
        {**study, "hard_negatives": np.zeros_like(study["hard_negatives"])},  # nothing deleted
    ):
        data = LesionInstancesd()(data)
        assert len(data["hard_negative_indices"]) == 0
        crop = RandLesionCropd(["image", "label"], PATCH, pos=0, neg=1, hard_negative_fraction=1)
        draws = _draws(crop, data, 40)
        assert {kind for kind, _ in draws} == {"brain"}
        assert all(study["brain"][(0, *c)] for _, c in draws)
        assert "hard_negative_indices" not in crop(data)[0]


def test_voxel_uniform_lesion_draw_is_the_pos_neg_draw(two_lesions):
    """ "pos_neg" sampling with hard negatives keeps its positive draw: every lesion voxel
    alike, so the single-voxel lesion is centred ~1 in 1,729 times, as by the MONAI crop."""
    data = LesionInstancesd()(two_lesions)
    crop = RandLesionCropd(["image", "label"], PATCH, pos=1.0, neg=0.0, size_power=VOXEL_UNIFORM)
    assert small_lesion_share(crop, data) < 0.05
    np.testing.assert_allclose(lesion_weights([1, 1000], VOXEL_UNIFORM), [1 / 1001, 1000 / 1001])


def test_false_positive_mask_keeps_the_components_the_reference_does_not_touch():
    predicted = np.zeros((20, 20, 20), bool)
    predicted[2:5, 2:5, 2:5] = True  # kept by the reviewer (touches the reference)
    predicted[10:12, 10:12, 10:12] = True  # deleted
    predicted[15, 15, 15] = predicted[16, 16, 16] = True  # one 26-connected deleted lesion
    reference = np.zeros_like(predicted)
    reference[4:8, 4:8, 4:8] = True
    mask = false_positive_mask(predicted, reference)
    expected = predicted.copy()
    expected[2:5, 2:5, 2:5] = False
    np.testing.assert_array_equal(mask, expected)
    assert not false_positive_mask(np.zeros_like(predicted), reference).any()


def _native(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    from metsflow.core.io import save_nifti

    save_nifti(path, data, affine, np.uint8)
    return path


# A native grid at 0.5 mm over the tiny studies' 1 mm preprocessed grid (_tiny_models.AFFINE).
NATIVE = np.diag([0.5, 0.5, 0.5, 1.0])
NATIVE[:3, 3] = [-20.0, -22.0, -18.0]


def _reviewed(tmp_path: Path, study_id: str) -> tuple[Path, Path]:
    """A confirmed native label (one lesion) and the presegmentation it was corrected from
    (that lesion, a deleted 4^3 mm component at prep voxels 30-33, and a deleted component of
    one native voxel, smaller than a preprocessed voxel)."""
    label = np.zeros((80, 80, 80), np.uint8)
    label[20:30, 20:30, 20:30] = lab.ENHANCING
    preseg = np.zeros_like(label)
    preseg[22:32, 22:32, 22:32] = lab.ENHANCING  # the kept lesion, grown: still touches
    preseg[24:26, 24:26, 24:26] = lab.NECROSIS
    preseg[60:68, 60:68, 60:68] = lab.ENHANCING  # deleted: prep voxels 30..33
    preseg[5, 75, 5] = lab.ENHANCING  # deleted, 0.125 mm^3
    preseg[70:74, 10:14, 10:14] = lab.EDEMA  # edema alone is no lesion
    folder = tmp_path / "native" / study_id
    return (
        _native(folder / "label.nii.gz", label, NATIVE),
        _native(folder / "presegmentation.nii.gz", preseg, NATIVE),
    )


def test_hard_negatives_on_prep_grid_are_what_the_reviewer_deleted(tmp_path):
    import nibabel as nib

    prep = tmp_path / "prep"
    for study_id in ("A", "B", "C"):
        make_prep_study(prep, study_id, sequences=("t1c",))
    label_a, preseg_a = _reviewed(tmp_path, "A")
    label_b, _ = _reviewed(tmp_path, "B")
    label_c, _ = _reviewed(tmp_path, "C")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    confirmed = {"A": label_a, "B": label_b, "C": label_c}
    found = train.hard_negatives_on_prep_grid(
        confirmed, {"A": preseg_a, "C": broken}, prep, tmp_path / "hn"
    )
    assert set(found) == {"A"}  # B has no presegmentation, C an unreadable one: no error
    img = nib.load(str(found["A"]))
    np.testing.assert_allclose(img.affine, nib.load(str(prep / "A" / "t1c.nii.gz")).affine)
    mask = np.asarray(img.dataobj)
    expected = np.zeros(mask.shape, np.uint8)
    expected[30:34, 30:34, 30:34] = 1
    np.testing.assert_array_equal(mask, expected)


def _round_layout(tmp_path: Path):
    """A layout after round 1: seed S0 and confirmed P1 (with a presegmentation) and P2
    (without one) preprocessed; round 1's annotation table and review package."""
    from metsflow.core.io import write_table
    from metsflow.core.layout import PRESEGMENTATION_NAME, Layout
    from metsflow.jobs.train import TrainingInputs

    layout = Layout(str(tmp_path / "results"))
    prep = Path(layout.stage_root("preprocessed"))
    for study_id in ("S0", "P1", "P2"):
        make_prep_study(prep, study_id, sequences=("t1c", "flair"))
    manifest = tmp_path / "manifest.tsv"
    write_table(manifest, pd.DataFrame({"study_id": ["S0", "P1", "P2"], "status": "ok"}))
    plan = tmp_path / "plan.tsv"
    write_table(
        plan, pd.DataFrame({"study_id": ["S0", "P1", "P2"], "role": ["seed", "pool", "pool"]})
    )
    rows = []
    for study_id in ("P1", "P2"):
        label, preseg = _reviewed(tmp_path, study_id)
        if study_id == "P1":
            review = Path(layout.review_dir(1)) / study_id / PRESEGMENTATION_NAME
            review.parent.mkdir(parents=True)
            review.write_bytes(preseg.read_bytes())
        rows.append({"study_id": study_id, "status": "confirmed", "label": str(label)})
    write_table(layout.annotations(1), pd.DataFrame(rows))
    return TrainingInputs(
        round_index=1,
        plan_path=str(plan),
        preprocess_manifests=[str(manifest)],
        annotation_tables=[layout.annotations(1)],
        train={},
        seed=0,
        layout=layout,
    )


def test_confirmed_items_carry_their_hard_negatives_only_when_asked(tmp_path):
    job = _round_layout(tmp_path)
    _, items, _, n_confirmed = job.labelled_items(tmp_path / "labels", hard_negatives=True)
    by_id = {item["study_id"]: item for item in items}
    assert set(by_id) == {"S0", "P1", "P2"} and n_confirmed == 2
    # P1's reviewer deleted a component; P2 has no presegmentation; S0 was never reviewed.
    assert [s for s in by_id if "hard_negatives" in by_id[s]] == ["P1"]
    assert Path(by_id["P1"]["hard_negatives"]).parent == tmp_path / "labels" / "hard_negatives"
    _, items, _, _ = job.labelled_items(tmp_path / "off", hard_negatives=False)
    assert not any("hard_negatives" in item for item in items)
    assert not (tmp_path / "off" / "hard_negatives").exists()  # no presegmentation read


@pytest.mark.parametrize("sampling", ["pos_neg", "lesion"])
def test_training_stream_centres_negatives_on_the_hard_negatives(tmp_path, sampling):
    studies = [make_prep_study(tmp_path, f"S{i}", seed=i) for i in range(2)]
    hard = np.zeros((40, 40, 40), np.uint8)
    hard[8:11, 30:33, 20:23] = 1
    from _tiny_models import AFFINE

    from metsflow.core.io import save_nifti

    save_nifti(tmp_path / "hn.nii.gz", hard, AFFINE, np.uint8)
    studies[0]["hard_negatives"] = str(tmp_path / "hn.nii.gz")
    params = tiny_params(
        patch_size=[16, 16, 16],
        optimizer="adam",
        iterations=3,
        val_interval=0,
        sampling=sampling,
        hard_negative_fraction=1.0,
        pos_neg_ratio=[1, 1],
    )
    run = train.resolve_params(params)
    cache = train._cache(studies, run, [16, 16, 16], 0)
    transform = train._sample_transform(run)
    crop = transform.transforms[0]
    assert isinstance(crop, RandLesionCropd)
    assert crop.size_power == (VOXEL_UNIFORM if sampling == "pos_neg" else 0.5)
    stream = train.PatchStream(cache, transform, seed=0, first_sample=0, count=80)
    kinds = {"lesion": 0, "hard_negative": 0, "brain": 0}
    for index in range(len(stream)):
        stream[index]
        kinds[crop.kind] += 1
        if crop.kind == "hard_negative":
            assert hard[crop.drawn_centre]
    # Negatives of S0 (1/4 of the draws) on its hard negatives; S1 has none: brain-centred.
    assert kinds["hard_negative"] > 8 and kinds["brain"] > 8 and kinds["lesion"] > 25
    result = train.train_model(studies, [], params, tmp_path / "m.pt", device="cpu")
    assert result["iterations"] == 3 and np.isfinite(result["final_loss"])


def test_fraction_0_keeps_the_monai_crop():
    run = train.resolve_params(tiny_params(patch_size=[16, 16, 16], sampling="pos_neg"))
    assert run.train.hard_negative_fraction == 0.0
    assert isinstance(train._sample_transform(run).transforms[0], RandCropByPosNegLabeld)


def test_a_checkpoint_on_argmax_proposals_keeps_them_under_the_new_default():
    """``proposal_sensitivity`` became 0.98 by default; a stage-2 checkpoint (or a config) that
    says null means stage 1's argmax, not "the default"."""
    assert cascade.resolve_params({}).proposal_sensitivity == 0.98
    assert cascade.resolve_params({"proposal_sensitivity": None}).proposal_sensitivity is None
    # Keys whose None only means "the default" still get it.
    assert cascade.resolve_params({"iterations": None}).iterations == 300


def test_stage2_job_falls_back_to_argmax_proposals_when_they_leave_nothing_to_learn(
    tmp_path, monkeypatch
):
    """A weak stage 1 can need the threshold floor for 98% proposal sensitivity, where its
    proposals merge into regions that all touch a lesion: no false positive for stage 2. The
    round then goes on with argmax proposals instead of failing."""
    import collections

    import pandas as pd

    from metsflow.core.layout import Layout
    from metsflow.core.settings import InferSettings
    from metsflow.jobs import train as train_job
    from metsflow.models import infer

    plan = pd.DataFrame({"study_id": ["S0", "S1"], "patient_id": ["P0", "P1"]})
    items = [{"study_id": "S0"}], [{"study_id": "S1"}]
    monkeypatch.setattr(
        train_job.TrainingInputs, "labelled_items", lambda self, d: (plan, *items, None)
    )
    monkeypatch.setattr(infer, "load_ensemble", lambda paths, device: ([], {"channels": ["t1c"]}))
    monkeypatch.setattr(
        cascade,
        "mine_proposal_threshold",
        lambda *a: {"threshold": 0.05, "proposal_sensitivity": 1.0},
    )
    mined = []
    monkeypatch.setattr(cascade, "mine_candidates", lambda *a: mined.append(a[5]) or [])
    trained, devices = [], []

    def fake_train(train, val, channels, params, out, stage1_checkpoint=None, device=None):
        trained.append(params)
        devices.append(device)
        if params.proposal_sensitivity is not None:
            raise cascade.NoCandidatesError("stage 2 needs lesion and false-positive candidates")
        return collections.defaultdict(float)  # the figures stage 2 would report

    monkeypatch.setattr(cascade, "train_stage2", fake_train)
    job = train_job.TrainingInputs(
        round_index=0, plan_path="", preprocess_manifests=[], annotation_tables=[],
        train={"stage2": {"proposal_sensitivity": 0.98}}, seed=0, layout=Layout(tmp_path),
    )  # fmt: skip
    summary = train_job.run_train_stage2(job, InferSettings(), ["m.pt"])
    assert [p.proposal_sensitivity for p in trained] == [0.98, None]
    assert [str(d) for d in devices] == ["cpu", "cpu"]  # the job's device (no GPU here)
    # The argmax retry mines at the configured threshold, not the floor the proposals needed.
    assert trained[1].proposal_threshold == cascade.DEFAULTS["proposal_threshold"]
    assert mined[-1].proposal_threshold == cascade.DEFAULTS["proposal_threshold"]
    assert summary["proposal_threshold"] == cascade.DEFAULTS["proposal_threshold"]
