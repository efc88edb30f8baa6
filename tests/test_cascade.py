"""Stage 2 of the cascade: candidates, operating point, filtering at a threshold, checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from metsflow.core import labels as lab
from metsflow.models import cascade


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


SHAPE = (40, 40, 40)


def two_lesion_prediction():
    pred = np.zeros(SHAPE, np.uint8)
    pred[ball(SHAPE, (10, 10, 10), 6)] = 2  # edema of lesion A
    pred[ball(SHAPE, (10, 10, 10), 3)] = 1
    pred[ball(SHAPE, (30, 30, 30), 6)] = 2  # edema of lesion B
    pred[ball(SHAPE, (30, 30, 30), 3)] = 3
    return pred


class FixedScores(torch.nn.Module):
    """Stand-in classifier: logit from the candidate's position (left half: high score)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        # Channel -2 is the candidate mask; crops are centred, so use the fg-prob channel mean.
        return (x[:, -1].mean(dim=(1, 2, 3)) * 100 - 1).unsqueeze(1) + self.dummy * 0


# A stage-2 checkpoint trained on stage 1's argmax (``proposal_sensitivity`` null).
ARGMAX_PROPOSALS = {"crop_size": [16, 16, 16], "proposal_sensitivity": None}


def test_filter_removes_candidates_below_threshold_with_their_edema():
    pred = two_lesion_prediction()
    fg_prob = np.zeros(SHAPE, np.float32)
    fg_prob[ball(SHAPE, (10, 10, 10), 3)] = 0.9  # A confident, B not
    image = np.zeros((1, *SHAPE), np.float32)
    meta = {"threshold": 0.5, "params": ARGMAX_PROPOSALS}
    filtered, cands = cascade.filter_prediction(pred, image, fg_prob, FixedScores(), meta, "S")
    assert len(cands) == 2
    scores = sorted(c.score for c in cands)
    assert scores[0] < 0.5 < scores[1]
    np.testing.assert_array_equal(filtered[:20, :20, :20], pred[:20, :20, :20])
    assert not filtered[20:, 20:, 20:].any()  # lesion B and its edema are gone
    # Threshold 0 keeps everything.
    kept, _ = cascade.filter_prediction(
        pred, image, fg_prob, FixedScores(), {**meta, "threshold": 0.0}
    )
    np.testing.assert_array_equal(kept, pred)


RULE = "target_sensitivity"


def test_choose_threshold_meets_target_sensitivity():
    # 4 reference lesions; candidates: scores with hits (empty = false positive).
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1])
    hits = [[1], [], [2], [3], [], [4], []]
    full = cascade.choose_threshold(scores, hits, 4, rule=RULE, target_sensitivity=1.0)
    assert full["threshold"] == pytest.approx(0.2)
    assert full["sensitivity_after"] == 1.0 and full["fdr_after"] == pytest.approx(2 / 6)
    assert full["fdr_before"] == pytest.approx(3 / 7)
    part = cascade.choose_threshold(scores, hits, 4, rule=RULE, target_sensitivity=0.75)
    assert part["threshold"] == pytest.approx(0.6)
    assert part["sensitivity_after"] == 0.75 and part["fdr_after"] == pytest.approx(1 / 4)
    # Stage 1 itself finds only 3 of 5: the goal becomes stage 1's sensitivity.
    capped = cascade.choose_threshold(scores, hits, 5, rule=RULE, target_sensitivity=0.95)
    assert capped["sensitivity_after"] == capped["sensitivity_before"] == 0.8


def test_crop_at_pads_outside_the_volume():
    volume = np.arange(27, dtype=np.float32).reshape(1, 3, 3, 3) + 1
    crop = cascade.crop_at(volume, (0, 0, 0), (4, 4, 4))
    assert crop.shape == (1, 4, 4, 4)
    assert crop[0, 2, 2, 2] == volume[0, 0, 0, 0] and crop[0, 0, 0, 0] == 0


def test_train_stage2_writes_checkpoint_with_operating_point(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *SHAPE)).astype(np.float32) * 0.1
    reference = ball(SHAPE, (10, 10, 10), 3) | ball(SHAPE, (30, 10, 30), 3)
    image[0][reference] += 3.0  # real lesions are bright
    fg_prob = np.zeros(SHAPE, np.float32)
    fg_prob[reference] = 0.8
    fg_prob[ball(SHAPE, (30, 30, 10), 2)] = 0.6  # a dark false positive
    params = {"crop_size": [16, 16, 16], "filters": [4, 8], "iterations": 15, "batch_size": 4}
    study = cascade.study_candidates("S", image, fg_prob, reference, params, add_reference=True)
    assert study.n_reference == 2
    assert sorted(study.labels.tolist()) == [0, 1, 1, 1, 1]  # 3 stage-1 + 2 reference
    assert study.sources.count("reference") == 2
    val = cascade.study_candidates("S", image, fg_prob, reference, params, add_reference=False)
    out = tmp_path / "stage2.pt"
    meta = cascade.train_stage2([study], [val], ["t1c"], params, out)
    assert meta["sensitivity_after"] >= min(0.95, meta["sensitivity_before"])
    assert meta["fdr_after"] <= meta["fdr_before"]
    network, loaded = cascade.load_stage2(out, ["t1c"])
    assert loaded["threshold"] == meta["threshold"]
    with pytest.raises(ValueError, match="channels"):
        cascade.load_stage2(out, ["t1c", "prior"])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a stage-2 checkpoint"):
        cascade.load_stage2(tmp_path / "junk.pt")


def test_mine_candidates_from_a_stage1_ensemble_adds_reference_lesions_for_training(tmp_path):
    import nibabel as nib
    from _tiny_models import make_checkpoint, make_prep_study

    from metsflow.core import labels as lab
    from metsflow.models.infer import load_ensemble

    item = make_prep_study(tmp_path / "prep", "S0")
    label = np.asarray(nib.load(item["label"]).dataobj)
    _, n_lesions = lab.lesion_components(lab.whole_lesion(label))
    networks, meta = load_ensemble([make_checkpoint(tmp_path / "m.pt", 0)], device="cpu")
    infer = {"overlap": 0.25, "sw_batch_size": 2}
    params = {"crop_size": [16, 16, 16], "proposal_threshold": 0.3}
    mined = {
        add: cascade.mine_candidates(
            networks, meta, [item], infer, torch.device("cpu"), params, add, {"S0": "P0"}
        )[0]
        for add in (True, False)
    }
    assert mined[True].n_reference == mined[False].n_reference == n_lesions > 0
    assert mined[True].sources.count("reference") == n_lesions
    assert "reference" not in mined[False].sources
    assert mined[True].patient_id == "P0" and mined[True].study_id == "S0"
    assert len(mined[True].ref_diameters_mm) == n_lesions  # 1 mm grid: spacing from the affine


def test_cascade_postprocess_hands_the_dropped_candidates_to_the_writer(tmp_path):
    """What stage 2 drops becomes the review's "possible lesions": a map and a table written
    next to the prediction (segment_study takes them out of the row)."""
    import json

    from metsflow.core.layout import SUGGESTIONS, SUGGESTIONS_TABLE
    from metsflow.models.infer import SUGGESTIONS_KEY, write_outputs
    from metsflow.models.postprocess import CascadePostProcess

    pred = two_lesion_prediction()
    probs = np.zeros((2, *SHAPE), np.float32)
    probs[0] = 1.0
    probs[1][ball(SHAPE, (10, 10, 10), 3)] = 0.9  # A confident, B not
    probs[0] -= probs[1]
    inp = {
        "image": np.zeros((1, *SHAPE), np.float32),
        "brain": np.ones(SHAPE, bool),
        "affine": np.eye(4),  # the grid's spacing, for keep_diameter_mm
    }
    meta = {"threshold": 0.5, "params": ARGMAX_PROPOSALS}
    post = CascadePostProcess((FixedScores(), meta), None, {}, torch.device("cpu"))
    filtered, extra = post({"study_id": "S"}, inp, probs, pred)
    ids, rows = extra[SUGGESTIONS_KEY]
    assert extra["stage2_removed"] == 1 and len(rows) == 1 and rows[0]["stage2_score"] < 0.5
    assert np.array_equal(ids == 1, ball(SHAPE, (30, 30, 30), 3))  # lesion B's core
    write_outputs(
        [
            (tmp_path / SUGGESTIONS, ids, np.eye(4), np.uint8),
            (tmp_path / SUGGESTIONS_TABLE, rows, np.eye(4), "json"),
        ]
    )
    assert json.loads((tmp_path / SUGGESTIONS_TABLE).read_text())[0]["id"] == 1


# ------------------------------------------------------------ size-aware stage 2 (issue #23)
# On a 1 mm grid: a large lesion (radius 6: 12 mm across) and a large false positive that
# stage 2 scores low, a small lesion it scores high and a small false positive in between.
BIG_LESION, BIG_FP, SMALL_LESION, SMALL_FP = (10, 10, 10), (30, 10, 30), (30, 30, 30), (10, 30, 30)
KEEP_PARAMS = {
    "crop_size": [16, 16, 16],
    "filters": [4, 8],
    "iterations": 1,
    "batch_size": 2,
    "proposal_sensitivity": 0.98,  # candidates: components of fg_prob >= proposal_threshold
    "proposal_threshold": 0.3,
}


def _size_study():
    fg_prob = np.zeros(SHAPE, np.float32)
    for centre, radius, prob in [
        (BIG_LESION, 6, 0.35),
        (BIG_FP, 6, 0.45),
        (SMALL_LESION, 2, 0.9),
        (SMALL_FP, 2, 0.6),
    ]:
        fg_prob[ball(SHAPE, centre, radius)] = prob
    reference = ball(SHAPE, BIG_LESION, 6) | ball(SHAPE, SMALL_LESION, 2)
    return np.zeros((1, *SHAPE), np.float32), fg_prob, reference


def _peak_scores(network, crops, batch_size=32):
    """Stand-in stage-2 scores: the candidate's peak stage-1 probability (fg-prob channel)."""
    return crops[:, -1].max(axis=(1, 2, 3))


@pytest.mark.parametrize("keep", [None, 10.0])
def test_keep_diameter_keeps_a_big_low_scoring_candidate_on_validation_and_at_inference(
    tmp_path, monkeypatch, keep
):
    """keep_diameter_mm: the validation operating point and filter_prediction apply the same rule
    (cascade.size_aware_scores), so the threshold chosen on validation counts the big candidates
    as kept (the big false positive too) and inference keeps them whatever their score."""
    monkeypatch.setattr(cascade, "score_crops", _peak_scores)
    image, fg_prob, reference = _size_study()
    params = {**KEEP_PARAMS, "keep_diameter_mm": keep}

    def cands(add_reference):
        return cascade.study_candidates(
            "S", image, fg_prob, reference, params, add_reference, spacing=(1.0, 1.0, 1.0)
        )

    out = tmp_path / "stage2.pt"
    meta = cascade.train_stage2([cands(True)], [cands(False)], ["t1c"], params, out)
    lost = {(r["study_id"], r["lesion_id"]) for r in meta["lost_lesions"]}
    if keep is None:
        # Scores 0.9 / 0.6 / 0.45 / 0.35 at <= 1 FP: only the small lesion; the big one is lost.
        assert meta["threshold"] == pytest.approx(0.9)
        assert meta["sensitivity_after"] == 0.5 and meta["fp_per_patient_after"] == 0.0
        assert len(lost) == 1
    else:
        # Both big candidates score 1.0: the big lesion found, its false positive the one allowed.
        assert meta["threshold"] == pytest.approx(0.9)
        assert meta["sensitivity_after"] == 1.0 and meta["fp_per_patient_after"] == 1.0
        assert not lost
    network, loaded = cascade.load_stage2(out, ["t1c"])
    assert loaded["params"]["keep_diameter_mm"] == keep
    pred = np.zeros(SHAPE, np.uint8)
    filtered, candidates = cascade.filter_prediction(
        pred, image, fg_prob, network, loaded, "S", spacing=(1.0, 1.0, 1.0)
    )
    kept = {c.centroid for c in candidates if c.score >= loaded["threshold"]}
    big_kept = {BIG_LESION, BIG_FP} <= kept
    assert big_kept == (keep is not None) and SMALL_LESION in kept and SMALL_FP not in kept
    assert (filtered[BIG_LESION] == 1) == (keep is not None)
    if keep is not None:
        # 0.5 mm voxels: the same components are 6 mm across, under the 10 mm rule.
        _, small_grid = cascade.filter_prediction(
            pred, image, fg_prob, network, loaded, "S", spacing=(0.5, 0.5, 0.5)
        )
        assert not any(c.score >= loaded["threshold"] for c in small_grid if c.voxels > 100)
        with pytest.raises(ValueError, match="spacing"):
            cascade.filter_prediction(pred, image, fg_prob, network, loaded, "S")


def test_keep_diameter_is_checked_and_off_in_older_checkpoints(tmp_path):
    assert cascade.resolve_params({}).keep_diameter_mm is None
    assert cascade.resolve_params({"keep_diameter_mm": 10}).keep_diameter_mm == 10
    for bad in (0, -3.0):
        with pytest.raises(ValueError, match="keep_diameter_mm"):
            cascade.resolve_params({"keep_diameter_mm": bad})
    # A checkpoint written before the key existed: loads, and keeps no candidate by size.
    params = {k: v for k, v in cascade.resolve_params(KEEP_PARAMS).as_dict().items()}
    for key in cascade.LEGACY_PARAMS:
        del params[key]
    spec = cascade.network_spec(["t1c"], params)
    path = tmp_path / "old.pt"
    meta = {"network": spec, "channels": ["t1c"], "params": params, "threshold": 0.5}
    cascade.save_stage2(path, cascade.build_classifier(spec), meta)
    _, loaded = cascade.load_stage2(path, ["t1c"])
    assert loaded["params"]["keep_diameter_mm"] is None
    assert loaded["params"]["recovered_peak_fraction"] is None  # the whole proposal, as before
    assert loaded["params"]["split_proposals"] is False  # trained on whole proposals
    assert loaded["params"]["stage1_weight"] == 0.0  # stage 2's score alone
    assert loaded["params"]["select_every"] is None  # the last iteration's weights


def test_select_every_keeps_the_weights_of_the_best_validation_froc(tmp_path, monkeypatch):
    """select_every: stage 2 is scored on validation every k iterations and at the last; the
    checkpoint holds the weights of the best validation FROC score, its threshold is chosen on
    them, and the training itself is the same as without selection (same seed, same weights at
    the last iteration)."""
    image, fg_prob, reference = _size_study()
    params = {**KEEP_PARAMS, "iterations": 12, "batch_size": 2}

    def cands(add_reference):
        return cascade.study_candidates(
            "S", image, fg_prob, reference, params, add_reference, spacing=(1.0, 1.0, 1.0)
        )

    train, val = [cands(True)], [cands(False)]
    plain_meta = cascade.train_stage2(train, val, ["t1c"], params, tmp_path / "last.pt")
    member = plain_meta["members"][0]
    assert member["selected_iteration"] == 12 and member["selection"] == []
    last, _ = cascade.load_stage2(tmp_path / "last.pt")

    real, seen = cascade.score_crops, []
    ranks = {1: False, 2: True, 3: False}  # the second evaluation ranks the lesions first

    def scripted(network, crops, batch_size=32):
        seen.append({k: v.clone() for k, v in network.state_dict().items()})
        real(network, crops, batch_size)
        good = ranks.get(len(seen), True)
        truth = np.asarray([bool(h) for h in val[0].hits], dtype=float)
        return np.where(truth == good, 0.9, 0.1)

    monkeypatch.setattr(cascade, "score_crops", scripted)
    meta = cascade.train_stage2(
        train, val, ["t1c"], {**params, "select_every": 5}, tmp_path / "best.pt"
    )
    member = meta["members"][0]
    assert [s["iteration"] for s in member["selection"]] == [5, 10, 12]
    assert member["selection"][1]["score"] == 1.0 > member["selection"][0]["score"]
    assert member["selected_iteration"] == 10
    assert meta["sensitivity_after"] == 1.0 and meta["fp_per_patient_after"] == 0.0
    best, loaded = cascade.load_stage2(tmp_path / "best.pt")
    assert loaded["params"]["select_every"] == 5
    for key, value in best.state_dict().items():
        assert torch.equal(value, seen[1][key])  # iteration 10's weights
        assert torch.equal(seen[2][key], last.state_dict()[key])  # the same training
    with pytest.raises(ValueError, match="select_every"):
        cascade.resolve_params({"select_every": 0})


def test_ensemble_scores_by_the_mean_probability_of_classifiers_from_consecutive_seeds(tmp_path):
    """ensemble k: k classifiers from seeds seed .. seed + k - 1, the first the one a single
    classifier of that seed is; the checkpoint scores a crop by their mean probability, and the
    operating point is chosen on that score."""
    image, fg_prob, reference = _size_study()
    params = {**KEEP_PARAMS, "iterations": 6, "batch_size": 2, "seed": 3}

    def cands(add_reference):
        return cascade.study_candidates(
            "S", image, fg_prob, reference, params, add_reference, spacing=(1.0, 1.0, 1.0)
        )

    train, val = [cands(True)], [cands(False)]
    cascade.train_stage2(train, val, ["t1c"], params, tmp_path / "one.pt")
    cascade.train_stage2(train, val, ["t1c"], {**params, "seed": 4}, tmp_path / "next.pt")
    meta = cascade.train_stage2(train, val, ["t1c"], {**params, "ensemble": 2}, tmp_path / "two.pt")
    assert [m["seed"] for m in meta["members"]] == [3, 4]
    ensemble, loaded = cascade.load_stage2(tmp_path / "two.pt", ["t1c"])
    assert isinstance(ensemble, cascade.SeedEnsemble) and loaded["params"]["ensemble"] == 2
    singles = [cascade.load_stage2(tmp_path / f)[0] for f in ("one.pt", "next.pt")]
    for member, single in zip(ensemble.members, singles, strict=True):
        for key, value in member.state_dict().items():
            assert torch.equal(value, single.state_dict()[key])
    crops = val[0].crops
    mean = np.mean([cascade.score_crops(n, crops) for n in singles], axis=0)
    np.testing.assert_allclose(cascade.score_crops(ensemble, crops), mean, atol=1e-6)
    # The validation operating point reads the ensemble's scores.
    hits = [[("S", r) for r in h] for h in val[0].hits]
    curve = cascade.choose_threshold(mean, hits, val[0].n_reference)["froc"]
    assert [round(r["threshold"], 5) for r in loaded["froc"]] == [
        round(r["threshold"], 5) for r in curve
    ]
    assert isinstance(singles[0], torch.nn.Module) and not isinstance(
        singles[0], cascade.SeedEnsemble
    )
    with pytest.raises(ValueError, match="ensemble"):
        cascade.resolve_params({"ensemble": 0})


def test_stage1_weight_mixes_the_stage1_peak_on_validation_and_at_inference(tmp_path, monkeypatch):
    """stage1_weight w: a candidate's score is (1 - w) x stage 2's + w x its stage-1 peak, read
    alike by the validation operating point and filter_prediction (cascade.candidate_scores)."""
    # A stage 2 that cannot tell the candidates apart: stage 1's peak decides.
    monkeypatch.setattr(
        cascade, "score_crops", lambda network, crops, batch_size=32: np.full(len(crops), 0.2)
    )
    image, fg_prob, reference = _size_study()
    params = {**KEEP_PARAMS, "stage1_weight": 0.5}

    def cands(add_reference):
        return cascade.study_candidates(
            "S", image, fg_prob, reference, params, add_reference, spacing=(1.0, 1.0, 1.0)
        )

    out = tmp_path / "stage2.pt"
    meta = cascade.train_stage2([cands(True)], [cands(False)], ["t1c"], params, out)
    # Peaks 0.9 (small lesion), 0.6 (small FP), 0.45 (big FP), 0.35 (big lesion) -> scores
    # 0.55, 0.40, 0.325, 0.275: at <= 1 FP the small lesion alone, at its own score.
    assert meta["threshold"] == pytest.approx(0.55)
    assert meta["sensitivity_after"] == 0.5 and meta["fp_per_patient_after"] == 0.0
    network, loaded = cascade.load_stage2(out, ["t1c"])
    pred = np.zeros(SHAPE, np.uint8)
    _, candidates = cascade.filter_prediction(
        pred, image, fg_prob, network, loaded, "S", spacing=(1.0, 1.0, 1.0)
    )
    for c in candidates:
        assert c.score == pytest.approx(0.5 * 0.2 + 0.5 * c.max_prob)
    assert {c.centroid for c in candidates if c.score >= loaded["threshold"]} == {SMALL_LESION}
    # The size rule still has the last word; peaks are needed once the weight is set.
    both = {**params, "keep_diameter_mm": 10.0}
    scores = cascade.candidate_scores(np.array([0.2, 0.2]), [0.4, 0.4], [905, 5], (1, 1, 1), both)
    assert scores.tolist() == pytest.approx([1.0, 0.3])
    with pytest.raises(ValueError, match="peak"):
        cascade.candidate_scores(np.array([0.2]), None, [5], (1, 1, 1), params)
    unweighted = cascade.candidate_scores(np.array([0.2]), None, None, None, {})
    assert unweighted.tolist() == pytest.approx([0.2])
    with pytest.raises(ValueError, match="stage1_weight"):
        cascade.resolve_params({"stage1_weight": 1.5})


# ------------------------------------------------- lesion-aware shape of recovered lesions (#23)
RECOVERED, ARGMAX_LESION = (20, 20, 20), (8, 8, 8)


def _recovery_study():
    """A proposal (fg_prob >= 0.3) stage 1 scored below 0.5 everywhere but its peak blob: a
    0.35 ball of radius 6 holding a 0.9 peak blob (radius 2) and, apart from it, a 0.6 speck; and
    a lesion stage 1's argmax found (a 0.4 proposal around a 0.9 core)."""
    fg_prob = np.zeros(SHAPE, np.float32)
    fg_prob[ball(SHAPE, RECOVERED, 6)] = 0.35
    fg_prob[ball(SHAPE, (20, 20, 17), 2)] = 0.9  # the peak, z 15-19
    fg_prob[ball(SHAPE, (20, 20, 24), 1)] = 0.6  # >= 0.5 x peak, not connected to it
    fg_prob[ball(SHAPE, ARGMAX_LESION, 4)] = 0.4
    fg_prob[ball(SHAPE, ARGMAX_LESION, 2)] = 0.9
    pred = np.zeros(SHAPE, np.uint8)
    pred[ball(SHAPE, ARGMAX_LESION, 2)] = 1
    return np.zeros((1, *SHAPE), np.float32), fg_prob, pred


@pytest.mark.parametrize("fraction", [None, 0.5])
def test_recovered_lesion_is_its_peak_connected_part_with_recovered_peak_fraction(
    monkeypatch, fraction
):
    """recovered_peak_fraction: a kept proposal without argmax lesion voxels is added as the
    connected piece of its voxels >= fraction x its peak that holds the peak (not the far speck,
    not the 0.35 halo); None adds the whole proposal, as before. A lesion the argmax found keeps
    stage 1's shape either way."""
    monkeypatch.setattr(cascade, "score_crops", _peak_scores)
    image, fg_prob, pred = _recovery_study()
    params = {**KEEP_PARAMS, "recovered_peak_fraction": fraction}
    meta = {"threshold": 0.5, "params": params}
    filtered, candidates = cascade.filter_prediction(pred, image, fg_prob, None, meta, "S")
    assert sorted(c.centroid[0] for c in candidates if c.score >= 0.5) == [8, 20]  # both kept
    proposal = ball(SHAPE, RECOVERED, 6)
    recovered = (filtered == 1) & proposal
    if fraction is None:
        assert np.array_equal(recovered, proposal)
    else:
        peak_part = ball(SHAPE, (20, 20, 17), 2)
        assert np.array_equal(recovered, peak_part) and peak_part.sum() < proposal.sum()
        assert np.array_equal(cascade.peak_connected_region(proposal, fg_prob, 0.5), peak_part)
    assert set(np.unique(filtered[proposal])) <= {0, 1}
    outside = ~proposal
    np.testing.assert_array_equal(filtered[outside], pred[outside])  # the argmax lesion as it was


def test_recovered_peak_fraction_is_checked():
    assert cascade.resolve_params({}).recovered_peak_fraction is None
    assert cascade.resolve_params({"recovered_peak_fraction": 1}).recovered_peak_fraction == 1
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="recovered_peak_fraction"):
            cascade.resolve_params({"recovered_peak_fraction": bad})
    empty = np.zeros((3, 3, 3), bool)
    assert not cascade.peak_connected_region(empty, np.ones((3, 3, 3)), 0.5).any()


# ------------------------------------------------------------ the cascade's FROC on test studies
def test_scored_candidate_hits_number_the_reference_lesions_each_candidate_touches():
    """Argmax proposals: lesion A (a reference lesion) and lesion B (none) -> A touches
    ("S", 1), B is a false positive; every reference lesion is listed with its diameter."""
    pred = two_lesion_prediction()
    fg_prob = np.zeros(SHAPE, np.float32)
    fg_prob[ball(SHAPE, (10, 10, 10), 3)] = 0.9
    image = np.zeros((1, *SHAPE), np.float32)
    reference = ball(SHAPE, (10, 10, 10), 2) | ball(SHAPE, (10, 30, 10), 2)  # 2nd: missed
    meta = {"threshold": 0.5, "params": ARGMAX_PROPOSALS}
    _, cands = cascade.filter_prediction(pred, image, fg_prob, FixedScores(), meta, "S")
    scores, hits, diameters = cascade.scored_candidate_hits(
        pred, fg_prob, meta, cands, reference, "S", (1.0, 1.0, 1.0)
    )
    assert scores.tolist() == [c.score for c in cands]
    by_centroid = {c.centroid: h for c, h in zip(cands, hits, strict=True)}
    assert by_centroid == {(10, 10, 10): [("S", 1)], (30, 30, 30): []}
    assert set(diameters) == {("S", 1), ("S", 2)}
    volume = ball(SHAPE, (10, 10, 10), 2).sum()
    assert diameters["S", 1] == pytest.approx((6 * volume / np.pi) ** (1 / 3))


@pytest.mark.parametrize("keep", [None, 10.0])
def test_test_froc_of_scored_candidates_is_the_validation_froc_on_the_same_study(
    tmp_path, monkeypatch, keep
):
    """Read on the study stage 2 chose its operating point on, the FROC of the candidates
    filter_prediction scored (scored_candidate_hits + metrics.froc) is the validation FROC the
    checkpoint stores, and lost_lesions at its threshold the validation lesions it lost."""
    from metsflow.evaluation import metrics

    monkeypatch.setattr(cascade, "score_crops", _peak_scores)
    image, fg_prob, reference = _size_study()
    params = {**KEEP_PARAMS, "keep_diameter_mm": keep}
    spacing = (1.0, 1.0, 1.0)

    def cands(add_reference):
        return cascade.study_candidates(
            "S", image, fg_prob, reference, params, add_reference, spacing=spacing
        )

    meta = cascade.train_stage2([cands(True)], [cands(False)], ["t1c"], params, tmp_path / "s2")
    network, loaded = cascade.load_stage2(tmp_path / "s2", ["t1c"])
    pred = np.zeros(SHAPE, np.uint8)
    _, candidates = cascade.filter_prediction(
        pred, image, fg_prob, network, loaded, "S", spacing=spacing
    )
    scores, hits, diameters = cascade.scored_candidate_hits(
        pred, fg_prob, loaded, candidates, reference, "S", spacing
    )
    curve = metrics.froc(scores, hits, len(diameters), n_patients=1)
    expected = pd.DataFrame(meta["froc"], columns=metrics.FROC_COLUMNS)
    pd.testing.assert_frame_equal(curve, expected, check_dtype=False)
    lost = cascade.lost_lesions(scores, hits, loaded["threshold"], diameters)
    assert lost == meta["lost_lesions"]
    assert len(lost) == (1 if keep is None else 0)


# ------------------------------------------------------ one candidate per lesion (issue #23)
LESION, SPECK = (10, 10, 10), (10, 10, 17)


def _merged_study():
    """A lesion stage 1 found (argmax, peak 0.9) and an argmax speck (0.55) whose proposals at
    0.3 merge into one component through a 0.35 bridge; the reference is the lesion alone."""
    fg_prob = np.zeros(SHAPE, np.float32)
    fg_prob[10, 10, 10:18] = 0.35
    fg_prob[ball(SHAPE, LESION, 3)] = 0.4
    fg_prob[ball(SHAPE, LESION, 2)] = 0.9
    fg_prob[ball(SHAPE, SPECK, 1)] = 0.55
    pred = np.zeros(SHAPE, np.uint8)
    pred[ball(SHAPE, LESION, 2) | ball(SHAPE, SPECK, 1)] = 1
    return np.zeros((1, *SHAPE), np.float32), fg_prob, pred, ball(SHAPE, LESION, 2)


def _mask_peak_scores(network, crops, batch_size=32):
    """Stand-in stage-2 scores: the peak stage-1 probability inside the candidate's own mask."""
    return (crops[:, -2] * crops[:, -1]).max(axis=(1, 2, 3))


def test_split_at_lesions_gives_each_argmax_lesion_its_own_candidate():
    proposal = np.zeros((12, 12, 12), bool)
    lesion = np.zeros_like(proposal)
    proposal[1:9, 1:3, 1:3] = True  # one proposal holding two argmax lesions
    lesion[1:3, 1:3, 1:3] = lesion[7:9, 1:3, 1:3] = True
    proposal[6:8, 7:9, 7:9] = True  # a proposal without argmax voxels
    lesion[11, 11, 11] = True  # an argmax voxel outside every proposal
    split = cascade.split_at_lesions(proposal, lesion)
    pieces, n_pieces = lab.lesion_components(lesion)
    assert n_pieces == 3 and split.max() == 4
    np.testing.assert_array_equal(split[lesion], pieces[lesion])  # argmax lesions: ids 1..3
    assert np.array_equal(split == 4, proposal & (np.indices(proposal.shape)[1] >= 7))
    assert not split[3:7, 1:3, 1:3].any()  # the proposal around the lesions: no candidate


@pytest.mark.parametrize("split", [False, True])
def test_split_proposals_drops_an_argmax_speck_a_kept_proposal_carried(
    tmp_path, monkeypatch, split
):
    """split_proposals: in training the speck is a false-positive candidate of its own (merged,
    the lesion's proposal hides it), and at inference stage 2 drops it while keeping the lesion;
    merged, the kept proposal carries the speck into the final mask (a false positive)."""
    monkeypatch.setattr(cascade, "score_crops", _mask_peak_scores)
    image, fg_prob, pred, reference = _merged_study()
    params = {**KEEP_PARAMS, "split_proposals": split}
    study = cascade.study_candidates("S", image, fg_prob, reference, params, False, pred=pred)
    assert study.labels.tolist() == ([1.0, 0.0] if split else [1.0])
    meta = {"threshold": 0.7, "params": cascade.resolve_params(params).as_dict()}
    filtered, candidates = cascade.filter_prediction(pred, image, fg_prob, None, meta, "S")
    assert len(candidates) == (2 if split else 1)
    assert filtered[LESION] == 1 and filtered[SPECK] == (0 if split else 1)
    scores, hits, _ = cascade.scored_candidate_hits(
        pred, fg_prob, meta, candidates, reference, "S", (1.0, 1.0, 1.0)
    )
    assert hits == ([[("S", 1)], []] if split else [[("S", 1)]])
    if split:
        with pytest.raises(ValueError, match="split_proposals"):
            cascade.study_candidates("S", image, fg_prob, reference, params, False)
