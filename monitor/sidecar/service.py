"""The sidecar's consumer loop: micro-batch -> lens bank -> narratives -> drift -> audit -> ack.

Delivery guarantees (Redis Streams consumer group shared by all replicas):

* each entry goes to one replica; it is acknowledged only after the fsync that covers its audit
  record, so a replica killed at any point leaves its entries pending, and another replica (or
  the restarted one) reclaims them with XAUTOCLAIM after ``claim_idle_ms``;
* a shared ledger in Redis keeps a re-delivered sample from being audited twice; the only
  duplicate possible is a replica dying between fsync and ledger mark, and that copy carries
  ``redelivered: true`` (the review tools deduplicate by sample id);
* poison entries (undecodable, wrong schema, fingerprint, shape, dtype, NaN/Inf, oversized,
  missing fields, or failing ``max_deliveries`` times) go to the dead-letter stream with their
  reason and a counter; the loop never dies on a message.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from monitor.audit.records import sample_fields
from monitor.drift.concepts import parse_concept
from monitor.errors import AuditError, ConfigError, LayerwatchError, TransportError, WireFormatError
from monitor.lenses.readings import BankOutput, split_batch
from monitor.lenses.runtime import read_with_context
from monitor.metrics import TAP_DROP_REASONS, SidecarMetrics, observe_many
from monitor.narratives import Narrative, default_decoder, narratives_for_batch, tokenizer_decoder
from monitor.sidecar.config import SidecarSettings
from monitor.sidecar.ledger import MemoryLedger, RedisLedger
from monitor.transport import Entry, Transport, open_transport
from monitor.wire import DECODE_REASONS, Sample, decode

log = logging.getLogger("layerwatch.sidecar")


class LensReader(Protocol):
    """What the sidecar needs from a lens bank (ONNX bank or the PyTorch logit lens)."""

    layers: tuple[int, ...]
    hidden_size: int
    fingerprint: str
    bundle_id: str
    provider: str
    probe_labels: dict[str, tuple[str, ...]]

    def read_arrays(self, hidden: np.ndarray) -> BankOutput: ...


class AuditSink(Protocol):
    """What the sidecar needs from the audit trail."""

    def append(self, kind: str, payload: dict[str, Any]) -> Any: ...

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> Any: ...

    def sync(self) -> Any: ...

    def close(self) -> Any: ...


@dataclass
class BatchResult:
    """What one call to :meth:`Sidecar.process_entries` did."""

    processed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    failed: int = 0
    acked: int = 0


class Sidecar:
    """One sidecar replica. ``run()`` blocks; ``start()`` runs it on a thread; ``stop()`` drains."""

    def __init__(
        self,
        settings: SidecarSettings,
        *,
        bank: LensReader | None = None,
        transport: Transport | None = None,
        audit: AuditSink | None = None,
        tokenizer: Any = None,
        registry: Any = None,
        ledger: Any = None,
        baseline: Any = None,
    ) -> None:
        self.settings = settings
        self.metrics = SidecarMetrics(registry)
        self.registry = self.metrics.registry
        self.bank = bank if bank is not None else self._load_bank()
        self._probe_labels: dict[str, tuple[str, ...]] = dict(self.bank.probe_labels)  # of the last batch
        tok = tokenizer if tokenizer is not None else getattr(self.bank, "tokenizer", None)
        if tok is None and settings.tokenizer is not None:
            tok = load_tokenizer(settings.tokenizer)
        self.decode_token = tokenizer_decoder(tok) if tok is not None else default_decoder
        self.transport = transport or open_transport(
            settings.transport, stream=settings.stream, maxlen=settings.stream_maxlen)
        self.ledger = ledger or (MemoryLedger() if settings.transport.startswith("memory")
                                 else RedisLedger(settings.transport, f"{settings.stream}:ledger:{settings.group}",
                                                  settings.ledger_ttl_s))
        self.audit = audit if audit is not None else self._open_audit()
        # The label is fixed at start-up (series never move): configured, else the bank's model name.
        self.model_label = settings.model_name or getattr(self.bank, "model_name", None) or "unknown"
        self._bank_index: dict[tuple[int, ...], np.ndarray] = {}
        self._series: dict[int, dict[str, Any]] = {}
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_claim = 0.0
        self._last_stats = 0.0
        self.transport_ok = False
        self.audit_ok = True
        self._tap_seen: dict[str, dict[str, Any]] = {}
        self.detector: Any = None
        self.learner: Any = None
        self.processed_total = 0
        self._init_scoring(baseline)
        self._init_series()
        if settings.warm_up and hasattr(self.bank, "warm_up"):
            log.info("lens bank warmed up at every batch size in %.1f s", self.bank.warm_up())
        self._audit_event("sidecar_start", {"consumer": settings.consumer, "group": settings.group})
        self._audit_event("config", {"settings": _redacted_settings(settings)})
        self._audit_event("bundle_loaded", {"bundle_id": self.bank.bundle_id, "provider": self.bank.provider,
                                            "model_fingerprint": self.bank.fingerprint})

    # ------------------------------------------------------------------ construction helpers
    def _load_bank(self) -> LensReader:
        if self.settings.bundle is None:
            raise LayerwatchError("bundle: no lens bundle configured (set LAYERWATCH_BUNDLE or pass bank=)")
        from monitor.lenses import LensBank  # onnxruntime: sidecar side only

        return LensBank.load(self.settings.bundle, threads=self.settings.ort_threads)  # type: ignore[no-any-return]

    def _open_audit(self) -> AuditSink:
        import re

        from monitor.audit.config import AuditConfig
        from monitor.audit.writer import AuditWriter

        fields = self.settings.audit.model_dump()
        if fields["head_store"] == "auto":
            fields["head_store"] = "file" if self.settings.transport.startswith("memory") else self.settings.transport
        writer_id = re.sub(r"[^A-Za-z0-9._-]", "-", self.settings.consumer)[:64].lstrip("._-") or "sidecar"
        return AuditWriter(AuditConfig(writer_id=writer_id, **fields), metrics=self.metrics,  # type: ignore[return-value]
                           model=self.settings.model_name or "")

    def _init_scoring(self, baseline: Any) -> None:
        from monitor.drift.baseline import BaselineLearner

        b = self.settings.baseline
        if baseline is None:
            baseline = self._find_baseline()
        self._check_watch(learning=baseline is None)
        if baseline is not None:
            self.detector = self._new_detector(baseline, b.watch)
            self.metrics.baseline_info.labels(self.model_label, baseline.id).set(1)
            self.metrics.baseline_learning.labels(self.model_label).set(0)
        else:
            self.learner = BaselineLearner(b.learn_samples, model=self.model_label,
                                           model_fingerprint=self.bank.fingerprint, bundle_id=self.bank.bundle_id)
            self.metrics.baseline_learning.labels(self.model_label).set(1)

    def _check_watch(self, learning: bool) -> None:
        """Watched concepts must be labels of this bundle's probes, and a learned baseline must
        calibrate enough samples to flag anything with them: refused at start-up, not later."""
        from monitor.drift.baseline import fit_calibration_split
        from monitor.drift.concepts import concept_name, min_calibration

        b = self.settings.baseline
        if not b.watch:
            return
        labels = {**dict(self.bank.probe_labels), **dict(getattr(self.bank, "context_probe_labels", {}))}
        known = {concept_name(p, lab) for p, labs in labels.items() for lab in labs}
        for w in b.watch:
            if concept_name(*parse_concept(w)) not in known:
                raise ConfigError(f"baseline.watch: {w!r} is not a probe label of bundle {self.bank.bundle_id} "
                                  f"(have {sorted(known)[:12]}{' ...' if len(known) > 12 else ''})")
        if learning:
            n_cal = fit_calibration_split(b.learn_samples)[1].size
            need = min_calibration(len(b.watch), b.alpha)
            if n_cal < need:
                raise ConfigError(
                    f"baseline.learn_samples: a learned baseline of {b.learn_samples} samples calibrates "
                    f"{n_cal}; watching {len(b.watch)} concept(s) at alpha={b.alpha} needs {need} (set "
                    f"learn_samples to at least {int(np.ceil(need / 0.3))}, or watch fewer concepts)")

    def _find_baseline(self) -> Any:
        b = self.settings.baseline
        if b.file is not None:
            from monitor.drift.baseline import Baseline

            return Baseline.loads(b.file.read_text())
        if self.settings.transport.startswith("memory"):
            return None
        try:
            from monitor.drift.store import BaselineStore

            store = BaselineStore(self.model_label, redis_url=self.settings.transport)
            return store.load(b.id) if b.id else store.active()
        except LayerwatchError as exc:
            log.warning("no baseline loaded from Redis: %s", exc)
            return None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Sidecar:
        """Run the loop on a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="layerwatch-sidecar", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stop reading, finish the batch in hand, flush the audit trail, ack; True if drained."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout or self.settings.shutdown_timeout_s)
            return not self._thread.is_alive()
        return True

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop gracefully (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())

    def run(self) -> None:
        """Consume until stopped. Never raises on a bad message or a transient outage."""
        try:
            self.transport.ensure_group(self.settings.group)
            self.transport_ok = True
        except TransportError as exc:
            log.warning("transport not reachable at start-up: %s", exc)
        while not self._stop.is_set():
            try:
                self.step()
            except TransportError as exc:
                self.transport_ok = False
                log.warning("transport error: %s", exc)
                self._stop.wait(0.5)
                try:
                    self.transport.ensure_group(self.settings.group)
                except TransportError:
                    pass
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("unexpected error in the sidecar loop")
                self._stop.wait(0.2)
        self._shutdown()

    def _shutdown(self) -> None:
        self._audit_event("sidecar_stop", {"consumer": self.settings.consumer, "processed": self.processed_total})
        try:
            self.audit.sync()
            self.audit.close()
        except Exception:  # noqa: BLE001
            log.exception("audit close failed")

    # ------------------------------------------------------------------ one iteration
    def step(self) -> BatchResult:
        """Reclaim stale entries if due, read one micro-batch, process it, refresh stats."""
        s = self.settings
        now = time.monotonic()
        entries: list[Entry] = []
        if now - self._last_claim >= s.claim_interval_s:
            self._last_claim = now
            entries = self.transport.claim_stale(s.group, s.consumer, s.claim_idle_ms, s.batch_max)
        if len(entries) < s.batch_max:
            entries += self.transport.read(s.group, s.consumer, s.batch_max - len(entries),
                                           block_ms=0 if entries else 500)
        self.transport_ok = True
        deadline = time.monotonic() + s.batch_wait_ms / 1000.0
        while entries and len(entries) < s.batch_max and not self._stop.is_set():
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                break
            more = self.transport.read(s.group, s.consumer, s.batch_max - len(entries), block_ms=left)
            if not more:
                break
            entries += more
        result = self.process_entries(entries) if entries else BatchResult()
        if time.monotonic() - self._last_stats >= s.stats_interval_s:
            self.refresh_stats()
        return result

    def refresh_stats(self) -> None:
        """Export lag, pending and trimmed counts from the transport."""
        self._last_stats = time.monotonic()
        st = self.transport.stats(self.settings.group)
        m = self.model_label
        self.metrics.consumer_lag.labels(m).set(st.lag)
        self.metrics.consumer_pending.labels(m).set(st.pending)
        trimmed = self.metrics.stream_drops.labels(m, "trimmed")
        seen = trimmed._value.get()  # counters only go up: add the difference
        if st.trimmed > seen:
            trimmed.inc(st.trimmed - seen)

    def _dead_letter(self, entry: Entry, reason: str, detail: str) -> None:
        self.transport.dead_letter(entry, reason, detail)
        self.metrics.dead_letters.labels(self.model_label, reason).inc()

    def process_entries(self, entries: Sequence[Entry]) -> BatchResult:
        """Process delivered entries end to end; ack exactly those that are safely done."""
        t0 = time.monotonic()
        res = BatchResult()
        s = self.settings
        to_ack: list[str] = []
        good: list[tuple[Entry, Sample]] = []
        for e in entries:
            try:
                sample = decode(e.data, max_bytes=s.max_payload_bytes, expected_fingerprint=self.bank.fingerprint,
                                expected_hidden_size=self.bank.hidden_size)
                self._layer_index(sample.layers)
            except WireFormatError as exc:
                self._dead_letter(e, exc.reason, str(exc))
                to_ack.append(e.id)
                res.dead_lettered += 1
                continue
            good.append((e, sample))
        if good:
            seen = self.ledger.seen(smp.sample_id for _, smp in good)
            unique: list[tuple[Entry, Sample]] = []
            for e, smp in good:  # already audited, or a second copy inside this very batch
                if smp.sample_id in seen:
                    res.duplicates += 1
                    to_ack.append(e.id)
                else:
                    seen.add(smp.sample_id)
                    unique.append((e, smp))
            if res.duplicates:
                self.metrics.samples_duplicate.labels(self.model_label).inc(res.duplicates)
            good = unique
        if good:
            done, failed = self._process_isolating(good, res)
            to_ack += done
            res.failed = failed
        if to_ack:
            res.acked = self.transport.ack(s.group, to_ack)
        if good and not res.failed:
            self.metrics.processing_latency.labels(self.model_label).observe(time.monotonic() - t0)
            self.metrics.batch_size.labels(self.model_label).observe(len(good))
        return res

    def _process_isolating(self, good: list[tuple[Entry, Sample]], res: BatchResult) -> tuple[list[str], int]:
        """Process a batch; if it fails, find the poison sample by processing one at a time.

        Infrastructure failures (audit trail, transport) leave the entries pending for redelivery;
        a sample that fails on its own (the lens bank or the detector cannot handle it) is
        dead-lettered as ``processing_error`` so it cannot block the stream forever.
        """
        try:
            self._explain_score_audit(good)
        except (AuditError, OSError, TransportError):
            self.audit_ok = False
            self.metrics.audit_write_errors.labels(self.model_label).inc()
            log.exception("audit/transport failure on a batch of %d; left pending for redelivery", len(good))
            return [], len(good)
        except Exception:  # noqa: BLE001
            if len(good) == 1:
                e, smp = good[0]
                log.exception("sample %s cannot be processed; dead-lettered", smp.sample_id)
                self._dead_letter(e, "processing_error", "the lens bank or detector failed on this sample")
                res.dead_lettered += 1
                return [e.id], 0
            done: list[str] = []
            failed = 0
            for item in good:
                d, f = self._process_isolating([item], res)
                done += d
                failed += f
            return done, failed
        self.audit_ok = True
        res.processed += len(good)
        return [e.id for e, _ in good], 0

    def _layer_index(self, layers: tuple[int, ...]) -> np.ndarray:
        """Positions of the bank's layers inside a sample's layers (shape_mismatch if missing)."""
        idx = self._bank_index.get(layers)
        if idx is None:
            pos = {layer: i for i, layer in enumerate(layers)}
            missing = [layer for layer in self.bank.layers if layer not in pos]
            if missing:
                raise WireFormatError("shape_mismatch", f"sample lacks layers {missing} the lens bank reads")
            idx = self._bank_index[layers] = np.array([pos[layer] for layer in self.bank.layers])
        return idx

    def _explain_score_audit(self, good: list[tuple[Entry, Sample]]) -> None:
        # The narrative reads the last captured position (for "mean": the mean vector); with
        # positions "last+mean" the probes also read the prompt mean (index 0) as context.
        hidden = np.stack([smp.hidden[self._layer_index(smp.layers), -1, :] for _, smp in good])
        context = None
        if all(smp.positions == "last+mean" for _, smp in good):
            context = np.stack([smp.hidden[self._layer_index(smp.layers), 0, :] for _, smp in good])
        out, labels = read_with_context(self.bank, hidden, context)
        self._probe_labels = labels
        readings = split_batch(out, labels)
        narratives = narratives_for_batch(out, readings, [(smp.sample_id, smp.request_id, smp.model) for _, smp in good],
                                          decode=self.decode_token, metadata=[smp.metadata for _, smp in good])
        scores, events = self._score(out, narratives)
        records: list[tuple[str, dict[str, Any]]] = []
        for (e, smp), nar, sc in zip(good, narratives, scores, strict=True):
            payload = sample_fields(
                sample_id=smp.sample_id, request_id=smp.request_id, model=smp.model,
                model_fingerprint=smp.model_fingerprint, bundle_id=self.bank.bundle_id,
                baseline_id=self.detector.baseline.id if self.detector is not None else None,
                narrative=nar.to_dict(), score=sc["score"], flags=sc["flags"], redelivered=e.deliveries > 1,
            )
            payload.update({"metadata": smp.metadata, "captured_at": smp.created_at, "positions": smp.positions})
            records.append(("sample", payload))
        for ev in events:  # the event's own "kind" (raised/cleared) is the record kind's suffix
            fields = {k: v for k, v in ev.to_dict().items() if k != "kind"}
            records.append((f"drift_alert_{ev.kind}", {"model": self.model_label, **fields}))
        self.audit.append_many(records)  # one write + one fsync per micro-batch
        self.audit.sync()  # durable before the ledger mark and the ack
        self.ledger.mark(smp.sample_id for _, smp in good)
        now = time.time()
        for (_, smp), nar, sc in zip(good, narratives, scores, strict=True):
            self.metrics.end_to_end_latency.labels(self.model_label).observe(max(0.0, now - smp.created_at))
            self._remember(nar, sc)
            self._fleet(smp)
        self._layer_metrics(out, narratives)
        self.processed_total += len(good)
        self.metrics.samples_processed.labels(self.model_label).inc(len(good))

    def _init_series(self) -> None:
        """Create every bounded-label series at start-up (0 for counters), so the first event
        is visible to ``increase()`` and dashboards show zeros instead of "no data"."""
        m, lab = self.metrics, self.model_label
        m.lens_provider.labels(lab, self.bank.provider).set(1)
        m.lens_bundle_info.labels(lab, self.bank.bundle_id).set(1)
        m.anomaly_expected_fpr.labels(lab).set(self.settings.baseline.alpha)
        m.stream_maxlen.labels(lab).set(self.settings.stream_maxlen)
        m.baseline_learning.labels(lab).set(1 if self.learner is not None else 0)
        m.baseline_learning_samples.labels(lab).set(self.learner.collected if self.learner is not None else 0)
        for reason in (*DECODE_REASONS, "processing_error"):
            m.dead_letters.labels(lab, reason)
        for concept in self.settings.baseline.watch:
            m.watched_concepts.labels(lab, "=".join(parse_concept(concept)))
        for reason in _TAP_REASONS:
            m.fleet_tap_drops.labels(lab, reason)
        m.stream_drops.labels(lab, "trimmed")
        for c in (m.audit_write_errors, m.samples_processed, m.samples_duplicate, m.anomalies, m.drift_alerts,
                  m.fleet_tap_sampled):
            c.labels(lab)
        m.drift_alert_active.labels(lab).set(1 if self.detector is not None and self.detector.alert["active"] else 0)

    def _score(self, out: BankOutput, narratives: list[Narrative]) -> tuple[list[dict[str, Any]], list[Any]]:
        from monitor.drift.detector import as_arrays, publish

        depth = np.array([n.prediction_depth for n in narratives])
        arrays = as_arrays(out, self._probe_labels, depth)
        learned: list[dict[str, Any]] = []
        if self.detector is None:
            taken = self.learner.add(arrays)
            self.metrics.baseline_learning_samples.labels(self.model_label).set(self.learner.collected)
            learned = [{"score": None, "flags": [], "learning": True} for _ in range(taken)]
            if not self.learner.done:
                return learned, []
            self._promote_learned()
            if taken == arrays.n:
                return learned, []
            # the samples of this batch past the learning target are scored by the new baseline
            arrays = arrays.subset(slice(taken, None))
        update = self.detector.process(arrays)
        publish(self.metrics, self.model_label, update)
        scored = [{"score": s.to_dict(), "flags": [f.to_dict() for f in s.flags]} for s in update.scores]
        return learned + scored, update.events

    def _promote_learned(self) -> None:
        baseline = self.learner.build()
        detector = self._learned_detector(baseline)
        if not self.settings.transport.startswith("memory"):
            try:
                from monitor.drift.store import BaselineStore

                store = BaselineStore(self.model_label, redis_url=self.settings.transport)
                store.save(baseline)
                store.promote(baseline.id)
            except LayerwatchError as exc:
                log.warning("learned baseline not stored in Redis: %s", exc)
        self.detector = detector
        self.learner = None
        self.metrics.baseline_learning.labels(self.model_label).set(0)
        self.metrics.baseline_info.labels(self.model_label, baseline.id).set(1)
        self.audit.append("baseline_promoted", {"baseline_id": baseline.id, "source": "learned from live traffic",
                                                "samples": baseline.n_samples if hasattr(baseline, "n_samples") else None})

    def _learned_detector(self, baseline: Any) -> Any:
        """The detector for a baseline just learned. Whether the watch list fits it depends on
        what the taps sent (a '<probe>@mean' concept needs positions "last+mean"), which start-up
        cannot know: a list that does not fit is dropped with an error in the log and the audit
        trail, so the sidecar scores without it rather than failing every batch from now on."""
        from monitor.errors import BaselineError

        b = self.settings.baseline
        try:
            return self._new_detector(baseline, b.watch)
        except BaselineError as exc:
            if not b.watch:
                raise
            log.error("baseline.watch %s does not fit the learned baseline %s, scoring without watched concepts: %s",
                      b.watch, baseline.id, exc)
            self._audit_event("watch_refused", {"baseline_id": baseline.id, "watch": list(b.watch), "reason": str(exc)})
            return self._new_detector(baseline, ())

    def _new_detector(self, baseline: Any, watch: Sequence[str]) -> Any:
        from monitor.drift.detector import DriftDetector

        b = self.settings.baseline
        return DriftDetector(baseline, alpha=b.alpha, window=b.window, step=max(1, b.window // 4),
                             bundle_id=self.bank.bundle_id, model_fingerprint=self.bank.fingerprint, watch=watch)

    def _audit_event(self, kind: str, payload: dict[str, Any]) -> None:
        try:
            self.audit.append(kind, payload)
            self.audit.sync()
        except Exception:  # noqa: BLE001 - an event record must not take the sidecar down
            self.metrics.audit_write_errors.labels(self.model_label).inc()
            log.exception("audit event %s not written", kind)

    # ------------------------------------------------------------------ metrics and caches
    def _layer_metrics(self, out: BankOutput, narratives: list[Narrative]) -> None:
        """Per-layer metrics of a batch: histograms observed per layer in one vectorised step,
        probe label counts from one argmax per probe (series handles cached)."""
        m, mm = self.model_label, self.metrics
        n = out.batch_size
        agree = (out.topk_ids[:, :, 0] == out.final_topk_ids[:, None, 0]).sum(axis=0).tolist()
        ent, kl = out.entropy, out.kl_to_final
        winners = {probe: probs.argmax(-1) for probe, probs in out.probes.items()}  # [B, L]
        for i, layer in enumerate(out.layers):
            s = self._layer_series(layer)
            observe_many(s["entropy"], ent[:, i])
            observe_many(s["kl"], kl[:, i])
            s["samples"].inc(n)
            if agree[i]:
                s["agree"].inc(agree[i])
            for probe, w in winners.items():
                names = self._probe_labels.get(probe, ())
                for c, count in zip(*np.unique(w[:, i], return_counts=True), strict=True):
                    label = names[c] if c < len(names) else str(c)
                    mm.probe_labels.labels(m, str(layer), probe, label).inc(int(count))
        observe_many(mm.prediction_depth.labels(m), [nar.prediction_depth for nar in narratives])

    def _layer_series(self, layer: int) -> dict[str, Any]:
        s = self._series.get(layer)
        if s is None:
            m, mm, lab = self.model_label, self.metrics, str(layer)
            s = self._series[layer] = {"entropy": mm.layer_entropy.labels(m, lab), "kl": mm.layer_kl.labels(m, lab),
                                       "samples": mm.layer_samples.labels(m, lab),
                                       "agree": mm.layer_top1_agree.labels(m, lab)}
        return s

    def _remember(self, nar: Narrative, score: dict[str, Any]) -> None:
        if self.settings.recent_narratives <= 0:
            return
        item = {"sample_id": nar.sample_id, "request_id": nar.request_id, "model": nar.model,
                "narrative": nar.to_dict(), "text": nar.render(), **score}
        with self._recent_lock:
            self.recent[nar.sample_id] = item
            while len(self.recent) > self.settings.recent_narratives:
                self.recent.popitem(last=False)

    def narrative(self, sample_id: str) -> dict[str, Any] | None:
        with self._recent_lock:
            return self.recent.get(sample_id)

    def _fleet(self, smp: Sample) -> None:
        """Tap counters ride in headers: add each tap instance's increase to fleet totals."""
        tap = smp.tap
        inst = tap.get("instance")
        if not isinstance(inst, str):
            return
        prev = self._tap_seen.get(inst, {"sampled": 0, "drops": {}})
        sampled = tap.get("sampled")
        if isinstance(sampled, int) and sampled > prev["sampled"]:
            self.metrics.fleet_tap_sampled.labels(self.model_label).inc(sampled - prev["sampled"])
        raw_drops = tap.get("drops")
        drops: dict[str, Any] = raw_drops if isinstance(raw_drops, dict) else {}
        for reason, n in drops.items():
            before = prev["drops"].get(reason, 0)
            if isinstance(n, int) and n > before and reason in _TAP_REASONS:
                self.metrics.fleet_tap_drops.labels(self.model_label, reason).inc(n - before)
        if len(self._tap_seen) > 10_000:  # bounded: forget the oldest instances
            self._tap_seen.pop(next(iter(self._tap_seen)))
        self._tap_seen[inst] = {"sampled": max(prev["sampled"], sampled if isinstance(sampled, int) else 0),
                                "drops": {**prev["drops"], **{k: v for k, v in drops.items() if isinstance(v, int)}}}

    # ------------------------------------------------------------------ health
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details) for /readyz: bundle loaded, transport connected, baseline loaded or learning."""
        connected = self.transport.ping()
        self.transport_ok = connected
        baseline: dict[str, Any]
        if self.detector is not None:
            baseline = {"state": "loaded", "id": self.detector.baseline.id, "alert": self.detector.alert}
        else:
            baseline = {"state": "learning", "collected": self.learner.collected, "target": self.learner.target}
        details = {"bundle": {"id": self.bank.bundle_id, "provider": self.bank.provider},
                   "transport": {"url": _strip_password(self.settings.transport), "connected": connected},
                   "baseline": baseline, "audit": {"ok": self.audit_ok}}
        return connected and self.audit_ok, details


_TAP_REASONS = frozenset(TAP_DROP_REASONS)


def load_tokenizer(path: Any) -> Any:
    """A tokenizer for printing tokens in narratives, from a Hugging Face tokenizer directory.

    ``tokenizer.json`` is read with the ``tokenizers`` library (Rust, no torch): the sidecar stays
    free of torch and transformers, which would add ~250 MB of RSS for decoding token ids. A
    directory without ``tokenizer.json`` (slow tokenizers only) falls back to transformers."""
    from pathlib import Path

    p = Path(path)
    try:
        if (p / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(p / "tokenizer.json"))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:  # noqa: BLE001 - tokenizers/transformers raise many types
        raise LayerwatchError(f"tokenizer: cannot load a tokenizer from {p}: {exc}") from exc


def _strip_password(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _redacted_settings(settings: SidecarSettings) -> dict[str, Any]:
    d = settings.model_dump(mode="json")  # SecretBytes dump as "**********"
    d["transport"] = _strip_password(d["transport"])
    return d
