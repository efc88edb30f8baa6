#!/usr/bin/env bash
# One command: set up .venv and NiiVue (if needed), install Chromium for the browser tests
# (if needed), and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
# The browser tests fail (never skip) without it, saying what is missing.
tests/install_browser.sh || echo "test: could not install chromium: tests/test_review_browser.py will fail" >&2
# Two pytest-xdist workers, each taking whole files (module fixtures and the session's tiny run
# are built once) in collection order, which tests/conftest.py makes longest-first (xdist's own
# reorder, by number of tests, would leave the SLURM run alone at the end): the SLURM and browser
# tests mostly wait, and most snakemake jobs use one core. METSFLOW_TEST_WORKERS=0: one process.
workers=${METSFLOW_TEST_WORKERS:-2}
parallel=()
if [ "$workers" -gt 0 ]; then parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder); fi
exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
