"""What the sidecar does with a micro-batch of good samples: the shared pipeline stage, then the
audit trail, the ledger, the recent-narratives cache and the recorder, in that order.

Order matters for the delivery guarantee: records are appended and fsynced, then the ledger is
marked; the caller acknowledges only after :meth:`BatchProcessor.process` returns.

Nothing is learned from or scored for good before its records are durable: the scoring stage's
state (the baseline being learned, the detector's windows and alert) is snapshotted before a
batch and put back when the batch fails before its fsync, so a retried batch is learned once.
Once the records are durable a failure to mark the ledger is remembered (:attr:`unmarked`) and
marked before the next lookup, so a retry acks the batch instead of auditing it again.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from monitor.audit.records import sample_fields
from monitor.backends.ledger import payload_digest
from monitor.drift.baseline import Baseline
from monitor.drift.prompt_windows import window_states_of
from monitor.errors import LayerwatchError
from monitor.narratives import Narrative
from monitor.pipeline.scoring import Scored, ScoringStage
from monitor.pipeline.stages import LayerIndex, explain, read_samples
from monitor.sidecar.bootstrap import SidecarParts
from monitor.transport import Entry
from monitor.wire import Sample

log = logging.getLogger("layerwatch.sidecar")


class BatchProcessor:
    """Readings -> narratives -> scores -> audit -> ledger for one replica (one thread)."""

    def __init__(self, parts: SidecarParts) -> None:
        self.parts = parts
        self.layer_index = LayerIndex(parts.bank.layers)
        self.audit_ok = True
        self.processed_total = 0
        self.unmarked: dict[str, str] = {}  # durable in the trail, not yet in the ledger: id -> digest

    def start(self) -> None:
        """Warm the bank up, bind the metric series, write the start-up audit records."""
        p, s = self.parts, self.parts.settings
        baseline = p.scoring.baseline
        p.recorder.start(provider=p.bank.provider, bundle_id=p.bank.bundle_id, alpha=s.baseline.alpha,
                         stream_maxlen=s.stream_maxlen, watch=s.baseline.watch,
                         baseline_id=baseline.id if baseline is not None else None,
                         learning_collected=p.scoring.learner.collected if p.scoring.learner is not None else None,
                         alert_active=bool(p.scoring.detector is not None and p.scoring.detector.alert["active"]))
        warm_up = getattr(p.bank, "warm_up", None)
        if s.warm_up and warm_up is not None:
            log.info("lens bank warmed up at every batch size in %.1f s", warm_up())
        self.event("sidecar_start", {"consumer": s.consumer, "group": s.group})
        self.event("config", {"settings": s.redacted()})
        self.event("bundle_loaded", {"bundle_id": p.bank.bundle_id, "provider": p.bank.provider,
                                     "model_fingerprint": p.bank.fingerprint})
        if p.baselines is not None and s.baseline.follow_active and s.baseline.id is None and s.baseline.file is None:
            p.scoring.follow(p.baselines, s.baseline.poll_interval_s, self._baseline_event)

    def shutdown(self) -> None:
        """The stop record, then flush and close the trail."""
        self.parts.scoring.stop_following()
        self.event("sidecar_stop", {"consumer": self.parts.settings.consumer, "processed": self.processed_total})
        try:
            self.parts.audit.sync()
            self.parts.audit.close()
        except Exception:  # noqa: BLE001
            log.exception("audit close failed")

    def process(self, good: list[tuple[Entry, Sample]]) -> list[float]:
        """Explain, score and audit ``good`` durably, then mark the ledger; returns the capture
        times of the audited samples. Raises on failure: before the fsync, with the scoring state
        rolled back; after it, with the ids kept in :attr:`unmarked`."""
        p = self.parts
        samples = [smp for _, smp in good]
        p.scoring.apply_pending()  # a promoted baseline is switched to outside the rollback's reach
        saved = _snapshot(p.scoring)
        try:
            scored, narratives, readings = self._audit(good)
        except BaseException:
            _restore(p.scoring, saved)
            raise
        digests = {smp.sample_id: payload_digest(e.data) for e, smp in good}
        try:
            p.ledger.mark(digests, digests)
        except Exception:
            self.unmarked.update(digests)
            raise
        self.audit_ok = True
        self.processed_total += len(good)
        try:
            for smp in samples:  # tap counters ride in headers: the fleet totals take each increase
                p.recorder.fleet.add(smp.tap)
            self._after(scored, narratives, readings)
        except Exception:  # noqa: BLE001 - the batch is durable and marked: metrics must not undo that
            log.exception("metrics of a durable batch not recorded")
        return [smp.created_at for smp in samples]

    def mark_unmarked(self) -> None:
        """Mark the ledger for records made durable by a batch whose mark failed."""
        if self.unmarked:
            self.parts.ledger.mark(self.unmarked, self.unmarked)
            self.unmarked.clear()

    def _audit(self, good: list[tuple[Entry, Sample]]) -> tuple[Scored, list[Narrative], Any]:
        """Readings, narratives and scores of a batch, appended and fsynced."""
        p = self.parts
        samples = [smp for _, smp in good]
        readings = read_samples(p.bank, samples, self.layer_index)
        narratives = explain(readings, samples, p.decode_token, include_tokens=p.settings.narratives.include_tokens)
        layers = p.scoring.window_layers(samples[0].layers) if samples else None
        scored = p.scoring.score(readings, None if layers is None else window_states_of(samples, layers))
        if scored.promoted is not None:  # its records precede the samples that built it
            self._promoted(scored.promoted, scored.refused_watch)
        baseline_id = p.scoring.baseline.id if p.scoring.baseline is not None else None
        records = [("sample", self._record(e, smp, nar, sc, baseline_id))
                   for (e, smp), nar, sc in zip(good, narratives, scored.results, strict=True)]
        events = scored.update.events if scored.update is not None else []
        for ev in events:  # the event's own "kind" (raised/cleared) is the record kind's suffix
            fields = {k: v for k, v in ev.to_dict().items() if k != "kind"}
            records.append((f"drift_alert_{ev.kind}", {"model": p.model_label, **fields}))
        p.audit.append_many(records)  # one write + one fsync per micro-batch
        p.audit.sync()  # durable before the ledger mark and the ack
        return scored, narratives, readings

    def _record(self, e: Entry, smp: Sample, nar: Narrative, sc: dict[str, Any], baseline_id: str | None) -> dict[str, Any]:
        payload = sample_fields(
            sample_id=smp.sample_id, request_id=smp.request_id, model=smp.model,
            model_fingerprint=smp.model_fingerprint, bundle_id=self.parts.bank.bundle_id,
            baseline_id=baseline_id, narrative=nar.to_dict(), score=sc["score"], flags=sc["flags"],
            redelivered=e.deliveries > 1,
        )
        payload.update({"metadata": smp.metadata, "captured_at": smp.created_at, "positions": smp.positions})
        return payload

    def _after(self, scored: Scored, narratives: list[Narrative], readings: Any) -> None:
        """Caches and metrics of a batch that is durable."""
        p = self.parts
        for nar, sc in zip(narratives, scored.results, strict=True):
            if p.recent.capacity > 0:
                p.recent.add(nar.sample_id, {"sample_id": nar.sample_id, "request_id": nar.request_id,
                                             "model": nar.model, "narrative": nar.to_dict(), "text": nar.render(), **sc})
        if p.scoring.learner is not None:
            p.recorder.learning(p.scoring.learner.collected)
        if scored.update is not None:
            p.recorder.detector(scored.update)
        p.recorder.readings(readings)

    def _promoted(self, baseline: Baseline, refused_watch: str | None) -> None:
        p = self.parts
        if refused_watch is not None:
            self.event("watch_refused", {"baseline_id": baseline.id, "watch": list(p.settings.baseline.watch),
                                         "reason": refused_watch})
        if p.baselines is not None:
            try:
                p.baselines.save(baseline)
                p.baselines.promote(baseline.id)
            except LayerwatchError as exc:
                log.warning("learned baseline not stored in Redis: %s", exc)
        p.recorder.promoted(baseline.id)
        p.audit.append("baseline_promoted", {"baseline_id": baseline.id, "source": "learned from live traffic",
                                             "samples": baseline.n_samples})

    def _baseline_event(self, kind: str, fields: dict[str, Any]) -> None:
        """A switch to (or refusal of) the store's active baseline, before the batch it scores."""
        if kind == "baseline_changed":
            self.parts.recorder.baseline_changed(fields.get("old_baseline_id"), fields["baseline_id"])
        self.event(kind, {"model": self.parts.model_label, **fields})

    def audit_failed(self) -> None:
        """An audit or transport failure left a batch pending."""
        self.audit_ok = False
        self.parts.recorder.audit_error()

    def event(self, kind: str, payload: dict[str, Any]) -> None:
        """Write one event record durably; a failure is counted and logged, never raised."""
        try:
            self.parts.audit.append(kind, payload)
            self.parts.audit.sync()
        except Exception:  # noqa: BLE001 - an event record must not take the sidecar down
            self.parts.recorder.audit_error()
            log.exception("audit event %s not written", kind)


def _snapshot(scoring: ScoringStage) -> tuple[Any, Any]:
    """A copy of the scoring stage's mutable state (the baseline and its derived tables are
    immutable and shared, not copied)."""
    keep: dict[int, Any] = {}
    d = scoring.detector
    if d is not None:
        keep = {id(d.baseline): d.baseline, id(d.scorer): d.scorer, id(d.windows.tester): d.windows.tester}
    return copy.deepcopy((scoring.detector, scoring.learner), keep)


def _restore(scoring: ScoringStage, saved: tuple[Any, Any]) -> None:
    scoring.detector, scoring.learner = saved
