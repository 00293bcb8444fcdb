"""Bringing a trail back to a state the writer can continue from.

Two moments need it:

* **After a failed write or fsync** (disk full, I/O error), while the writer runs. After a
  failed fsync the kernel may have dropped dirty pages, so nothing written since the last good
  fsync can be trusted; and no record past that point was acknowledged (entries are acked only
  after the fsync covering them). :func:`cut_to_durable` moves everything past the last durable
  byte to the quarantine folder (whole newer segments, and the durable segment's bytes past the
  durable size), then the writer re-reads the tail (:func:`~monitor.audit.segments.recover_tail`
  checks the newest record's hash and writer), checks that it *is* the last durable record, and
  continues the chain in a new segment. The callers of the failed appends got an error and retry:
  their samples are written once, after the recovery.
* **At start-up**, the head kept outside the trail says how far the trail was durable. A head
  that is damaged, or (with an HMAC key) unsigned or wrongly signed, is not evidence of anything:
  anyone with write access to Redis can plant one. :func:`load_trusted_head` returns it only
  when it can be trusted, and otherwise says what is wrong, which the writer records and counts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.audit.heads import Head, HeadStore
from monitor.audit.records import KeyRing
from monitor.audit.segments import fsync_dir, list_segments, quarantine_tail, recover_tail, segment_first_seq
from monitor.errors import AuditError, AuditIntegrityError

log = logging.getLogger("monitor.audit.writer")


@dataclass(frozen=True)
class WriteFault:
    """A failed write or fsync the writer has not recovered from yet."""

    error: str
    since: float  # time.monotonic() when it happened
    last_seq: int  # the last seq written then (records past the durable one are discarded)

    def failing_for(self) -> float:
        """Seconds since the failure."""
        return time.monotonic() - self.since

    def recovery(self, durable_seq: int, quarantined: list[dict[str, Any]]) -> dict[str, Any]:
        """The body of the ``write_failed`` recovery record written once the trail writes again."""
        discarded = {"from_seq": durable_seq + 1, "to_seq": self.last_seq} if self.last_seq > durable_seq else None
        return {"reason": "write_failed", "error": self.error, "discarded": discarded,
                "failed_for_s": round(self.failing_for(), 3), "quarantined": quarantined}


def writer_health(fault: WriteFault | None, sync_since: float | None, *, closed: bool, durable_seq: int,
                  bound_s: float) -> dict[str, Any]:
    """What :meth:`~monitor.audit.writer.AuditWriter.health` reports: not live once writes have
    failed for ``bound_s``, or one fsync has been running that long (a hung disk never fails)."""
    now = time.monotonic()
    failing = round(now - fault.since, 3) if fault is not None else None
    running = round(now - sync_since, 3) if sync_since is not None else None
    return {"writable": fault is None and not closed, "error": fault.error if fault else None,
            "failing_for_s": failing, "fsync_running_s": running, "durable_seq": durable_seq,
            "live": all(x is None or x < bound_s for x in (failing, running))}


def cut_to_durable(trail_dir: Path, segment: str, size: int, *, now: float) -> list[dict[str, Any]]:
    """Quarantine what was written after the last good fsync: segments newer than ``segment``
    (whole) and the bytes of ``segment`` past ``size``. Returns what was moved, for the recovery
    record. AuditIntegrityError when ``segment`` is shorter than ``size`` (durable bytes are gone)."""
    moved: list[dict[str, Any]] = []
    first = segment_first_seq(segment)
    for seg in reversed(list_segments(trail_dir)):
        if segment_first_seq(seg.name) > first:
            data = seg.read_bytes()
            if data:
                moved.append(quarantine_tail(trail_dir, seg, data, 0, whole=True, now=now))
            else:  # created, nothing written: nothing to keep
                seg.unlink()
                fsync_dir(trail_dir)
    path = trail_dir / segment
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditIntegrityError(f"{path} holds durable records and is gone; run `layerwatch audit verify`") from None
    if len(data) < size:
        raise AuditIntegrityError(f"{path} is {len(data)} bytes, but {size} bytes of it were durable: the "
                                  "trail was cut while it was being written; run `layerwatch audit verify`")
    if len(data) > size:
        moved.append(quarantine_tail(trail_dir, path, data, size, whole=False, now=now))
    return moved


def reverify_durable_tail(trail_dir: Path, writer_id: str, segment: str, size: int, durable: tuple[int, str], *,
                          now: float) -> list[dict[str, Any]]:
    """After a failed write or fsync: :func:`cut_to_durable`, then re-read the tail (a torn record
    is quarantined as at start-up) and check that the newest record is the last durable one,
    ``durable`` = (seq, hash). Returns what was quarantined; OSError while the disk still fails,
    AuditIntegrityError when durable records were changed or lost."""
    moved = cut_to_durable(trail_dir, segment, size, now=now)
    last, _, torn = recover_tail(trail_dir, writer_id, now=now)
    if last is None or (last["seq"], last["hash"]) != durable:
        raise AuditIntegrityError(f"after a failed write, the newest record of {trail_dir} is not the last durable "
                                  f"one (seq {durable[0]}); run `layerwatch audit verify`")
    return moved + torn


def head_summary(head: Head) -> dict[str, Any]:
    """The fields of a head a recovery record repeats."""
    return {"seq": head.seq, "hash": head.hash, "segment": head.segment, "ts": head.ts}


def load_trusted_head(store: HeadStore | None, writer_id: str,
                      keys: KeyRing | None) -> tuple[Head | None, dict[str, Any] | None]:
    """The writer's stored head when it can be trusted, else ``(None, problem)``: a damaged head,
    another writer's, or, with ``keys``, one that is unsigned or fails its signature. A store that
    cannot be reached gives ``(None, None)`` (logged: a cut tail cannot be checked now)."""
    if store is None:
        return None, None
    try:
        head = store.load(writer_id)
    except AuditIntegrityError as exc:
        return None, {"reason": "head_untrusted", "detail": f"{store.describe()}: {exc}"}
    except AuditError as exc:
        log.warning("audit head unavailable at start-up (%s): a cut tail cannot be checked now", exc)
        return None, None
    if head is None or not keys:
        return head, None
    problem = head.check_signature(keys)
    if problem is None:
        return head, None
    return None, {"reason": "head_untrusted", "head": head_summary(head),
                  "detail": f"the head in {store.describe()} fails verification ({problem}); not used to judge "
                            "the trail: whoever can write there could have planted it"}
