"""Where the vLLM tap hooks into vLLM: two seams, patched when their module is imported.

* ``vllm.v1.engine.core.EngineCore.preprocess_add_request`` (engine core process): every new
  request is decided once by :class:`RequestDecider`; the decision rides to the workers in the
  request's ``SamplingParams.extra_args`` (key :data:`MARK`), and a sampled request skips reading
  the prefix cache (``Request.skip_reading_prefix_cache``) so its whole prompt is recomputed.
* ``vllm.v1.worker.worker_base.WorkerBase.__init__`` (worker process): the worker's
  ``load_model`` is wrapped on the instance so that, once the model has loaded, a
  :class:`~monitor.tap.vllm.frontend.VllmTap` attaches to its model runner.

A module already imported is patched at once; otherwise a post-import finder patches it right
after it executes, so the plugin imports nothing of vLLM in a process that never needs it.
"""

from __future__ import annotations

import copy
import importlib.abc
import importlib.machinery
import re
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from monitor.tap.vllm import log

MARK = "layerwatch_tap"  # SamplingParams.extra_args key carrying the engine core's decision
CONTROL = "layerwatch"  # the request's own extra argument: "force" or "skip" (if allowed)
_CHILD = re.compile(r"^(\d+)_(.+)$")
_OPENAI = (re.compile(r"^cmpl-(.+)-(\d+)$"), re.compile(r"^chatcmpl-(.+)$"))


def client_request_id(external: str) -> str:
    """The id a client knows from the id vLLM's OpenAI server gives the engine: completions
    ``cmpl-<X-Request-Id>-<prompt index>`` (index 0 dropped), chat ``chatcmpl-<X-Request-Id>``.
    Offline ``LLM`` ids pass unchanged. Sampling hashes this id, so the Hugging Face tap and the
    vLLM plugin sample the same requests."""
    m = _OPENAI[0].match(external)
    if m is not None:
        return m.group(1) if m.group(2) == "0" else f"{m.group(1)}-{m.group(2)}"
    m = _OPENAI[1].match(external)
    return m.group(1) if m is not None else external


class RequestDecider:
    """The engine core's once-per-request sampling decision (one per engine core process)."""

    def __init__(self) -> None:
        from monitor.config import TapSettings, build_settings
        from monitor.tap.sampler import Sampler, read_key

        self.settings = build_settings(TapSettings, "LAYERWATCH_TAP_")
        self.sampler = Sampler(self.settings.sample_rate, self.settings.max_samples_per_s,
                               key=read_key(self.settings))

    def decide(self, core_request: Any) -> dict[str, Any]:
        """The mark for one ``EngineCoreRequest``: sampled or the skip reason, and its external id."""
        internal = str(core_request.request_id)
        engine_id = str(getattr(core_request, "external_req_id", None) or internal)
        external = client_request_id(engine_id)
        child = _CHILD.match(internal)
        if child is not None and child.group(2).startswith(engine_id) and child.group(1) != "0":
            return {"sampled": False, "reason": "sibling", "request_id": external}  # n > 1: one sample
        if getattr(core_request, "lora_request", None) is not None:
            return {"sampled": False, "reason": "unsupported", "request_id": external}
        params = getattr(core_request, "sampling_params", None)
        if params is None:  # pooling requests: nothing generated, nothing to read
            return {"sampled": False, "reason": "unsupported", "request_id": external}
        control = (params.extra_args or {}).get(CONTROL) if self.settings.allow_request_control else None
        if control == "skip":
            return {"sampled": False, "reason": "opt_out", "request_id": external}
        reason = self.sampler.decide(external, force=control == "force")
        return {"sampled": reason is None, "reason": reason, "request_id": external}


_decider: RequestDecider | None = None
_decider_failed = False
_decider_lock = threading.Lock()


def _mark_request(core_request: Any, req: Any) -> None:
    global _decider, _decider_failed
    with _decider_lock:
        if _decider is None:
            if _decider_failed:
                return
            try:
                _decider = RequestDecider()
            except Exception as exc:  # invalid settings: said once, then nothing is marked
                _decider_failed = True
                log.error("layerwatch: no sampling decisions (settings invalid): %s: %s", type(exc).__name__, exc)
                return
    mark = _decider.decide(core_request)
    if req.sampling_params is None:
        return
    # n > 1 children share one SamplingParams object: each request gets its own copy to mark
    params = copy.copy(req.sampling_params)
    params.extra_args = {**(params.extra_args or {}), MARK: mark}
    req.sampling_params = params
    if mark["sampled"]:
        req.skip_reading_prefix_cache = True  # recompute the prompt: its states must exist


def _patch_engine_core(mod: ModuleType) -> None:
    cls = mod.EngineCore
    orig = cls.preprocess_add_request
    if getattr(orig, "_layerwatch", False):
        return

    def preprocess_add_request(self: Any, request: Any) -> Any:
        req, wave = orig(self, request)
        try:
            _mark_request(request, req)
        except Exception as exc:  # the worker decides by itself when no mark arrives
            log.error("layerwatch: sampling decision failed for a request: %s: %s", type(exc).__name__, exc)
        return req, wave

    preprocess_add_request._layerwatch = True  # type: ignore[attr-defined]
    cls.preprocess_add_request = preprocess_add_request


def _patch_worker_base(mod: ModuleType) -> None:
    cls = mod.WorkerBase
    orig_init = cls.__init__
    if getattr(orig_init, "_layerwatch", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        try:
            _wrap_load_model(self)
        except Exception as exc:
            log.error("layerwatch: cannot watch this worker: %s: %s", type(exc).__name__, exc)

    __init__._layerwatch = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


def _wrap_load_model(worker: Any) -> None:
    load = worker.load_model  # the subclass's own method, bound

    def load_model(*args: Any, **kwargs: Any) -> Any:
        out = load(*args, **kwargs)
        from monitor.tap.vllm.frontend import attach_worker

        attach_worker(worker)  # never raises
        return out

    worker.load_model = load_model


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "vllm.v1.engine.core": _patch_engine_core,
    "vllm.v1.worker.worker_base": _patch_worker_base,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._inner = inner
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        try:
            self._patch(module)
        except Exception as exc:
            log.error("layerwatch: cannot patch %s: %s: %s", module.__name__, type(exc).__name__, exc)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Patches a module of :data:`PATCHES` right after it is first imported."""

    def __init__(self, pending: dict[str, Callable[[ModuleType], None]]) -> None:
        self.pending = pending

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        patch = self.pending.pop(fullname, None)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def install() -> None:
    """Patch the seams now or when their modules are imported. Idempotent."""
    pending = {}
    for name, patch in PATCHES.items():
        mod = sys.modules.get(name)
        if mod is not None:
            patch(mod)
        else:
            pending[name] = patch
    if pending and not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder(pending))
