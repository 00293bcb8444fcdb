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
raise. An unsampled request costs a flag check per hook. A sampled one slices the sampled
rows/positions, casts them to float16 and copies them off the device inside the hook (on CUDA a
non-blocking copy into pinned memory plus an event the exporter thread waits on), so the queue
never keeps a full activation alive.
"""

from __future__ import annotations

import contextvars
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from monitor.adapters import ModelParts, block_input, block_output, find_parts, model_fingerprint
from monitor.config import TapSettings, build_settings
from monitor.metrics import TapMetrics
from monitor.tap.exporter import CapturedSample, Exporter
from monitor.tap.sampler import Sampler, hash_unit
from monitor.transport import Transport, open_transport
from monitor.wire import SCHEMA_VERSION, sanitize_metadata

__all__ = ["Tap", "attach", "RequestHandle", "hash_unit"]


@dataclass
class RequestHandle:
    """What ``tap.request()`` yields: the request id (generated if none) and the decision."""

    request_id: str
    sampled: bool
    sample_ids: tuple[str, ...] = ()


@dataclass
class _Capture:
    """Per-request capture state, held in a ContextVar while the request runs."""

    request_ids: list[str]
    sample_ids: list[str]
    rows: list[int]  # batch rows sampled (slot i -> rows[i])
    metadata: dict[str, Any]
    step: int = 0
    failed: bool = False
    implicit: bool = False
    # per step: gather plan computed once in the model pre-hook
    gather_rows: torch.Tensor | None = None
    gather_pos: torch.Tensor | None = None
    owners: list[int] = field(default_factory=list)
    mean_weights: torch.Tensor | None = None  # [S, T] for positions="mean"
    logits_pos: torch.Tensor | None = None
    seq_len: int = 0
    prompt_len: int = 0
    dev_index: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None
    # captured data: per watched-layer index, per step -> tensor [R', d]
    chunks: list[list[torch.Tensor]] = field(default_factory=list)
    step_owners: list[list[int]] = field(default_factory=list)
    final_ids: list[torch.Tensor] = field(default_factory=list)
    final_logprobs: list[torch.Tensor] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    positions_per_slot: list[list[int]] = field(default_factory=list)
    nbytes: int = 0
    started: float = 0.0


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
                from monitor.errors import ConfigError

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
        self.instance = uuid.uuid4().hex[:16]
        self._pid = os.getpid()
        self.sampled = 0
        self.skipped: dict[str, int] = {"rate": 0, "budget": 0}
        self.hook_errors = 0
        self._counters_cache: dict[str, Any] = {}
        options = {"stream": settings.stream, "maxlen": settings.stream_maxlen}
        self._transport_override = transport
        self.exporter = Exporter(
            (lambda: transport) if transport is not None else (lambda: open_transport(settings.transport, **options)),
            self.metrics, self.model_name,
            max_items=settings.queue_max_items, max_bytes=settings.queue_max_bytes,
            batch_size=settings.export_batch, max_payload_bytes=settings.max_payload_bytes,
            backoff_initial_s=settings.backoff_initial_s, backoff_max_s=settings.backoff_max_s,
            counters=self._tap_counters,
        )
        self._handles: list[Any] = []
        self._install_hooks()
        self._closed = False
        self._metrics_server: Any = None
        if settings.metrics_port:
            self.serve_metrics(settings.metrics_port)

    # ------------------------------------------------------------------------- public API
    @contextmanager
    def request(
        self, request_id: str | None = None, metadata: dict[str, Any] | None = None, force: bool = False
    ) -> Iterator[RequestHandle]:
        """Run one request under the tap. All batch rows of the call belong to this request."""
        rid = request_id or uuid.uuid4().hex
        if self._var.get() is not None or self._closed:
            yield RequestHandle(rid, False)
            return
        reason = self.sampler.decide(rid, force)
        if reason is not None:
            self.skipped[reason] += 1
            self._m_skipped[reason].inc()
            yield RequestHandle(rid, False)
            return
        cap = self._new_capture([rid], None, metadata)
        token = self._var.set(cap)
        try:
            yield RequestHandle(rid, True, tuple(cap.sample_ids))
        finally:
            self._var.reset(token)
            self._finish(cap)

    @contextmanager
    def batch(
        self,
        request_ids: Sequence[str | None],
        metadata: Sequence[dict[str, Any] | None] | dict[str, Any] | None = None,
        force: Sequence[bool] | bool = False,
    ) -> Iterator[list[RequestHandle]]:
        """Batched serving: batch row ``i`` belongs to ``request_ids[i]`` (None: generate one)."""
        rids = [r or uuid.uuid4().hex for r in request_ids]
        forces = list(force) if isinstance(force, (list, tuple)) else [bool(force)] * len(rids)
        metas = list(metadata) if isinstance(metadata, (list, tuple)) else [metadata] * len(rids)
        handles, rows = [], []
        nested = self._var.get() is not None or self._closed
        for i, rid in enumerate(rids):
            reason = "nested" if nested else self.sampler.decide(rid, forces[i])
            if reason is None:
                rows.append(i)
            elif reason != "nested":
                self.skipped[reason] += 1
                self._m_skipped[reason].inc()
            handles.append(RequestHandle(rid, reason is None))
        if not rows:
            yield handles
            return
        cap = self._new_capture([rids[i] for i in rows], rows, None, [metas[i] for i in rows])
        for slot, row in enumerate(rows):
            handles[row].sample_ids = (cap.sample_ids[slot],)
        token = self._var.set(cap)
        try:
            yield handles
        finally:
            self._var.reset(token)
            self._finish(cap)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` s until every queued sample has been published or dropped."""
        return self.exporter.flush(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters of this process's tap (also sent in every sample header)."""
        return {
            "model": self.model_name,
            "sampled": self.sampled,
            "skipped": dict(self.skipped),
            "exported": self.exporter.exported,
            "drops": dict(self.exporter.drops),
            "queue_depth": self.exporter.queue_depth,
            "queue_bytes": self.exporter.queued_bytes,
            "layers": list(self.layers),
        }

    def close(self, timeout: float = 5.0) -> bool:
        """Remove the hooks, flush within ``timeout`` and stop the exporter. Idempotent."""
        if self._closed:
            return True
        self._closed = True
        self.detach()
        ok = self.exporter.close(timeout)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        return ok

    def detach(self) -> None:
        """Remove every hook; the model behaves exactly as before attach()."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def serve_metrics(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve this tap's registry on ``http://addr:port/metrics`` (for servers without /metrics)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._metrics_server = server

    # ------------------------------------------------------------------------- internals
    def _tap_counters(self) -> dict[str, Any]:
        if self._pid != os.getpid():  # forked child: a new tap instance in the fleet
            self._pid = os.getpid()
            self.instance = uuid.uuid4().hex[:16]
        return {
            "instance": self.instance, "pid": self._pid, "sampled": self.sampled,
            "exported": self.exporter.exported, "drops": dict(self.exporter.drops),
        }

    def _new_capture(
        self, rids: list[str], rows: list[int] | None, metadata: dict[str, Any] | None,
        metas: list[dict[str, Any] | None] | None = None,
    ) -> _Capture:
        n = len(rids)
        self.sampled += n
        self._m_sampled.inc(n)
        meta = sanitize_metadata(metadata)
        cap = _Capture(
            request_ids=rids, sample_ids=[uuid.uuid4().hex for _ in rids],
            rows=rows if rows is not None else [], metadata=meta, started=time.time(),
        )
        cap.chunks = [[] for _ in self.layers]
        if metas is not None:
            cap.metadata = {"_per_row": [sanitize_metadata(m) for m in metas]}
        return cap

    def _install_hooks(self) -> None:
        p = self.parts
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post))
        if 0 in self._slot:
            self._handles.append(p.blocks[0].register_forward_pre_hook(self._embed_pre, with_kwargs=True))
        for i, blk in enumerate(p.blocks):
            if i + 1 in self._slot:
                self._handles.append(blk.register_forward_hook(self._make_block_hook(self._slot[i + 1])))
        if p.unembed is not None and self.settings.positions in ("last", "generated"):
            self._handles.append(p.unembed.register_forward_hook(self._unembed_post))

    def _hook_failed(self, cap: _Capture) -> None:
        if not cap.failed:
            cap.failed = True
            self.hook_errors += 1

    # Each hook's first line is the flag check: an unsampled request returns right there.
    def _model_pre(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cap = self._var.get()
        if cap is None:
            return
        try:
            self._plan_step(cap, args, kwargs)
        except Exception:
            self._hook_failed(cap)

    def _model_post(self, _m: nn.Module, _a: Any, _o: Any) -> None:
        cap = self._var.get()
        if cap is None:
            return
        cap.step += 1
        cap.gather_rows = None
        cap.mean_weights = None

    def _embed_pre(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cap = self._var.get()
        if cap is None or cap.failed or (cap.gather_rows is None and cap.mean_weights is None):
            return
        try:
            self._take(cap, 0, block_input(args, kwargs))
        except Exception:
            self._hook_failed(cap)

    def _make_block_hook(self, slot: int) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            cap = self._var.get()
            if cap is None or cap.failed or (cap.gather_rows is None and cap.mean_weights is None):
                return
            try:
                self._take(cap, slot, block_output(out))
            except Exception:
                self._hook_failed(cap)

        return hook

    def _unembed_post(self, _m: nn.Module, _a: Any, out: Any) -> None:
        cap = self._var.get()
        if cap is None or cap.failed or cap.gather_rows is None or cap.logits_pos is None:
            return
        try:
            logits = out if isinstance(out, torch.Tensor) else out[0]
            with torch.no_grad():
                rows, pos = self._device_index(cap, logits.device)
                if logits.shape[1] != cap.seq_len:  # logits_to_keep: only the last position(s)
                    shift = cap.seq_len - logits.shape[1]
                    if int(cap.logits_pos.min()) < shift:
                        return
                    pos = pos - shift
                lp = logits[rows, pos].float().log_softmax(-1)
                vals, ids = lp.topk(self.settings.final_topk, dim=-1)
                cap.final_ids.append(self._off_device(cap, ids))
                cap.final_logprobs.append(self._off_device(cap, vals))
        except Exception:
            self._hook_failed(cap)

    def _plan_step(self, cap: _Capture, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Decide, once per forward, which rows and positions every hook of this step takes."""
        mode = self.settings.positions
        cap.gather_rows = None
        cap.mean_weights = None
        cap.logits_pos = None
        if cap.step > 0 and mode != "generated":
            return
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            raise ValueError("cannot find input_ids or inputs_embeds")
        bsz, seq = int(ids.shape[0]), int(ids.shape[1])
        cap.seq_len = seq
        cap.dev_index = None
        if cap.step == 0:
            cap.prompt_len = seq
        if not cap.rows:  # tap.request(): every row of the call belongs to the request
            cap.rows = list(range(bsz))
            cap.sample_ids = cap.sample_ids + [uuid.uuid4().hex for _ in range(bsz - len(cap.sample_ids))]
            cap.request_ids = cap.request_ids * bsz if len(cap.request_ids) == 1 else cap.request_ids
        if not cap.positions_per_slot:
            cap.positions_per_slot = [[] for _ in cap.rows]
        if max(cap.rows) >= bsz:
            raise ValueError(f"batch rows {cap.rows} but the batch has {bsz} rows")
        mask = kwargs.get("attention_mask")
        if cap.step == 0 and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == seq:
            valid = [torch.nonzero(mask[r] > 0).flatten().tolist() or [seq - 1] for r in cap.rows]
        else:
            valid = [list(range(seq)) for _ in cap.rows]
        rows, pos, owners = [], [], []
        if mode == "mean":
            w = torch.zeros(len(cap.rows), seq)
            for s, v in enumerate(valid):
                w[s, v] = 1.0 / len(v)
                cap.positions_per_slot[s] = [-1]
            cap.mean_weights = w
            cap.owners = list(range(len(cap.rows)))
            cap.step_owners.append(cap.owners)
            return
        for s, v in enumerate(valid):
            if mode == "all":
                take = v[-self.settings.max_positions:]
            elif mode == "generated":
                if len(cap.positions_per_slot[s]) >= self.settings.max_positions:
                    continue
                take = [v[-1]]
            else:  # last
                take = [v[-1]]
            for t in take:
                rows.append(cap.rows[s])
                pos.append(t)
                owners.append(s)
                # absolute position: prompt positions at step 0, then one per generated token
                cap.positions_per_slot[s].append(t if cap.step == 0 else cap.prompt_len + cap.step - 1)
        if not rows:
            return
        cap.gather_rows = torch.tensor(rows)
        cap.gather_pos = torch.tensor(pos)
        cap.logits_pos = cap.gather_pos
        cap.owners = owners
        cap.step_owners.append(owners)

    def _off_device(self, cap: _Capture, t: torch.Tensor) -> torch.Tensor:
        """Small tensor -> host memory. CUDA: non-blocking copy into pinned memory + an event."""
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            cap.events.append(ev)
            return host
        return t if t.device.type == "cpu" else t.to("cpu")

    @staticmethod
    def _device_index(cap: _Capture, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's gather indices on ``dev``, copied there once per step (not once per layer)."""
        if cap.dev_index is None or cap.dev_index[0] != dev:
            assert cap.gather_rows is not None and cap.gather_pos is not None
            if dev.type == "cpu":
                cap.dev_index = (dev, cap.gather_rows, cap.gather_pos)
            else:
                both = torch.stack([cap.gather_rows, cap.gather_pos]).pin_memory().to(dev, non_blocking=True)
                cap.dev_index = (dev, both[0], both[1])
        return cap.dev_index[1], cap.dev_index[2]

    def _take(self, cap: _Capture, slot: int, hidden: torch.Tensor) -> None:
        with torch.no_grad():
            if cap.mean_weights is not None:
                w = cap.mean_weights.to(hidden.device, torch.float32)
                rows = torch.tensor(cap.rows, device=hidden.device)
                small = torch.einsum("st,std->sd", w, hidden[rows].float()).to(torch.float16)
            else:
                rows_i, pos_i = self._device_index(cap, hidden.device)
                small = hidden[rows_i, pos_i].to(torch.float16)
            host = self._off_device(cap, small)
            cap.chunks[slot].append(host)
            cap.nbytes += host.numel() * 2

    def _finish(self, cap: _Capture) -> None:
        """Hand the captures to the exporter, one CapturedSample per sampled row. Never raises."""
        try:
            if cap.failed:
                self.exporter.drop("hook_error", len(cap.sample_ids) or 1)
                return
            if not cap.step_owners or not cap.chunks or not cap.chunks[-1]:
                return  # the model never ran inside the request
            per_row_meta = cap.metadata.get("_per_row")
            n_slots = len(cap.rows)
            for s in range(n_slots):
                chunks: list[list[torch.Tensor]] = []
                fids: list[torch.Tensor] = []
                flps: list[torch.Tensor] = []
                for slot_chunks in cap.chunks:
                    steps = []
                    for step, owners in enumerate(cap.step_owners):
                        if step >= len(slot_chunks):
                            break
                        idx = [i for i, o in enumerate(owners) if o == s]
                        if idx:
                            t = slot_chunks[step]
                            steps.append(t[idx[0]: idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else t[idx])
                    chunks.append(steps)
                for step, owners in enumerate(cap.step_owners):
                    if step < len(cap.final_ids):
                        idx = [i for i, o in enumerate(owners) if o == s]
                        if idx:
                            fids.append(cap.final_ids[step][idx])
                            flps.append(cap.final_logprobs[step][idx])
                if not chunks or not chunks[0]:
                    continue
                meta = per_row_meta[s] if per_row_meta is not None else cap.metadata
                header = {
                    "schema": SCHEMA_VERSION,
                    "sample_id": cap.sample_ids[s],
                    "request_id": cap.request_ids[s],
                    "model": self.model_name,
                    "model_fingerprint": self.fingerprint,
                    "layers": list(self.layers),
                    "n_states": self.parts.n_states,
                    "positions": self.settings.positions,
                    "position_index": cap.positions_per_slot[s] if cap.positions_per_slot else [],
                    "created_at": cap.started,
                    "metadata": {**meta, "row": cap.rows[s]} if len(cap.rows) > 1 else meta,
                }
                nbytes = sum(int(t.numel()) * 2 for steps in chunks for t in steps)
                item = CapturedSample(header, chunks, fids, flps, list(cap.events), nbytes, cap.started)
                self.exporter.offer(item)
        except Exception:
            self.exporter.drop("hook_error")


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
    ladder does not know. ``transport`` may also be a :class:`Transport` instance.
    """
    transport_obj = transport if isinstance(transport, Transport) else None
    cfg = build_settings(
        TapSettings, "LAYERWATCH_TAP_", sample_rate=sample_rate,
        transport=transport_obj.url if transport_obj is not None else transport,
        layers=layers, positions=positions, **settings,
    )
    parts = find_parts(model, blocks=blocks, final_norm=final_norm, unembed=unembed) if blocks else None
    return Tap(model, cfg, parts=parts, registry=registry, transport=transport_obj)
