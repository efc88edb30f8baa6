"""Fictitious priors (bounds of the random draw) and the follow-up merge rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from metsflow.imaging import priors


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def test_translate_is_zero_filled_and_exact():
    mask = np.zeros((10, 10, 10), bool)
    mask[2, 3, 4] = True
    moved = priors.translate(mask, [3, -2, 5])
    assert np.argwhere(moved).tolist() == [[5, 1, 9]]
    assert not priors.translate(mask, [0, 0, 6]).any()  # pushed out, not wrapped around


def test_fictitious_prior_stays_within_bounds():
    lesion = ball((48, 48, 48), (24, 24, 24), 7)
    rng = np.random.default_rng(0)
    seen_ops, seen_shift = set(), set()
    for _ in range(60):
        prior, draw = priors.fictitious_prior(lesion, rng)
        shift = draw["shift"]
        seen_ops.add(draw["op"])
        seen_shift.update(shift)
        assert all(-6 <= s <= 6 for s in shift)
        low, high = (0, 6) if draw["op"] == "dilate" else (0, 3)
        assert low <= draw["radius"] <= high
        # Undo the shift: the prior is the lesion grown/shrunk by exactly that radius.
        unshifted = priors.translate(prior, [-s for s in shift])
        expected = (
            ndimage.distance_transform_edt(~lesion) <= draw["radius"]
            if draw["op"] == "dilate"
            else ndimage.distance_transform_edt(lesion) > draw["radius"]
        )
        np.testing.assert_array_equal(unshifted, expected)
        volume = prior.sum()
        assert (volume > lesion.sum()) if draw["op"] == "dilate" and draw["radius"] else True
    assert seen_ops == {"dilate", "erode"}
    assert min(seen_shift) == -6 and max(seen_shift) == 6


def test_rand_fictitious_prior_transform_is_binary_near_the_label_and_seeded():
    label = np.zeros((1, 32, 32, 32), np.uint8)
    label[0][ball((32, 32, 32), (16, 16, 16), 5)] = 1
    transform = priors.RandFictitiousPriord("prior", "label", lesion_classes=[1])
    transform.set_random_state(seed=4)
    out = transform({"label": label})
    assert out["prior"].shape == label.shape
    assert set(np.unique(out["prior"])) <= {0.0, 1.0} and out["prior"].any()
    # Within dilation 6 + translation 6 per axis of the lesion.
    near = ndimage.distance_transform_edt(~label[0].astype(bool)) <= 6 + 6 * np.sqrt(3)
    assert not (out["prior"][0].astype(bool) & ~near).any()
    transform.set_random_state(seed=4)
    np.testing.assert_array_equal(transform({"label": label})["prior"], out["prior"])


def test_merge_takes_tracked_lesions_from_reseg_and_new_ones_from_cascade():
    shape = (40, 40, 40)
    prior = ball(shape, (10, 10, 10), 4)
    reseg = np.zeros(shape, np.uint8)
    cascade = np.zeros(shape, np.uint8)
    reseg[ball(shape, (11, 10, 10), 5)] = 1  # tracked lesion, re-seg delineation
    reseg[ball(shape, (30, 30, 10), 2)] = 1  # re-seg hit far from any prior: dropped
    cascade[ball(shape, (10, 10, 10), 3)] = 3  # cascade's version of the tracked lesion: dropped
    cascade[ball(shape, (30, 10, 30), 3)] = 1  # new lesion
    cascade[ball(shape, (30, 10, 30), 5) & ~ball(shape, (30, 10, 30), 3)] = 2  # its edema
    merged, counts = priors.merge_followup(reseg, cascade, prior)
    assert counts == {"tracked": 1, "new": 1}
    tracked = ball(shape, (11, 10, 10), 5)
    np.testing.assert_array_equal(merged[tracked], 1)  # from re-seg, not the cascade's 3
    assert not merged[ball(shape, (30, 30, 10), 2)].any()
    assert (merged[ball(shape, (30, 10, 30), 3)] == 1).all()
    assert (merged == 2).sum() == (cascade == 2).sum()
    with pytest.raises(ValueError, match="shape"):
        priors.merge_followup(reseg, cascade[:-1], prior)


def test_merge_counts_cascade_lesion_within_margin_of_prior_as_tracked():
    shape = (30, 30, 30)
    prior = ball(shape, (10, 10, 10), 3)
    cascade = np.zeros(shape, np.uint8)
    cascade[ball(shape, (10, 10, 15), 1)] = 1  # 1 voxel gap from the prior: not new
    merged, counts = priors.merge_followup(np.zeros(shape, np.uint8), cascade, prior, margin=2)
    assert counts == {"tracked": 0, "new": 0} and not merged.any()
