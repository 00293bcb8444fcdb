"""The sidecar's consumer loop: micro-batch -> pipeline -> audit -> ack.

Delivery guarantees (Redis Streams consumer group shared by all replicas):

* each entry goes to one replica; it is acknowledged only after the fsync that covers its audit
  record, so a replica killed at any point leaves its entries pending, and another replica (or
  the restarted one) reclaims them with XAUTOCLAIM after ``claim_idle_ms``;
* a shared ledger in Redis keeps a re-delivered sample from being audited twice; the only
  duplicate possible is a replica dying between fsync and ledger mark, and that copy carries
  ``redelivered: true`` (the review tools deduplicate by sample id); another entry reusing an
  audited id with other bytes is dead-lettered as ``duplicate_id``;
* poison isolation: whatever a message makes fail, and however (a wire format error at decode,
  any exception in the lens bank, the detector or the audit writer's rendering of its record),
  ends with that message dead-lettered with a reason at its first delivery: a failing batch is
  split in halves until the failing sample is alone, and its good samples are audited once;
* infrastructure failures (Redis, the disk: :func:`is_infrastructure`) dead-letter nothing: the
  batch is kept in hand and retried in place with a back-off (``touch`` keeps it pending with
  this replica without counting a delivery) while ``/readyz`` says not ready;
* ``max_deliveries``: an entry Redis has delivered more often than that (its replicas kept dying
  while holding it, e.g. a crash in native code) is dead-lettered unread as ``max_deliveries``;
  stale entries are reclaimed and processed one at a time, so such a message counts its
  deliveries alone instead of taking its batch-mates with it;
* reads are bounded: at most ``batch_max`` entries, and a payload over ``max_payload_bytes``
  never leaves Redis (dead-lettered as ``oversized`` by its size).

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

from monitor.backends.ledger import payload_digest
from monitor.errors import (
    AuditError,
    AuditLockedError,
    AuditWriteError,
    TransportError,
    WireFormatError,
    WireTooLarge,
)
from monitor.sidecar.batch import BatchProcessor
from monitor.sidecar.bootstrap import SidecarParts, build_parts
from monitor.sidecar.config import SidecarSettings
from monitor.sidecar.recorder import BatchStats
from monitor.transport import Entry
from monitor.urls import strip_credentials
from monitor.wire import Sample, decode

log = logging.getLogger("layerwatch.sidecar")

BatchResult = BatchStats  # the former name of what process_entries returns
RETRY_MAX_S = 5.0  # longest back-off between in-place retries of a batch after an infrastructure failure


def is_infrastructure(exc: BaseException) -> bool:
    """True for failures of what the sidecar runs on (Redis, the disk, the trail's lock), which
    leave entries pending; False for failures a message causes, which dead-letter it. An
    AuditError raised while rendering a record (ValueError/TypeError underneath: a value JSON
    cannot hold) is the message's; any other AuditError is the trail's."""
    if isinstance(exc, (TransportError, OSError, AuditWriteError, AuditLockedError)):
        return True
    return isinstance(exc, AuditError) and not isinstance(exc.__cause__, (ValueError, TypeError))


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
        self._held: list[Entry] = []  # kept after an infrastructure failure, retried in place
        self._retry_at = 0.0
        self._retry_delay = 0.0
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
        """Retry a held batch, or reclaim stale entries if due and read one micro-batch; process
        it; refresh stats."""
        s = self.settings
        if self._held:
            result = self._retry_held()
        else:
            result = self._read_and_process()
        if time.monotonic() - self._last_stats >= s.stats_interval_s:
            self.refresh_stats()
        return result

    def _read_and_process(self) -> BatchStats:
        s, limit = self.settings, self.settings.max_payload_bytes
        if time.monotonic() - self._last_claim >= s.claim_interval_s:
            self._last_claim = time.monotonic()
            reclaimed = self._reclaim()
            if reclaimed is not None:
                return reclaimed
        entries = self.transport.read(s.group, s.consumer, s.batch_max, block_ms=500, max_entry_bytes=limit)
        self.transport_ok = True
        deadline = time.monotonic() + s.batch_wait_ms / 1000.0
        while entries and len(entries) < s.batch_max and not self._stop.is_set():
            left = int((deadline - time.monotonic()) * 1000)
            more = (self.transport.read(s.group, s.consumer, s.batch_max - len(entries), block_ms=left,
                                        max_entry_bytes=limit) if left > 0 else [])
            if not more:
                break
            entries += more
        return self._process_all(entries) if entries else BatchStats()

    def _reclaim(self) -> BatchStats | None:
        """Take over stale entries one at a time, each processed before the next is claimed
        (XAUTOCLAIM counts a delivery for every entry it claims: claimed together, a message that
        kills its replica would take its batch-mates to max_deliveries with it). None if none."""
        s, total, n = self.settings, BatchStats(), 0
        while n < s.batch_max and not self._held and not self._stop.is_set():
            got = self.transport.claim_stale(s.group, s.consumer, s.claim_idle_ms, 1, s.max_payload_bytes)
            if not got:
                break
            n += 1
            total.add(self._process_all(got))
        return total if n else None

    def _retry_held(self) -> BatchStats:
        """Process the held batch again once its back-off has passed (keeping it pending here)."""
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            self._stop.wait(min(wait, 0.5))
            return BatchStats()
        entries, self._held = self._held, []
        try:
            self.transport.touch(self.settings.group, self.settings.consumer, [e.id for e in entries])
        except TransportError:
            self._hold(entries)
            raise
        return self._process_all(entries)

    def _process_all(self, entries: Sequence[Entry]) -> BatchStats:
        """Entries delivered before (their replica died holding them) one at a time, so a message
        that kills its replica takes no batch-mate towards max_deliveries; the rest as one batch.
        After an infrastructure failure, whatever is left is held with the failed part."""
        again = [[e] for e in entries if e.deliveries > 1]
        fresh = [e for e in entries if e.deliveries <= 1]
        groups = again + ([fresh] if fresh else [])
        total = BatchStats()
        for i, group in enumerate(groups):
            total.add(self.process_entries(group))
            if self._held:
                self._held += [e for rest in groups[i + 1:] for e in rest]
                break
        return total

    def _hold(self, entries: Sequence[Entry]) -> None:
        self._held = list(entries)
        # touched at every retry, so retrying within half of claim_idle_ms keeps other replicas off
        longest = min(RETRY_MAX_S, self.settings.claim_idle_ms / 2000.0)
        self._retry_delay = min(longest, max(0.05, self._retry_delay * 2))
        self._retry_at = time.monotonic() + self._retry_delay

    def refresh_stats(self) -> None:
        """Read lag, pending and trimmed counts from the transport."""
        self._last_stats = time.monotonic()
        self.recorder.stream(self.transport.stats(self.settings.group))

    def process_entries(self, entries: Sequence[Entry]) -> BatchStats:
        """Process delivered entries end to end; ack exactly those that are safely done. After an
        infrastructure failure the entries are held and retried in place (nothing dead-lettered)."""
        res = BatchStats()
        try:
            to_ack = self._handle(entries, res)
            if to_ack:
                res.acked = self.transport.ack(self.settings.group, to_ack)
        except Exception as exc:
            if not is_infrastructure(exc):
                raise  # a bug of the loop itself: the entries stay pending, then count deliveries
            if isinstance(exc, TransportError):
                self.transport_ok = False
            else:
                self.processor.audit_failed()
            log.warning("infrastructure failure on a batch of %d entries, kept and retried: %s", len(entries), exc)
            res.failed += len(entries)
            self._hold(entries)
        else:
            self._retry_delay = 0.0
        self.recorder.batch(res)
        return res

    def _handle(self, entries: Sequence[Entry], res: BatchStats) -> list[str]:
        """Dead-letter what cannot be processed, skip duplicates, process the rest; the ids to ack."""
        to_ack: list[str] = []
        decoded: list[tuple[Entry, Sample]] = []
        limit = self.settings.max_deliveries
        for e in entries:
            if e.deliveries > limit:  # its replicas kept dying on it: never read it again
                self._dead_letter(e, "max_deliveries", f"delivered {e.deliveries} times, max_deliveries is {limit}", res)
                to_ack.append(e.id)
                continue
            try:
                decoded.append((e, self._decode(e)))
            except Exception as exc:
                if is_infrastructure(exc):
                    raise
                reason = exc.reason if isinstance(exc, WireFormatError) else "undecodable"
                self._dead_letter(e, reason, str(exc) or type(exc).__name__, res)
                to_ack.append(e.id)
        unique = self._dedupe(decoded, res, to_ack)
        res.unique = len(unique)
        if unique:
            to_ack += self._process_isolating(unique, res)
        return to_ack

    def _dedupe(self, decoded: list[tuple[Entry, Sample]], res: BatchStats, to_ack: list[str]) -> list[tuple[Entry, Sample]]:
        """Samples not audited yet. A copy of an audited sample (same bytes) is acked as a duplicate;
        another entry reusing an audited id with other bytes is dead-lettered as duplicate_id."""
        if not decoded:
            return []
        self.processor.mark_unmarked()
        known = self.ledger.lookup(smp.sample_id for _, smp in decoded)
        unique: list[tuple[Entry, Sample]] = []
        for e, smp in decoded:
            digest, prev = payload_digest(e.data), known.get(smp.sample_id)
            if prev is None:
                known[smp.sample_id] = digest
                unique.append((e, smp))
                continue
            if prev in (digest, ""):
                res.duplicates += 1
            else:
                self._dead_letter(e, "duplicate_id", "another entry with this sample_id and other bytes was audited", res)
            to_ack.append(e.id)
        return unique

    def _decode(self, e: Entry) -> Sample:
        limit = self.settings.max_payload_bytes
        if e.withheld is not None:  # the transport kept it in Redis
            raise WireTooLarge(f"sample is {e.withheld} bytes, limit {limit}")
        sample = decode(e.data, max_bytes=limit, expected_fingerprint=self.bank.fingerprint,
                        expected_hidden_size=self.bank.hidden_size)
        try:
            self.processor.layer_index(sample.layers)
        except WireFormatError as exc:
            raise WireFormatError("unknown_layer", str(exc).split(": ", 1)[-1]) from exc
        return sample

    def _dead_letter(self, entry: Entry, reason: str, detail: str, res: BatchStats) -> None:
        self.transport.dead_letter(entry, reason, detail)
        self.recorder.dead_letter(reason)
        res.dead_letters[reason] += 1

    def _process_isolating(self, good: list[tuple[Entry, Sample]], res: BatchStats) -> list[str]:
        """Process a batch; if a message makes it fail, split it in halves until the failing
        sample is alone and dead-letter it (``processing_error``; ``audit_rejected`` when the audit
        writer refused its record). Infrastructure failures propagate (the batch is held)."""
        try:
            res.capture_times += self.processor.process(good)
        except Exception as exc:
            if is_infrastructure(exc):
                raise
            if len(good) > 1:
                mid = len(good) // 2
                return self._process_isolating(good[:mid], res) + self._process_isolating(good[mid:], res)
            e, smp = good[0]
            reason = "audit_rejected" if isinstance(exc, AuditError) else "processing_error"
            log.warning("sample %r cannot be processed, dead-lettered as %s: %s: %s", smp.sample_id, reason,
                        type(exc).__name__, str(exc)[:200])
            self._dead_letter(e, reason, f"{type(exc).__name__}: {exc}", res)
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
