"""A cost pilot with every model kind: the tests' tiny pipeline run with config/cohort.yaml's model
set in miniature, whose ``benchmark:`` files ``metsflow cost`` scales to the cohort.

4 patients x 2 time points (tests/conftest.py's phantom, 4 mm grid, tiny DynUNet), round 0 and one
simulated active-learning round, 2 stage-1 folds (12 iterations, fine-tuning 6), cascade stage 2
(10 iterations), follow-up re-segmentation (12 / 6 iterations): every training job kind of
``rules/train.smk`` and inference with a 2-member ensemble, CPU only. Run from the checkout:

    nice -n 10 python benchmarks/bench_cost_pilot.py --out /tmp/cost_pilot
    python -m metsflow.cli cost --benchmarks /tmp/cost_pilot/results/benchmarks \\
        --pilot-configfile /tmp/cost_pilot/pilot.yaml --configfile config/cohort.yaml --gpus 8

(``--pilot-configfile``: the pilot's iterations and TTA, against which config/cohort.yaml's are
scaled.) Prints the pilot's wall time and its benchmark files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import make_tiny_cohort, run_snakemake, write_tiny_config  # noqa: E402

MODELS = {
    "folds": 2,
    "stage2": {"enabled": True, "iterations": 10},
    "reseg": {"enabled": True, "iterations": 12, "finetune_iterations": 6},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    demo = args.out / "demo"
    if not (demo / "studies.tsv").exists():
        make_tiny_cohort(demo, n_patients=4, labelled_patients=3)
    config = write_tiny_config(
        args.out,
        demo,
        name="pilot.yaml",
        train=MODELS,
        active_learning={"strategy": "disagreement"},
    )
    start = time.perf_counter()
    run_snakemake(
        ["--profile", "profiles/local", "--cores", str(args.cores), "--configfile", str(config)],
        timeout=3600,
    )
    print(f"pilot run: {time.perf_counter() - start:.0f} s wall, config {config}")
    root = args.out / "results" / "benchmarks"
    for path in sorted(root.rglob("*.tsv")):
        print(path.relative_to(root).as_posix())


if __name__ == "__main__":
    main()
