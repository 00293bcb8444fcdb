"""Verification of a trail: every record, every link, the segment boundaries, and the head.

:func:`verify_trail` reads a trail oldest segment first and stops at the first break, which it
reports with its kind and exact location (segment file, line, byte offset, seq). Kinds:

=========================  =========================================================================
``malformed_record``       a line is not a canonical audit record (not JSON, bytes changed, a field
                           missing, an unterminated line inside the trail)
``hash_mismatch``          a record's content does not match its ``hash`` (edited after writing)
``hmac_missing``           with a key: a record carries no signature
``hmac_invalid``           with a key: a signature is wrong or made with an unknown key
``foreign_record``         a record of another writer
``duplicate_record``       a line repeats the line before it
``sequence_gap``           records are missing inside a segment (deleted lines)
``sequence_order``         seq goes backwards (lines inserted, duplicated or swapped)
``chain_break``            ``prev_hash`` is not the hash of the record before (a record replaced)
``record_after_close``     a record follows the writer's closing checkpoint in the same segment
``segment_misnamed``       a segment's file name promises another first seq than it holds
``segment_start_invalid``  a segment does not start with a checkpoint continuing from the one before
``empty_segment``          a segment other than the newest holds no record
``dropped_segment``        whole segments are missing between two segments
``dropped_oldest_segment`` the trail starts after seq 1 and no prune record covers the gap
``cut_tail``               the head says records were durable that are no longer there
``dropped_newest_segment`` the head is in a segment that no longer exists
``head_mismatch``          the head's hash differs from the record at its seq (records rewritten)
``head_invalid``           the head is damaged, of another writer, its signature is wrong, or it is
                           unsigned beside a signed trail: it is reported and never trusted
``head_missing``           the trail declares a head file that is missing (or --require-head)
``records_lost``           a recovery record: at start-up the writer found durable records missing
``torn_write``             (status ``torn``, not ``broken``) the newest segment ends in a partial
                           record *not* covered by the head: a crash, which the writer quarantines
                           at its next start-up
=========================  =========================================================================

Exit codes (:meth:`TrailReport.exit_code`): 0 intact, 1 broken, 3 torn write only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from monitor.audit.heads import HEAD_FILE, FileHeadStore, Head, HeadStore
from monitor.audit.records import (
    KeyRing,
    RecordFormatError,
    RecordKind,
    parse_record,
)
from monitor.audit.scan import Break, Scanner
from monitor.audit.segments import Line, list_segments, split_lines, torn_suffix_start
from monitor.errors import AuditError, AuditIntegrityError

AUTO: Any = object()


@dataclass
class TrailReport:
    """Result of verifying one trail."""

    trail: Path
    writer: str | None = None
    status: Literal["intact", "torn", "broken"] = "intact"
    first_break: Break | None = None
    segments: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str = "not checked"
    signatures: str = "unsigned"
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 intact, 1 broken, 3 torn write only."""
        return {"intact": 0, "broken": 1, "torn": 3}[self.status]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "trail": str(self.trail), "writer": self.writer, "status": self.status,
            "first_break": self.first_break.to_dict() if self.first_break else None,
            "segments": self.segments, "records": self.records, "first_seq": self.first_seq,
            "last_seq": self.last_seq, "head": self.head, "signatures": self.signatures,
            "notes": self.notes, "warnings": self.warnings,
        }


def first_record(path: Path) -> dict[str, Any]:
    """The parsed first record of a segment; AuditIntegrityError when it has none."""
    with path.open("rb") as f:
        line = f.readline()
    if not line.endswith(b"\n"):
        raise AuditIntegrityError(f"{path} has no complete first record")
    try:
        return parse_record(line[:-1])
    except RecordFormatError as exc:
        raise AuditIntegrityError(f"{path} line 1: {exc.reason}") from exc


def verify_segments(paths: Sequence[Path], *, keys: KeyRing | None = None, first_line_of_last: bool = False) -> Break | None:
    """Check the records and links of consecutive segments (not the trail's start or head).
    With ``first_line_of_last`` only the first record of the last segment is read (it must
    continue the chain). Used before pruning, so tampering is never pruned away unseen."""
    scanner = Scanner(keys, check_start=False)
    for i, path in enumerate(paths):
        lines = split_lines(path.read_bytes())
        if first_line_of_last and i == len(paths) - 1:
            lines = lines[:1]
        if not lines:
            scanner.empty_segment(path.name, newest=False)
        scanner.feed(path.name, lines, newest=False)
        if scanner.brk is not None:
            return scanner.brk
    return None


def _load_head(store: HeadStore, writer: str, report: TrailReport) -> tuple[Head | None, Break | None]:
    try:
        return store.load(writer), None
    except AuditIntegrityError as exc:
        return None, Break("head_invalid", f"{store.describe()}: {exc}")
    except AuditError as exc:
        report.warnings.append(f"head not checked: {exc}")
        return None, None


def verify_trail(
    trail: str | Path,
    *,
    keys: KeyRing | None = None,
    head_store: HeadStore | None = AUTO,
    require_head: bool = False,
) -> TrailReport:
    """Verify one trail folder. ``head_store``: where to read the head (default: the trail's
    ``HEAD.json`` if present; pass a RedisHeadStore for trails that publish there, None to skip).
    ``require_head``: a head that cannot be checked is a break (``head_missing``)."""
    trail = Path(trail)
    report = TrailReport(trail=trail)
    segments = list_segments(trail)
    report.segments = len(segments)
    if head_store is AUTO:
        head_file = trail / HEAD_FILE
        head_store = FileHeadStore(head_file) if head_file.exists() else None
        auto_head = True
    else:
        auto_head = False

    # The writer id, needed to look the head up, is in every record; read it from the first one.
    writer: str | None = None
    for seg in segments:
        try:
            writer = first_record(seg)["writer"]
            break
        except AuditIntegrityError:
            continue
    head: Head | None = None
    head_break: Break | None = None
    if head_store is not None and writer is not None:
        head, head_break = _load_head(head_store, writer, report)
    elif head_store is not None and isinstance(head_store, FileHeadStore) and not head_store.per_writer:
        try:
            head = Head.from_json(head_store.path.read_bytes())
        except (OSError, AuditIntegrityError) as exc:
            head_break = Break("head_invalid", f"{head_store.describe()}: {exc}")

    scanner = Scanner(keys, want_seq=head.seq if head is not None else None)
    torn: tuple[str, Line, int] | None = None
    end_loc: tuple[str, int, int] | None = None
    for i, seg in enumerate(segments):
        data = seg.read_bytes()
        lines = split_lines(data)
        newest = i == len(segments) - 1
        end = torn_suffix_start(lines) if newest else len(lines)
        if newest and end < len(lines):
            torn = (seg.name, lines[end], len(data) - lines[end].offset)
        if end == 0:
            scanner.empty_segment(seg.name, newest)
        scanner.feed(seg.name, lines[:end], newest)
        if newest:
            end_loc = (seg.name, end + 1, lines[end].offset if end < len(lines) else len(data))

    report.writer = scanner.writer or writer
    report.records = scanner.records
    report.first_seq = scanner.first_seq
    report.last_seq = scanner.last_seq
    report.notes.extend(scanner.notes)
    if scanner.signed:
        kids = ", ".join(sorted(scanner.key_ids))
        report.signatures = f"checked (key id {kids})" if keys else f"NOT checked: signed with key id {kids}, no key given"
        if not keys:
            report.warnings.append(f"signatures not checked: the trail is signed (key id {kids}); pass its key")
    brk = scanner.brk

    # The start of the trail: seq 1 from the genesis hash, or a prune checkpoint covering the gap.
    if scanner.start_gap is not None:
        seq, prev_hash, seg_name, line_no, offset = scanner.start_gap
        through = scanner.prune_through
        covering = [p for p in scanner.prunes if p.get("seq") == seq - 1]
        if through is None or through["seq"] < seq - 1:
            covered = f"the prune records cover seq 1..{through['seq']}" if through else "no prune record covers them"
            brk = Break("dropped_oldest_segment", f"the trail starts at seq {seq}, so records 1..{seq - 1} are gone, "
                        f"and {covered}: segments were removed other than by `layerwatch audit prune`",
                        seg_name, line_no, offset, seq)
        elif covering and covering[-1].get("hash") != prev_hash:
            brk = Break("dropped_oldest_segment", f"the prune record says the chain continues from hash "
                        f"{str(covering[-1].get('hash'))[:16]}… at seq {seq - 1}, the first record's prev_hash differs",
                        seg_name, line_no, offset, seq)
        else:
            report.notes.append(f"pruned: records 1..{seq - 1} removed by `audit prune`; the chain continues from "
                                f"{prev_hash[:16]}… (checkpoint at {seg_name} line 1)")

    # The head: what was durable must still be there, unchanged.
    status_torn = False
    if brk is None:
        if head_break is not None:
            brk = head_break
        elif head is not None:
            brk, status_torn = _check_head(head, keys, scanner, torn, end_loc, segments, report)
        else:
            declared = scanner.head_store_declared
            if require_head:
                brk = Break("head_missing", "no head to check the tail against (--require-head)"
                            + (f"; the trail publishes it to {declared}" if declared and declared != "file" else ""))
            elif declared == "file" and auto_head:
                brk = Break("head_missing", f"the trail keeps its head in {HEAD_FILE}, which is missing: "
                            "a cut tail cannot be ruled out")
            elif declared == "none":
                report.warnings.append("this trail keeps no head outside its segments: a cut tail cannot be detected")
            elif declared:
                report.warnings.append(f"the head is kept in {declared}: pass --head to check for a cut tail")
            if brk is None and torn is not None:
                status_torn = True
        if brk is None and status_torn and torn is not None:
            seg_name, line, nbytes = torn
            brk = Break("torn_write", f"the newest segment ends in {nbytes} byte(s) of a partial record not covered "
                        "by the head: a crash during a write (or a write in progress, if the writer is running); "
                        "the writer quarantines it at its next start-up",
                        seg_name, line.number, line.offset)
    if brk is not None:
        report.first_break = brk
        report.status = "torn" if brk.kind == "torn_write" else "broken"
    elif scanner.last_kind == RecordKind.CHECKPOINT and scanner.last_reason == "close":
        report.notes.append("the trail ends with the writer's closing checkpoint")
    else:
        report.notes.append("the trail does not end with a closing checkpoint (writer running, or it stopped uncleanly)")
    return report


def _check_head(
    head: Head,
    keys: KeyRing | None,
    scanner: Scanner,
    torn: tuple[str, Line, int] | None,
    end_loc: tuple[str, int, int] | None,
    segments: Sequence[Path],
    report: TrailReport,
) -> tuple[Break | None, bool]:
    if scanner.writer is not None and head.writer != scanner.writer:
        return Break("head_invalid", f"the head belongs to writer {head.writer!r}, the trail to {scanner.writer!r}"), False
    if keys:
        problem = head.check_signature(keys)
        if problem:
            return Break("head_invalid", f"head signature: {problem}; the head is not used"), False
    elif scanner.signed and head.hmac is None:
        return Break("head_invalid", "the trail is signed but its head is not, so its writer did not publish it "
                     "(planted?); the head is not used"), False
    last = scanner.last_seq or 0
    report.head = f"seq {head.seq} ({head.ts})"
    if head.seq > last:
        missing = f"records {last + 1}..{head.seq}"
        if torn is not None:
            seg_name, line, _ = torn
            if not line.terminated:
                return Break("cut_tail", f"the newest segment ends inside a record, and the head says {missing} were "
                             f"durable: the file was cut, not torn by a crash", seg_name, line.number, line.offset,
                             last + 1), False
            return Break("malformed_record", f"a damaged line where the head says {missing} were durable",
                         seg_name, line.number, line.offset, last + 1), False
        names = {p.name for p in segments}
        if head.segment not in names:
            return Break("dropped_newest_segment", f"the head is seq {head.seq} in {head.segment}, which is missing: "
                         f"{missing} are gone", head.segment, None, None, last + 1), False
        seg_name, line_no, offset = end_loc or (head.segment, None, None)
        return Break("cut_tail", f"the head says {missing} were durable, but the trail ends at seq {last}",
                     seg_name, line_no, offset, last + 1), False
    if scanner.first_seq is not None and head.seq < scanner.first_seq:
        report.warnings.append(f"the head (seq {head.seq}) is older than the trail's first record; not compared")
        return None, torn is not None
    if scanner.want_hash != head.hash:
        seg_name, line_no, offset = scanner.want_loc or (head.segment, None, None)
        return Break("head_mismatch", f"the head's hash for seq {head.seq} differs from the record's: the trail "
                     "was rewritten from here on", seg_name, line_no, offset, head.seq), False
    report.head = f"seq {head.seq} matches ({head.ts})"
    return None, torn is not None
