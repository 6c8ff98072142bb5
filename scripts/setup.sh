#!/usr/bin/env bash
# Sets up .venv on a fresh machine: the CPU build of torch, then the project
# with its dev extras, at the versions in constraints-dev.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build first: with it installed, torchft's torch requirement is met and
# pip does not fetch a multi-GB CUDA build.
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) picks where it comes from.
python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install -q -c constraints-dev.txt -e ".[dev]"
