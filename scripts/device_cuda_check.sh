#!/usr/bin/env bash
# Run the tap's CUDA tests (tests/test_tap_cuda.py; the vLLM front end's planning and copy on CUDA,
# tests/test_tap_vllm_plan.py) and the CPU tap tests on a GPU machine.
#
# Usage (repo root): bash scripts/device_cuda_check.sh
# Wheels of packages the machine lacks (pydantic, pydantic-settings and their needs) may be put
# in .whl/; they are installed to /tmp/site and put on PYTHONPATH. The log goes to $OUT/log
# when OUT is set (else to ./device-cuda-check.log).
set -u
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
LOG="${OUT:-.}/log"
[ -n "${OUT:-}" ] || LOG=./device-cuda-check.log
{
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed"; exit 3; }
    export PYTHONPATH="/tmp/site:$PWD"
  else
    export PYTHONPATH="$PWD"
  fi
  echo "== machine"
  nvidia-smi -L || true
  python3 - <<'PY'
import sys, torch, transformers, numpy, pydantic, pydantic_settings
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| numpy", numpy.__version__,
      "| pydantic", pydantic.__version__, "| pydantic-settings", pydantic_settings.__version__)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
import monitor.tap  # noqa: F401  (the tap imports on this machine)
print("import monitor.tap: ok")
PY
  rc_env=$?
  echo "== CUDA tap tests"
  timeout 300 python3 -m pytest -q -rs -p no:cacheprovider -o timeout=120 tests/test_tap_cuda.py tests/test_tap_vllm_plan.py
  rc_cuda=$?
  echo "== CPU tap tests (redis-backed ones skip: no redis here)"
  timeout 150 python3 -m pytest -q -rs -p no:cacheprovider -o timeout=60 tests/test_tap.py tests/test_sampler.py
  rc_cpu=$?
  echo "== rc: env=$rc_env cuda=$rc_cuda cpu=$rc_cpu"
  [ "$rc_env" -eq 0 ] && [ "$rc_cuda" -eq 0 ] && [ "$rc_cpu" -eq 0 ]
} 2>&1 | tee "$LOG"
