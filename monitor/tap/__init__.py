"""The tap: forward hooks that sample hidden states from a served model at near-zero cost.

This is the only part of layerwatch inside the inference server. It imports only the standard
library, torch, numpy, prometheus_client and the package's config, errors, metrics, wire format
and transports (redis only for a redis URL); never onnxruntime or anything of the sidecar.

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
``positions="last+mean"`` ships two vectors per layer: index 0 the mean over the prompt's real
tokens, index 1 the last prompt token (so ``hidden[:, -1]`` is the last token, as for "last").
The lens bank reads the last token; the concept probes also read the mean (the prompt's
context), which the drift detector uses (``<probe>@mean`` readings).
"""

from __future__ import annotations

import contextvars
import itertools
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from monitor.adapters import ModelParts, find_parts, model_fingerprint
from monitor.config import TapSettings, build_settings
from monitor.errors import ConfigError
from monitor.metrics import TapMetrics
from monitor.tap.exporter import CapturedRequest, CapturedStep, Counts, Exporter
from monitor.tap.sampler import Sampler, hash_unit
from monitor.transport import Transport, open_transport
from monitor.wire import SCHEMA_VERSION, sanitize_metadata

__all__ = ["Tap", "attach", "RequestHandle", "hash_unit"]


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


@dataclass(slots=True)
class _Plan:
    """Which rows/positions every hook of one forward takes (built once, in the model pre-hook)."""

    mode: str  # "gather" or "mean"
    device: torch.device
    seq: int
    per_slot: int
    n_out: int  # P: rows of the step buffer
    rows: torch.Tensor  # [P] batch row of each captured vector (gather) / [S] sampled rows (mean)
    pos: torch.Tensor | None  # [P] padded position of each captured vector (gather) / [S] last token (last+mean)
    weights: torch.Tensor | None  # [S, 1, T] float32 (mean, last+mean)
    positions: torch.Tensor | None  # [P] position in the row's own tokens (None: fixed_positions)
    fixed_positions: list[int] | None
    valid: torch.Tensor | None  # [P] bool, None = all valid
    all_rows: bool  # rows == every batch row in order (mean: skip the gather)
    # per device: (flat index into hidden.view(B*T, d) for gather | sampled rows for mean, weights,
    # last+mean: flat index of each sampled row's last token)
    index: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict)
    views: tuple[torch.Tensor, ...] = ()
    buf: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None


@dataclass(slots=True)
class _Capture:
    """Per-request capture state, held in a ContextVar while the request runs."""

    request_ids: list[str]
    sample_ids: list[str]
    rows: list[int] | None  # sampled batch rows (None: every row of the call, known at plan time)
    metadata: list[dict[str, Any]]
    batch_size: int | None  # tap.batch(): the batch size the caller announced
    started: float
    step: int = 0
    failed: bool = False
    plan: _Plan | None = None
    rows_dev: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    lengths: torch.Tensor | list[int] | None = None  # tokens per sampled row at step 0
    steps: list[CapturedStep] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    nbytes: int = 0
    hooked: bool = False  # holds a reference on the per-layer hooks (see Tap._hold_layer_hooks)


_HOST = torch.device("cpu")


class Tap:
    """Hooks on one model, a sampler and an exporter. Create with :func:`attach`."""

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
        n = self.parts.n_blocks
        if settings.layers == "all":
            layers = list(range(n + 1))
        else:
            bad = [i for i in settings.layers if i > n]
            if bad:
                raise ConfigError(f"layers: indices {bad} out of range 0..{n} for a {n}-block model")
            layers = sorted(set(settings.layers) | {n})  # state N is always captured
        self.layers: tuple[int, ...] = tuple(layers)
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        cfg = getattr(model, "config", None)
        self.model_name = settings.model_name or str(getattr(cfg, "name_or_path", "") or type(model).__name__)
        self.fingerprint = model_fingerprint(model, self.parts)
        self.metrics = TapMetrics(registry)
        self.registry = self.metrics.registry
        self._m_sampled = self.metrics.requests_sampled.labels(self.model_name)
        self._m_skipped = {r: self.metrics.requests_skipped.labels(self.model_name, r) for r in ("rate", "budget")}
        self.sampler = Sampler(settings.sample_rate, settings.max_samples_per_s)
        self._var: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
            f"layerwatch_tap_{id(self)}", default=None
        )
        self._counts = Counts(("sampled", "skipped_rate", "skipped_budget", "hook_errors"))
        self._new_instance()
        self._base_header = {
            "schema": SCHEMA_VERSION, "model": self.model_name, "model_fingerprint": self.fingerprint,
            "layers": list(self.layers), "n_states": self.parts.n_states, "positions": settings.positions,
        }
        options: dict[str, Any] = {"stream": settings.stream, "maxlen": settings.stream_maxlen}
        if settings.transport.split("://", 1)[0] in ("redis", "rediss", "unix"):
            options.update(socket_timeout=settings.transport_timeout_s,
                           connect_timeout=settings.transport_timeout_s)
        self.exporter = Exporter(
            (lambda: transport) if transport is not None else (lambda: open_transport(settings.transport, **options)),
            self.metrics, self.model_name,
            max_items=settings.queue_max_items, max_bytes=settings.queue_max_bytes,
            batch_size=settings.export_batch, max_payload_bytes=settings.max_payload_bytes,
            backoff_initial_s=settings.backoff_initial_s, backoff_max_s=settings.backoff_max_s,
            counters=self._tap_counters, owns_transport=transport is None,
            interval_s=settings.export_interval_s,
        )
        ref = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())
        self._handles: list[Any] = []
        self._layer_handles: list[Any] = []
        self._layer_refs = 0
        self._layer_lock = threading.Lock()
        self._closed = False
        self._install_hooks()
        self._metrics_server: Any = None
        if settings.metrics_port:
            self.serve_metrics(settings.metrics_port)

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
        if self._closed or self._var.get() is not None:
            yield RequestHandle(rid, False)
            return
        reason = self.sampler.decide(rid, force)
        if reason is not None:
            self._skip(reason)
            yield RequestHandle(rid, False)
            return
        cap = self._new_capture([rid], None, [sanitize_metadata(metadata)], None)
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
            reason = "nested" if nested else self.sampler.decide(rid, forces[i])
            if reason is None:
                rows.append(i)
            elif reason != "nested":
                self._skip(reason)
            handles.append(RequestHandle(rid, reason is None))
        if not rows:
            yield handles
            return
        many = len(rids) > 1
        meta = [{**sanitize_metadata(metas[i]), "row": i} if many else sanitize_metadata(metas[i]) for i in rows]
        cap = self._new_capture([rids[i] for i in rows], rows, meta, len(rids))
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
    def sampled(self) -> int:
        """Requests (batch rows for ``tap.batch``) sampled by this process."""
        return self._counts.get("sampled")

    @property
    def skipped(self) -> dict[str, int]:
        """Requests not sampled, by reason (rate, budget)."""
        return {"rate": self._counts.get("skipped_rate"), "budget": self._counts.get("skipped_budget")}

    @property
    def hook_errors(self) -> int:
        """Requests whose capture failed inside a hook (each also counted as a drop)."""
        return self._counts.get("hook_errors")

    def stats(self) -> dict[str, Any]:
        """Counters of this process's tap (the same numbers ride in every sample header)."""
        return {
            "model": self.model_name,
            "instance": self.instance,
            "sampled": self.sampled,
            "skipped": self.skipped,
            "hook_errors": self.hook_errors,
            "exported": self.exporter.exported,
            "drops": self.exporter.drops,
            "queue_depth": self.exporter.queue_depth,
            "queue_bytes": self.exporter.queued_bytes,
            "layers": list(self.layers),
        }

    def close(self, timeout: float = 5.0) -> bool:
        """Remove the hooks, flush within ``timeout`` and stop the exporter. Idempotent.

        Returns False when something was still queued at the deadline (dropped as ``closed``).
        """
        if self._closed:
            return True
        self._closed = True
        self.detach()
        ok = self.exporter.close(timeout)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        return ok

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

    def serve_metrics(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve this tap's registry on ``http://addr:port/metrics`` (for servers without /metrics).

        A server with its own /metrics should mount ``tap.registry`` instead, e.g.
        ``generate_latest(tap.registry)`` or ``make_asgi_app(registry=tap.registry)``.
        """
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._metrics_server = server

    # ------------------------------------------------------------------------- bookkeeping
    def _new_instance(self) -> None:
        self.instance = uuid.uuid4().hex[:16]
        self._pid = os.getpid()
        self._seq = itertools.count()

    def _after_fork_in_child(self) -> None:
        # A forked worker is a new tap instance: fresh id, counters and locks.
        self._new_instance()
        self._counts.reset()
        self.sampler.after_fork()
        # per-layer hooks held by the parent's in-flight forwards: none of those threads exist here
        self._layer_lock = threading.Lock()
        for h in self._layer_handles:
            h.remove()
        self._layer_handles, self._layer_refs = [], 0

    def _skip(self, reason: str) -> None:
        self._counts.add("skipped_" + reason)
        self._m_skipped[reason].inc()

    def _tap_counters(self) -> dict[str, Any]:
        return {
            "instance": self.instance, "pid": self._pid, "sampled": self.sampled,
            "skipped": self.skipped, "exported": self.exporter.exported, "drops": self.exporter.drops,
        }

    def _sample_id(self) -> str:
        # Unique across the fleet: a random per-process instance id plus a sequence number.
        return f"{self.instance}-{next(self._seq):x}"

    def _new_capture(
        self, rids: list[str], rows: list[int] | None, metas: list[dict[str, Any]], batch_size: int | None
    ) -> _Capture:
        n = len(rids)
        if self._pid != os.getpid():  # a fork that bypassed os.register_at_fork: ids must not collide
            self._after_fork_in_child()
        self._counts.add("sampled", n)
        self._m_sampled.inc(n)
        return _Capture(rids, [self._sample_id() for _ in rids], rows, metas, batch_size, time.time())

    def _finish(self, cap: _Capture, ok: bool) -> None:
        """Offer the request's captures to the exporter. Never raises; O(1) Python work."""
        try:
            self._release_layer_hooks(cap)  # a forward that raised never reached _model_post
            n = len(cap.sample_ids)
            if cap.failed:
                self.exporter.drop("hook_error", n)
            elif not ok:
                self.exporter.drop("request_error", n)  # the request raised: partial capture
            elif cap.plan is not None:  # a forward started and never finished
                self.exporter.drop("request_error", n)
            elif cap.steps:
                self.exporter.offer(CapturedRequest(
                    self._base_header, cap.sample_ids, cap.request_ids, cap.metadata, cap.steps,
                    cap.events, cap.nbytes, cap.started))
            # else: the model never ran inside the request; nothing was captured.
        except Exception:
            self.exporter.drop("hook_error", len(cap.sample_ids) or 1)

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

    def _hold_layer_hooks(self, cap: _Capture) -> None:
        """Take a reference on the per-layer hooks for ``cap``'s forward (installs them on the
        first). Hooks of other threads' unsampled forwards see no capture and return at once."""
        if cap.hooked or not self._handles:  # detached: never re-install
            return
        with self._layer_lock:
            if self._layer_refs == 0:
                self._layer_handles = self._register_layer_hooks()
            self._layer_refs += 1
        cap.hooked = True

    def _release_layer_hooks(self, cap: _Capture) -> None:
        if not cap.hooked:
            return
        cap.hooked = False
        with self._layer_lock:
            self._layer_refs = max(0, self._layer_refs - 1)
            if self._layer_refs == 0:
                for h in self._layer_handles:
                    h.remove()
                self._layer_handles = []

    def _hook_failed(self, cap: _Capture) -> None:
        cap.plan = None
        if not cap.failed:
            cap.failed = True
            self._counts.add("hook_errors")

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
            self._seal(cap, plan)
        except Exception:
            self._hook_failed(cap)

    def _embed_pre(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cap = self._var.get()
        if cap is None or cap.plan is None:
            return
        try:
            h = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
            self._take(cap, cap.plan, 0, h)
        except Exception:
            self._hook_failed(cap)

    def _make_block_hook(self, slot: int) -> Any:
        var = self._var

        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            cap = var.get()
            if cap is None or cap.plan is None:
                return
            try:
                self._take(cap, cap.plan, slot, out if isinstance(out, torch.Tensor) else out[0])
            except Exception:
                self._hook_failed(cap)

        return hook

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
                flat = self._index_on(plan, logits.device)[0]
            else:  # logits_to_keep: only the last `kept` positions have logits
                assert plan.pos is not None
                shift = plan.seq - kept
                pos = plan.pos - shift
                if plan.fixed_positions is None or plan.valid is not None or plan.per_slot > kept:
                    valid = _to_device(pos >= 0, logits.device)
                flat = _to_device(plan.rows * kept + pos.clamp(min=0), logits.device)
            x = logits.detach().reshape(-1, logits.shape[-1]).index_select(0, flat)
            vals, ids = x.topk(min(self.settings.final_topk, int(x.shape[-1])), dim=-1)
            # log-probabilities of the top k without materialising a full log_softmax
            plan.topk = (ids, vals.float() - x.float().logsumexp(-1, keepdim=True), valid)
        except Exception:
            self._hook_failed(cap)

    # ------------------------------------------------------------------------- capture
    def _plan_step(self, cap: _Capture, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Plan | None:
        """Decide, once per forward, which rows and positions every hook of this step takes.

        Everything is built with torch ops on the inputs' device: no ``.tolist()``/``int()`` of a
        device tensor, so there is no host synchronisation on CUDA.
        """
        mode = self.settings.positions
        step = cap.step
        if step > 0 and (mode != "generated" or step >= self.settings.max_positions):
            return None
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
            raise ValueError("cannot find input_ids or inputs_embeds of shape [batch, seq, ...]")
        bsz, seq = int(ids.shape[0]), int(ids.shape[1])
        dev = ids.device
        if cap.rows is None:  # tap.request(): every row of the call belongs to the request
            cap.rows = list(range(bsz))
            while len(cap.sample_ids) < bsz:
                cap.sample_ids.append(self._sample_id())
            if bsz > 1:
                base_meta = cap.metadata[0]
                cap.request_ids = cap.request_ids * bsz
                cap.metadata = [{**base_meta, "row": r} for r in range(bsz)]
        elif cap.batch_size is not None and bsz != cap.batch_size:
            raise ValueError(f"tap.batch() got {cap.batch_size} request ids but the model ran {bsz} rows")
        n_slots = len(cap.rows)
        all_rows = n_slots == bsz
        rows = cap.rows_dev.get(dev)
        if rows is None:
            rows = torch.arange(bsz, device=dev) if all_rows else _to_device(torch.tensor(cap.rows), dev)
            cap.rows_dev[dev] = rows
        mask = kwargs.get("attention_mask")
        if step > 0 or not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == seq):
            mask = None
        if mask is not None:
            m = (mask if all_rows else mask.index_select(0, rows.to(mask.device))).to(dev) != 0
        if mode in ("mean", "last+mean"):
            if mask is None:
                weights = torch.full((n_slots, 1, seq), 1.0 / seq, device=dev)
            else:
                w = m.float()
                weights = (w / w.sum(-1, keepdim=True).clamp(min=1.0)).unsqueeze(1)
            last = None
            if mode == "last+mean":  # vector 0: the mean, vector 1: the last real token
                last = torch.full((n_slots,), seq - 1, device=dev) if mask is None else _last_valid(m)
            k = 1 if last is None else 2
            return _Plan("mean", dev, seq, k, n_slots * k, rows, last, weights, None, [], None, all_rows)
        if mode == "all":
            k = min(self.settings.max_positions, seq)
            ar = torch.arange(k, device=dev)
            rows_k = rows.unsqueeze(1).expand(n_slots, k).reshape(-1)  # (repeat_interleave may sync)
            if mask is None:
                pos = torch.arange(seq - k, seq, device=dev).repeat(n_slots)
                return _Plan("gather", dev, seq, k, n_slots * k, rows_k, pos, None, None,
                             list(range(seq - k, seq)) * n_slots, None, all_rows)
            last = _last_valid(m)
            idx = last.unsqueeze(1) - (k - 1) + ar  # [S, k]: a window ending at each row's last token
            idxc = idx.clamp(min=0)
            valid = (idx >= 0) & m.gather(1, idxc)
            real = m.long().cumsum(-1).gather(1, idxc) - 1
            return _Plan("gather", dev, seq, k, n_slots * k, rows_k, idxc.reshape(-1), None,
                         real.reshape(-1), None, valid.reshape(-1), all_rows)
        # "last", or "generated" (step 0: the last prompt token; then each token fed back)
        if step == 0:
            if mask is None:
                cap.lengths = [seq] * n_slots
                pos = torch.full((n_slots,), seq - 1, device=dev)
                return _Plan("gather", dev, seq, 1, n_slots, rows, pos, None, None, [seq - 1] * n_slots, None,
                             all_rows)
            row_len = m.sum(-1)
            cap.lengths = row_len
            return _Plan("gather", dev, seq, 1, n_slots, rows, _last_valid(m), None, (row_len - 1).clamp(min=0),
                         None, None, all_rows)
        pos = torch.full((n_slots,), seq - 1, device=dev)
        lengths = cap.lengths
        if isinstance(lengths, torch.Tensor):
            return _Plan("gather", dev, seq, 1, n_slots, rows, pos, None, lengths + (step - 1), None, None,
                         all_rows)
        fixed = [n + step - 1 for n in lengths or [seq] * n_slots]
        return _Plan("gather", dev, seq, 1, n_slots, rows, pos, None, None, fixed, None, all_rows)

    @staticmethod
    def _index_on(
        plan: _Plan, dev: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The plan's index tensors on ``dev`` (a model split over devices), built once per step."""
        got = plan.index.get(dev)
        if got is None:
            if plan.mode == "gather":
                assert plan.pos is not None
                flat = plan.rows * plan.seq + plan.pos
                got = (_to_device(flat, dev), None, None)
            else:
                assert plan.weights is not None
                last = None if plan.pos is None else _to_device(plan.rows * plan.seq + plan.pos, dev)
                got = (_to_device(plan.rows, dev), _to_device(plan.weights, dev), last)
            plan.index[dev] = got
        return got

    def _take(self, cap: _Capture, plan: _Plan, slot: int, hidden: torch.Tensor) -> None:
        """Copy this layer's sampled vectors into the step buffer: one index_select per hook."""
        h = hidden.detach() if hidden.requires_grad else hidden
        buf = plan.buf
        if buf is None:  # first hook of the step: allocate on the device the model runs on
            if h.dim() != 3 or int(h.shape[1]) != plan.seq:
                raise ValueError(f"hidden state of shape {tuple(h.shape)}, expected [batch, {plan.seq}, d]")
            dtype = h.dtype if plan.mode == "gather" else torch.float32
            buf = plan.buf = torch.empty((len(self.layers), plan.n_out, int(h.shape[-1])), dtype=dtype,
                                         device=h.device)
            plan.views = buf.unbind(0)
        index, weights, last = plan.index.get(h.device) or self._index_on(plan, h.device)
        if weights is None:
            flat = h.reshape(-1, h.shape[-1])
            if h.dtype == buf.dtype and h.device == buf.device:
                torch.index_select(flat, 0, index, out=plan.views[slot])
            else:
                plan.views[slot].copy_(flat.index_select(0, index))
            return
        sel = h if plan.all_rows else h.index_select(0, index)
        mean = torch.bmm(weights, sel.float())  # [S, 1, d]
        if last is None:
            plan.views[slot].copy_(mean.reshape(plan.n_out, -1))
            return
        # last+mean: each vector by the very op its single mode uses, so [mean, last] equal the
        # "mean" and "last" payloads bit for bit (one bmm over [mean; one-hot] weights did not:
        # the BLAS may pick another kernel, another summation order, for 2 rows than for 1)
        pair = plan.views[slot].view(-1, 2, plan.views[slot].shape[-1])
        pair[:, 0].copy_(mean[:, 0])
        pair[:, 1].copy_(h.reshape(-1, h.shape[-1]).index_select(0, last))

    def _seal(self, cap: _Capture, plan: _Plan) -> None:
        """End of a forward: one cast to float16, then the step off the device (CUDA: async)."""
        if plan.buf is None:
            return
        events: dict[torch.device, Any] = {}
        topk = plan.topk
        hidden = plan.buf if plan.buf.dtype == torch.float16 else plan.buf.to(torch.float16)
        st = CapturedStep(
            hidden=_to_host(hidden, events), per_slot=plan.per_slot,
            positions=None if plan.positions is None else _to_host(plan.positions, events),
            fixed_positions=plan.fixed_positions,
            valid=None if plan.valid is None else _to_host(plan.valid, events),
            topk_ids=None if topk is None else _to_host(topk[0], events),
            topk_logprobs=None if topk is None else _to_host(topk[1], events),
            topk_valid=None if topk is None or topk[2] is None else _to_host(topk[2], events),
        )
        for dev in events:  # one event per device, recorded after every copy was enqueued
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            cap.events.append(ev)
        cap.steps.append(st)
        cap.nbytes += hidden.numel() * 2


def _last_valid(m: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-padding position ([S, T] bool -> [S]; 0 for an empty row)."""
    ar = torch.arange(m.shape[1], device=m.device)
    return torch.where(m, ar, 0).amax(-1)


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Move a small tensor without a host synchronisation (pinned + non-blocking from the CPU)."""
    if t.device == dev:
        return t
    if t.device.type == "cpu" and dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev, non_blocking=True)


def _to_host(t: torch.Tensor, events: dict[torch.device, Any]) -> torch.Tensor:
    """Small tensor -> host memory. CUDA: a non-blocking copy into pinned memory (an event per
    device is recorded by the caller after all copies); the serving thread never waits."""
    if t.device.type == "cpu":
        return t
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        events.setdefault(t.device, None)
        return host
    return t.to(_HOST)  # other accelerators: a plain copy


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
