#!/usr/bin/env bash
# The whole check, from a fresh machine: set-up, generated-code freshness, lint,
# types, then the test suite (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/tools.sh
. .venv/bin/activate
echo "== generated code"; bash scripts/gen_proto.sh --check
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest -m "not slow" "$@"
