#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one short run (well under 8 minutes on
# one H200): the gpu-marked tests, then a short bench.
#
#   - CUDA tensors received in place (and allocated on the GPU) from a CPU
#     Gloo wire through pinned host staging, and sent from the GPU to a CPU
#     joiner (tests/integration/test_transport_cuda.py);
#   - CUDA IPC sharing through the sidecar, plain tensors and FSDP2's DTensor
#     local shards, recovered in place from a CPU donor
#     (tests/integration/test_sidecar.py);
#   - bench/gpu_bench.py --quick: pinned and pageable host<->device GB/s beside
#     the transport's, raw Gloo as the anchor.
#
# NCCL between two ranks needs two GPUs: those tests stay marked and skip on
# one. With the device tool: run scripts/gpu_wheels.sh here once, then
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Exit status: 0 when every check passed, 2 without a usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/recoveryd-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/recoveryd-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch " + torch.__version__)
print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
PYEOF
out=${OUT:-/tmp/recoveryd-gpu-check}
mkdir -p "$out"
status=0
timeout 420 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rA \
  tests/integration/test_transport_cuda.py tests/integration/test_sidecar.py \
  2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 150 "$PY" -m bench.gpu_bench --quick 2>&1 | tee "$out/gpu_bench.txt" || status=1
echo "gpu_check: $([[ $status == 0 ]] && echo passed || echo FAILED)"
exit $status
