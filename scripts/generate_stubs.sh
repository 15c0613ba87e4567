#!/usr/bin/env bash
# Regenerates stubs/ (messages, gRPC services and type stubs for saga.v1) from protos/.
# Usage: scripts/generate_stubs.sh [OUTPUT_DIR]   (default: stubs)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/stubs}")
python=$(realpath -s "${PYTHON:-$root/.venv/bin/python}")

rm -rf "$out/saga"
mkdir -p "$out"
cd "$root/protos"
PATH="$(dirname "$python"):$PATH" "$python" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  saga/v1/*.proto
touch "$out/saga/v1/py.typed"
