"""The tap inside a vLLM worker: wraps the model runner, plans each step on the host, copies
only the sampled rows.

Per step (``GPUModelRunner._model_forward``, wrapped on the runner instance):

* no sampled request in flight: the original call, nothing else (a dict check);
* a sampled request's tokens in the step: the step's plan is built from the runner's host-side
  arrays (request index, query start offsets, computed-token counts: no device read), and each
  decoder layer copies the planned rows of the residual stream into a small step buffer
  (:mod:`monitor.tap.plan`): from inside the compiled graph (:mod:`monitor.tap.vllm.graph`)
  where that graph runs every step (no CUDA graphs), otherwise from forward hooks while the step
  runs uncompiled (``skip_compiled``, CUDA graphs off for this step only). vLLM's decoder layers return ``(out, residual)`` and
  add the two inside the next layer's norm: the state after block l is their sum.

Positions mean what they mean in the Hugging Face tap (``last+mean``, ``last``, ``mean``,
``all``, ``generated``), counted in the request's own tokens. A prompt split over steps by
chunked prefill is assembled across steps (the mean accumulates in float32; a recomputed prefix
after preemption is not counted twice). The engine core makes sampled requests skip the prefix
cache, so every prompt token is computed; if that mark is missing (another vLLM build), the
worker decides by itself and the header's metadata says from which position the mean was taken.

Tensor parallelism: the residual stream is replicated after each all-reduce, so only rank 0
captures and exports; every rank runs sampled steps the same way. Pipeline parallelism is
refused (the layers of one request live in several processes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from monitor.adapters import ModelParts, checkpoint_fingerprint, find_parts
from monitor.config import TapSettings, build_settings
from monitor.errors import UnsupportedArchitecture
from monitor.metrics import TapMetrics
from monitor.tap.core import TapCore
from monitor.tap.plan import take
from monitor.tap.recorder import attached as record_attached
from monitor.tap.vllm import log
from monitor.tap.vllm.assembly import Assembly, _Req, _StepWork
from monitor.tap.vllm.graph import set_sink, wrap_layers
from monitor.tap.vllm.plugin import MARK
from monitor.windows import window_bounds

__all__ = ["VllmTap", "attach_worker", "taps"]


class VllmTap(Assembly):
    """One worker's tap over its model runner. Create with :func:`attach_worker`."""

    def __init__(self, runner: Any, vllm_config: Any, settings: TapSettings, *, rank: int = 0,
                 registry: Any = None, transport: Any = None) -> None:
        par = vllm_config.parallel_config
        if getattr(par, "pipeline_parallel_size", 1) > 1:
            raise UnsupportedArchitecture(
                "pipeline parallelism is not supported: one request's layers live in several processes "
                "(serve with tensor parallelism, or without the layerwatch tap)")
        if getattr(runner, "is_pooling_model", False):
            raise UnsupportedArchitecture("pooling/encoder models are not supported by the vLLM tap")
        if vllm_config.speculative_config is not None and settings.positions == "generated":
            raise UnsupportedArchitecture("positions='generated' is not supported with speculative decoding "
                                          "(draft tokens may be rejected); prompt positions are")
        self.runner = runner
        self.settings = settings
        self.parts = _find_vllm_parts(runner.model)
        model_dir = _checkpoint_dir(vllm_config.model_config.model)
        name = settings.model_name or str(getattr(vllm_config.model_config, "served_model_name", None)
                                          or vllm_config.model_config.model)
        if isinstance(name, list):
            name = name[0]
        self.capturing = rank == 0  # TP: the residual stream is replicated; rank 0 exports
        self.core = TapCore(settings, model_name=str(name), fingerprint=checkpoint_fingerprint(model_dir),
                            n_blocks=self.parts.n_blocks, registry=registry, transport=transport,
                            header={"engine": "vllm"}, hidden_size=self.parts.hidden_size) if self.capturing else None
        self.layers = self.core.layers if self.core else ()
        self.slot = self.core.slot if self.core else {}
        self.mode = settings.positions
        self.active: dict[str, _Req | None] = {}  # sampled internal ids (None: rank > 0, no capture)
        self._work: _StepWork | None = None
        self._handles: list[Any] = []
        self.in_graph = _runs_compiled_graph(vllm_config)
        if self.in_graph:  # before vLLM compiles the model (this runs right after load_model)
            self._owner = _next_owner()
            wrap_layers(runner.model, self.parts.blocks, self._owner, self.slot if self.core else {})
            set_sink(self._owner, self._take)
            extra = vllm_config.additional_config
            if isinstance(extra, dict):  # another compile-cache key than graphs without the op
                extra["layerwatch_tap"] = GRAPH_VERSION
        self._orig_execute = runner.execute_model
        self._orig_forward = runner._model_forward
        runner.execute_model = self._execute_model
        runner._model_forward = self._model_forward
        if self.core is not None:
            self.core.recorder.attached("ok")

    # ------------------------------------------------------------------------- runner seams
    def _execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            self._admit(scheduler_output)
        except Exception as exc:
            self._failed(exc)
        return self._orig_execute(scheduler_output, *args, **kwargs)

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self._orig_forward(*args, **kwargs)
        try:
            work = self._plan()
        except Exception as exc:
            self._failed(exc)
            work = None
        if work is None:
            return self._orig_forward(*args, **kwargs)
        if self.in_graph:
            return self._graph_forward(work, *args, **kwargs)
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        saved = (ctx.skip_compiled, ctx.cudagraph_runtime_mode)
        ctx.skip_compiled, ctx.cudagraph_runtime_mode = True, CUDAGraphMode.NONE
        self._work = work if self.core is not None else None
        if self._work is not None:
            self._hook()
        try:
            return self._orig_forward(*args, **kwargs)
        finally:
            ctx.skip_compiled, ctx.cudagraph_runtime_mode = saved
            self._unhook()
            if self._work is not None:
                self._work = None
                try:
                    self._collect(work)
                except Exception as exc:
                    self._failed(exc)

    def _graph_forward(self, work: _StepWork, *args: Any, **kwargs: Any) -> Any:
        """The compiled step as it is; the layer ops copy the planned rows (:mod:`.graph`)."""
        self._work = work if self.core is not None else None
        try:
            return self._orig_forward(*args, **kwargs)
        finally:
            if self._work is not None:
                self._work = None
                try:
                    if all(p is None or p.buf is None for p in (work.gather, work.mean, work.windows)):
                        # a compiled graph without the op (e.g. loaded from another cache): from now
                        # on sampled steps run uncompiled with hooks; this step's captures are lost
                        self.in_graph = False
                        raise RuntimeError("the compiled graph did not call layerwatch::tap; "
                                           "sampled steps run uncompiled from now on")
                    self._collect(work)
                except Exception as exc:
                    self._failed(exc)

    # ------------------------------------------------------------------------- requests
    def _admit(self, so: Any) -> None:
        """New requests: read the engine core's decision (or decide); finished ones: close."""
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            mark = (params.extra_args or {}).get(MARK) if params is not None else None
            if mark is None:  # no engine-core decision (not patched there): decide (and count) here
                mark = self._decide_here(new)
            elif self.core is not None:  # decided by the engine core: count it here, where /metrics is
                if mark.get("sampled"):
                    self.core.count_sampled(1)
                elif mark.get("reason") not in (None, "sibling"):
                    self.core.skip(str(mark["reason"]))
            if not mark.get("sampled"):
                continue
            if self.core is None:
                self.active[new.req_id] = None
                continue
            plen = len(new.prompt_token_ids or ())
            meta: dict[str, Any] = {"prompt_tokens": plen}
            first = int(new.num_computed_tokens)
            if first > 0:
                meta["prefix_cached_tokens"] = first
            r = _Req(new.req_id, str(mark["request_id"]), self.core.new_ids(1)[0],
                     plen, meta, time.time(), mean_from=first)
            if self.settings.windows > 0 and self.mode != "generated":
                if first > 0:  # the prefix's states were never computed: no windows (the mean says it)
                    meta["windows_skipped"] = "prefix_cached"
                else:
                    r.bounds = window_bounds(plen, self.settings.windows, self.settings.window_min_tokens)
            self.active[new.req_id] = r
        for rid in so.finished_req_ids:
            if rid in self.active:
                self._close(rid, finished=True)

    def _decide_here(self, new: Any) -> dict[str, Any]:
        rid = str(new.req_id)
        if self.core is None:
            return {"sampled": False}
        return {"sampled": self.core.decide(rid) is None, "request_id": rid}

    def _close(self, rid: str, finished: bool = False) -> None:
        r = self.active.pop(rid, None)
        if r is None or self.core is None:
            return
        if self.mode == "generated" and r.vecs:
            self._export(r)
        elif finished:  # the request ended before its prompt was read (aborted)
            self.core.finish([r.sample_id], [r.request_id], [r.metadata], [], events=[], nbytes=0,
                             started=r.started, drop_reason="request_error")

    # ------------------------------------------------------------------------- planning
    def _hook(self) -> None:
        blocks = self.parts.blocks
        if 0 in self.slot:
            self._handles.append(blocks[0].register_forward_pre_hook(self._embed_pre, with_kwargs=True))
        for i, blk in enumerate(blocks):
            if i + 1 in self.slot:
                self._handles.append(blk.register_forward_hook(self._block_hook(self.slot[i + 1])))

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _take(self, slot: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        work = self._work
        if work is None:
            return
        try:
            n = len(self.layers)
            for plan in (work.gather, work.mean, work.windows):
                if plan is not None:
                    take(plan, n, slot, hidden, residual)
        except Exception as exc:
            self._work = None
            self._failed(exc)

    def _embed_pre(self, _m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = kwargs.get("hidden_states")
        if h is None:  # (positions, hidden_states, residual) in Llama-like layers, (hidden,) in GPT-2
            h = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if h is not None:
            self._take(0, h, None)

    def _block_hook(self, slot: int) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self._take(slot, out, None)
            elif isinstance(out, (tuple, list)) and len(out) >= 2 and isinstance(out[1], torch.Tensor) \
                    and out[1].shape == out[0].shape:
                self._take(slot, out[0], out[1])  # (mlp_out, residual): the stream is their sum
            else:
                self._take(slot, out[0], None)

        return hook

    # ------------------------------------------------------------------------- after the step
    def _failed(self, exc: BaseException) -> None:
        """A failure inside the tap: counted, logged once per kind, swallowed; captures dropped."""
        if self.core is None:
            return
        self.core.hook_failed()
        if self.core.hook_errors <= 3:
            log.error("layerwatch: tap error (serving continues): %s: %s", type(exc).__name__, exc)
        for rid in list(self.active):
            r = self.active.pop(rid)
            if r is not None:
                self.core.finish([r.sample_id], [r.request_id], [r.metadata], [], events=[], nbytes=0,
                                 started=r.started, drop_reason="hook_error")

    def close(self, timeout: float = 5.0) -> bool:
        """Unwrap the runner and flush the exporter."""
        self.runner.execute_model = self._orig_execute
        self.runner._model_forward = self._orig_forward
        self._unhook()
        if self.in_graph:
            set_sink(self._owner, None)
        return self.core.close(timeout) if self.core is not None else True


GRAPH_VERSION = "tap-op-1"
_OWNERS = [0]


def _next_owner() -> int:
    _OWNERS[0] += 1
    return _OWNERS[0]


def _runs_compiled_graph(vllm_config: Any) -> bool:
    """Whether each step executes the compiled graph (so an op in it runs every step): compiled,
    and no CUDA graphs (a CUDA graph replays kernels without calling Python). Read by value, so
    no vLLM import: ``CompilationMode.NONE`` is 0, ``CUDAGraphMode.NONE`` is named NONE."""
    cc = getattr(vllm_config, "compilation_config", None)
    if cc is None or getattr(vllm_config.model_config, "enforce_eager", False):
        return False
    if int(getattr(cc, "mode", 0) or 0) == 0:
        return False
    cudagraphs = getattr(cc, "cudagraph_mode", None)
    return cudagraphs is None or getattr(cudagraphs, "name", str(cudagraphs)) == "NONE"


def _find_vllm_parts(model: Any) -> ModelParts:
    """The ladder on vLLM's module tree (the same attribute names as Hugging Face's), then on
    an inner ``model`` (vLLM's Transformers backend wraps the Hugging Face base model)."""
    try:
        return find_parts(model)
    except UnsupportedArchitecture:
        inner = getattr(model, "model", None)
        if inner is None:
            raise
        return find_parts(inner)


def _checkpoint_dir(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))


_TAPS: list[VllmTap] = []


def taps() -> list[VllmTap]:
    """The taps attached in this process (one per worker; tests and control RPCs read them)."""
    return list(_TAPS)


def attach_worker(worker: Any) -> VllmTap | None:
    """Attach a tap to ``worker``'s model runner. Never raises: a tap that cannot attach is
    logged with the reason (and counted on ``layerwatch_tap_attached``); vLLM serves on."""
    settings = None
    try:
        settings = build_settings(TapSettings, "LAYERWATCH_TAP_")
        from vllm.distributed import get_tensor_model_parallel_rank

        tap = VllmTap(worker.model_runner, worker.vllm_config, settings, rank=get_tensor_model_parallel_rank())
        _TAPS.append(tap)
        log.warning("layerwatch: tap attached (%d states, positions=%s, rate=%s, transport=%s)",
                    tap.parts.n_states, settings.positions, settings.sample_rate,
                    settings.transport.split("://", 1)[0])
        return tap
    except Exception as exc:
        reason = "unsupported" if isinstance(exc, UnsupportedArchitecture) else "error"
        log.error("layerwatch: the tap is not attached, nothing is captured (vLLM serves on): %s: %s",
                  type(exc).__name__, exc)
        try:
            metrics = TapMetrics()
            record_attached(metrics, settings.model_name or "" if settings else "", reason)
            if settings is not None and settings.metrics_port:
                from monitor.httpserver import serve_registry

                serve_registry(metrics.registry, settings.metrics_host, settings.metrics_port)
        except Exception:
            pass
        return None
