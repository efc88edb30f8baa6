"""Re-seg training data (fictitious priors in the sample stream), fold splits of the training
job, and the inference cascade hook (stage 2 + follow-up merge) on tiny CPU networks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from _tiny_models import AFFINE, ALL_AUGMENTATIONS, make_checkpoint, make_prep_study, tiny_params

from metsflow.cohort.splits import fold_split
from metsflow.core import labels as lab
from metsflow.core.io import save_nifti
from metsflow.imaging.priors import RandFictitiousPriord
from metsflow.models import train
from metsflow.models.cascade import build_classifier, network_spec, resolve_params, save_stage2
from metsflow.models.infer import predict_items, predict_study
from metsflow.models.postprocess import CascadePostProcess
from metsflow.models.train import reseg_params


def test_reseg_samples_carry_a_fictitious_prior_near_the_label(tmp_path):
    item = make_prep_study(tmp_path, "S0", seed=0)  # no real prior: channel would be zeros
    params = train.resolve_params(
        tiny_params(
            channels=["t1c", "prior", "t2"], patch_size=[16, 16, 16], seed=0, **ALL_AUGMENTATIONS
        )
    )
    cache = train._cache([item], params, [16, 16, 16], 0)
    transform = train._sample_transform(params)
    assert isinstance(transform.transforms[1], RandFictitiousPriord)
    lesion = lab.whole_lesion(np.asarray(nib.load(item["label"]).dataobj))
    stream = train.PatchStream(cache, transform, seed=0, first_sample=0, count=8)
    priors_seen = 0
    for n in range(8):
        sample = stream[n]
        prior = sample["image"][1].numpy()
        assert sample["image"].shape == (3, 16, 16, 16)
        # Binary: nearest-neighbour spatial augmentation, no intensity augmentation.
        assert set(np.unique(prior)) <= {0.0, 1.0}
        priors_seen += prior.any()
    assert priors_seen > 0
    assert lesion.any()
    # Without the prior channel, no fictitious-prior step.
    plain = train.resolve_params(tiny_params(patch_size=[16, 16, 16]))
    assert not any(
        isinstance(t, RandFictitiousPriord) for t in train._sample_transform(plain).transforms
    )


def test_reseg_params_override_channels_and_iterations():
    model = tiny_params()
    cfg = {
        "iterations": 100,
        "finetune_iterations": 50,
        "folds": 3,
        "reseg": {"enabled": True, "iterations": 7, "finetune_iterations": 3},
        "stage2": {"enabled": True},
    }
    run = reseg_params(model, cfg, [1, 1, 1], seed=5, round_index=0)
    assert run.model.channels == ["t1c", "prior", "t2"] and run.train.iterations == 7
    assert run.train.fictitious_prior and run.train.seed == 5
    assert not {"reseg", "stage2", "enabled"} & set(run.as_params())
    assert reseg_params(model, cfg, [1, 1, 1], seed=5, round_index=2).train.iterations == 3


def test_fold_split_keeps_patients_together():
    plan = pd.DataFrame(
        {"study_id": [f"S{i}" for i in range(10)], "patient_id": [f"P{i // 2}" for i in range(10)]}
    )
    items = [{"study_id": s} for s in plan.study_id]
    seen = []
    for fold in range(3):
        tr, va = fold_split(items, plan, fold, 3, seed=1)
        tr_p = {plan.set_index("study_id").patient_id[i["study_id"]] for i in tr}
        va_p = {plan.set_index("study_id").patient_id[i["study_id"]] for i in va}
        assert not tr_p & va_p and len(tr) + len(va) == 10
        seen += [i["study_id"] for i in va]
    assert sorted(seen) == sorted(plan.study_id)


def test_cascade_hook_filters_and_merges_followups(tmp_path):
    small = (24, 24, 24)
    base = make_prep_study(tmp_path / "prep", "S0", seed=0, shape=small)
    follow = make_prep_study(tmp_path / "prep", "S1", seed=0, shape=small)
    label = np.asarray(nib.load(follow["label"]).dataobj)
    save_nifti(tmp_path / "prior.nii.gz", label, AFFINE, np.uint8)
    follow["prior"] = str(tmp_path / "prior.nii.gz")
    stage1 = make_checkpoint(tmp_path / "s1.pt", 0)
    reseg = make_checkpoint(tmp_path / "rs.pt", 1, channels=["t1c", "prior", "t2"])
    s2_params = resolve_params({"crop_size": [16, 16, 16], "filters": [4, 8]})
    torch.manual_seed(0)
    spec = network_spec(["t1c", "flair"], s2_params)
    # Threshold 1.01: stage 2 removes every candidate, so only re-seg's tracked lesions remain.
    save_stage2(
        tmp_path / "s2.pt",
        build_classifier(spec),
        {"network": spec, "channels": ["t1c", "flair"], "params": s2_params, "threshold": 1.01},
    )
    settings = {"overlap": 0.25, "sw_batch_size": 2}
    device = torch.device("cpu")
    hook = CascadePostProcess.from_checkpoints(
        ["t1c", "flair"], str(tmp_path / "s2.pt"), [str(reseg)], settings, device
    )
    from metsflow.models.infer import load_ensemble

    networks, meta = load_ensemble([stage1], device=device)
    row_base = predict_study(networks, meta, base, tmp_path / "out", settings, device, hook)
    assert row_base["lesion_count"] == 0  # baseline: no prior, stage 2 dropped everything
    assert row_base["stage2_removed"] == row_base["stage1_lesions"]
    assert "tracked_lesions" not in row_base
    row_fu = predict_study(networks, meta, follow, tmp_path / "out", settings, device, hook)
    assert row_fu["new_lesions"] == 0
    assert row_fu["lesion_count"] == row_fu["tracked_lesions"]
    pred = np.asarray(nib.load(tmp_path / "out" / "S1" / "pred.nii.gz").dataobj)
    # Every remaining lesion touches the (2-voxel dilated) prior.
    from scipy import ndimage

    near = ndimage.binary_dilation(lab.whole_lesion(label), iterations=3)
    assert not (lab.whole_lesion(pred) & ~near).any() or row_fu["tracked_lesions"] > 0
    # No hook: plain stage-1 output, no cascade columns.
    rows = predict_items([stage1], [base], tmp_path / "plain", settings, "cpu")
    assert "stage2_removed" not in rows[0]
    with pytest.raises(ValueError, match="prior"):
        CascadePostProcess(None, load_ensemble([stage1], device=device), settings, device)
