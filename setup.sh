#!/usr/bin/env bash
# Create .venv/ in the checkout and install metsflow with everything it needs (idempotent).
# torch is installed first and on its own: a bare `torch` requirement resolved together with the
# rest pulls a multi-GB CUDA build. On a GPU cluster set TORCH_SPEC to your CUDA build, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
  .venv/bin/python -m pip install --quiet $TORCH_SPEC
fi
stamp=.venv/.metsflow-install
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing metsflow and its dependencies"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" >"$stamp"
fi
# NiiVue, the review server's viewer (metsflow review serve), from npm, pinned by package-lock.json.
web=metsflow/review_server/web
want_web=$(sha256sum "$web/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$web/node_modules/.metsflow-install" 2>/dev/null)" != "$want_web" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm not found: install Node.js >= 18 with npm (Debian: apt-get install -y nodejs npm) for the review viewer" >&2
    exit 1
  fi
  echo "setup: installing NiiVue (npm ci --prefix $web)"
  npm ci --prefix "$web" --no-audit --no-fund --loglevel=error
  echo "$want_web" >"$web/node_modules/.metsflow-install"
fi
.venv/bin/python -c "import torch, monai, ants, snakemake; print(f'setup: ok (torch {torch.__version__}, monai {monai.__version__}, snakemake {snakemake.__version__})')"
