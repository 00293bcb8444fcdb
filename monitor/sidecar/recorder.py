"""The sidecar's one recorder: plain stats objects in, Prometheus updates out.

The consumer loop and the pipeline fill :class:`BatchStats` and hand over what they produced
(readings, the detector's update); :class:`SidecarRecorder` turns them into metric updates on
:class:`monitor.metrics.SidecarMetrics`. Series of bounded label sets are bound once at start-up
(:meth:`SidecarRecorder.start`) so dashboards show zeros instead of "no data". Values owned
elsewhere are read at scrape time: the stream's trimmed count (the transport's), the fleet's tap
totals (:class:`FleetTapTotals`, from sample headers).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.drift.concepts import parse_concept
from monitor.drift.detector import DetectorUpdate
from monitor.drift.score import LOCAL_FLAG
from monitor.lenses.readings import Readings
from monitor.metrics import TAP_DROP_REASONS, SidecarMetrics
from monitor.transport import StreamStats
from monitor.wire import DECODE_REASONS

# Every dead-letter reason: the wire format's, then the consumer loop's own.
DEAD_LETTER_REASONS = (
    *DECODE_REASONS,
    "duplicate_id",  # another entry with an audited sample_id and other bytes
    "max_deliveries",  # delivered more than max_deliveries times (its replicas kept dying on it)
    "processing_error",  # the lens bank, narratives or detector failed on this sample alone
    "audit_rejected",  # the audit writer refused this sample's record (a value it cannot write)
)


@dataclass
class BatchStats:
    """What one micro-batch did, filled by the consumer loop."""

    processed: int = 0
    unique: int = 0  # decoded, not yet audited samples handed to the pipeline (the micro-batch size)
    duplicates: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    acked: int = 0
    started: float = field(default_factory=time.monotonic)
    capture_times: list[float] = field(default_factory=list)  # wall-clock capture time of each audited sample

    def add(self, other: BatchStats) -> None:
        """Fold another micro-batch's counts into these (one step can process several)."""
        self.processed += other.processed
        self.unique += other.unique
        self.duplicates += other.duplicates
        self.dead_letters.update(other.dead_letters)
        self.failed += other.failed
        self.acked += other.acked
        self.capture_times += other.capture_times


class FleetTapTotals:
    """Fleet totals of every tap's counters, from the counters each sample header carries.

    A tap instance's counters only grow; the sidecar keeps the largest value it saw per instance
    (bounded: the oldest instances are forgotten past ``max_instances``, their totals kept)."""

    def __init__(self, max_instances: int = 10_000) -> None:
        self._max = max_instances
        self._seen: dict[str, tuple[int, dict[str, int]]] = {}
        self._sampled = 0
        self._drops: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._reasons = frozenset(TAP_DROP_REASONS)

    def add(self, tap: dict[str, Any]) -> None:
        """Fold one header's tap counters in."""
        inst = tap.get("instance")
        if not isinstance(inst, str):
            return
        raw_sampled = tap.get("sampled")
        sampled = raw_sampled if isinstance(raw_sampled, int) else 0
        raw = tap.get("drops")
        drops = {k: v for k, v in (raw.items() if isinstance(raw, dict) else ()) if isinstance(v, int) and k in self._reasons}
        with self._lock:
            prev_sampled, prev_drops = self._seen.pop(inst, (0, {}))
            self._sampled += max(0, sampled - prev_sampled)
            for reason, n in drops.items():
                self._drops[reason] += max(0, n - prev_drops.get(reason, 0))
            if len(self._seen) >= self._max:
                self._seen.pop(next(iter(self._seen)))
            self._seen[inst] = (max(prev_sampled, sampled), {**prev_drops, **drops})

    def sampled(self) -> int:
        """Requests sampled by all taps."""
        return self._sampled

    def drops(self) -> dict[str, int]:
        """Tap drops by reason (every known reason, zeros included)."""
        with self._lock:
            return {r: self._drops.get(r, 0) for r in TAP_DROP_REASONS}


class SidecarRecorder:
    """Translates the sidecar's stats into metric updates. One per sidecar; one model label."""

    def __init__(self, metrics: SidecarMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.fleet = FleetTapTotals()
        self._trimmed = 0
        m, lab = metrics, model
        self._processed = m.samples_processed.labels(lab)
        self._duplicates = m.samples_duplicate.labels(lab)
        self._latency = m.processing_latency.labels(lab)
        self._e2e = m.end_to_end_latency.labels(lab)
        self._batch = m.batch_size.labels(lab)
        self._depth = m.prediction_depth.labels(lab)
        self._layers: dict[int, tuple[Any, Any, Any, Any]] = {}
        m.stream_drops.bind(lambda: [((lab, "trimmed"), self._trimmed)])
        m.fleet_tap_sampled.bind(lambda: [((lab,), self.fleet.sampled())])
        m.fleet_tap_drops.bind(lambda: [((lab, r), n) for r, n in self.fleet.drops().items()])

    def start(self, *, provider: str, bundle_id: str, alpha: float, stream_maxlen: int,
              watch: Sequence[str], baseline_id: str | None, learning_collected: int | None,
              alert_active: bool) -> None:
        """Bind every bounded-label series (0 for counters) and the start-up facts."""
        m, lab = self.metrics, self.model
        m.lens_provider.labels(lab, provider).set(1)
        m.lens_bundle_info.labels(lab, bundle_id).set(1)
        m.anomaly_expected_fpr.labels(lab).set(alpha)
        m.stream_maxlen.labels(lab).set(stream_maxlen)
        if baseline_id is not None:
            self.promoted(baseline_id)
            m.baseline_learning_samples.labels(lab).set(0)
        else:
            self.learning(learning_collected or 0)
        for reason in DEAD_LETTER_REASONS:
            m.dead_letters.labels(lab, reason)
        for concept in watch:
            m.watched_concepts.labels(lab, "=".join(parse_concept(concept)))
        for c in (m.audit_write_errors, m.anomalies, m.drift_alerts):
            c.labels(lab)
        m.drift_alert_active.labels(lab).set(1 if alert_active else 0)

    # --- consumer loop ------------------------------------------------------------------------
    def batch(self, stats: BatchStats) -> None:
        """One micro-batch's counts and latencies."""
        if stats.duplicates:
            self._duplicates.inc(stats.duplicates)
        if stats.processed:
            self._processed.inc(stats.processed)
            self.end_to_end(stats.capture_times)
        if stats.unique and not stats.failed:
            self._latency.observe(time.monotonic() - stats.started)
            self._batch.observe(stats.unique)

    def dead_letter(self, reason: str) -> None:
        """A poison entry moved to the dead-letter stream (counted at once, whatever follows)."""
        self.metrics.dead_letters.labels(self.model, reason).inc()

    def audit_error(self) -> None:
        """A failed audit write or fsync."""
        self.metrics.audit_write_errors.labels(self.model).inc()

    def stream(self, st: StreamStats) -> None:
        """Lag, pending and the trimmed count read from the transport."""
        self.metrics.consumer_lag.labels(self.model).set(st.lag)
        self.metrics.consumer_pending.labels(self.model).set(st.pending)
        self._trimmed = max(self._trimmed, st.trimmed)

    # --- pipeline -------------------------------------------------------------------------------
    def readings(self, r: Readings) -> None:
        """Per-layer readings of a batch: histograms observed per layer in one vectorised step,
        probe label counts from one argmax per probe."""
        m, lab = self.metrics, self.model
        n = r.batch_size
        agree = (r.topk_ids[:, :, 0] == r.final_topk_ids[:, None, 0]).sum(axis=0).tolist()
        winners = {probe: probs.argmax(-1) for probe, probs in r.probes.items()}  # [B, L]
        for i, layer in enumerate(r.layers):
            entropy, kl, samples, agreeing = self._layer(layer)
            entropy.observe_many(r.entropy[:, i])
            kl.observe_many(r.kl_to_final[:, i])
            samples.inc(n)
            if agree[i]:
                agreeing.inc(agree[i])
            for probe, w in winners.items():
                names = r.probe_labels.get(probe, ())
                for c, count in zip(*np.unique(w[:, i], return_counts=True), strict=True):
                    label = names[c] if c < len(names) else str(c)
                    m.probe_labels.labels(lab, str(layer), probe, label).inc(int(count))
        self._depth.observe_many(r.depth)

    def end_to_end(self, capture_times: Iterable[float]) -> None:
        """Capture-to-audit latency of each audited sample."""
        now = time.time()
        for t in capture_times:
            self._e2e.observe(max(0.0, now - t))

    def detector(self, update: DetectorUpdate) -> None:
        """Scores, flags and alert events of one detector update (bounded labels only)."""
        m, lab = self.metrics, self.model
        for s in update.scores:
            if np.isfinite(s.score):
                m.anomaly_score.labels(model=lab).observe(s.score)
            if s.anomalous:
                m.anomalies.labels(model=lab).inc()
            for f in s.flags:
                m.flags.labels(model=lab, flag=f.kind).inc()
                if f.kind == "watched_concept":
                    m.watched_concepts.labels(model=lab, concept=f.reading.split(":", 1)[1]).inc()
                elif f.kind == LOCAL_FLAG:
                    self._local_segment(f.facts, f.layers)
        for ev in update.events:
            if ev.kind == "raised":
                m.drift_alerts.labels(model=lab).inc()
                m.drift_alert_active.labels(model=lab).set(1)
            else:
                m.drift_alert_active.labels(model=lab).set(0)

    def _local_segment(self, facts: Mapping[str, Any], layers: Iterable[int]) -> None:
        """Where a flagged segment sits (fraction of the prompt) and which layers carry it."""
        m, lab = self.metrics, self.model
        n = facts.get("prompt_tokens")
        if isinstance(n, int) and n > 0:
            m.local_segment_position.labels(model=lab).observe(min(1.0, max(0.0, float(facts["start"]) / n)))
        for layer in layers:
            m.local_segment_layers.labels(lab, str(layer)).inc()

    def learning(self, collected: int) -> None:
        """Learning mode, with the samples collected so far."""
        self.metrics.baseline_learning.labels(self.model).set(1)
        self.metrics.baseline_learning_samples.labels(self.model).set(collected)

    def promoted(self, baseline_id: str) -> None:
        """A baseline is in use."""
        self.metrics.baseline_learning.labels(self.model).set(0)
        self.metrics.baseline_info.labels(self.model, baseline_id).set(1)

    def baseline_changed(self, old: str | None, new: str) -> None:
        """The replica switched baselines while running: the info series moves to the new id."""
        if old is not None and old != new:
            with contextlib.suppress(KeyError):
                self.metrics.baseline_info.remove(self.model, old)
        self.promoted(new)

    def _layer(self, layer: int) -> tuple[Any, Any, Any, Any]:
        s = self._layers.get(layer)
        if s is None:
            m, lab, ly = self.metrics, self.model, str(layer)
            s = self._layers[layer] = (m.layer_entropy.labels(lab, ly), m.layer_kl.labels(lab, ly),
                                       m.layer_samples.labels(lab, ly), m.layer_top1_agree.labels(lab, ly))
        return s
