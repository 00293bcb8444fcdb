"""The vLLM front end of the tap: a ``vllm.general_plugins`` entry point.

vLLM loads every installed general plugin in every one of its processes (API server, engine
core, workers). :func:`register` therefore does nothing at all unless the tap is configured,
i.e. unless at least one ``LAYERWATCH_TAP_*`` environment variable is set (the same
:class:`monitor.config.TapSettings` as the Hugging Face tap). When it is, it arranges two things
(:mod:`monitor.tap.vllm.plugin`), whichever process imports the vLLM module concerned:

* in the engine core, each new request is decided once (sampling hash of its external id, the
  budget, optional per-request control) and a sampled one skips reading the prefix cache, so its
  whole prompt is computed and its states exist;
* in each worker, once the model has loaded, :class:`monitor.tap.vllm.frontend.VllmTap` wraps the
  model runner. Where the compiled graph runs every step (no CUDA graphs: the CPU backend) the
  capture is an op inside that graph (:mod:`monitor.tap.vllm.graph`); elsewhere steps without a
  sampled request run exactly as before (compiled, CUDA graphs) and a step with one runs
  uncompiled with layer hooks. Either way only the sampled rows are copied.

Nothing here may break serving: every failure is logged and counted, and vLLM serves on.
"""

from __future__ import annotations

import logging
import os

ENV_PREFIX = "LAYERWATCH_TAP_"
log = logging.getLogger("layerwatch.vllm")


def configured(environ: dict[str, str] | None = None) -> bool:
    """True when at least one ``LAYERWATCH_TAP_*`` variable is set: the plugin's on switch."""
    env = os.environ if environ is None else environ
    return any(k.startswith(ENV_PREFIX) for k in env)


def register() -> None:
    """The entry point vLLM calls in each of its processes. Never raises."""
    if not configured():
        return
    try:
        from monitor.tap.vllm.plugin import install

        install()
    except Exception as exc:  # a broken install must not stop vLLM
        log.error("layerwatch: the vLLM tap is not installed: %s: %s", type(exc).__name__, exc)
