"""Retention: which of a trail's oldest segments a prune removes, checked before it does.

The writer (:meth:`monitor.audit.writer.AuditWriter.prune`, and its rotation when a retention
setting is on) asks :func:`plan_prune` for the segments to remove and the seq/hash the remaining
chain continues from, writes a ``prune`` checkpoint naming them, fsyncs, and only then deletes
the files, so the pruned trail still verifies and a segment removed any other way does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.audit.records import AuditRecord, KeyRing, format_ts
from monitor.audit.segments import list_segments
from monitor.errors import AuditError, AuditIntegrityError


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed: segment names, and the seq/hash the remaining chain continues from."""

    removed: tuple[str, ...]
    through_seq: int | None
    through_hash: str | None
    record: AuditRecord | None


def plan_prune(trail_dir: Path, current: Path | None, cutoff: float | None, keep_segments: int | None,
               keys: KeyRing | None) -> tuple[list[Path], dict[str, Any]]:
    """The closed segments to remove (oldest first: beyond the newest ``keep_segments``, or whose
    records are all older than ``cutoff``) and where the chain continues (``seq``, ``hash``,
    ``segment``). Verifies them first: AuditIntegrityError rather than prune tampering away."""
    from monitor.audit.verify import first_record, verify_segments

    if keep_segments is not None and keep_segments < 1:
        raise AuditError("keep_segments must be at least 1")
    segments = list_segments(trail_dir)
    if not segments or segments[-1] != current:
        raise AuditIntegrityError(f"{trail_dir}: the segment being written is not the newest; run verify")
    cutoff_ts = format_ts(cutoff) if cutoff is not None else None
    plan: list[Path] = []
    for i, seg in enumerate(segments[:-1]):
        by_count = keep_segments is not None and len(segments) - i > keep_segments
        by_age = cutoff_ts is not None and first_record(segments[i + 1])["ts"] < cutoff_ts
        if not (by_count or by_age):
            break
        plan.append(seg)
    if not plan:
        return [], {}
    nxt = segments[len(plan)]
    broken = verify_segments(plan + [nxt], keys=keys, first_line_of_last=True)
    if broken is not None:
        raise AuditIntegrityError(f"refusing to prune {trail_dir}: {broken.describe()}")
    following = first_record(nxt)
    return plan, {"seq": following["seq"] - 1, "hash": following["prev_hash"], "segment": plan[-1].name}
