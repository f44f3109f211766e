#!/usr/bin/env bash
# Regenerates the gRPC modules into a scratch copy and fails if they differ from core/pb/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/core"
"$PY" -m grpc_tools.protoc -Icore/pb=proto --python_out="$scratch" --grpc_python_out="$scratch" \
    --pyi_out="$scratch" proto/electron/v1/worker.proto
for f in worker_pb2.py worker_pb2_grpc.py worker_pb2.pyi; do
    if ! cmp -s "$scratch/core/pb/electron/v1/$f" "core/pb/electron/v1/$f"; then
        echo "core/pb/electron/v1/$f is stale: run 'make proto' and commit the result" >&2
        exit 1
    fi
done
echo "generated gRPC modules are fresh"
