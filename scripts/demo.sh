#!/usr/bin/env bash
# The main command: set-up, then `recoveryd demo` (a coordinator and 3 replicas
# x 2 ranks training on this machine; one is killed, restarted, and recovers
# from a live donor; the timeline and bit-for-bit checks are printed).
# Extra arguments go to `recoveryd demo` (see `recoveryd demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
recoveryd demo "$@"
