"""The record-by-record checks of a trail (:class:`Scanner`) and what a failed one reports
(:class:`Break`); :mod:`monitor.audit.verify` drives them over segments and the head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monitor.audit.records import (
    GENESIS_HASH,
    KeyRing,
    RecordFormatError,
    RecordKind,
    parse_and_hash,
    parse_record,
)
from monitor.audit.segments import Line, segment_first_seq

_START_REASONS = ("open", "rotate", "reopen")  # reopen: after a failed write or fsync


@dataclass(frozen=True)
class Break:
    """The first place verification failed."""

    kind: str
    message: str
    segment: str | None = None
    line: int | None = None
    offset: int | None = None
    seq: int | None = None

    def location(self) -> str:
        """``segment-….jsonl line 17 (byte 8123)``, or what is known of it."""
        if self.segment is None:
            return "trail"
        where = self.segment
        if self.line is not None:
            where += f" line {self.line}"
        if self.offset is not None:
            where += f" (byte {self.offset})"
        return where

    def describe(self) -> str:
        """One line: kind, location, seq, message."""
        seq = f", seq {self.seq}" if self.seq is not None else ""
        return f"{self.kind} at {self.location()}{seq}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"kind": self.kind, "message": self.message, "segment": self.segment, "line": self.line,
                "offset": self.offset, "seq": self.seq}


class Scanner:
    """Walks records in order and remembers the first break and what later checks need."""

    def __init__(self, keys: KeyRing | None, want_seq: int | None = None, check_start: bool = True) -> None:
        self.keys = keys
        self.want_seq = want_seq
        self.want_hash: str | None = None
        self.want_loc: tuple[str, int, int] | None = None
        self.check_start = check_start
        self.brk: Break | None = None
        self.expected_seq: int | None = None
        self.expected_prev: str | None = None
        self.prev_line: bytes | None = None
        self.prev_loc: str = ""
        self.writer: str | None = None
        self.records = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.start_gap: tuple[int, str, str, int, int] | None = None  # (seq, prev_hash, segment, line, offset)
        self.prune_through: dict[str, Any] | None = None
        self.prunes: list[dict[str, Any]] = []
        self.head_store_declared: str | None = None
        self.key_ids: set[str] = set()
        self.signed = 0
        self.notes: list[str] = []
        self.last_kind: str | None = None
        self.last_reason: str | None = None

    def fail(self, kind: str, message: str, seg: str | None, line: Line | None, seq: int | None = None) -> None:
        if self.brk is None:
            self.brk = Break(kind, message, seg, line.number if line else None, line.offset if line else None, seq)

    def empty_segment(self, seg: str, newest: bool) -> None:
        if self.brk is not None:
            return
        name_seq = segment_first_seq(seg)
        if not newest:
            self.fail("empty_segment", "the segment holds no record", seg, None, name_seq)
        elif self.expected_seq is not None and name_seq != self.expected_seq:
            self.fail("segment_misnamed", f"the file name says seq {name_seq} but the chain is at seq {self.expected_seq}",
                      seg, None, name_seq)

    def feed(self, seg: str, lines: Sequence[Line], newest: bool) -> None:
        for index, line in enumerate(lines):
            if self.brk is not None:
                self._light(line)
                continue
            self._check(seg, index, line, lines[index + 1] if index + 1 < len(lines) else None)

    def _light(self, line: Line) -> None:
        # After the first break, still collect prune checkpoints (they decide whether the trail's
        # start is legitimate, which would be an earlier break).
        try:
            rec, digest = parse_and_hash(line.data)
        except RecordFormatError:
            return
        if rec["kind"] == RecordKind.CHECKPOINT and digest == rec["hash"]:
            self._note_checkpoint(rec)

    def _note_checkpoint(self, rec: dict[str, Any]) -> None:
        body = rec.get("checkpoint")
        if not isinstance(body, dict):
            return
        if isinstance(body.get("head_store"), str):
            self.head_store_declared = body["head_store"]
        if body.get("reason") == "prune":
            through = body.get("pruned_through")
            if isinstance(through, dict) and type(through.get("seq")) is int:
                self.prunes.append(through)
                if self.prune_through is None or through["seq"] > self.prune_through["seq"]:
                    self.prune_through = through

    def _check(self, seg: str, index: int, line: Line, following: Line | None) -> None:
        if not line.terminated:
            self.fail("malformed_record", "the line has no terminating newline (cut inside the trail)", seg, line)
            return
        try:
            rec, digest = parse_and_hash(line.data)
        except RecordFormatError as exc:
            self.fail("malformed_record", exc.reason, seg, line)
            return
        seq = rec["seq"]
        if digest != rec["hash"]:
            self.fail("hash_mismatch", "the record's content does not match its hash (edited after it was written)",
                      seg, line, seq)
            return
        if self.keys:
            sig = rec.get("hmac")
            if sig is None:
                self.fail("hmac_missing", "the record is not signed (written without a key, or its signature removed)",
                          seg, line, seq)
                return
            problem = self.keys.check(rec["hash"], sig)
            if problem:
                self.fail("hmac_invalid", problem, seg, line, seq)
                return
        if "hmac" in rec:
            self.signed += 1
            self.key_ids.add(rec["hmac"].partition(":")[0])
        if self.writer is None:
            self.writer = rec["writer"]
        elif rec["writer"] != self.writer:
            self.fail("foreign_record", f"written by {rec['writer']!r}, but this is the trail of {self.writer!r}",
                      seg, line, seq)
            return
        if index > 0 and self.last_kind == RecordKind.CHECKPOINT and self.last_reason == "close":
            self.fail("record_after_close", "a record after the writer's closing checkpoint in the same segment "
                      "(a restarted writer starts a new segment): it was appended by someone else", seg, line, seq)
            return
        if self.expected_seq is not None and index > 0:
            if seq != self.expected_seq:
                if line.data == self.prev_line:
                    self.fail("duplicate_record", "the line repeats the line before it", seg, line, seq)
                elif seq > self.expected_seq and _seq_of(following) == self.expected_seq:
                    self.fail("sequence_order", f"seq {seq} comes before seq {self.expected_seq}: lines were swapped "
                              "or moved", seg, line, seq)
                elif seq > self.expected_seq:
                    self.fail("sequence_gap", f"records {self.expected_seq}..{seq - 1} are missing before this one",
                              seg, line, seq)
                else:
                    self.fail("sequence_order", f"seq {seq} after seq {self.expected_seq - 1}: lines were inserted, "
                              "duplicated or reordered", seg, line, seq)
                return
            if rec["prev_hash"] != self.expected_prev:
                self.fail("chain_break", f"prev_hash is not the hash of the record before ({self.prev_loc}): "
                          "that record or this one was replaced", seg, line, seq)
                return
        if index == 0 and not self._check_segment_start(seg, line, rec):
            return
        body = rec.get("checkpoint")
        if rec["kind"] == RecordKind.CHECKPOINT:
            if not isinstance(body, dict) or body.get("segment") != seg:
                self.fail("segment_start_invalid" if index == 0 else "malformed_record",
                          f"checkpoint names segment {body.get('segment') if isinstance(body, dict) else None!r}, "
                          f"but it is in {seg}", seg, line, seq)
                return
            if index > 0 and body.get("reason") in _START_REASONS:
                self.fail("segment_start_invalid", "a segment-start checkpoint in the middle of a segment", seg, line, seq)
                return
            self._note_checkpoint(rec)
        if rec["kind"] == RecordKind.RECOVERY:
            self._check_recovery(seg, line, rec)
            if self.brk is not None:
                return
        if self.first_seq is None:
            self.first_seq = seq
        self.records += 1
        self.last_seq = seq
        self.expected_seq = seq + 1
        self.expected_prev = rec["hash"]
        self.prev_line = line.data
        self.prev_loc = f"{seg} line {line.number}"
        self.last_kind = rec["kind"]
        self.last_reason = body.get("reason") if isinstance(body, dict) else None
        if seq == self.want_seq:
            self.want_hash = rec["hash"]
            self.want_loc = (seg, line.number, line.offset)

    def _check_segment_start(self, seg: str, line: Line, rec: dict[str, Any]) -> bool:
        seq = rec["seq"]
        name_seq = segment_first_seq(seg)
        if seq != name_seq:
            self.fail("segment_misnamed", f"the file name says the segment starts at seq {name_seq}, its first "
                      f"record is seq {seq}", seg, line, seq)
            return False
        body = rec.get("checkpoint")
        cont = body.get("continues_from") if isinstance(body, dict) else None
        if (rec["kind"] != RecordKind.CHECKPOINT or not isinstance(body, dict) or body.get("reason") not in _START_REASONS
                or not isinstance(cont, dict)):
            self.fail("segment_start_invalid", "the segment does not start with its checkpoint record", seg, line, seq)
            return False
        if cont.get("seq") != seq - 1 or cont.get("hash") != rec["prev_hash"]:
            self.fail("segment_start_invalid", "the checkpoint's continues_from disagrees with its seq/prev_hash",
                      seg, line, seq)
            return False
        if self.expected_seq is None:
            if seq == 1 and rec["prev_hash"] == GENESIS_HASH:
                return True
            if self.check_start:
                self.start_gap = (seq, rec["prev_hash"], seg, line.number, line.offset)
            return True
        if seq > self.expected_seq:
            self.fail("dropped_segment", f"records {self.expected_seq}..{seq - 1} are missing: the segment(s) "
                      f"between {self.prev_loc.split(' ')[0]} and {seg} were removed or cut", seg, line, seq)
            return False
        if seq < self.expected_seq:
            self.fail("sequence_order", f"the segment starts at seq {seq} but the one before ends at seq "
                      f"{self.expected_seq - 1}", seg, line, seq)
            return False
        if rec["prev_hash"] != self.expected_prev:
            self.fail("chain_break", f"prev_hash is not the hash of the last record of the segment before "
                      f"({self.prev_loc})", seg, line, seq)
            return False
        return True

    def _check_recovery(self, seg: str, line: Line, rec: dict[str, Any]) -> None:
        body = rec.get("recovery")
        if not isinstance(body, dict):
            self.fail("malformed_record", "recovery record without a 'recovery' object", seg, line, rec["seq"])
            return
        reason = body.get("reason")
        if reason == "torn_write":
            self.notes.append(
                f"recovered from a torn write at start-up: {body.get('bytes')} byte(s) of {body.get('segment')} "
                f"(from byte {body.get('offset')}) moved to {body.get('quarantined_to')} (seq {rec['seq']})")
        elif reason in ("tail_lost", "head_mismatch"):
            self.fail("records_lost", f"at start-up the writer found durable records missing or changed: "
                      f"{body.get('detail', reason)} (records {body.get('from_seq')}..{body.get('to_seq')})",
                      seg, line, rec["seq"])
        elif reason == "write_failed":
            d = body.get("discarded")
            what = (f"records {d.get('from_seq')}..{d.get('to_seq')}, never durable nor acknowledged, moved to "
                    "quarantine" if isinstance(d, dict) else "no record written before it was lost")
            self.notes.append(f"recovered from a failed write ({body.get('error')}) at seq {rec['seq']}: {what}")
        elif reason == "head_untrusted":
            self.notes.append(f"at start-up the stored head was not trusted ({body.get('detail')}) (seq {rec['seq']})")
        else:
            self.notes.append(f"recovery record ({reason}) at seq {rec['seq']}")


def _seq_of(line: Line | None) -> int | None:
    if line is None:
        return None
    try:
        return int(parse_record(line.data)["seq"])
    except RecordFormatError:
        return None
