"""Planning benchmark: `snakemake -n` over a full-cohort synthetic sheet (default 11,892 studies).

Prints wall seconds, the peak RSS of the snakemake process and the job count by rule, against
the targets of issue 5 (<= 15 s, <= 1 GB, <= ~3,000 jobs). Run from the repository root:

    python benchmarks/bench_planning.py                 # 11,892 studies, config/cohort.yaml
    python benchmarks/bench_planning.py --studies 2000 --profile-parse
    python benchmarks/bench_planning.py --candidates all   # every round segments the whole pool

A dry run needs no images: the synthetic sheet only names paths (missing inputs are not a DAG
error, see rules/common.smk `shard_raw_inputs`).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _dry_run import dry_run_job_counts as job_counts  # noqa: E402
from _dry_run import synthetic_oracle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 15.0
TARGET_RSS_GB = 1.0
TARGET_JOBS = 3000


def dry_run(
    sheet: Path, workdir: Path, extra: list[str], overlays: tuple[str, ...] = ()
) -> tuple[float, float, float, str]:
    """One dry run in a child process: (wall s, CPU s, peak RSS in GB of the child, stdout).

    CPU seconds (user + system of the child) are reported next to wall seconds because on a
    shared, oversubscribed machine the wall figure mostly measures the neighbours.
    """
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--quiet",
        "rules",
        "--cores",
        "1",
        "--configfile",
        "config/cohort.yaml",
        *overlays,  # one --configfile list: a second --configfile option would replace it
        "--config",
        f"sheet={sheet}",
        # metsflow.cohort.sheet.synthetic_sheet's paths lie under <workdir>/cohort (an existing, empty
        # folder: the data roots are checked at parse time, the files only by the jobs)
        f"data_roots=['{workdir / 'cohort'}']",
        f"results={workdir / 'results'}",
        f"label_store={workdir / 'labels'}",
        *extra,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-4000:]
        sys.exit(f"dry run failed ({proc.returncode}):\n{output}")
    # ru_maxrss of children is the largest child so far (KiB on Linux): run one dry run per
    # process invocation, or the figure is the max over the runs.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, after.ru_maxrss / 1024**2, proc.stdout


def profile_parse(sheet: Path, workdir: Path) -> None:
    """Where the parse-time seconds go: sheet reading and the plan (the Snakefile's own work)."""
    import yaml

    from metsflow.cohort.plan import PlanSettings, build_plan
    from metsflow.cohort.sheet import read_sheet

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config.update(yaml.safe_load((REPO / "config/cohort.yaml").read_text()))
    start = time.perf_counter()
    cohort = read_sheet(sheet)
    t_sheet = time.perf_counter() - start
    start = time.perf_counter()
    plan = build_plan(cohort, PlanSettings.from_config(config))
    t_plan = time.perf_counter() - start
    print(f"  read_sheet: {t_sheet:.2f} s   build_plan: {t_plan:.2f} s   ({len(plan)} studies)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=11_892)
    parser.add_argument("--profile-parse", action="store_true", help="time sheet + plan alone")
    parser.add_argument(
        "--candidates",
        help="active_learning.candidates (default: config/cohort.yaml's; 'all' = whole pool)",
    )
    parser.add_argument("snakemake_args", nargs="*", help="extra snakemake arguments")
    args = parser.parse_args()

    from metsflow.cohort.sheet import synthetic_sheet

    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_planning_") as tmp:
        workdir = Path(tmp)
        sheet = workdir / "cohort.tsv"
        (workdir / "cohort").mkdir()
        synthetic_sheet(args.studies, sheet, seed=0, root=workdir / "cohort")
        if args.profile_parse:
            profile_parse(sheet, workdir)
        # config/cohort.yaml reviews with people: the default target stops at the first batch
        # without confirmed labels. The whole campaign (every round planned at once) is what
        # the simulated annotator plans; both are what a user sees, so both are measured.
        # The simulated annotator's oracle sheet is checked at parse time (a label file for
        # every pool study): a placeholder answers them all.
        oracle = synthetic_oracle(sheet, workdir / "oracle" / "oracle.tsv")
        campaign = workdir / "campaign.yaml"
        human = workdir / "human.yaml"
        candidates = f"  candidates: {args.candidates}\n" if args.candidates else ""
        campaign.write_text(
            f"oracle_sheet: {oracle}\nactive_learning:\n  annotator: simulated\n{candidates}"
        )
        human.write_text(f"active_learning:\n  annotator: human\n{candidates}")
        for title, overlays in (
            ("human review (default target: up to the first unconfirmed batch)", (str(human),)),
            ("whole campaign (all rounds; simulated annotator)", (str(campaign),)),
        ):
            seconds, cpu, rss_gb, stdout = dry_run(sheet, workdir, args.snakemake_args, overlays)
            if args.candidates:
                title += f", candidates: {args.candidates}"
            ok &= report(args.studies, title, seconds, cpu, rss_gb, job_counts(stdout))
    print("within targets" if ok else "OUTSIDE targets")
    return 0 if ok else 1


def report(studies: int, title: str, seconds, cpu, rss_gb, counts: dict) -> bool:
    total = counts.pop("total", sum(counts.values()))
    print(f"dry run over {studies} studies, config/cohort.yaml, {title}")
    load = os.getloadavg()[0]
    print(f"  wall: {seconds:.1f} s (target <= {TARGET_SECONDS:.0f} s), load average {load:.1f}")
    print(f"  CPU (user+sys): {cpu:.1f} s")
    print(f"  peak RSS: {rss_gb:.2f} GB (target <= {TARGET_RSS_GB:.0f} GB)")
    print(f"  jobs: {total} (target <= {TARGET_JOBS})")
    for rule, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"    {rule:<24} {n}")
    # Judged on CPU seconds: equal to wall on an idle machine, robust to neighbours.
    return cpu <= TARGET_SECONDS and rss_gb <= TARGET_RSS_GB and total <= TARGET_JOBS


if __name__ == "__main__":
    sys.exit(main())
