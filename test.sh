#!/usr/bin/env bash
# One command: set up .venv and NiiVue (if needed), install Chromium for the browser tests
# (if needed), and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
# The browser tests fail (never skip) without it, saying what is missing.
tests/install_browser.sh || echo "test: could not install chromium: tests/test_review_browser.py will fail" >&2
exec .venv/bin/python -m pytest "$@"
