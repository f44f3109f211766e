#!/usr/bin/env bash
# Regenerates the committed gRPC modules under core/pb/ from proto/. CI runs this and fails
# when the result differs from what is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
rm -rf core/pb/electron
# -Icore/pb=proto makes the generated imports read "from core.pb.electron.v1 import ...".
"$PY" -m grpc_tools.protoc -Icore/pb=proto --python_out=. --grpc_python_out=. --pyi_out=. \
    proto/electron/v1/worker.proto
touch core/pb/__init__.py core/pb/electron/__init__.py core/pb/electron/v1/__init__.py
