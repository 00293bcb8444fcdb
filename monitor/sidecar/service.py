"""The sidecar's consumer loop: micro-batch -> pipeline -> audit -> ack.

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

Collaborators come from the composition root (:mod:`monitor.sidecar.bootstrap`); the work on
good samples is the shared pipeline stage (:mod:`monitor.sidecar.batch`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from monitor.errors import AuditError, TransportError, WireFormatError
from monitor.sidecar.batch import BatchProcessor
from monitor.sidecar.bootstrap import SidecarParts, build_parts
from monitor.sidecar.config import SidecarSettings
from monitor.sidecar.recorder import BatchStats
from monitor.transport import Entry
from monitor.urls import strip_credentials
from monitor.wire import Sample, decode

log = logging.getLogger("layerwatch.sidecar")

BatchResult = BatchStats  # the former name of what process_entries returns


class Sidecar:
    """One sidecar replica. ``run()`` blocks; ``start()`` runs it on a thread; ``stop()`` drains.

    ``Sidecar(parts)`` takes collaborators built by :func:`~monitor.sidecar.bootstrap.build_parts`;
    ``Sidecar(settings, bank=..., ...)`` builds them itself (the keywords are build_parts')."""

    def __init__(self, settings: SidecarSettings | SidecarParts, **overrides: Any) -> None:
        parts = settings if isinstance(settings, SidecarParts) else build_parts(settings, **overrides)
        self.parts = parts
        self.settings = parts.settings
        self.bank, self.transport, self.ledger, self.audit = parts.bank, parts.transport, parts.ledger, parts.audit
        self.model_label, self.recorder, self.recent = parts.model_label, parts.recorder, parts.recent
        self.registry = parts.metrics.registry
        self.processor = BatchProcessor(parts)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_claim = 0.0
        self._last_stats = 0.0
        self.transport_ok = False
        self.processor.start()

    # --- state the HTTP endpoints and tests read ------------------------------------------------
    @property
    def detector(self) -> Any:
        """The drift detector in use (None while learning a baseline)."""
        return self.parts.scoring.detector

    @property
    def learner(self) -> Any:
        """The baseline being learned (None once one is in use)."""
        return self.parts.scoring.learner

    @property
    def processed_total(self) -> int:
        """Samples explained, scored and audited by this replica."""
        return self.processor.processed_total

    @property
    def running(self) -> bool:
        """True while the loop's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def narrative(self, sample_id: str) -> dict[str, Any] | None:
        """A recent narrative by sample id (None when unknown or forgotten)."""
        return self.recent.get(sample_id)

    # --- lifecycle --------------------------------------------------------------------------------
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
        self._ensure_group(log_failure=True)
        while not self._stop.is_set():
            try:
                self.step()
            except TransportError as exc:
                self.transport_ok = False
                log.warning("transport error: %s", exc)
                self._stop.wait(0.5)
                self._ensure_group()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("unexpected error in the sidecar loop")
                self._stop.wait(0.2)
        self.processor.shutdown()

    def _ensure_group(self, log_failure: bool = False) -> None:
        try:
            self.transport.ensure_group(self.settings.group)
            self.transport_ok = True
        except TransportError as exc:
            if log_failure:
                log.warning("transport not reachable at start-up: %s", exc)

    # --- one iteration ----------------------------------------------------------------------------
    def step(self) -> BatchStats:
        """Reclaim stale entries if due, read one micro-batch, process it, refresh stats."""
        s = self.settings
        entries: list[Entry] = []
        if time.monotonic() - self._last_claim >= s.claim_interval_s:
            self._last_claim = time.monotonic()
            entries = self.transport.claim_stale(s.group, s.consumer, s.claim_idle_ms, s.batch_max)
        if len(entries) < s.batch_max:
            entries += self.transport.read(s.group, s.consumer, s.batch_max - len(entries),
                                           block_ms=0 if entries else 500)
        self.transport_ok = True
        deadline = time.monotonic() + s.batch_wait_ms / 1000.0
        while entries and len(entries) < s.batch_max and not self._stop.is_set():
            left = int((deadline - time.monotonic()) * 1000)
            more = self.transport.read(s.group, s.consumer, s.batch_max - len(entries), block_ms=left) if left > 0 else []
            if not more:
                break
            entries += more
        result = self.process_entries(entries) if entries else BatchStats()
        if time.monotonic() - self._last_stats >= s.stats_interval_s:
            self.refresh_stats()
        return result

    def refresh_stats(self) -> None:
        """Read lag, pending and trimmed counts from the transport."""
        self._last_stats = time.monotonic()
        self.recorder.stream(self.transport.stats(self.settings.group))

    def process_entries(self, entries: Sequence[Entry]) -> BatchStats:
        """Process delivered entries end to end; ack exactly those that are safely done."""
        res = BatchStats()
        to_ack: list[str] = []
        good: list[tuple[Entry, Sample]] = []
        for e in entries:
            try:
                good.append((e, self._decode(e)))
            except WireFormatError as exc:
                self._dead_letter(e, exc.reason, str(exc), res)
                to_ack.append(e.id)
        seen = self.ledger.seen(smp.sample_id for _, smp in good) if good else set()
        unique: list[tuple[Entry, Sample]] = []
        for e, smp in good:  # already audited, or a second copy inside this very batch
            if smp.sample_id in seen:
                res.duplicates += 1
                to_ack.append(e.id)
            else:
                seen.add(smp.sample_id)
                unique.append((e, smp))
        res.unique = len(unique)
        if unique:
            to_ack += self._process_isolating(unique, res)
        if to_ack:
            res.acked = self.transport.ack(self.settings.group, to_ack)
        self.recorder.batch(res)
        return res

    def _decode(self, e: Entry) -> Sample:
        sample = decode(e.data, max_bytes=self.settings.max_payload_bytes,
                        expected_fingerprint=self.bank.fingerprint, expected_hidden_size=self.bank.hidden_size)
        self.processor.layer_index(sample.layers)  # shape_mismatch when it lacks a bank layer
        return sample

    def _dead_letter(self, entry: Entry, reason: str, detail: str, res: BatchStats) -> None:
        self.transport.dead_letter(entry, reason, detail)
        self.recorder.dead_letter(reason)
        res.dead_letters[reason] += 1

    def _process_isolating(self, good: list[tuple[Entry, Sample]], res: BatchStats) -> list[str]:
        """Process a batch; if it fails, find the poison sample by processing one at a time.

        Infrastructure failures (audit trail, transport) leave the entries pending for redelivery;
        a sample that fails on its own (the lens bank or the detector cannot handle it) is
        dead-lettered as ``processing_error`` so it cannot block the stream forever.
        """
        try:
            res.capture_times += self.processor.process(good)
        except (AuditError, OSError, TransportError):
            self.processor.audit_failed()
            log.exception("audit/transport failure on a batch of %d; left pending for redelivery", len(good))
            res.failed += len(good)
            return []
        except Exception:  # noqa: BLE001
            if len(good) > 1:
                return [i for item in good for i in self._process_isolating([item], res)]
            e, smp = good[0]
            log.exception("sample %s cannot be processed; dead-lettered", smp.sample_id)
            self._dead_letter(e, "processing_error", "the lens bank or detector failed on this sample", res)
            return [e.id]
        res.processed += len(good)
        return [e.id for e, _ in good]

    # --- health -----------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details) for /readyz: bundle loaded, transport connected, baseline loaded or learning."""
        connected = self.transport.ping()
        self.transport_ok = connected
        details = {"bundle": {"id": self.bank.bundle_id, "provider": self.bank.provider},
                   "transport": {"url": strip_credentials(self.settings.transport), "connected": connected},
                   "baseline": self.parts.scoring.state(), "audit": {"ok": self.processor.audit_ok}}
        return connected and self.processor.audit_ok, details

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """(live, details) for /healthz: False once the audit trail has refused writes for longer
        than ``audit.unhealthy_after_s`` (it recovers by itself when the disk does; if it has not by
        then, a restart is the orchestrator's remedy), or when the consumer loop has died."""
        health = getattr(self.audit, "health", None)
        full: dict[str, Any] = health() if health is not None else {"live": True}
        audit = {k: full.get(k) for k in ("live", "writable", "failing_for_s", "fsync_running_s")}  # no paths: see the log
        loop_dead = self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()
        return bool(audit["live"]) and not loop_dead, {"audit": audit, "loop": "dead" if loop_dead else "ok"}
