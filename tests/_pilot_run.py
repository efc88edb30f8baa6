"""A pilot run's benchmark files and plan, for the cost-model tests (test_costmodel,
test_cost_candidates): ``write_pilot_run``; ``bench`` writes one Snakemake benchmark file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(path: Path, seconds: float, cpu: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:00\t100\t200\t90\t95\t1\t1\t90\t{cpu}\n")


def write_pilot_run(tmp_path: Path) -> Path:
    """A pilot run's benchmarks folder (returned) and plan under ``tmp_path/results``: CPU
    shards of 2 and 4 studies, GPU shards of 4 and 2 non-seed studies."""
    results = tmp_path / "results"
    plan = pd.DataFrame(
        {
            "study_id": [f"S{i}" for i in range(6)],
            "shard": ["s0000"] * 2 + ["s0001"] * 4,
            "gpu_shard": ["g0000"] * 4 + ["g0001"] * 2,
            "role": ["pool"] * 6,
        }
    )
    (results / "plan").mkdir(parents=True)
    plan.to_csv(results / "plan/cohort.tsv", sep="\t", index=False)
    b = results / "benchmarks"
    # preprocess: 5 s per job + 10 s per study; CPU = wall
    bench(b / "preprocess/s0000.tsv", 25, 25)
    bench(b / "preprocess/s0001.tsv", 45, 45)
    # inference: 20 s model load + 3 s per study, two rounds
    for r in (0, 1):
        bench(b / f"infer/round_{r}/g0000.tsv", 32, 30)
        bench(b / f"infer/round_{r}/g0001.tsv", 26, 24)
        bench(b / f"train/round_{r}.tsv", 600, 1200)
    bench(b / "plan_cohort.tsv", 1, 1)  # bookkeeping: ignored
    return b
