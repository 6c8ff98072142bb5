#!/usr/bin/env bash
# Regenerates recoveryd/v1/ from proto/recoveryd/v1/*.proto. Commit the result.
# With --check, fails if the committed code is stale instead of writing it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
python -m grpc_tools.protoc -Iproto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/recoveryd/v1/*.proto
if [[ "${1:-}" == "--check" ]]; then
  for f in "$out"/recoveryd/v1/*.py "$out"/recoveryd/v1/*.pyi; do
    rel=recoveryd/v1/$(basename "$f")
    if ! cmp -s "$f" "$rel"; then
      echo "generated code is stale: $rel (run scripts/gen_proto.sh and commit)" >&2
      exit 1
    fi
  done
  echo "generated code is fresh"
fi
