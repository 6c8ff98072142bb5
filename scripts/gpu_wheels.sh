#!/usr/bin/env bash
# Fetches, here, the wheels scripts/gpu_check.sh needs on a GPU machine whose
# Python (3.12 on the lent H200s) has torch but not recoveryd's other
# dependencies, into .whl/ (ignored by git through .git/info/exclude).
# Versions: the ones constraints-dev.txt pins. About 11 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
pins=()
for name in torchft grpcio grpcio-health-checking grpcio-reflection protobuf xxhash blake3 prometheus_client; do
  pin=$(grep -i -E "^${name//-/[-_]}==" constraints-dev.txt) || { echo "no pin for $name" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -la .whl
