"""The tap's exporter: a bounded queue drained by a daemon thread that encodes and publishes.

Threading contract: :meth:`Exporter.offer` and :meth:`Exporter.drop` are called synchronously
on the serving thread, so they must not block or raise. ``offer`` checks shutdown and the item
and byte bounds under a short, uncontended lock (the worker holds it only to pop and account),
appends to a ``deque`` and wakes the worker only when a full batch is ready (otherwise the
worker's ``interval_s`` timer exports it, so sparse samples do not wake a thread per request). A full queue drops the item and counts
the reason; nothing is logged per drop. Everything else (waiting for device copies, splitting a
batch into per-request ``[L, P, d]`` arrays, JSON encoding, transport I/O, reconnection with
backoff) runs on the worker thread.

Accounting: a queued item is one sampled forward batch holding ``n_samples`` samples; the item
bound counts samples and the byte bound counts the host bytes of captured tensors. Both stay
charged until the item's publish has finished, so the bound is a bound on the tap's memory.
Every sample offered ends in exactly one of ``exported`` or a drop reason.

Fork safety: ``os.register_at_fork`` (through a weak reference) gives a forked child (e.g. a
gunicorn worker) a fresh queue, lock, worker thread and transport, so the child keeps sampling.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.tap.recorder import DROP_REASONS, Counts, TapRecorder
from monitor.transport import Transport
from monitor.windows import window_bounds
from monitor.wire import encode

__all__ = ["DROP_REASONS", "CapturedRequest", "CapturedStep", "Counts", "Exporter"]
MAX_LOGGED_ERRORS = 16  # distinct publish errors logged per exporter; the rest are only counted

log = logging.getLogger("layerwatch.tap")


@dataclass
class CapturedStep:
    """What one forward pass captured for the sampled rows, already in host memory.

    ``hidden`` is ``[L, P, d]`` float16 with the rows of slot ``s`` (the s-th sampled batch row)
    at ``[s*k, (s+1)*k)`` where ``k = per_slot``. ``positions``/``valid`` are ``[P]`` (or None:
    the positions are the Python list ``fixed_positions``, all valid). ``topk_*`` are ``[P, K]``
    with ``topk_valid`` ``[P]`` (None: all valid). Prompt windows (step 0 only): ``windows``
    ``[L, S*max_windows, d]`` (slot ``s`` at ``[s*max_windows, ...)``, zero past its own window
    count) and ``window_lengths`` ``[S]``, the prompt length of each slot.
    """

    hidden: Any
    per_slot: int
    positions: Any = None
    fixed_positions: list[int] | None = None
    valid: Any = None
    topk_ids: Any = None
    topk_logprobs: Any = None
    topk_valid: Any = None
    windows: Any = None
    window_lengths: Any = None
    max_windows: int = 0
    window_min_tokens: int = 1


@dataclass
class CapturedRequest:
    """One sampled forward batch (one request, or the sampled rows of a batch), as queued."""

    base_header: dict[str, Any]
    sample_ids: list[str]
    request_ids: list[str]
    metadata: list[dict[str, Any]]
    steps: list[CapturedStep]
    events: list[Any] = field(default_factory=list)
    nbytes: int = 0
    captured_at: float = 0.0

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    def samples(self) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray | None]]:
        """Wait for device copies, then yield ``(header, hidden[L, P, d], windows[L, W, d] or
        None)`` per sampled row (the header then names the windows' bounds).

        Runs on the exporter thread. A row with no valid position (an all-padding row) yields
        nothing; the caller counts it as an encode error.
        """
        for ev in self.events:
            ev.synchronize()  # waits on the exporter thread, never on the serving thread
        steps = [_StepArrays.of(st) for st in self.steps]
        for s, sample_id in enumerate(self.sample_ids):
            parts: list[np.ndarray] = []
            pos: list[int] = []
            tk_ids: list[np.ndarray] = []
            tk_lp: list[np.ndarray] = []
            topk_ok = True
            for st in steps:
                sl = slice(s * st.k, (s + 1) * st.k)
                keep = st.valid[sl] if st.valid is not None else None
                h = st.hidden[:, sl]
                p = st.positions[sl]
                if keep is not None and not keep.all():
                    h, p = h[:, keep], p[keep]
                parts.append(h)
                pos.extend(int(x) for x in p)
                if st.topk_ids is None:
                    topk_ok = False
                    continue
                assert st.topk_lp is not None
                ids, lp = st.topk_ids[sl], st.topk_lp[sl]
                tv = st.topk_valid[sl] if st.topk_valid is not None else None
                if keep is not None:
                    ids, lp = ids[keep], lp[keep]
                    tv = tv[keep] if tv is not None else None
                if tv is not None and not tv.all():
                    topk_ok = False  # all-or-nothing: rows of final_topk align with positions
                tk_ids.append(ids)
                tk_lp.append(lp)
            hidden = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            if hidden.shape[1] == 0:
                continue
            header = dict(self.base_header)
            header["sample_id"] = sample_id
            header["request_id"] = self.request_ids[s]
            header["metadata"] = self.metadata[s]
            header["created_at"] = self.captured_at
            header["position_index"] = pos if header.get("positions") != "mean" else []
            header["final_topk"] = None
            if topk_ok and tk_ids:
                ids = np.concatenate(tk_ids) if len(tk_ids) > 1 else tk_ids[0]
                lp = np.concatenate(tk_lp) if len(tk_lp) > 1 else tk_lp[0]
                header["final_topk"] = {
                    "ids": ids.astype(np.int64).tolist(),
                    "logprobs": np.round(lp.astype(np.float64), 6).tolist(),
                }
            windows = None
            if steps[0].windows is not None:
                windows = _windows_of(steps[0], s, header)
            yield header, np.ascontiguousarray(hidden), windows


def _windows_of(st: _StepArrays, s: int, header: dict[str, Any]) -> np.ndarray:
    """Slot ``s``'s window means, its bounds (:func:`monitor.windows.window_bounds` of its
    prompt length, as the plan built them on the device) written into ``header``."""
    assert st.windows is not None and st.window_lengths is not None
    n = int(st.window_lengths[s])
    bounds = window_bounds(n, st.max_windows, st.window_min_tokens)
    header["windows"] = bounds.tolist()
    header["prompt_tokens"] = n
    base = s * st.max_windows
    return np.ascontiguousarray(st.windows[:, base:base + len(bounds)])


@dataclass
class _StepArrays:
    hidden: np.ndarray
    k: int
    positions: np.ndarray
    valid: np.ndarray | None
    topk_ids: np.ndarray | None
    topk_lp: np.ndarray | None
    topk_valid: np.ndarray | None
    windows: np.ndarray | None = None
    window_lengths: np.ndarray | None = None
    max_windows: int = 0
    window_min_tokens: int = 1

    @staticmethod
    def of(st: CapturedStep) -> _StepArrays:
        def arr(t: Any) -> np.ndarray | None:
            return None if t is None else t.numpy() if hasattr(t, "numpy") else np.asarray(t)

        positions = arr(st.positions) if st.positions is not None else np.asarray(st.fixed_positions or [])
        return _StepArrays(arr(st.hidden), st.per_slot, positions, arr(st.valid),  # type: ignore[arg-type]
                           arr(st.topk_ids), arr(st.topk_logprobs), arr(st.topk_valid),
                           arr(st.windows), arr(st.window_lengths), st.max_windows, st.window_min_tokens)


class Exporter:
    """Bounded queue + daemon worker publishing batches through a transport."""

    def __init__(
        self,
        transport_factory: Callable[[], Transport],
        recorder: TapRecorder,
        *,
        max_items: int,
        max_bytes: int,
        batch_size: int,
        max_payload_bytes: int,
        backoff_initial_s: float,
        backoff_max_s: float,
        counters: Callable[[], dict[str, Any]],
        owns_transport: bool = True,
        interval_s: float = 0.5,
    ) -> None:
        self._factory = transport_factory
        self._owns_transport = owns_transport
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.max_payload_bytes = max_payload_bytes
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._counters = counters
        self.interval_s = interval_s
        self.recorder = recorder
        self._init_state()
        ref = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())
        close_ref = weakref.WeakMethod(self._atexit_close)
        atexit.register(lambda: (m := close_ref()) is not None and m())

    # --- state (re)initialisation -------------------------------------------------------------
    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: deque[CapturedRequest] = deque()
        self._items = 0  # samples queued or in flight
        self._bytes = 0  # their host bytes
        self._in_flight = 0
        self._wake = threading.Event()
        self._shutdown = False
        self._transport: Transport | None = None
        self._down_until = 0.0
        self._backoff = self.backoff_initial_s
        self._logged_errors: set[str] = set()
        self._worker: threading.Thread | None = None

    def _after_fork_in_child(self) -> None:
        # Locks and threads do not survive fork: start afresh. Queued items belong to the
        # parent, which exports them; the child is a new tap instance with zeroed counters.
        self._init_state()  # the counters are the recorder's: TapCore resets them

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name="layerwatch-tap-exporter", daemon=True)
            self._worker.start()

    # --- serving thread -----------------------------------------------------------------------
    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped samples (no logging: drops can be frequent)."""
        self.recorder.dropped(reason, n)

    def offer(self, item: CapturedRequest) -> bool:
        """Queue a captured batch; never blocks or raises. False when dropped (and counted)."""
        n = item.n_samples
        if self._pid != os.getpid():  # a fork that bypassed os.register_at_fork (e.g. from C)
            self._after_fork_in_child()
        if self._shutdown:
            self.drop("closed", n)
            return False
        reason = None
        with self._lock:
            if self._shutdown:  # close() won the race
                reason = "closed"
            elif self._items + n > self.max_items:
                reason = "queue_full"
            elif self._bytes + item.nbytes > self.max_bytes:
                reason = "queue_bytes"
            else:
                self._items += n
                self._bytes += item.nbytes
                self._queue.append(item)
        if reason is not None:
            self.drop(reason, n)
            return False
        if self._worker is None:
            self._ensure_worker()
        if self._items >= self.batch_size and not self._wake.is_set():
            self._wake.set()  # a full batch is ready; otherwise the worker's timer picks it up
        return True

    # --- worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=self.interval_s)
            self._wake.clear()
            while True:
                with self._lock:
                    batch: list[CapturedRequest] = []
                    n = 0
                    while self._queue and n < self.batch_size:
                        item = self._queue.popleft()
                        batch.append(item)
                        n += item.n_samples
                    self._in_flight = len(batch)
                    self.recorder.queue(self._items, self._bytes)  # the gauges follow the worker, not offer()
                if not batch:
                    break
                try:
                    self._export(batch)
                except Exception:  # unreachable by construction (_export counts every sample)
                    pass  # but the worker must survive anything
                finally:
                    with self._lock:
                        self._in_flight = 0
                        self._items -= n
                        self._bytes -= sum(it.nbytes for it in batch)
                        self.recorder.queue(self._items, self._bytes)  # before the notify: flush() sees them
                        self._idle.notify_all()
            with self._lock:
                self._idle.notify_all()
                if self._shutdown and not self._queue:
                    return

    def _export(self, batch: list[CapturedRequest]) -> None:
        total = sum(it.n_samples for it in batch)
        if time.monotonic() < self._down_until:
            self.drop("transport_down", total)
            return
        try:
            counters = self._counters()
        except Exception:
            counters = {}
        payloads: list[bytes] = []
        stamps: list[float] = []
        for item in batch:
            done = 0
            try:
                for header, hidden, windows in item.samples():
                    done += 1
                    try:
                        header["tap"] = counters
                        payloads.append(encode(header, hidden, windows=windows, max_bytes=self.max_payload_bytes))
                        stamps.append(item.captured_at)
                    except Exception:
                        self.drop("encode_error")
                self.drop("encode_error", item.n_samples - done)  # rows with no valid position
            except Exception:
                self.drop("encode_error", item.n_samples - done)
        if not payloads:
            return
        try:
            if self._transport is None:
                self._transport = self._factory()
            self._transport.publish(payloads)
        except Exception as exc:  # TransportError, a missing redis package, anything: count and back off
            self.recorder.transport_error()
            self._log_once(exc)
            self.drop("transport_error", len(payloads))
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(self.backoff_max_s, self._backoff * 2)
            return
        self._backoff = self.backoff_initial_s
        self.recorder.exported(stamps)

    def _log_once(self, exc: Exception) -> None:
        """Log a publish error the first time its kind is seen (a wrong password, a full Redis, a
        TLS failure each say so once); the messages carry redacted URLs only."""
        kind = f"{type(exc).__name__}: {str(exc)[:300]}"
        if kind not in self._logged_errors and len(self._logged_errors) < MAX_LOGGED_ERRORS:
            self._logged_errors.add(kind)
            log.warning("layerwatch tap: cannot publish samples (%s); they are dropped as transport_error "
                        "until it works; this error is logged once", kind)

    # --- control ----------------------------------------------------------------------------
    @property
    def exported(self) -> int:
        """Samples published successfully (by this process)."""
        return self.recorder.stats.exported.get("samples")

    @property
    def drops(self) -> dict[str, int]:
        """Dropped samples by reason (by this process)."""
        return self.recorder.stats.drops.snapshot()

    @property
    def queue_depth(self) -> int:
        """Samples queued or being published."""
        return self._items

    @property
    def queued_bytes(self) -> int:
        """Host bytes of captured tensors queued or being published (bounded by ``max_bytes``)."""
        return self._bytes

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until everything queued was published or dropped."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            if self._queue:
                self._ensure_worker()
            while self._items:
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    def close(self, timeout: float) -> bool:
        """Flush and stop within ``timeout`` s in all; whatever is left is dropped as ``closed``."""
        deadline = time.monotonic() + max(0.0, timeout)
        drained = self.flush(timeout)
        with self._lock:
            self._shutdown = True
            left = sum(it.n_samples for it in self._queue)
            for it in self._queue:
                self._items -= it.n_samples
                self._bytes -= it.nbytes
            self._queue.clear()
        self.drop("closed", left)
        self._wake.set()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._transport is not None and self._owns_transport and (worker is None or not worker.is_alive()):
            try:
                self._transport.close()
            except Exception:
                pass
        return drained and not left

    def _atexit_close(self) -> None:
        if not self._shutdown:
            self.close(timeout=2.0)
