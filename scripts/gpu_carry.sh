#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh needs beside the checkout on a GPU machine that has torch,
# triton and transformers but none of our other dependencies and no network
# (bench/README.md, "On a GPU"):
#   .whl/    cp312 manylinux wheels of the packages it lacks, at the project's pins
#   .gputok/ SmolLM2's tokenizer as a Hugging Face directory (the package that embeds it is
#            too big to carry)
# Both folders are git-ignored (.git/info/exclude). Run from the repository root, with the
# project installed (make install):
#   bash scripts/gpu_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

for ignored in /.whl/ /.gputok/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >>.git/info/exclude
done

WHEELS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 gguf==0.19.0 llguidance==1.9.1 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 xxhash==4.1.0
  orjson==3.13.0 protobuf==7.36.2 pytest-asyncio==1.5.0
)
mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
  # llguidance is built for manylinux_2_31 only; pip matches each platform tag exactly.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 -d .whl "$wheel"
done

"$PY" - <<'EOF'
from core.model_files import resolve_model_path
from core.tokenizer import Tokenizer

Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct")).save_hf(".gputok")
EOF
du -sh .whl .gputok
