"""The tap's exporter: a bounded queue drained by a daemon thread that encodes and publishes.

Threading contract: :meth:`Exporter.offer` is called synchronously on the serving thread, so it
must not block or raise: it checks shutdown and the pid (fork), checks the item and byte bounds,
appends to a ``deque`` and wakes the worker. A full queue drops the item and counts the reason;
nothing is logged per drop. Everything else (waiting for device copies, assembling the
``[L, P, d]`` array, JSON encoding, transport I/O, reconnection with backoff) runs on the
worker thread.

Fork safety: ``os.register_at_fork`` (through a weak reference) gives a forked child (e.g. a
gunicorn worker) a fresh queue, lock, worker thread and transport, so the child keeps sampling.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.errors import LayerwatchError, TransportError, WireError
from monitor.metrics import TapMetrics
from monitor.transport import Transport
from monitor.wire import encode


@dataclass
class CapturedSample:
    """One sampled request's captures, as handed from the serving thread to the exporter.

    ``chunks[i]`` holds, per step, the captured vectors of watched layer ``i`` ([P_step, d]
    tensors, already float16 and off the device, or pinned copies with ``events`` to wait on).
    """

    header: dict[str, Any]
    chunks: list[list[Any]]
    final_ids: list[Any] = field(default_factory=list)
    final_logprobs: list[Any] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    nbytes: int = 0
    captured_at: float = 0.0

    def assemble(self) -> np.ndarray:
        """Wait for device copies, then build the ``[L, P, d]`` float16 array."""
        for ev in self.events:
            ev.synchronize()  # waits on the exporter thread, never on the serving thread
        import torch

        layers = [torch.cat(steps, dim=0) if len(steps) > 1 else steps[0] for steps in self.chunks]
        return torch.stack(layers).numpy()

    def final_topk(self) -> dict[str, list[list[float]]] | None:
        if not self.final_ids:
            return None
        import torch

        ids = torch.cat(self.final_ids, dim=0) if len(self.final_ids) > 1 else self.final_ids[0]
        lp = torch.cat(self.final_logprobs, dim=0) if len(self.final_logprobs) > 1 else self.final_logprobs[0]
        return {"ids": ids.tolist(), "logprobs": [[round(float(x), 6) for x in row] for row in lp.tolist()]}


class Exporter:
    """Bounded queue + daemon worker publishing batches through a transport."""

    def __init__(
        self,
        transport_factory: Callable[[], Transport],
        metrics: TapMetrics,
        model_label: str,
        *,
        max_items: int,
        max_bytes: int,
        batch_size: int,
        max_payload_bytes: int,
        backoff_initial_s: float,
        backoff_max_s: float,
        counters: Callable[[], dict[str, Any]],
    ) -> None:
        self._factory = transport_factory
        self._metrics = metrics
        self._label = model_label
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.max_payload_bytes = max_payload_bytes
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._counters = counters
        self._m_drops = {r: metrics.drops.labels(model_label, r) for r in (
            "queue_full", "queue_bytes", "transport_error", "transport_down", "hook_error", "encode_error", "closed")}
        self._m_exported = metrics.samples_exported.labels(model_label)
        self._m_depth = metrics.queue_depth.labels(model_label)
        self._m_bytes = metrics.queue_bytes.labels(model_label)
        self._m_latency = metrics.export_latency.labels(model_label)
        self._m_terr = metrics.transport_errors.labels(model_label)
        self.drops: dict[str, int] = dict.fromkeys(self._m_drops, 0)
        self.exported = 0
        self._init_state()
        ref = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())
        self._atexit = weakref.WeakMethod(self._atexit_close)
        atexit.register(lambda: (m := self._atexit()) is not None and m())

    # --- state (re)initialisation -------------------------------------------------------------
    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._queue: deque[CapturedSample] = deque()
        self._queued_bytes = 0
        self._in_flight = 0
        self._wake = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._shutdown = False
        self._transport: Transport | None = None
        self._down_until = 0.0
        self._backoff = self.backoff_initial_s
        self._worker: threading.Thread | None = None

    def _after_fork_in_child(self) -> None:
        # Locks and threads do not survive fork: start afresh (queued items belong to the parent).
        self._init_state()

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name="layerwatch-tap-exporter", daemon=True)
            self._worker.start()

    # --- serving thread -----------------------------------------------------------------------
    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped samples (no logging: drops can be frequent)."""
        self.drops[reason] = self.drops.get(reason, 0) + n
        self._m_drops[reason].inc(n)

    def offer(self, item: CapturedSample) -> bool:
        """Queue a captured sample; never blocks or raises. False when dropped."""
        if self._pid != os.getpid():
            self._init_state()
        if self._shutdown:
            self.drop("closed")
            return False
        if len(self._queue) >= self.max_items:
            self.drop("queue_full")
            return False
        if self._queued_bytes + item.nbytes > self.max_bytes:
            self.drop("queue_bytes")
            return False
        self._queued_bytes += item.nbytes
        self._queue.append(item)
        if self._worker is None:
            self._ensure_worker()
        self._wake.set()
        return True

    # --- worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=0.25)
            self._wake.clear()
            while self._queue:
                batch = []
                with self._idle:
                    while self._queue and len(batch) < self.batch_size:
                        item = self._queue.popleft()
                        self._queued_bytes -= item.nbytes
                        batch.append(item)
                    self._in_flight = len(batch)
                try:
                    self._export(batch)
                except Exception:  # the worker must survive anything
                    self.drop("encode_error", len(batch))
                finally:
                    with self._idle:
                        self._in_flight = 0
                        self._idle.notify_all()
            self._m_depth.set(len(self._queue))
            self._m_bytes.set(max(0, self._queued_bytes))
            with self._idle:
                self._idle.notify_all()
            if self._shutdown and not self._queue:
                return

    def _export(self, batch: list[CapturedSample]) -> None:
        self._m_depth.set(len(self._queue))
        self._m_bytes.set(max(0, self._queued_bytes))
        if time.monotonic() < self._down_until:
            self.drop("transport_down", len(batch))
            return
        counters = self._counters()
        payloads, stamps = [], []
        for item in batch:
            try:
                hidden = item.assemble()
                header = dict(item.header)
                header["final_topk"] = item.final_topk()
                header["tap"] = counters
                payloads.append(encode(header, hidden, max_bytes=self.max_payload_bytes))
                stamps.append(item.captured_at)
            except (WireError, ValueError, RuntimeError):
                self.drop("encode_error")
        if not payloads:
            return
        try:
            if self._transport is None:
                self._transport = self._factory()
            self._transport.publish(payloads)
        except (TransportError, LayerwatchError, OSError):
            self._m_terr.inc()
            self.drop("transport_error", len(payloads))
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(self.backoff_max_s, self._backoff * 2)
            return
        self._backoff = self.backoff_initial_s
        now = time.time()
        self.exported += len(payloads)
        self._m_exported.inc(len(payloads))
        for t in stamps:
            self._m_latency.observe(max(0.0, now - t))

    # --- control ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return max(0, self._queued_bytes)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been handed to the transport (or dropped)."""
        if self._pid != os.getpid():
            self._init_state()
        deadline = time.monotonic() + max(0.0, timeout)
        if self._queue:
            self._ensure_worker()
        with self._idle:
            while self._queue or self._in_flight:
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    def close(self, timeout: float) -> bool:
        """Flush within ``timeout``, then stop; whatever is left is dropped as ``closed``."""
        drained = self.flush(timeout)
        self._shutdown = True
        self._wake.set()
        left = len(self._queue)
        if left:
            self._queue.clear()
            self._queued_bytes = 0
            self.drop("closed", left)
        if self._worker is not None:
            self._worker.join(timeout=max(0.1, timeout))
        if self._transport is not None:
            try:
                self._transport.close()
            except LayerwatchError:
                pass
        return drained

    def _atexit_close(self) -> None:
        if not self._shutdown:
            self.close(timeout=2.0)
