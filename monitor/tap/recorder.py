"""The tap's one recorder: what happened, counted once, turned into metrics in one place.

The front ends (:mod:`monitor.tap.hf`, :mod:`monitor.tap.vllm`), :class:`~monitor.tap.core.TapCore`
and the :class:`~monitor.tap.exporter.Exporter` say what happened (a request sampled or skipped, a
sample dropped or exported, the queue's size); :class:`TapRecorder` keeps the plain counters that
ride in every sample header (:class:`TapStats`) and updates :class:`monitor.metrics.TapMetrics`.
Every series of the tap's bounded label sets is bound once, at construction, so the hot path is
one counter addition and dashboards show zeros instead of "no data". Nothing else in the tap
touches a metric.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from monitor.metrics import TAP_DROP_REASONS, TapMetrics

SKIP_REASONS = ("rate", "budget", "opt_out", "unsupported")
DROP_REASONS = TAP_DROP_REASONS


class Counts:
    """Thread-safe integer counters by name (serving threads and the worker both count)."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def reset(self) -> None:
        """Zero every counter with a new lock (a forked child is a new tap instance)."""
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self._values, 0)


class TapStats:
    """This tap instance's counters: plain numbers, the ones every sample header carries."""

    def __init__(self) -> None:
        self.requests = Counts(("sampled", *(f"skipped_{r}" for r in SKIP_REASONS), "hook_errors"))
        self.drops = Counts(DROP_REASONS)
        self.exported = Counts(("samples",))

    @property
    def sampled(self) -> int:
        return self.requests.get("sampled")

    @property
    def skipped(self) -> dict[str, int]:
        return {r: self.requests.get("skipped_" + r) for r in SKIP_REASONS}

    @property
    def hook_errors(self) -> int:
        return self.requests.get("hook_errors")

    def reset(self) -> None:
        """A forked child is a new tap instance: its counters start at zero."""
        for c in (self.requests, self.drops, self.exported):
            c.reset()


class TapRecorder:
    """Counts into :class:`TapStats` and records into :class:`TapMetrics` (series bound once)."""

    def __init__(self, metrics: TapMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.stats = TapStats()
        self._sampled = metrics.requests_sampled.labels(model)
        self._skipped = {r: metrics.requests_skipped.labels(model, r) for r in SKIP_REASONS}
        self._drops = {r: metrics.drops.labels(model, r) for r in DROP_REASONS}
        self._exported = metrics.samples_exported.labels(model)
        self._depth = metrics.queue_depth.labels(model)
        self._bytes = metrics.queue_bytes.labels(model)
        self._latency = metrics.export_latency.labels(model)
        self._transport_errors = metrics.transport_errors.labels(model)

    # --- serving thread (never blocks beyond a short lock, never raises) ---------------------
    def sampled(self, n: int = 1) -> None:
        """``n`` requests sampled."""
        self.stats.requests.add("sampled", n)
        self._sampled.inc(n)

    def skipped(self, reason: str) -> None:
        """One request not sampled, for ``reason`` (one of :data:`SKIP_REASONS`)."""
        self.stats.requests.add("skipped_" + reason)
        self._skipped[reason].inc()

    def hook_error(self) -> None:
        """A capture hook failed (the forward pass went on without it)."""
        self.stats.requests.add("hook_errors")

    def dropped(self, reason: str, n: int = 1) -> None:
        """``n`` sampled requests that will not reach the transport (reason: :data:`DROP_REASONS`)."""
        if n <= 0:
            return
        self.stats.drops.add(reason, n)
        m = self._drops.get(reason)
        if m is not None:
            m.inc(n)

    # --- export worker ----------------------------------------------------------------------
    def queue(self, items: int, nbytes: int) -> None:
        """The export queue's size now."""
        self._depth.set(items)
        self._bytes.set(nbytes)

    def exported(self, captured_at: Iterable[float]) -> None:
        """Samples published, each with its capture time (wall clock)."""
        stamps = list(captured_at)
        self.stats.exported.add("samples", len(stamps))
        self._exported.inc(len(stamps))
        now = time.time()
        for t in stamps:
            self._latency.observe(max(0.0, now - t))

    def transport_error(self) -> None:
        """One failed publish."""
        self._transport_errors.inc()

    # --- attachment -------------------------------------------------------------------------
    def attached(self, reason: str = "ok") -> None:
        """The front end attached (``ok``: 1) or could not (``unsupported``, ``error``: 0)."""
        attached(self.metrics, self.model, reason)


def attached(metrics: TapMetrics, model: str, reason: str = "ok") -> None:
    """Set ``layerwatch_tap_attached`` for a tap that may have no recorder (it failed to attach)."""
    metrics.attached.labels(model, reason).set(1 if reason == "ok" else 0)
