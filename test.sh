#!/usr/bin/env bash
# One command: set up .venv (if needed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
exec .venv/bin/python -m pytest "$@"
