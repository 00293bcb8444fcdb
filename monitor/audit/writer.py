"""The audit trail writer: one per sidecar replica, one trail folder per writer.

Typical use by the sidecar::

    writer = AuditWriter(AuditConfig(directory=..., writer_id="replica-a", hmac_key_file=...),
                         metrics=sidecar_metrics, model="smollm2")
    writer.append("config", {"config": effective_config})
    writer.append("sidecar_start", {"version": __version__})
    recs = writer.append_many([("sample", sample_fields(sample_id=..., ...)) for ...])
    durable = writer.sync()            # fsync now; then XACK the entries of ``recs``
    ...
    writer.append("sidecar_stop", {"reason": "SIGTERM"})
    writer.close()

Threading: every public method takes one lock, so the writer may be shared between threads;
calls are short (a ``write`` per record, an ``fdatasync`` per sync) except where an fsync policy
makes them sync. Durable listeners run on the thread that did the fsync, under the lock: keep
them short (e.g. hand the seq to the thread that acks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.audit.config import AuditConfig
from monitor.audit.heads import Head, HeadPublisher, HeadStore, head_loss, head_store_from_spec
from monitor.audit.pipeline import ChainState, SegmentSink, build_logger
from monitor.audit.records import (
    AuditRecord,
    KeyRing,
    RecordKind,
    check_fields,
    check_kind,
    format_ts,
)
from monitor.audit.segments import (
    TrailLock,
    fsync_dir,
    list_segments,
    recover_tail,
    segment_name,
)
from monitor.errors import AuditError, AuditIntegrityError, AuditWriteError

if TYPE_CHECKING:
    from monitor.metrics import SidecarMetrics

log = logging.getLogger(__name__)

_FROM_CONFIG: Any = object()


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed: segment names, and the seq/hash the remaining chain continues from."""

    removed: tuple[str, ...]
    through_seq: int | None
    through_hash: str | None
    record: AuditRecord | None


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
        try:
            if head_store is _FROM_CONFIG:
                head_store = head_store_from_spec(config.head_store, self.trail_dir, key_prefix=config.head_key_prefix)
            self._head_store = head_store
            self._state = ChainState()
            self._sink = SegmentSink(self._state)
            self._log = build_logger(self._sink, self._state, writer_id=self.writer_id,
                                     store_text=config.store_text, keys=self._keys, clock=clock)
            self._durable_seq = 0
            self._durable_head: Head | None = None
            self._unsynced = 0
            self._last_sync = clock()
            self._segment_started = clock()
            self._listeners: list[Callable[[int], None]] = []
            self._fatal: str | None = None
            self._closed = False
            self.head_publish_errors = 0
            self._head_failing = False
            self.recoveries: list[dict[str, Any]] = []
            self._publisher = (HeadPublisher(head_store, self._head_result, f"audit-head-{self.writer_id}")
                               if head_store is not None else None)
            self._open()
        except BaseException:
            self._sink_close_quietly()
            publisher: HeadPublisher | None = getattr(self, "_publisher", None)
            if publisher is not None:
                publisher.stop(flush=False)
            if self._head_store is not None:
                self._head_store.close()
            self._trail_lock.release()
            raise
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if config.fsync == "interval":
            self._flusher = threading.Thread(target=self._flush_loop, name=f"audit-flush-{self.writer_id}", daemon=True)
            self._flusher.start()

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
    def segment(self) -> Path | None:
        """The segment being written."""
        return self._sink.path

    def flush_head(self, timeout: float = 5.0) -> bool:
        """Wait until the head of the last sync is published (heads go out on their own thread);
        False when the store did not take it within ``timeout``."""
        return self._publisher.flush(timeout) if self._publisher is not None else True

    def add_durable_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(durable_seq)`` after every fsync (under the writer's lock: be quick)."""
        with self._lock:
            self._listeners.append(callback)

    def prune(self, *, before: datetime | float | None = None, keep_segments: int | None = None) -> PruneResult:
        """Remove the oldest closed segments: those whose records are all older than ``before``
        and/or beyond the newest ``keep_segments``. First verifies them, then appends and fsyncs
        a checkpoint record naming the seq and hash the remaining chain continues from, then
        deletes the files, so the pruned trail still verifies and a segment removed any other
        way does not."""
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
                if self._fatal is None:
                    self._emit(RecordKind.CHECKPOINT, {"checkpoint": self._checkpoint_body("close")})
                    self._sync_locked()
            finally:
                self._closed = True
                self._stop.set()
                self._sink_close_quietly()
                if self._publisher is not None:
                    self._publisher.stop(flush=True)
                if self._head_store is not None:
                    self._head_store.close()
                self._trail_lock.release()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5)

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- checks ----------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise AuditError(f"the audit writer of {self.trail_dir} is closed")
        if self._fatal is not None:
            raise AuditWriteError(f"{self._fatal}; restart the writer: it recovers from the last durable record")

    # --- writing ---------------------------------------------------------------------------------

    def _emit(self, kind: str, fields: Mapping[str, Any]) -> AuditRecord:
        try:
            rec = self._log.audit(kind, **fields)
        except OSError as exc:
            self._count_error()
            raise AuditWriteError(f"cannot write to {self._sink.path}: {exc.strerror or exc}") from exc
        except (ValueError, TypeError) as exc:
            raise AuditError(str(exc)) from exc
        if self._metrics is not None:
            model = fields.get("model") if isinstance(fields.get("model"), str) else self._model
            self._metrics.audit_records.labels(model=model or self._model, kind=kind).inc()
        return rec

    def _count_error(self) -> None:
        if self._metrics is not None:
            self._metrics.audit_write_errors.labels(model=self._model).inc()

    def _apply_fsync_policy(self, n: int) -> None:
        self._unsynced += n
        if not self._unsynced or self._fatal is not None:
            return
        policy = self.config.fsync
        if (policy == "every_record"
                or (policy == "every_n" and self._unsynced >= self.config.fsync_every_n)
                or (policy == "interval" and self._clock() - self._last_sync >= self.config.fsync_interval_s)):
            self._sync_locked()

    def _sync_locked(self) -> int:
        if self._state.seq == self._durable_seq:
            return self._durable_seq
        try:
            self._sink.fsync()
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages: nothing written since
            # the last good fsync can be trusted. Stop; a restart recovers from the durable tail.
            self._fatal = f"fsync of {self._sink.path} failed ({exc.strerror or exc})"
            self._count_error()
            raise AuditWriteError(self._fatal) from exc
        self._durable_seq = self._state.seq
        self._unsynced = 0
        self._last_sync = self._clock()
        assert self._sink.path is not None
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

    def _head_result(self, error: Exception | None) -> None:
        # Runs on the publisher thread. One log line when publishing starts and stops failing.
        if error is not None:
            self.head_publish_errors += 1
            if not self._head_failing:
                log.warning("audit head not published (%s); records stay durable, cut-tail detection lags", error)
            self._head_failing = True
        elif self._head_failing:
            log.warning("audit head published again to %s", self._head_store.describe() if self._head_store else "?")
            self._head_failing = False

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.config.fsync_interval_s):
            with self._lock:
                if self._closed:
                    return
                if self._fatal is None and self._state.seq > self._durable_seq:
                    try:
                        self._sync_locked()
                    except AuditError as exc:
                        log.error("audit trail flush failed: %s", exc)

    def _sink_close_quietly(self) -> None:
        sink = getattr(self, "_sink", None)
        if sink is not None:
            try:
                sink.close()
            except OSError:
                pass

    # --- segments ----------------------------------------------------------------------------------

    def _checkpoint_body(self, reason: str, **extra: Any) -> dict[str, Any]:
        assert self._sink.path is not None
        body: dict[str, Any] = {
            "reason": reason,
            "segment": self._sink.path.name,
            "head_store": self._head_store.describe() if self._head_store is not None else "none",
            "key_id": self._keys.key_ids[0] if self._keys else None,
        }
        body.update(extra)
        return body

    def _start_segment(self, reason: str, previous: str | None) -> AuditRecord:
        continues_from = {"seq": self._state.seq, "hash": self._state.hash, "segment": previous}
        path = self.trail_dir / segment_name(self._state.seq + 1)
        if path.exists():
            raise AuditIntegrityError(f"{path} already exists; the trail is inconsistent, run `layerwatch audit verify`")
        try:
            self._sink.open(path)
            fsync_dir(self.trail_dir)
        except OSError as exc:
            self._count_error()
            raise AuditWriteError(f"cannot create segment {path}: {exc.strerror or exc}") from exc
        self._segment_started = self._clock()
        settings = {
            "fsync": self.config.fsync, "store_text": self.config.store_text,
            "max_segment_bytes": self.config.max_segment_bytes, "max_segment_age_s": self.config.max_segment_age_s,
        }
        body = self._checkpoint_body(reason, continues_from=continues_from)
        if reason == "open":
            body["settings"] = settings
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

    def _load_head(self) -> Head | None:
        if self._head_store is None:
            return None
        try:
            return self._head_store.load(self.writer_id)
        except AuditError as exc:
            log.warning("audit head unavailable at start-up (%s): a cut tail cannot be checked now", exc)
            return None

    def _open(self) -> None:
        head = self._load_head()
        last, last_segment, quarantined = recover_tail(self.trail_dir, self.writer_id, now=self._clock())
        if last is not None:
            self._state.seq, self._state.hash = last["seq"], last["hash"]
        lost = head_loss(head, self._state.seq, self._state.hash)
        last_good = {"seq": self._state.seq, "hash": self._state.hash}
        self._start_segment("open", last_segment)
        for q in quarantined:
            q = {"reason": "torn_write", "last_good": last_good, **q}
            self.recoveries.append(q)
            self._emit(RecordKind.RECOVERY, {"recovery": q})
            log.warning("audit trail %s: torn write quarantined (%s bytes from %s offset %s)",
                        self.trail_dir, q["bytes"], q["segment"], q["offset"])
        if lost is not None:
            self.recoveries.append(lost)
            self._emit(RecordKind.RECOVERY, {"recovery": lost})
            log.error("audit trail %s: %s; recorded as a recovery record", self.trail_dir, lost["detail"])
        self._sync_locked()

    # --- retention ---------------------------------------------------------------------------------

    def _prune_locked(self, cutoff: float | None, keep_segments: int | None) -> PruneResult:
        from monitor.audit.verify import first_record, verify_segments

        if keep_segments is not None and keep_segments < 1:
            raise AuditError("keep_segments must be at least 1")
        segments = list_segments(self.trail_dir)
        if not segments or segments[-1] != self._sink.path:
            raise AuditIntegrityError(f"{self.trail_dir}: the segment being written is not the newest; run verify")
        cutoff_ts = format_ts(cutoff) if cutoff is not None else None
        plan: list[Path] = []
        for i, seg in enumerate(segments[:-1]):
            by_count = keep_segments is not None and len(segments) - i > keep_segments
            by_age = cutoff_ts is not None and first_record(segments[i + 1])["ts"] < cutoff_ts
            if not (by_count or by_age):
                break
            plan.append(seg)
        if not plan:
            return PruneResult((), None, None, None)
        nxt = segments[len(plan)]
        broken = verify_segments(plan + [nxt], keys=self._keys, first_line_of_last=True)
        if broken is not None:
            raise AuditIntegrityError(f"refusing to prune {self.trail_dir}: {broken.describe()}")
        following = first_record(nxt)
        through = {"seq": following["seq"] - 1, "hash": following["prev_hash"], "segment": plan[-1].name}
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
