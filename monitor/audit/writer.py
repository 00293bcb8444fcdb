"""The audit trail writer: one per sidecar replica, one trail folder per writer.

Typical use by the sidecar::

    writer = AuditWriter(AuditConfig(directory=..., writer_id="replica-a", hmac_key_file=...),
                         metrics=sidecar_metrics, model="smollm2")
    writer.append("sidecar_start", {"version": __version__})
    recs = writer.append_many([("sample", sample_fields(sample_id=..., ...)) for ...])
    durable = writer.sync()            # fsync now; then XACK the entries of ``recs``
    writer.append("sidecar_stop", {"reason": "SIGTERM"})
    writer.close()

Threading: every public method takes one lock, so the writer may be shared between threads;
calls are short (a ``write`` per record, an ``fdatasync`` per sync) except where an fsync policy
makes them sync. Durable listeners run on the thread that did the fsync, under the lock: keep
them short (e.g. hand the seq to the thread that acks).

Faults: a failed write or fsync (disk full, I/O error) makes every call raise AuditWriteError
until the writer has recovered, which it tries at every call and every ``recover_interval_s`` on
its own thread: everything past the last durable record is quarantined, the tail is re-verified
and the chain continues in a new segment after a ``write_failed`` recovery record
(:mod:`monitor.audit.recovery`). :meth:`health` says whether it writes, and whether it has been
failing for longer than ``unhealthy_after_s`` (the process should then be restarted).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.audit.config import AuditConfig
from monitor.audit.heads import Head, HeadPublisher, HeadStore, head_loss, head_store_from_spec
from monitor.audit.pipeline import ChainState, SegmentSink, build_logger
from monitor.audit.records import (
    GENESIS_HASH,
    AuditRecord,
    KeyRing,
    RecordKind,
    check_fields,
    check_kind,
    format_ts,
)
from monitor.audit.recovery import WriteFault, load_trusted_head, reverify_durable_tail, writer_health
from monitor.audit.retention import PruneResult, plan_prune
from monitor.audit.segments import (
    TrailLock,
    fsync_dir,
    recover_tail,
    segment_name,
)
from monitor.errors import AuditError, AuditIntegrityError, AuditWriteError

if TYPE_CHECKING:
    from monitor.metrics import SidecarMetrics

log = logging.getLogger(__name__)

_FROM_CONFIG: Any = object()


class AuditWriter:
    """Appends hash-chained, optionally HMAC-signed records to a trail (see module doc)."""

    def __init__(
        self,
        config: AuditConfig,
        *,
        head_store: HeadStore | None = _FROM_CONFIG,
        metrics: SidecarMetrics | None = None,
        model: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (or create) the trail ``config.trail_dir``: take its lock, recover a torn tail,
        start a new segment with a checkpoint record. Raises AuditLockedError when another writer
        holds the trail, AuditIntegrityError when its newest record fails its hash."""
        self.config = config
        self.writer_id = config.writer_id
        self.trail_dir = config.trail_dir
        self._metrics = metrics
        self._model = model
        self._clock = clock
        self._lock = threading.RLock()
        key = config.load_hmac_key()
        self._keys = KeyRing([key]) if key else None
        try:
            self.trail_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditError(f"cannot create the audit trail folder {self.trail_dir}: {exc.strerror or exc}") from exc
        self._trail_lock = TrailLock(self.trail_dir, self.writer_id)
        self._head_store: HeadStore | None = None
        self._stop = threading.Event()
        try:
            if head_store is _FROM_CONFIG:
                head_store = head_store_from_spec(config.head_store, self.trail_dir, key_prefix=config.head_key_prefix)
            self._head_store = head_store
            self._state = ChainState()
            self._sink = SegmentSink(self._state)
            self._log = build_logger(self._sink, self._state, writer_id=self.writer_id,
                                     store_text=config.store_text, keys=self._keys, clock=clock)
            self._durable_seq, self._durable_hash, self._durable_segment, self._durable_size = 0, GENESIS_HASH, "", 0
            self._durable_head: Head | None = None
            self._unsynced = 0
            self._last_sync = clock()
            self._segment_started = clock()
            self._listeners: list[Callable[[int], None]] = []
            self._fault: WriteFault | None = None  # a failed write or fsync, until recovered
            self._sync_since: float | None = None  # time.monotonic() when the running fsync started
            self._closed = False
            self.recoveries: list[dict[str, Any]] = []
            self._publisher = HeadPublisher(head_store, f"audit-head-{self.writer_id}") if head_store else None
            self._open()
        except BaseException:
            self._release(flush=False)
            raise
        self._background = threading.Thread(target=self._background_loop, name=f"audit-{self.writer_id}", daemon=True)
        self._background.start()

    # --- public API ----------------------------------------------------------------------------

    def append(self, kind: str, fields: Mapping[str, Any] | None = None, /) -> AuditRecord:
        """Append one record of ``kind`` (a :class:`RecordKind` value) and return it as written.

        Durable when it returns only with ``fsync="every_record"``; otherwise see :meth:`sync`.
        Raises AuditError for an unknown kind, a reserved field or a value that is not JSON,
        AuditWriteError when the write fails."""
        return self.append_many([(kind, fields or {})])[0]

    def append_many(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[AuditRecord]:
        """Append several records in order with one fsync decision (one fsync for
        ``every_record``). On failure raises AuditWriteError whose ``written`` lists the records of
        this call already in the trail."""
        batch = [(k, check_fields(k, fields)) for k, fields in ((check_kind(k), f) for k, f in items)]
        with self._lock:
            self._check_usable()
            written: list[AuditRecord] = []
            try:
                for kind, fields in batch:
                    self._maybe_rotate()
                    written.append(self._emit(kind, fields))
            except AuditError as exc:
                self._unsynced += len(written)  # not synced here: the caller sees the error and decides
                raise AuditWriteError(str(exc), written) from exc
            self._apply_fsync_policy(len(written))
            return written

    def sync(self) -> int:
        """fsync everything written so far and publish the head; returns the durable seq."""
        with self._lock:
            self._check_usable()
            return self._sync_locked()

    @property
    def durable_seq(self) -> int:
        """The last seq covered by an fsync (0 when none)."""
        return self._durable_seq

    @property
    def last_seq(self) -> int:
        """The last seq written (durable or not)."""
        return self._state.seq

    @property
    def head(self) -> Head | None:
        """The head last published (the last durable record)."""
        return self._durable_head

    @property
    def head_publish_errors(self) -> int:
        """Heads the store did not take (each is logged when publishing starts and stops failing)."""
        return self._publisher.errors if self._publisher is not None else 0

    @property
    def segment(self) -> Path | None:
        """The segment being written."""
        return self._sink.path

    def flush_head(self, timeout: float = 5.0) -> bool:
        """Wait until the last sync's head is published (on its own thread); False after ``timeout``."""
        return self._publisher.flush(timeout) if self._publisher is not None else True

    def add_durable_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(durable_seq)`` after every fsync (under the writer's lock: be quick). After
        a failed write or fsync the records past the durable seq are discarded and their seqs reused:
        drop work waiting on a seq above the last one received once :meth:`health` is not writable."""
        with self._lock:
            self._listeners.append(callback)

    def prune(self, *, before: datetime | float | None = None, keep_segments: int | None = None) -> PruneResult:
        """Remove the oldest closed segments (all records older than ``before``, and/or beyond the
        newest ``keep_segments``), verified first and covered by a fsynced ``prune`` checkpoint
        before the files go, so the pruned trail still verifies (:mod:`monitor.audit.retention`)."""
        with self._lock:
            self._check_usable()
            cutoff = before.timestamp() if isinstance(before, datetime) else before
            return self._prune_locked(cutoff, keep_segments)

    def close(self) -> None:
        """Write a closing checkpoint, fsync, publish the head, release the lock (idempotent)."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._fault is None or self._try_recover_locked():
                    self._emit(RecordKind.CHECKPOINT, {"checkpoint": self._checkpoint_body("close")})
                    self._sync_locked()
            finally:
                self._closed = True
                self._release(flush=True)
        if self._background is not threading.current_thread():
            self._background.join(timeout=5)

    def _release(self, *, flush: bool) -> None:
        self._stop.set()
        self._sink_close_quietly()
        publisher: HeadPublisher | None = getattr(self, "_publisher", None)
        if publisher is not None:
            publisher.stop(flush=flush)
        if self._head_store is not None:
            self._head_store.close()
        self._trail_lock.release()

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- checks and faults -----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``writable``, ``live`` (False once writes have failed, or an fsync has hung, for
        ``unhealthy_after_s``), ``error``, ``failing_for_s``, ``fsync_running_s``, ``durable_seq``.
        Lock-free: a probe never waits behind a hung fsync."""
        return writer_health(self._fault, self._sync_since, closed=self._closed, durable_seq=self._durable_seq,
                             bound_s=self.config.unhealthy_after_s)

    def _check_usable(self) -> None:
        if self._closed:
            raise AuditError(f"the audit writer of {self.trail_dir} is closed")
        if self._fault is not None and not self._try_recover_locked():
            raise AuditWriteError(f"{self._fault.error}; the writer retries every {self.config.recover_interval_s:g} "
                                  "s and continues from the last durable record once the disk accepts writes")

    def _fail(self, reason: str) -> AuditWriteError:
        """Enter the failed state: records since the last good fsync are no longer trusted, and
        every call fails until :meth:`_try_recover_locked` succeeds. Returns the error to raise."""
        if self._metrics is not None:
            self._metrics.audit_write_errors.labels(model=self._model).inc()
        if self._fault is None:
            self._fault = WriteFault(reason, time.monotonic(), self._state.seq)
            log.error("audit trail %s: %s; writes refused until it recovers", self.trail_dir, reason)
            self._set_writable(False)
        return AuditWriteError(reason)

    def _try_recover_locked(self) -> bool:
        """Quarantine what is past the last durable record, re-verify the tail, continue the
        chain in a new segment. True when the writer writes again."""
        fault = self._fault
        assert fault is not None
        self._sink_close_quietly()
        try:
            moved = reverify_durable_tail(self.trail_dir, self.writer_id, self._durable_segment, self._durable_size,
                                          (self._durable_seq, self._durable_hash), now=self._clock())
        except (AuditIntegrityError, OSError) as exc:  # OSError: the disk still fails, the next try may not
            log.log(logging.DEBUG if isinstance(exc, OSError) else logging.ERROR, "audit trail %s not recovered: %s",
                    self.trail_dir, exc)
            return False
        body = fault.recovery(self._durable_seq, moved)
        self._state.seq, self._state.hash = self._durable_seq, self._durable_hash
        try:
            self._start_segment("reopen", self._durable_segment)
            self._emit(RecordKind.RECOVERY, {"recovery": body})
            self._sync_locked()
        except AuditError:
            return False  # _fail() counted it: still failing, the next try starts again from the durable record
        log.warning("audit trail %s recovered after %s (%.1f s); continuing at seq %d", self.trail_dir, fault.error,
                    body["failed_for_s"], self._state.seq)
        self.recoveries.append(body)
        self._fault = None
        self._set_writable(True)
        if self._metrics is not None:
            self._metrics.audit_recoveries.labels(model=self._model, reason="write_failed").inc()
        return True

    def _set_writable(self, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.audit_writable.labels(model=self._model).set(int(ok))

    # --- writing ---------------------------------------------------------------------------------

    def _emit(self, kind: str, fields: Mapping[str, Any]) -> AuditRecord:
        try:
            rec = self._log.audit(kind, **fields)
        except OSError as exc:
            raise self._fail(f"cannot write to {self._sink.path}: {exc.strerror or exc}") from exc
        except (ValueError, TypeError) as exc:
            raise AuditError(str(exc)) from exc
        if self._metrics is not None:
            model = fields.get("model") if isinstance(fields.get("model"), str) else self._model
            self._metrics.audit_records.labels(model=model or self._model, kind=kind).inc()
        return rec

    def _apply_fsync_policy(self, n: int) -> None:
        self._unsynced += n
        if not self._unsynced or self._fault is not None:
            return
        policy = self.config.fsync
        if (policy == "every_record"
                or (policy == "every_n" and self._unsynced >= self.config.fsync_every_n)
                or (policy == "interval" and self._clock() - self._last_sync >= self.config.fsync_interval_s)):
            self._sync_locked()

    def _sync_locked(self) -> int:
        if self._state.seq == self._durable_seq:
            return self._durable_seq
        self._sync_since = time.monotonic()
        try:
            self._sink.fsync()
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages: nothing written since
            # the last good fsync can be trusted. Refuse writes until recovered from the durable tail.
            raise self._fail(f"fsync of {self._sink.path} failed ({exc.strerror or exc})") from exc
        finally:
            self._sync_since = None
        assert self._sink.path is not None
        self._durable_seq, self._durable_hash = self._state.seq, self._state.hash
        self._durable_segment, self._durable_size = self._sink.path.name, self._sink.size
        self._unsynced = 0
        self._last_sync = self._clock()
        head = Head(writer=self.writer_id, seq=self._state.seq, hash=self._state.hash,
                    segment=self._sink.path.name, ts=format_ts(self._last_sync)).signed(self._keys)
        self._durable_head = head
        self._publish_head(head)
        for callback in self._listeners:
            callback(self._durable_seq)
        return self._durable_seq

    def _publish_head(self, head: Head) -> None:
        if self._publisher is not None:
            self._publisher.submit(head)

    def _background_loop(self) -> None:
        """Fsyncs every ``fsync_interval_s`` (policy ``interval``); retries a failed trail every
        ``recover_interval_s``."""
        cfg = self.config
        while not self._stop.wait(cfg.recover_interval_s if self._fault is not None or cfg.fsync != "interval"
                                  else cfg.fsync_interval_s):
            if self._fault is None and cfg.fsync != "interval":
                continue  # nothing to do; the lock is not taken
            with self._lock:
                if self._closed:
                    return
                if self._fault is not None:
                    self._try_recover_locked()
                elif cfg.fsync == "interval" and self._state.seq > self._durable_seq:
                    try:
                        self._sync_locked()
                    except AuditError as exc:
                        log.error("audit trail flush failed: %s", exc)

    def _sink_close_quietly(self) -> None:
        with contextlib.suppress(OSError):
            if getattr(self, "_sink", None) is not None:
                self._sink.close()

    # --- segments ----------------------------------------------------------------------------------

    def _checkpoint_body(self, reason: str, **extra: Any) -> dict[str, Any]:
        assert self._sink.path is not None
        return {"reason": reason, "segment": self._sink.path.name,
                "head_store": self._head_store.describe() if self._head_store is not None else "none",
                "key_id": self._keys.key_ids[0] if self._keys else None, **extra}

    def _start_segment(self, reason: str, previous: str | None) -> AuditRecord:
        continues_from = {"seq": self._state.seq, "hash": self._state.hash, "segment": previous}
        path = self.trail_dir / segment_name(self._state.seq + 1)
        if path.exists():
            raise AuditIntegrityError(f"{path} already exists; the trail is inconsistent, run `layerwatch audit verify`")
        try:
            self._sink.open(path)
            fsync_dir(self.trail_dir)
        except OSError as exc:
            raise self._fail(f"cannot create segment {path}: {exc.strerror or exc}") from exc
        self._segment_started = self._clock()
        body = self._checkpoint_body(reason, continues_from=continues_from)
        if reason == "open":
            body["settings"] = {"fsync": self.config.fsync, "store_text": self.config.store_text, "max_segment_bytes":
                                self.config.max_segment_bytes, "max_segment_age_s": self.config.max_segment_age_s}
        return self._emit(RecordKind.CHECKPOINT, {"checkpoint": body})

    def _maybe_rotate(self) -> None:
        if self._sink.records <= 1:  # never rotate a segment holding only its checkpoint
            return
        age = self.config.max_segment_age_s
        if self._sink.size >= self.config.max_segment_bytes or (age is not None and self._clock() - self._segment_started >= age):
            self._rotate()

    def _rotate(self) -> None:
        self._sync_locked()  # the old segment is complete and durable before the next one exists
        previous = self._sink.path.name if self._sink.path else None
        self._start_segment("rotate", previous)
        self._unsynced += 1
        cfg = self.config
        if cfg.retention_max_segments is not None or cfg.retention_max_age_s is not None:
            cutoff = self._clock() - cfg.retention_max_age_s if cfg.retention_max_age_s is not None else None
            self._prune_locked(cutoff, cfg.retention_max_segments)

    # --- start-up recovery -------------------------------------------------------------------------

    def _open(self) -> None:
        head, untrusted = load_trusted_head(self._head_store, self.writer_id, self._keys)
        last, last_segment, quarantined = recover_tail(self.trail_dir, self.writer_id, now=self._clock())
        if last is not None:
            self._state.seq, self._state.hash = last["seq"], last["hash"]
        lost = head_loss(head, self._state.seq, self._state.hash)
        last_good = {"seq": self._state.seq, "hash": self._state.hash}
        self._start_segment("open", last_segment)
        torn = [{"reason": "torn_write", "last_good": last_good, **q} for q in quarantined]
        for problem in torn + [p for p in (untrusted, lost) if p is not None]:
            self.recoveries.append(problem)
            self._emit(RecordKind.RECOVERY, {"recovery": problem})
            log.warning("audit trail %s: recovery record at start-up: %s", self.trail_dir, problem.get("detail") or
                        f"torn write quarantined ({problem['bytes']} bytes from {problem['segment']} offset {problem['offset']})")
            if self._metrics is not None:
                self._metrics.audit_recoveries.labels(model=self._model, reason=problem["reason"]).inc()
        self._sync_locked()
        self._set_writable(True)

    # --- retention ---------------------------------------------------------------------------------

    def _prune_locked(self, cutoff: float | None, keep_segments: int | None) -> PruneResult:
        plan, through = plan_prune(self.trail_dir, self._sink.path, cutoff, keep_segments, self._keys)
        if not plan:
            return PruneResult((), None, None, None)
        names = tuple(p.name for p in plan)
        rec = self._emit(RecordKind.CHECKPOINT, {"checkpoint": self._checkpoint_body(
            "prune", pruned_through=through, pruned_segments=list(names))})
        self._unsynced += 1
        self._sync_locked()
        for seg in plan:
            seg.unlink()
        fsync_dir(self.trail_dir)
        log.info("audit trail %s: pruned %d segment(s) through seq %d", self.trail_dir, len(plan), through["seq"])
        return PruneResult(names, through["seq"], through["hash"], rec)
