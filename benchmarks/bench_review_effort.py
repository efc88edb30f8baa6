"""Reviewer effort with and without the review assists: a scripted reviewer on a phantom batch.

Each phantom study has a reference label (spherical metastases of 1.5-9 mm radius, enhancing, the
larger ones with a necrotic core, on a 1 mm grid) and what the cascade would hand the reviewer:

- a foreground probability ``fg_prob``: the reference blurred (Gaussian, sigma 1.2 voxels), so
  p = 0.5 lies on the reference border, plus noise;
- a pre-segmentation thresholded from it at a per-lesion threshold drawn in [0.2, 0.8] (borders
  too large or too small, as a model's are), with the model's typical errors: small lesions
  stage 2 dropped (offered as *possible lesions*), lesions stage 1 missed entirely (in neither),
  false-positive lesions, a lesion labelled edema instead of enhancing; and false suggestions
  (possible lesions that are not lesions).

The scripted reviewer turns the pre-segmentation into the reference twice. Action model (one
count per stroke, click or key; navigation to each lesion, one key, is the same in both arms and
counted in both; the final save counts once):

paint only (pen, erase, filled outline):
  - every 2-D connected region of disagreement in an axial slice costs one stroke (a filled
    outline drawn around it, with the right pen or the eraser) plus one key per tool used in
    the study (a lower bound); the voxels of those regions are *painted voxels*;
  - a difference region of <= ``TOLERANCE`` voxels in a slice is left as it is: no reviewer
    repaints a 2-voxel sliver (the same tolerance in both arms, so the final Dice is compared).
with assists:
  - a dropped candidate that is a lesion: S (jump) + A (accept) = 2 keys, no painted voxel;
  - a false suggestion: S + D = 2 keys (the assists' own cost);
  - a false-positive lesion: click + X = 2 actions;
  - a whole lesion with the wrong label: click + Shift+digit = 2 actions;
  - a border error: click + one slider release at the threshold (0.05 steps) whose redrawn
    lesion agrees best with the reference = 2 actions;
  - whatever then still differs (a lesion stage 1 missed, residual border) is painted as in the
    paint-only arm.

It prints per study and the medians: actions, painted voxels and final Dice (whole lesion) of
each arm, and the ratio of the median actions.

    python benchmarks/bench_review_effort.py --studies 20 --seed 0
"""

from __future__ import annotations

import argparse
import statistics

import cc3d
import numpy as np
from scipy import ndimage

SHAPE = (96, 96, 64)
TOLERANCE = 2  # voxels of disagreement per slice region a reviewer leaves alone
THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)
ENHANCING, EDEMA, NECROSIS = 1, 2, 3


def _ball(shape, centre, radius):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def phantom_study(rng: np.random.Generator) -> dict:
    """Reference, fg_prob, pre-segmentation and suggestions of one phantom study."""
    reference = np.zeros(SHAPE, np.uint8)
    centres = []
    n = int(rng.integers(3, 7))
    while len(centres) < n + 3:  # + false positive, false suggestions
        c = rng.integers([12, 12, 12], [s - 12 for s in SHAPE])
        if all(np.linalg.norm(c - o) > 22 for o in centres):
            centres.append(c)
    radii = rng.uniform(1.5, 9.0, n)
    for c, r in zip(centres[:n], radii, strict=True):
        reference[_ball(SHAPE, c, r)] = ENHANCING
        if r > 6:
            reference[_ball(SHAPE, c, r / 3)] = NECROSIS
    prob = ndimage.gaussian_filter((reference > 0).astype(np.float32), 1.2)
    prob = np.clip(prob + rng.normal(0, 0.03, SHAPE).astype(np.float32), 0, 1)
    components = cc3d.connected_components(reference > 0, connectivity=26)
    preseg = np.zeros_like(reference)
    suggestions = np.zeros(SHAPE, np.uint8)
    order = np.argsort(radii)
    dropped = {int(order[0]) + 1} if radii[order[0]] < 4 else set()
    missed = {int(order[1]) + 1} if n > 4 and radii[order[1]] < 5 else set()
    mislabelled = {int(rng.integers(1, n + 1))} if rng.random() < 0.4 else set()
    for lesion in range(1, n + 1):
        own = ndimage.binary_dilation(components == lesion, iterations=4)
        t = rng.uniform(0.2, 0.8)
        mask = own & (prob >= t)
        if lesion in dropped:
            suggestions[mask] = len(np.unique(suggestions))
            continue
        if lesion in missed:
            continue
        preseg[mask] = np.where(reference[mask] > 0, reference[mask], ENHANCING)
        if lesion in mislabelled:
            preseg[mask] = EDEMA
    fp = _ball(SHAPE, centres[n], rng.uniform(2, 4))
    preseg[fp] = ENHANCING
    prob[fp] = np.maximum(prob[fp], 0.7)
    for c in centres[n + 1 : n + 3]:
        blob = _ball(SHAPE, c, rng.uniform(1.5, 3))
        suggestions[blob] = suggestions.max() + 1
        prob[blob] = np.maximum(prob[blob], 0.6)
    return {"reference": reference, "prob": prob, "preseg": preseg, "suggestions": suggestions}


def paint_cost(current: np.ndarray, reference: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(strokes + tool keys, painted voxels, result) of painting ``current`` into
    ``reference`` slice by slice, leaving regions of <= TOLERANCE voxels."""
    result = current.copy()
    strokes, painted, tools = 0, 0, set()
    for z in range(current.shape[2]):
        differ = current[:, :, z] != reference[:, :, z]
        if not differ.any():
            continue
        regions, count = ndimage.label(differ, structure=np.ones((3, 3)))
        sizes = np.bincount(regions.ravel())
        for region in range(1, count + 1):
            if sizes[region] <= TOLERANCE:
                continue
            where = regions == region
            target = reference[:, :, z][where]
            tools.update(int(v) for v in np.unique(target))
            result[:, :, z][where] = target
            strokes += 1
            painted += int(sizes[region])
    return strokes + len(tools), painted, result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _lesions(label: np.ndarray) -> tuple[np.ndarray, int]:
    return cc3d.connected_components(label > 0, connectivity=26, return_N=True)


def navigation(reference: np.ndarray, preseg: np.ndarray) -> int:
    """One key (J) per lesion of the reference or the pre-segmentation: both arms visit all."""
    return _lesions(np.maximum(reference, preseg))[1]


def assisted(study: dict) -> tuple[int, int, np.ndarray]:
    reference, prob, label = study["reference"], study["prob"], study["preseg"].copy()
    suggestions = study["suggestions"]
    actions = 0
    for sid in range(1, int(suggestions.max()) + 1):
        mask = suggestions == sid
        if not mask.any():
            continue
        actions += 2  # S + A or S + D
        if (reference[mask] > 0).mean() > 0.5:
            label[mask & (label == 0)] = ENHANCING
    components, n = _lesions(label)
    ref_whole = reference > 0
    for lesion in range(1, n + 1):
        mask = components == lesion
        overlap = ref_whole[mask].mean()
        if overlap < 0.1:  # false positive: click + X
            label[mask] = 0
            actions += 2
            continue
        values, counts = np.unique(label[mask], return_counts=True)
        dominant = values[np.argmax(counts)]
        if dominant == EDEMA and (reference[mask] == ENHANCING).mean() > 0.5:
            label[mask & (label == EDEMA)] = ENHANCING  # click + Shift+1
            actions += 2
        # Border: the slider threshold that agrees best with the reference around the lesion.
        box = ndimage.binary_dilation(mask, iterations=6)
        now = dice(label[box] > 0, ref_whole[box])
        best, best_t = now, None
        for t in THRESHOLDS:
            seeds = mask & (prob >= t)
            if not seeds.any():
                continue
            grown, _ = ndimage.label(box & (prob >= t) & ((label == 0) | mask))
            keep = np.isin(grown, np.unique(grown[seeds & (grown > 0)]))
            score = dice(keep[box], ref_whole[box])
            if score > best + 0.02:
                best, best_t, best_keep = score, t, keep
        if best_t is not None:
            # New voxels take the lesion's dominant label, as the editor's slider does.
            values, counts = np.unique(label[mask], return_counts=True)
            fill = values[np.argmax(counts)]
            old = label.copy()
            label[mask] = 0
            label[best_keep] = np.where(old[best_keep] > 0, old[best_keep], fill)
            actions += 2  # click + slider release
    # The rest (labels inside lesions, lesions stage 1 missed, residual borders): paint.
    paint_actions, painted, result = paint_cost(label, reference)
    return actions + paint_actions, painted, result


def run(studies: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(studies):
        study = phantom_study(rng)
        nav = navigation(study["reference"], study["preseg"]) + 1  # + save
        paint_actions, paint_voxels, paint_result = paint_cost(study["preseg"], study["reference"])
        assist_actions, assist_voxels, assist_result = assisted(study)
        rows.append(
            {
                "study": f"P{index + 1:03d}",
                "paint_actions": paint_actions + nav,
                "paint_voxels": paint_voxels,
                "paint_dice": dice(paint_result, study["reference"]),
                "assist_actions": assist_actions + nav,
                "assist_voxels": assist_voxels,
                "assist_dice": dice(assist_result, study["reference"]),
                "preseg_dice": dice(study["preseg"], study["reference"]),
            }
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run(args.studies, args.seed)
    header = (
        f"{'study':6} {'preseg Dice':>11} | {'paint actions':>13} {'painted vox':>11} "
        f"{'Dice':>6} | {'assist actions':>14} {'painted vox':>11} {'Dice':>6}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['study']:6} {r['preseg_dice']:11.3f} | {r['paint_actions']:13d} "
            f"{r['paint_voxels']:11d} {r['paint_dice']:6.3f} | {r['assist_actions']:14d} "
            f"{r['assist_voxels']:11d} {r['assist_dice']:6.3f}"
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "study"}
    print(
        f"{'median':6} {med['preseg_dice']:11.3f} | {med['paint_actions']:13.1f} "
        f"{med['paint_voxels']:11.1f} {med['paint_dice']:6.3f} | {med['assist_actions']:14.1f} "
        f"{med['assist_voxels']:11.1f} {med['assist_dice']:6.3f}"
    )
    print(
        f"actions paint/assists: {med['paint_actions'] / med['assist_actions']:.2f}x; "
        f"painted voxels paint/assists: "
        f"{med['paint_voxels'] / max(med['assist_voxels'], 1):.2f}x"
    )


if __name__ == "__main__":
    main()
