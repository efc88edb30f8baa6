"""Small-lesion detection benchmark: size-binned sensitivity and FP/patient on a phantom cohort
whose lesion radii follow a heavy-tailed (Pareto) law, most lesions under 3 mm in diameter.

Prints, for the held-out test patients, lesion sensitivity per reference-lesion size bin
(equivalent-sphere diameter; < 3 mm, 3-10 mm, >= 10 mm) with Wilson 95% intervals, and false
positives per patient and per study, for
  1. stage 1 (the segmentation network alone);
  2. stage 1 + stage 2 at the operating point chosen on a validation patient by each rule:
     ``max_fp_per_patient`` (default 1.0) and ``target_sensitivity`` (default 0.95);
  3. on the test follow-ups: stage 1, the cascade, and re-seg (propagated prior) merged with
     the cascade.
It also lists the validation lesions each operating point loses and writes the test FROC of
stage 1 (max foreground probability per predicted lesion) and of the cascade (stage-2 score per
stage-1 lesion) to ``<out>/froc_test.png``.

The cohort, preprocessing and training set-up are those of ``bench_models.py`` (every sequence
on one 2 mm grid, ideal-registration priors, patch 32, filters 8-64). At 2 mm a single voxel
is 8 mm^3, a 2.48 mm sphere: the "< 3 mm" bin holds the one-voxel lesions, the hardest case.
Lesions are matched at IoU > 0.1 as in ``bench_models.py`` (a 1-voxel lesion and a 3-voxel
prediction overlap at IoU 1/3).

    PYTHONPATH=. nice -n 10 python benchmarks/bench_small_lesions.py --out /tmp/bench_small
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_models import (
    IOU,
    Models,
    add_common_args,
    base_params,
    items_of,
    phantom_studies,
    split_patients,
    stage2_candidates,
    whole,
)

from metsflow.core.io import write_json, write_table
from metsflow.evaluation.figures import plot_froc
from metsflow.evaluation.metrics import (
    DEFAULT_SIZE_BINS_MM,
    choose_operating_point,
    detection_by_size,
    false_positive_rates,
    froc,
    froc_from_tables,
    lesion_tables,
    pooled_lesion_tables,
)
from metsflow.imaging.priors import merge_followup
from metsflow.jobs.report import run_report_froc
from metsflow.models.cascade import (
    filter_prediction,
    find_candidates,
    lost_lesions,
    score_crops,
)
from metsflow.models.infer import foreground_probability

SPACING = (2.0, 2.0, 2.0)


def evaluate(name: str, preds: dict, refs: dict, patient_of: dict, scores=None) -> tuple:
    """``(table rows, reference lesions, predicted lesions)`` of one variant."""
    lesions, predicted, false = pooled_lesion_tables(preds, refs, SPACING, IOU, scores)
    fp = false_positive_rates(false, {s: patient_of[s] for s in preds})
    row = {"variant": name}
    for bin_row in detection_by_size(lesions, DEFAULT_SIZE_BINS_MM).itertuples():
        row[bin_row.size_bin] = (
            f"{bin_row.n_detected}/{bin_row.n_ref_lesions} {bin_row.sensitivity:.2f} "
            f"[{bin_row.ci95_low:.2f}-{bin_row.ci95_high:.2f}]"
        )
    row["FP/patient"] = round(fp["fp_per_patient"], 2)
    row["FP/study"] = round(fp["fp_per_study"], 2)
    return row, lesions, predicted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_small_lesions"))
    add_common_args(ap, patients=10, target_sensitivity=0.95)
    ap.add_argument("--max-lesions", type=int, default=15)
    ap.add_argument("--max-fp-per-patient", type=float, default=1.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    start = time.perf_counter()

    studies = phantom_studies(
        args, SPACING, max_lesions=args.max_lesions, radius_law="heavy_tailed"
    )
    patient_of = dict(zip(studies.study_id, studies.patient_id, strict=True))
    groups = split_patients(studies)
    items = items_of(studies, groups)
    refs = {i["study_id"]: whole(i["label"]) for i in studies.to_dict("records")}
    print(
        f"patients: train {groups['train']}, stage-2 validation {groups['val']}, "
        f"test {groups['test']}",
        flush=True,
    )

    base = {**base_params(args.seed, SPACING), "iterations": args.iterations}
    models = Models(args.out, args.reuse_models)

    # ---- stage 1 ------------------------------------------------------------------------------
    seg = models.train("seg", items["train"], {**base, "channels": ["t1c", "t2"]})
    stage1 = {k: models.segment(seg, items[k]) for k in ("train", "val", "test")}
    fg = {
        k: [foreground_probability(probs, inp["brain"]) for inp, probs, _ in stage1[k]]
        for k in stage1
    }
    test_ids = [i["study_id"] for i in items["test"]]
    rows = []
    s1_preds = {s: whole(p) for s, (_, _, p) in zip(test_ids, stage1["test"], strict=True)}
    s1_scores = dict(zip(test_ids, fg["test"], strict=True))
    row, s1_lesions, s1_pred_lesions = evaluate(
        "stage 1", s1_preds, refs, patient_of, scores=s1_scores
    )
    rows.append(row)

    # ---- stage 2, two rules on one network ----------------------------------------------------
    s2_params = {
        "iterations": args.stage2_iterations,
        "crop_size": [24, 24, 24],
        "operating_rule": "max_fp_per_patient",
        "max_fp_per_patient": args.max_fp_per_patient,
        "target_sensitivity": args.target_sensitivity,
        "seed": args.seed,
        "proposal_threshold": 0.3,
    }

    def cands(key, add_reference):
        return stage2_candidates(
            items[key], stage1[key], refs, s2_params, add_reference, spacing=SPACING
        )

    s2_net, s2_meta = models.stage2(
        lambda: cands("train", True), lambda: cands("val", False), ["t1c", "t2"], s2_params
    )
    val_curve = pd.DataFrame(s2_meta["froc"])
    rules = {
        f"max {args.max_fp_per_patient:g} FP/patient": s2_meta["threshold"],
        f"target sensitivity {args.target_sensitivity:g}": choose_operating_point(
            val_curve, "target_sensitivity", target_sensitivity=args.target_sensitivity
        )["threshold"],
    }
    cascade_preds: dict[str, dict] = {}
    s2_scores: list[float] = []
    s2_hits: list[list] = []
    for rule, threshold in rules.items():
        preds = {}
        for study_id, (inp, _probs, pred), f in zip(
            test_ids, stage1["test"], fg["test"], strict=True
        ):
            meta = {**s2_meta, "threshold": threshold}
            filtered, candidates = filter_prediction(
                pred, inp["image"], f, s2_net, meta, study_id, spacing=SPACING
            )
            preds[study_id] = filtered
            if rule.startswith("max"):
                # Test FROC of the cascade: a stage-1 lesion's stage-2 score, hits by matching.
                components, _ = find_candidates(whole(pred), f, study_id)
                lookup = np.zeros(len(candidates) + 1, np.float32)
                lookup[[c.index for c in candidates]] = [c.score for c in candidates]
                score_map = lookup[components]
                _, predicted = lesion_tables(
                    whole(pred).astype(np.uint8),
                    refs[study_id].astype(np.uint8),
                    SPACING,
                    groups=["whole_lesion"],
                    iou_threshold=IOU,
                    study_id=study_id,
                    score_map=score_map,
                )
                s2_scores += predicted.score.tolist()
                s2_hits += [[(study_id, int(m))] if m else [] for m in predicted.matched_lesion_id]
        cascade_preds[rule] = preds
        row, _, _ = evaluate(
            f"stage 1 + stage 2 ({rule}, t={threshold:.3f})",
            {s: whole(p) for s, p in preds.items()},
            refs,
            patient_of,
        )
        rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False), flush=True)

    # ---- follow-ups: re-seg merged with the cascade --------------------------------------------
    reseg = models.train("reseg", items["train"], {**base, "channels": ["t1c", "prior", "t2"]})
    followups = [i for i in items["test"] if i["prior"]]
    fu_ids = [i["study_id"] for i in followups]
    reseg_out = models.segment(reseg, followups)
    max_fp_rule = next(iter(rules))
    merged = {}
    for item, (inp, _, pred) in zip(followups, reseg_out, strict=True):
        prior = inp["image"][1] > 0
        cascade = cascade_preds[max_fp_rule][item["study_id"]]
        merged[item["study_id"]] = whole(merge_followup(pred, cascade, prior)[0])
    fu_rows = []
    for name, preds in (
        ("follow-ups: stage 1", {s: s1_preds[s] for s in fu_ids}),
        (
            f"follow-ups: cascade ({max_fp_rule})",
            {s: whole(cascade_preds[max_fp_rule][s]) for s in fu_ids},
        ),
        ("follow-ups: re-seg + cascade merged", merged),
    ):
        fu_rows.append(evaluate(name, preds, refs, patient_of)[0])
    rows += fu_rows

    print("\nsize-binned lesion sensitivity: detected/reference, sensitivity [Wilson 95% CI]")
    print(pd.DataFrame(rows).to_string(index=False))
    counts = s1_lesions.size_bin.value_counts().to_dict()
    print(f"\ntest reference lesions: {len(s1_lesions)} ({counts}) in {len(test_ids)} studies")

    # ---- operating points and what they lose on validation -------------------------------------
    val_scores, val_hits, diameters = [], [], {}
    for study in cands("val", False):
        keep = [i for i, s in enumerate(study.sources) if s == "stage1"]
        val_scores += score_crops(s2_net, study.crops[keep]).tolist()
        val_hits += [[(study.study_id, r) for r in study.hits[i]] for i in keep]
        for lesion, d in enumerate(study.ref_diameters_mm or [], start=1):
            diameters[(study.study_id, lesion)] = d
    for rule, threshold in rules.items():
        lost = pd.DataFrame(lost_lesions(np.array(val_scores), val_hits, threshold, diameters))
        point = val_curve[val_curve.threshold >= threshold - 1e-12].iloc[-1]
        print(
            f"\nvalidation operating point [{rule}]: threshold {threshold:.3f}, sensitivity "
            f"{point.sensitivity:.3f} at {point.fp_per_patient:.2f} FP/patient "
            f"(stage 1: {s2_meta['sensitivity_before']:.3f} at "
            f"{s2_meta['fp_per_patient_before']:.2f}); lesions it loses: {len(lost)}"
        )
        if len(lost):
            print(lost.to_string(index=False, float_format=lambda v: f"{v:.2f}"))

    n_test_patients = len(set(patient_of[s] for s in test_ids))
    curves = {
        "stage 1 (max fg probability)": froc_from_tables(
            s1_lesions, s1_pred_lesions, {s: patient_of[s] for s in test_ids}
        ),
        "cascade (stage-2 score)": froc(s2_scores, s2_hits, len(s1_lesions), n_test_patients),
    }
    plot_froc(
        curves,
        args.out / "froc_test.png",
        title=f"test FROC, {len(s1_lesions)} lesions, {n_test_patients} patients",
        max_fp_per_patient=args.max_fp_per_patient,
    )
    # The report's own figure (rules/report.smk, report_froc): the test predictions' FROC by
    # stage-1 probability, stage 2's validation FROC and its chosen point.
    write_table(args.out / "froc_test_stage1.tsv", curves["stage 1 (max fg probability)"])
    write_json(args.out / "stage2_summary.json", {"round": 0, **s2_meta})
    run_report_froc(
        0,
        str(args.out / "froc_test_stage1.tsv"),
        str(args.out / "stage2_summary.json"),
        str(args.out / "froc_report.png"),
    )
    for name, curve in curves.items():
        at = {
            limit: curve[curve.fp_per_patient <= limit].sensitivity.max()
            for limit in (0.5, 1, 2, 4, 8)
        }
        print(f"test FROC {name}: " + ", ".join(f"{v:.3f} at <= {k} FP/pt" for k, v in at.items()))
    print(f"FROC figures: {args.out / 'froc_test.png'}, {args.out / 'froc_report.png'}")
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in models.timings.items()))
    print(f"total {time.perf_counter() - start:.0f} s")
    pd.DataFrame(rows).to_csv(args.out / "bench_small_lesions.tsv", sep="\t", index=False)


if __name__ == "__main__":
    main()
