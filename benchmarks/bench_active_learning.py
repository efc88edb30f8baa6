"""Random vs an informed acquisition strategy over K active-learning rounds on the phantom cohort.

Runs the real workflow (``snakemake round_<K>``) in simulated-annotator mode once per strategy,
with the same seed, cohort, round-0 model and labelling budget, and prints validation Dice and
lesion F1 per number of labelled training studies, plus the difference to random measured in this
same run. Sized for 2 CPU cores: a small phantom at 4 mm, a small DynUNet and few iterations; the
settings are printed with the figures. Round 0 (preprocessing, registration, the seed model and its
pool predictions) is computed once and copied, so both strategies start from identical state.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_active_learning.py --out /tmp/bench_al
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_ROUND0 = ("plan", "preprocessed", "registered", "qc", "rounds/round_0")


def workflow_config(args, demo: Path, work: Path, strategy: str) -> dict:
    return {
        "sheet": str(demo / "studies.tsv"),
        "oracle_sheet": str(demo / "oracle.tsv"),
        "results": str(work / strategy / "results"),
        "label_store": str(work / strategy / "labels"),
        "seed": args.seed,
        "sharding": {"cpu_shard_size": 6, "gpu_shard_size": 24},
        "validation": {"fraction": 0.5},
        # Skull-free, co-registered phantoms: no atlas brain mask or rigid co-registration to
        # spend the 2 cores on; the comparison is about the labels, not preprocessing.
        "preprocess": {"spacing": [4.0, 4.0, 4.0], "coregister": "none", "brain_mask": "nonzero"},
        "model": {"filters": [8, 16, 32], "patch_size": [32, 32, 32]},
        "train": {
            "iterations": args.iterations,
            "finetune_iterations": args.finetune_iterations,
            "val_interval": args.iterations,
            "checkpoint_interval": args.iterations,
        },
        "active_learning": {
            "rounds": args.rounds,
            "batch_size": args.batch_size,
            "strategy": strategy,
            "per_patient_max": 1,
            "annotator": "simulated",
            "dice_threshold": 1.0,  # never stop early: compare the full budget
            "final_validation_sample": 0,
        },
        "threads": {"preprocess": 1, "register": 1, "train": args.cores, "infer": args.cores},
    }


def run_rounds(config_path: Path, rounds: int, cores: int, log_path: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        f"round_{rounds}",  # before --configfile, which takes every path that follows it
        "--profile",
        "profiles/local",
        "--cores",
        str(cores),
        "--configfile",
        str(config_path),
    ]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed ({proc.returncode}); see {log_path}")
    return time.perf_counter() - start


def round_metrics(results: Path, strategy: str, rounds: int) -> pd.DataFrame:
    rows = []
    for r in range(rounds + 1):
        summary = json.loads((results / f"rounds/round_{r}/evaluation/summary.json").read_text())
        rows.append(
            {
                "strategy": strategy,
                "round": r,
                "n_labelled": summary.get("n_train"),
                "mean_dice": summary.get("mean_dice"),
                "mean_lesion_f1": summary.get("mean_lesion_f1"),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_al")
    parser.add_argument("--strategy", default="lesion_aware", help="compared against random")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--timepoints", type=int, default=1)
    parser.add_argument("--labelled-patients", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--finetune-iterations", type=int, default=30)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from metsflow.active_learning.curves import plot_learning_curves
    from metsflow.phantom import make_demo_cohort

    work = Path(args.out).resolve()
    shutil.rmtree(work, ignore_errors=True)
    demo = work / "demo"
    make_demo_cohort(
        demo,
        n_patients=args.patients,
        n_timepoints=args.timepoints,
        native_spacing=(2.0, 2.0, 4.0),
        model_spacing=4.0,
        labelled_patients=args.labelled_patients,
        skull=False,
        separate_grids=False,
        seed=args.seed,
        workers=args.cores,
    )
    strategies = ["random", args.strategy]
    print(
        f"settings: phantom {args.patients} patients x {args.timepoints} time points "
        f"({args.labelled_patients} labelled: seed + validation; skull-free, native 2x2x4 mm), "
        f"model grid 4 mm, no co-registration, DynUNet filters 8/16/32, "
        f"patch 32^3, {args.iterations} iterations round 0, {args.finetune_iterations} per "
        f"fine-tune, {args.rounds} rounds x batch {args.batch_size} (per_patient_max 1), "
        f"seed {args.seed}, {args.cores} cores"
    )
    curves, seconds = [], {}
    for i, strategy in enumerate(strategies):
        config_path = work / f"{strategy}.yaml"
        config_path.write_text(yaml.safe_dump(workflow_config(args, demo, work, strategy)))
        if i > 0:
            # Identical starting point: reuse the first strategy's round 0 (same seed and data).
            for part in SHARED_ROUND0:
                src = work / strategies[0] / "results" / part
                if src.exists():
                    shutil.copytree(src, work / strategy / "results" / part)
        seconds[strategy] = run_rounds(
            config_path, args.rounds, args.cores, work / f"{strategy}.snakemake.log"
        )
        curves.append(round_metrics(work / strategy / "results", strategy, args.rounds))
    table = pd.concat(curves, ignore_index=True)
    table.to_csv(work / "curves.tsv", sep="\t", index=False)

    wide = table.pivot(
        index="round", columns="strategy", values=["n_labelled", "mean_dice", "mean_lesion_f1"]
    )
    print("\nvalidation metrics per round (n_labelled = labelled training studies)")
    print(wide.round(3).to_string())
    base = table[table.strategy == "random"].set_index("round")
    best = table[table.strategy == args.strategy].set_index("round")
    delta = pd.DataFrame(
        {
            "n_labelled": best["n_labelled"],
            "dice_minus_random": best["mean_dice"] - base["mean_dice"],
            "lesion_f1_minus_random": best["mean_lesion_f1"] - base["mean_lesion_f1"],
        }
    )
    print(f"\n{args.strategy} minus random (same run, same seed and budget)")
    print(delta.round(3).to_string())
    later = delta.loc[delta.index > 0]
    print(
        f"\nmean over rounds 1..{args.rounds}: Dice {later.dice_minus_random.mean():+.3f}, "
        f"lesion F1 {later.lesion_f1_minus_random.mean():+.3f} "
        f"({args.strategy} vs random; |difference| below ~0.02 is within noise here)"
    )
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    png = work / "dice_vs_labelled.png"
    plot_learning_curves(table, png, metric="mean_dice")
    plot_learning_curves(table, work / "lesion_f1_vs_labelled.png", metric="mean_lesion_f1")
    print(f"curves: {work / 'curves.tsv'}; plots: {png}, {work / 'lesion_f1_vs_labelled.png'}")


if __name__ == "__main__":
    main()
