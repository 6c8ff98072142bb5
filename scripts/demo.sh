#!/usr/bin/env bash
# The main command. Until the coordinator lands, the demo is the transport
# benchmark at quick scale: recoveryd beside PyTorch's and torchft's transports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m bench.transport_bench --quick "$@"
