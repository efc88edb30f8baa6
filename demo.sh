#!/usr/bin/env bash
# One command: set up .venv, generate the phantom demo cohort, run the whole pipeline with the
# local profile (preprocess, register, train round 0, infer, evaluate, one active-learning round
# with the simulated annotator, fine-tune, evaluate) and render the HTML report.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)
[ -s demo/studies.tsv ] || metsflow demo-cohort --out demo
snakemake --profile profiles/local "$@"
snakemake --profile profiles/local --report results/report.html "$@"
metsflow al status --results results --labels labels
echo "demo finished in $(( $(date +%s) - start )) s; report: $PWD/results/report.html"
