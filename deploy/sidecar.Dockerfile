# syntax=docker/dockerfile:1
# The layerwatch sidecar: consumes tap samples from Redis, runs the lens bank (ONNX Runtime),
# scores drift, writes the audit trail and serves /metrics, /healthz, /readyz on port 9400.
#
#   docker build -f deploy/sidecar.Dockerfile -t layerwatch-sidecar .                 # CPU
#   docker build -f deploy/sidecar.Dockerfile --build-arg EXTRA=sidecar-gpu \
#                --build-arg BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 ...   # GPU
#
# Build context: the repository root. The image runs as a non-root user and works with a
# read-only root filesystem (writable: /tmp and the audit directory, both volumes).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# torch first and pinned (the tap's core dependency); TORCH_INDEX_URL may point pip at a
# CPU-only wheel index for a much smaller image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG EXTRA=sidecar
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A CUDA base image (Ubuntu) has no venv module: install Python there.
RUN python3 -m venv --help >/dev/null 2>&1 || (apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/layerwatch
WORKDIR /src
COPY pyproject.toml README* ./
COPY monitor ./monitor
RUN /opt/layerwatch/bin/pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && /opt/layerwatch/bin/pip install ".[${EXTRA}]"

FROM ${BASE}
ARG UID=10001
RUN python3 --version >/dev/null 2>&1 || (apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*)
RUN groupadd --system --gid ${UID} layerwatch \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /var/lib/layerwatch --shell /usr/sbin/nologin layerwatch \
 && mkdir -p /var/lib/layerwatch/audit /var/lib/layerwatch/bundle \
 && chown -R ${UID}:${UID} /var/lib/layerwatch
COPY --from=build /opt/layerwatch /opt/layerwatch
ENV PATH=/opt/layerwatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    LAYERWATCH_HTTP_PORT=9400 \
    LAYERWATCH_BUNDLE=/var/lib/layerwatch/bundle \
    LAYERWATCH_AUDIT__DIRECTORY=/var/lib/layerwatch/audit
USER ${UID}:${UID}
WORKDIR /var/lib/layerwatch
VOLUME ["/var/lib/layerwatch/audit"]
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=2)"]
ENTRYPOINT ["layerwatch"]
CMD ["sidecar"]
