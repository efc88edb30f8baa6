"""Random vs an informed acquisition strategy over K active-learning rounds on the phantom cohort.

Runs the real workflow (``snakemake round_<K>``) in simulated-annotator mode once per strategy,
with the same seed, cohort, round-0 model and labelling budget, and prints validation Dice and
lesion F1 per number of labelled training studies, plus the difference to random measured in this
same run, and the correction burden of each round's batch (median voxels and ml changed and
lesion edits between the previous model's pre-segmentation and the simulated annotator's
label): it should fall as the model improves. Sized for 2 CPU cores: a small phantom at 3 mm,
a small DynUNet and few iterations; the settings are printed with the figures. Round 0 (preprocessing, the seed model and its pool
predictions) is computed once and copied, so both strategies start from identical state; rounds
1..K of the strategies then run side by side. An interrupted run resumes (same --out).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_active_learning.py --out /tmp/bench_al

With ``--candidates N`` the two arms use the same strategy and budget instead: selecting from the
whole pool (``candidates: all``) against selecting from a seeded N-study candidate subset that
the round's model segmented (``active_learning.candidates: N``, issue 14). With ``--seeds S ...``
the run is replicated per seed (phantom, round-0 model, draws; ``OUT/seed_<s>``) and the paired
difference is summarised across seeds with a 95% CI: one seed alone is noise-level evidence.
"""

from __future__ import annotations

import argparse
import contextlib
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


def workflow_config(
    args, demo: Path, work: Path, strategy: str, arm: str | None = None, candidates="all"
) -> dict:
    arm = arm or strategy
    return {
        "sheet": str(demo / "studies.tsv"),
        "oracle_sheet": str(demo / "oracle.tsv"),
        "results": str(work / arm / "results"),
        "label_store": str(work / arm / "labels"),
        "seed": args.seed,
        "sharding": {"cpu_shard_size": 6, "gpu_shard_size": 24},
        "validation": {"fraction": 0.5},
        # Skull-free, co-registered phantoms: no atlas brain mask or rigid co-registration to
        # spend the 2 cores on; the comparison is about the labels, not preprocessing.
        "preprocess": {
            "spacing": [args.spacing] * 3,
            "coregister": "none",
            "brain_mask": "nonzero",
        },
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
            "candidates": candidates,
        },
        "threads": {"preprocess": 1, "register": 1, "train": args.cores, "infer": args.cores},
    }


def snakemake_command(config_path: Path, target: str, cores: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        target,  # before --configfile, which takes every path that follows it
        "--profile",
        "profiles/local",
        "--cores",
        str(cores),
        "--configfile",
        str(config_path),
    ]


def run_parallel(commands: dict[str, list[str]], logs: dict[str, Path]) -> dict[str, float]:
    """Run one snakemake per strategy at the same time; wall seconds per strategy."""
    start = time.perf_counter()
    procs, seconds, failed = {}, {}, []
    with contextlib.ExitStack() as stack:
        for name, cmd in commands.items():
            log = stack.enter_context(open(logs[name], "a"))
            procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        for name, proc in procs.items():
            if proc.wait() != 0:
                failed.append(name)
            seconds[name] = time.perf_counter() - start
    if failed:
        raise SystemExit(f"snakemake failed for {failed}; see {[str(logs[n]) for n in failed]}")
    return seconds


def round_metrics(results: Path, strategy: str, rounds: int) -> pd.DataFrame:
    """Validation metrics of each round's model and the correction burden of the batch that
    model r-1 pre-segmented (labelled in round r; the workflow's correction_burden tables)."""
    from metsflow.active_learning.burden import BURDEN_NAME, read_burden_tables, summarise_rounds

    burden = summarise_rounds(
        read_burden_tables(
            results / f"rounds/round_{r}" / BURDEN_NAME for r in range(1, rounds + 1)
        ),
        rounds=range(1, rounds + 1),
    ).set_index("round")
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
                "burden_voxels": burden["voxels_changed_median"].get(r),
                "burden_ml": burden["changed_ml_median"].get(r),
                "burden_lesion_edits": burden["lesion_edits_median"].get(r),
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
    parser.add_argument("--spacing", type=float, default=3.0, help="model grid, mm")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--finetune-iterations", type=int, default=150)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="replicate over these seeds (phantom, round-0 model, draws): one run each in "
        "OUT/seed_<s>, then the compared-minus-baseline difference across seeds with a 95%% CI",
    )
    parser.add_argument(
        "--candidates", type=int, help="compare a candidate subset of this size to the whole pool"
    )
    args = parser.parse_args()
    seeds = args.seeds or [args.seed]
    differences = {}
    for seed in seeds:
        work = Path(args.out).resolve() / (f"seed_{seed}" if args.seeds else "")
        differences[seed] = run_seed(argparse.Namespace(**{**vars(args), "seed": seed}), work)
    if args.seeds:
        print_across_seeds(differences, args.rounds)


def print_across_seeds(differences: dict[int, pd.DataFrame], rounds: int) -> None:
    """Per round and over rounds 1..K: mean of the per-seed differences (compared minus
    baseline, paired within a seed), its 95% t interval and a one-sample t-test against 0."""
    from scipy import stats

    table = pd.concat(differences, names=["seed"]).reset_index()
    columns = [c for c in table.columns if "_minus_" in c]
    later = table[table["round"] > 0]
    rows = [(f"round {r}", later[later["round"] == r]) for r in range(1, rounds + 1)]
    rows.append((f"mean of rounds 1..{rounds}", later.groupby("seed")[columns].mean()))
    print(
        f"\nacross {len(differences)} seeds ({', '.join(map(str, differences))}): mean "
        "difference [95% CI], p (t-test against 0), seeds where compared >= baseline"
    )
    for title, part in rows:
        cells = []
        for column in columns:
            values = part[column].to_numpy(dtype=float)
            mean, sem = values.mean(), stats.sem(values)
            if values.max() - values.min() > 1e-9:
                low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem)
                p = f"{stats.ttest_1samp(values, 0.0).pvalue:.2f}"
            else:  # every seed gave the same difference (e.g. the arms chose alike)
                low, high, p = mean, mean, "n/a"
            cells.append(
                f"{column} {mean:+.3f} [{low:+.3f}, {high:+.3f}] p={p} "
                f"{int((values >= 0).sum())}/{len(values)}"
            )
        print(f"  {title:<18} " + "   ".join(cells))


def run_seed(args, work: Path) -> pd.DataFrame:
    """One replicate (``args.seed``) in ``work``: both arms, printed; returns the per-round
    compared-minus-baseline differences."""
    from metsflow.active_learning.curves import plot_learning_curves
    from metsflow.cohort.phantom import make_demo_cohort

    demo = work / "demo"
    if not (demo / "oracle.tsv").exists():  # an interrupted benchmark resumes where it was
        shutil.rmtree(work, ignore_errors=True)
        make_demo_cohort(
            demo,
            n_patients=args.patients,
            n_timepoints=args.timepoints,
            native_spacing=(2.0, 2.0, 4.0),
            model_spacing=args.spacing,
            labelled_patients=args.labelled_patients,
            skull=False,
            separate_grids=False,
            seed=args.seed,
            workers=args.cores,
        )
    # arm -> (acquisition strategy, candidates); the first arm is the baseline
    if args.candidates:
        arms = {
            "pool": (args.strategy, "all"),
            f"subset{args.candidates}": (args.strategy, args.candidates),
        }
    else:
        arms = {"random": ("random", "all"), args.strategy: (args.strategy, "all")}
    strategies = list(arms)
    baseline, compared = strategies
    print(
        f"settings: phantom {args.patients} patients x {args.timepoints} time points "
        f"({args.labelled_patients} labelled: seed + validation; skull-free, native 2x2x4 mm), "
        f"model grid {args.spacing:g} mm, no co-registration, DynUNet filters 8/16/32, "
        f"patch 32^3, {args.iterations} iterations round 0, {args.finetune_iterations} per "
        f"fine-tune, {args.rounds} rounds x batch {args.batch_size} (per_patient_max 1), "
        f"seed {args.seed}, {args.cores} cores per strategy; arms: "
        + ", ".join(f"{a} ({s}, candidates {c})" for a, (s, c) in arms.items())
    )
    configs, logs = {}, {}
    for strategy in strategies:
        configs[strategy] = work / f"{strategy}.yaml"
        acquisition, candidates = arms[strategy]
        config = workflow_config(args, demo, work, acquisition, strategy, candidates)
        configs[strategy].write_text(yaml.safe_dump(config))
        logs[strategy] = work / f"{strategy}.snakemake.log"
    # Round 0 once (it does not depend on the strategy), then the same starting state for all.
    first = strategies[0]
    run_parallel(
        {first: snakemake_command(configs[first], "round_0", args.cores)}, {first: logs[first]}
    )
    for strategy in strategies[1:]:
        for part in SHARED_ROUND0:
            src = work / first / "results" / part
            dst = work / strategy / "results" / part
            if src.exists() and not dst.exists():
                shutil.copytree(src, dst)
    seconds = run_parallel(
        {s: snakemake_command(configs[s], f"round_{args.rounds}", args.cores) for s in strategies},
        logs,
    )
    curves = [round_metrics(work / s / "results", s, args.rounds) for s in strategies]
    table = pd.concat(curves, ignore_index=True)
    table.to_csv(work / "curves.tsv", sep="\t", index=False)

    wide = table.pivot(
        index="round", columns="strategy", values=["n_labelled", "mean_dice", "mean_lesion_f1"]
    )
    print("\nvalidation metrics per round (n_labelled = labelled training studies)")
    print(wide.round(3).to_string())
    base = table[table.strategy == baseline].set_index("round")
    best = table[table.strategy == compared].set_index("round")
    delta = pd.DataFrame(
        {
            "n_labelled": best["n_labelled"],
            f"dice_minus_{baseline}": best["mean_dice"] - base["mean_dice"],
            f"lesion_f1_minus_{baseline}": best["mean_lesion_f1"] - base["mean_lesion_f1"],
        }
    )
    print(f"\n{compared} minus {baseline} (same run, same seed and budget)")
    print(delta.round(3).to_string())
    burden = table[table["round"] > 0].pivot(
        index="round",
        columns="strategy",
        values=["burden_voxels", "burden_ml", "burden_lesion_edits"],
    )
    print(
        "\ncorrection burden of round r's batch, pre-segmented by model r-1 (median over the batch:"
        " voxels and ml changed, lesions added + removed + resized by the simulated annotator)"
    )
    print(burden.round(3).to_string())
    later = delta.loc[delta.index > 0]
    print(
        f"\nmean over rounds 1..{args.rounds}: "
        f"Dice {later[f'dice_minus_{baseline}'].mean():+.3f}, "
        f"lesion F1 {later[f'lesion_f1_minus_{baseline}'].mean():+.3f} "
        f"({compared} vs {baseline}; one seed, so no confidence interval)"
    )
    print(
        "wall time of rounds 1..K, strategies run side by side (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    )
    png = work / "dice_vs_labelled.png"
    plot_learning_curves(table, png, metric="mean_dice")
    plot_learning_curves(table, work / "lesion_f1_vs_labelled.png", metric="mean_lesion_f1")
    print(f"curves: {work / 'curves.tsv'}; plots: {png}, {work / 'lesion_f1_vs_labelled.png'}")
    return delta


if __name__ == "__main__":
    main()
