"""The Hugging Face front end of the tap: forward hooks on a transformers model.

Sampling, sample ids, counters and export live in :mod:`monitor.tap.core`; the step plan and the
copy in :mod:`monitor.tap.plan` (shared with the vLLM plugin, :mod:`monitor.tap.vllm`).

Usage::

    tap = monitor.attach(model, sample_rate=0.01, transport="redis://127.0.0.1:6379/0")
    with tap.request(request_id="r-123", metadata={"route": "/v1/chat"}):
        model(**inputs)                      # or model.generate(...)
    with tap.batch(["r-1", "r-2", None]):   # batched serving: row i belongs to request i
        model(**batch_inputs)

Threading contract: the hooks run synchronously on the serving thread; they never block or
raise. The request context lives in a :class:`contextvars.ContextVar`, so the model must run in
the thread (or the ``asyncio.to_thread`` context) that entered ``tap.request()``.

* An unsampled request costs a flag check per hook (a ContextVar read).
* A sampled one: the model's pre-hook plans the forward once (which rows and positions, as
  index tensors built on the device with no host synchronisation); each block hook copies its
  ``[P, d]`` slice into a small per-forward ``[L, P, d]`` buffer with one ``index_select``;
  the model's post-hook casts that buffer to float16 and takes it off the device (CPU: nothing
  to copy; CUDA: one non-blocking copy into pinned memory plus an event the exporter thread
  waits on). So the queue never keeps a full activation alive and the serving thread never
  waits for the GPU.
* At the end of the request one item is offered to the exporter; splitting it per request,
  encoding and I/O run on the exporter thread.

Position semantics (header ``position_index``): the index of the captured token in the row's
own token sequence, padding excluded (so a left-padded and a right-padded batch give the same
indices). ``positions="generated"`` captures, at each generation step, the state of the token
that step consumes: the last prompt token, then each generated token fed back, i.e. the states
that produced generated tokens 1..N (``final_topk`` row i is the distribution of token i).
Prompt windows (``windows`` setting): the prefill also ships window means (:mod:`monitor.windows`).
``positions="last+mean"`` ships two vectors per layer: index 0 the mean over the prompt's real
tokens, index 1 the last prompt token (so ``hidden[:, -1]`` is the last token, as for "last").
The lens bank reads the last token; the concept probes also read the mean (the prompt's
context), which the drift detector uses (``<probe>@mean`` readings).
"""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from monitor.adapters import ModelParts, find_parts, model_fingerprint
from monitor.config import TapSettings, build_settings
from monitor.errors import ConfigError
from monitor.tap.core import TapCore
from monitor.tap.hf_plan import Capture, plan_padded_step
from monitor.tap.plan import StepPlan, final_topk, seal, take, to_device
from monitor.transport import Transport
from monitor.wire import sanitize_metadata

__all__ = ["Tap", "attach", "RequestHandle"]


class RequestHandle:
    """What ``tap.request()`` (and each row of ``tap.batch()``) yields.

    ``request_id`` (generated when none was given), ``sampled`` (the decision) and
    ``sample_ids`` (the ids the exported samples carry; one per batch row of the request, known
    once the model has run).
    """

    __slots__ = ("request_id", "sampled", "_ids")

    def __init__(self, request_id: str, sampled: bool, sample_ids: Sequence[str] = ()) -> None:
        self.request_id = request_id
        self.sampled = sampled
        self._ids: Sequence[str] = sample_ids

    @property
    def sample_ids(self) -> tuple[str, ...]:
        return tuple(self._ids)

    def __repr__(self) -> str:
        return f"RequestHandle({self.request_id!r}, sampled={self.sampled}, sample_ids={self.sample_ids})"


class Tap:
    """Hooks on one model over a :class:`TapCore`. Create with :func:`attach`."""

    def __init__(
        self,
        model: nn.Module,
        settings: TapSettings,
        *,
        parts: ModelParts | None = None,
        registry: CollectorRegistry | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.parts = parts or find_parts(model)
        cfg = getattr(model, "config", None)
        name = settings.model_name or str(getattr(cfg, "name_or_path", "") or type(model).__name__)
        self.core = TapCore(settings, model_name=name, fingerprint=model_fingerprint(model, self.parts),
                            n_blocks=self.parts.n_blocks, registry=registry, transport=transport,
                            hidden_size=self.parts.hidden_size)
        self.core.on_fork(self._after_fork_in_child)
        self.layers = self.core.layers
        self._slot = self.core.slot
        self.model_name = name
        self.fingerprint = self.core.fingerprint
        self.metrics = self.core.metrics
        self.registry = self.core.registry
        self.sampler = self.core.sampler
        self.exporter = self.core.exporter
        self._var: contextvars.ContextVar[Capture | None] = contextvars.ContextVar(
            f"layerwatch_tap_{id(self)}", default=None
        )
        self._handles: list[Any] = []
        self._layer_handles: list[Any] = []
        self._layer_refs = 0
        self._layer_lock = threading.Lock()
        self._closed = False
        self._install_hooks()

    # ------------------------------------------------------------------------- public API
    @contextmanager
    def request(
        self, request_id: str | None = None, metadata: dict[str, Any] | None = None, force: bool = False
    ) -> Iterator[RequestHandle]:
        """Run one request under the tap. Every batch row of the call belongs to this request
        (each row becomes one sample with this request id and ``metadata["row"]``).

        ``force=True`` samples regardless of rate and budget. Nested requests are not sampled.
        """
        rid = request_id or uuid.uuid4().hex
        if self._closed or self._var.get() is not None or self.core.decide(rid, force) is not None:
            yield RequestHandle(rid, False)
            return
        cap = Capture([rid], self.core.new_ids(1), None, [sanitize_metadata(metadata)], None, time.time())
        token = self._var.set(cap)
        ok = False
        try:
            yield RequestHandle(rid, True, cap.sample_ids)
            ok = True
        finally:
            self._var.reset(token)
            self._finish(cap, ok)

    @contextmanager
    def batch(
        self,
        request_ids: Sequence[str | None],
        metadata: Sequence[dict[str, Any] | None] | dict[str, Any] | None = None,
        force: Sequence[bool] | bool = False,
    ) -> Iterator[list[RequestHandle]]:
        """Batched serving: batch row ``i`` belongs to ``request_ids[i]`` (None: generate one).

        Each row is sampled on its own (by its id); only sampled rows are captured and each
        becomes one sample with its request id and its metadata (``metadata`` is one dict for
        all rows or one per row). The model's batch size must equal ``len(request_ids)``.
        """
        rids = [r or uuid.uuid4().hex for r in request_ids]
        forces = list(force) if isinstance(force, (list, tuple)) else [bool(force)] * len(rids)
        metas: list[dict[str, Any] | None] = (
            list(metadata) if isinstance(metadata, (list, tuple)) else [metadata] * len(rids))  # type: ignore[list-item]
        if len(forces) != len(rids) or len(metas) != len(rids):
            raise ValueError("tap.batch(): force and metadata need one entry per request id")
        nested = self._closed or self._var.get() is not None
        handles, rows = [], []
        for i, rid in enumerate(rids):
            sampled = not nested and self.core.decide(rid, forces[i]) is None
            if sampled:
                rows.append(i)
            handles.append(RequestHandle(rid, sampled))
        if not rows:
            yield handles
            return
        many = len(rids) > 1
        meta = [{**sanitize_metadata(metas[i]), "row": i} if many else sanitize_metadata(metas[i]) for i in rows]
        cap = Capture([rids[i] for i in rows], self.core.new_ids(len(rows)), rows, meta, len(rids), time.time())
        for slot, row in enumerate(rows):
            handles[row]._ids = cap.sample_ids[slot : slot + 1]
        token = self._var.set(cap)
        ok = False
        try:
            yield handles
            ok = True
        finally:
            self._var.reset(token)
            self._finish(cap, ok)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` s until every queued sample has been published or dropped."""
        return self.exporter.flush(timeout)

    @property
    def instance(self) -> str:
        return self.core.instance

    @property
    def sampled(self) -> int:
        """Requests (batch rows for ``tap.batch``) sampled by this process."""
        return self.core.sampled

    @property
    def skipped(self) -> dict[str, int]:
        """Requests not sampled, by reason (rate, budget, ...)."""
        return self.core.skipped

    @property
    def hook_errors(self) -> int:
        """Requests whose capture failed inside a hook (each also counted as a drop)."""
        return self.core.hook_errors

    def stats(self) -> dict[str, Any]:
        """Counters of this process's tap (the same numbers ride in every sample header)."""
        return self.core.stats()

    def close(self, timeout: float = 5.0) -> bool:
        """Remove the hooks, flush within ``timeout`` and stop the exporter. Idempotent.

        Returns False when something was still queued at the deadline (dropped as ``closed``).
        """
        if self._closed:
            return True
        self._closed = True
        self.detach()
        return self.core.close(timeout)

    def detach(self) -> None:
        """Remove every hook; the model behaves exactly as before attach()."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        with self._layer_lock:
            for h in self._layer_handles:
                h.remove()
            self._layer_handles.clear()
            self._layer_refs = 0

    def serve_metrics(self, port: int, addr: str | None = None) -> None:
        """Serve this tap's registry on ``http://addr:port/metrics`` (for servers without /metrics;
        ``addr`` defaults to the ``metrics_host`` setting, loopback).

        A server with its own /metrics should mount ``tap.registry`` instead, e.g.
        ``generate_latest(tap.registry)`` or ``make_asgi_app(registry=tap.registry)``.
        """
        self.core.serve_metrics(port, addr or self.settings.metrics_host)

    # ------------------------------------------------------------------------- bookkeeping
    def _after_fork_in_child(self) -> None:
        # per-layer hooks held by the parent's in-flight forwards: none of those threads exist here
        self._layer_lock = threading.Lock()
        for h in self._layer_handles:
            h.remove()
        self._layer_handles, self._layer_refs = [], 0

    def _finish(self, cap: Capture, ok: bool) -> None:
        """Offer the request's captures to the exporter. Never raises; O(1) Python work."""
        try:
            self._release_layer_hooks(cap)  # a forward that raised never reached _model_post
        except Exception:
            cap.failed = True
        reason = ("hook_error" if cap.failed else "request_error" if not ok  # the request raised: partial
                  else "request_error" if cap.plan is not None else None)  # a forward never finished
        self.core.finish(cap.sample_ids, cap.request_ids, cap.metadata, cap.steps, events=cap.events,
                         nbytes=cap.nbytes, started=cap.started, drop_reason=reason)

    # ------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        """Only the model's own pre/post hooks stay installed. The per-layer hooks are registered
        while at least one sampled forward runs (:meth:`_hold_layer_hooks`): a module with hooks
        leaves PyTorch's fast call path, which cost ~0.6 ms per unsampled forward of a 30-block
        model when they stayed installed."""
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post))

    def _register_layer_hooks(self) -> list[Any]:
        p = self.parts
        out = []
        if 0 in self._slot:
            out.append(p.blocks[0].register_forward_pre_hook(self._embed_pre, with_kwargs=True))
        for i, blk in enumerate(p.blocks):
            if i + 1 in self._slot:
                out.append(blk.register_forward_hook(self._make_block_hook(self._slot[i + 1])))
        if p.unembed is not None and self.settings.positions not in ("mean", "last+mean"):
            out.append(p.unembed.register_forward_hook(self._unembed_post))
        return out

    def _hold_layer_hooks(self, cap: Capture) -> None:
        """Take a reference on the per-layer hooks for ``cap``'s forward (installs them on the
        first). Hooks of other threads' unsampled forwards see no capture and return at once."""
        if cap.hooked or not self._handles:  # detached: never re-install
            return
        with self._layer_lock:
            if self._layer_refs == 0:
                self._layer_handles = self._register_layer_hooks()
            self._layer_refs += 1
        cap.hooked = True

    def _release_layer_hooks(self, cap: Capture) -> None:
        if not cap.hooked:
            return
        cap.hooked = False
        with self._layer_lock:
            self._layer_refs = max(0, self._layer_refs - 1)
            if self._layer_refs == 0:
                for h in self._layer_handles:
                    h.remove()
                self._layer_handles = []

    def _hook_failed(self, cap: Capture) -> None:
        cap.plan = None
        if not cap.failed:
            cap.failed = True
            self.core.hook_failed()

    # Each hook's first line is the flag check: an unsampled request returns right there.
    def _model_pre(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cap = self._var.get()
        if cap is None or cap.failed:
            return
        try:
            # (a plan left by a forward that raised is simply replaced)
            cap.plan = self._plan_step(cap, args, kwargs)
            if cap.plan is not None:
                self._hold_layer_hooks(cap)
        except Exception:
            self._hook_failed(cap)

    def _model_post(self, _m: nn.Module, _a: Any, _o: Any) -> None:
        cap = self._var.get()
        if cap is None:
            return
        self._release_layer_hooks(cap)
        if cap.failed:
            return
        plan = cap.plan
        cap.plan = None
        cap.step += 1
        if plan is None:
            return
        try:
            st = seal(plan, cap.events, self.core.wire_dtype)
            if st is not None:
                cap.steps.append(st)
                cap.nbytes += int(st.hidden.numel()) * st.hidden.element_size()
                if st.windows is not None:
                    cap.nbytes += int(st.windows.numel()) * st.windows.element_size()
        except Exception:
            self._hook_failed(cap)

    def _embed_pre(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cap = self._var.get()
        if cap is None or cap.plan is None:
            return
        try:
            h = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
            self._take(cap.plan, 0, h)
        except Exception:
            self._hook_failed(cap)

    def _make_block_hook(self, slot: int) -> Any:
        var = self._var

        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            cap = var.get()
            if cap is None or cap.plan is None:
                return
            try:
                self._take(cap.plan, slot, out if isinstance(out, torch.Tensor) else out[0])
            except Exception:
                self._hook_failed(cap)

        return hook

    def _take(self, plan: StepPlan, slot: int, hidden: torch.Tensor) -> None:
        """Copy this layer's sampled vectors into the step buffer: one index_select per hook."""
        if plan.buf is None and (hidden.dim() != 3 or int(hidden.shape[1]) != plan.seq):
            raise ValueError(f"hidden state of shape {tuple(hidden.shape)}, expected [batch, {plan.seq}, d]")
        take(plan, len(self.layers), slot, hidden)

    def _unembed_post(self, _m: nn.Module, _a: Any, out: Any) -> None:
        cap = self._var.get()
        if cap is None or cap.plan is None:
            return
        plan = cap.plan
        try:
            if plan.mode != "gather":
                return
            logits = out if isinstance(out, torch.Tensor) else out[0]
            if logits.dim() != 3:
                return
            kept = int(logits.shape[1])
            valid = None
            if kept == plan.seq:
                flat = plan.on(logits.device)[0]
            else:  # logits_to_keep: only the last `kept` positions have logits
                assert plan.pos is not None and plan.rows is not None
                pos = plan.pos - (plan.seq - kept)
                if plan.fixed_positions is None or plan.valid is not None or plan.per_slot > kept:
                    valid = to_device(pos >= 0, logits.device)
                flat = to_device(plan.rows * kept + pos.clamp(min=0), logits.device)
            x = logits.detach().reshape(-1, logits.shape[-1]).index_select(0, flat)
            plan.topk = (*final_topk(x, self.settings.final_topk), valid)
        except Exception:
            self._hook_failed(cap)

    def _plan_step(self, cap: Capture, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepPlan | None:
        """Decide, once per forward, which rows and positions every hook of this step takes."""
        return plan_padded_step(cap, self.settings, self.core.new_ids, args, kwargs)


def attach(
    model: nn.Module,
    sample_rate: float | None = None,
    transport: str | Transport | None = None,
    layers: str | list[int] | None = None,
    positions: str | None = None,
    *,
    registry: CollectorRegistry | None = None,
    blocks: str | None = None,
    final_norm: str | None = None,
    unembed: str | None = None,
    **settings: Any,
) -> Tap:
    """Attach the tap to ``model`` and return it.

    Arguments override ``LAYERWATCH_TAP_*`` environment variables; see :class:`TapSettings`
    for every option (``max_samples_per_s``, ``queue_max_items``, ``model_name``, ...).
    ``blocks``/``final_norm``/``unembed`` are dotted module paths for architectures the adapter
    ladder does not know. ``transport`` may also be a :class:`Transport` instance (the caller
    keeps owning it: ``tap.close()`` does not close it).
    """
    transport_obj = transport if isinstance(transport, Transport) else None
    cfg = build_settings(
        TapSettings, "LAYERWATCH_TAP_", sample_rate=sample_rate,
        transport=transport_obj.url if transport_obj is not None else transport,
        layers=layers, positions=positions, **settings,
    )
    manual = blocks is not None or final_norm is not None or unembed is not None
    if manual and blocks is None:
        raise ConfigError("attach(): final_norm/unembed paths need blocks='path.to.layers' as well")
    parts = find_parts(model, blocks=blocks, final_norm=final_norm, unembed=unembed) if manual else None
    return Tap(model, cfg, parts=parts, registry=registry, transport=transport_obj)
