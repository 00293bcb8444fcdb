"""Reading trails for review: iterate records with their location, merge writers, filter.

Reading does not verify (``layerwatch audit verify`` does); lines that are not records (a torn
tail) are skipped and counted. Several trails (one per sidecar replica) are merged by time.
Samples are de-duplicated by ``sample_id``, keeping the first record: the sidecar's only allowed
duplicate is a re-delivered sample, marked ``redelivered``.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from monitor.audit.records import RecordFormatError, RecordKind, format_ts, parse_record
from monitor.audit.segments import discover_trails, list_segments, split_lines
from monitor.errors import AuditError


@dataclass(frozen=True)
class Entry:
    """A record and where it is: trail folder, segment file, line number, byte offset, its bytes."""

    record: dict[str, Any]
    trail: Path
    segment: str
    line: int
    offset: int
    raw: bytes = b""

    @property
    def sort_key(self) -> tuple[str, str, int]:
        """(ts, writer, seq): the merge order of several trails."""
        return (self.record.get("ts", ""), self.record.get("writer", ""), self.record.get("seq", 0))


@dataclass
class ReadStats:
    """What reading skipped."""

    unreadable_lines: int = 0
    duplicates_skipped: int = 0
    trails: list[Path] = field(default_factory=list)


def _first_ts(seg: Path) -> str | None:
    with seg.open("rb") as f:
        m = _TS.search(f.readline())
    return m.group(1).decode() if m else None


_TS = re.compile(rb'"ts":"([0-9T:.Z-]+)"')


def iter_trail(
    trail: Path,
    stats: ReadStats | None = None,
    prefilter: Iterable[str] = (),
    since: str | None = None,
    until: str | None = None,
) -> Iterator[Entry]:
    """Records of one trail in order. ``prefilter``: skip lines containing none of these strings
    before parsing (a cheap pass for id searches). ``since``/``until``: skip whole segments
    outside the range, judged by the time of each segment's first record (its checkpoint)."""
    needles = [n.encode() for n in prefilter]
    segments = list_segments(trail)
    starts = [_first_ts(seg) for seg in segments] if since or until else []
    for i, seg in enumerate(segments):
        nxt = starts[i + 1] if since and i + 1 < len(segments) else None
        if since and nxt is not None and nxt < since:
            continue  # everything in this segment was written before the next one started
        first = starts[i] if until else None
        if until and first is not None and first > until:
            break
        for line in split_lines(seg.read_bytes()):
            if needles and not any(n in line.data for n in needles):
                continue
            try:
                rec = parse_record(line.data)
            except RecordFormatError:
                if stats is not None:
                    stats.unreadable_lines += 1
                continue
            yield Entry(rec, trail, seg.name, line.number, line.offset, line.data)


def iter_entries(
    paths: Iterable[str | Path],
    stats: ReadStats | None = None,
    prefilter: Iterable[str] = (),
    since: str | None = None,
    until: str | None = None,
) -> Iterator[Entry]:
    """Records of every trail under ``paths``, merged by (ts, writer, seq)."""
    trails = discover_trails(paths)
    if stats is not None:
        stats.trails = trails
    needles = list(prefilter)
    yield from heapq.merge(*(iter_trail(t, stats, needles, since, until) for t in trails), key=lambda e: e.sort_key)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: datetime | None = None) -> str:
    """A time bound as the trail's timestamp text: an ISO 8601 date/time (UTC unless it says
    otherwise), ``now``, or a duration ago (``90s``, ``15m``, ``2h``, ``7d``, ``1w``)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    m = _DURATION.match(text)
    if text == "now":
        when = now
    elif m:
        when = now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise AuditError(f"cannot read time {text!r}: use ISO 8601 (2025-01-31T12:00Z), 'now' or a duration "
                             "ago like 2h or 7d") from exc
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    return format_ts(when.timestamp())


def is_flagged(record: dict[str, Any]) -> bool:
    """A sample whose score says flagged, or that carries flags."""
    score = record.get("score")
    return bool(isinstance(score, dict) and score.get("flagged")) or bool(record.get("flags"))


def flag_kinds(record: dict[str, Any]) -> list[str]:
    """The kinds of a record's flags."""
    flags = record.get("flags")
    if not isinstance(flags, list):
        return []
    return [str(f.get("kind")) for f in flags if isinstance(f, dict) and f.get("kind") is not None]


@dataclass
class Query:
    """Search criteria; empty lists match everything. Checkpoints are left out unless asked for."""

    since: str | None = None
    until: str | None = None
    flagged: bool = False
    request_ids: list[str] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    flag_kinds: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    include_duplicates: bool = False

    def prefilter(self) -> list[str]:
        """Strings one of which a matching line must contain (ids are rare; a fast pre-pass)."""
        if self.request_ids and not self.sample_ids:
            return list(self.request_ids)
        if self.sample_ids and not self.request_ids:
            return list(self.sample_ids)
        return []

    def matches(self, rec: dict[str, Any]) -> bool:
        """Whether ``rec`` satisfies every criterion."""
        kind = rec.get("kind")
        if self.kinds:
            if kind not in self.kinds:
                return False
        elif kind == RecordKind.CHECKPOINT:
            return False
        ts = rec.get("ts", "")
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts > self.until:
            return False
        if self.flagged and not (kind == RecordKind.SAMPLE and is_flagged(rec)):
            return False
        if self.request_ids and rec.get("request_id") not in self.request_ids:
            return False
        if self.sample_ids and rec.get("sample_id") not in self.sample_ids:
            return False
        if self.models:
            names = {str(rec.get("model", "")), str(rec.get("model_fingerprint", ""))}
            if not any(m in names or str(rec.get("model_fingerprint", "")).startswith(m) for m in self.models):
                return False
        if self.flag_kinds and not set(self.flag_kinds).intersection(flag_kinds(rec)):
            return False
        return True


def search(paths: Iterable[str | Path], query: Query, stats: ReadStats | None = None) -> Iterator[Entry]:
    """Matching records of all trails under ``paths``, in time order, samples de-duplicated."""
    stats = stats if stats is not None else ReadStats()
    seen: set[str] = set()
    for entry in iter_entries(paths, stats, query.prefilter(), query.since, query.until):
        rec = entry.record
        if not query.matches(rec):
            continue
        sid = rec.get("sample_id")
        if rec.get("kind") == RecordKind.SAMPLE and isinstance(sid, str) and not query.include_duplicates:
            if sid in seen:
                stats.duplicates_skipped += 1
                continue
            seen.add(sid)
        yield entry
