"""verify: each kind of break is found, at its exact location; valid trails pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.audit import AuditConfig, AuditWriter, KeyRing, verify_trail
from monitor.audit.records import body_json, encode_record, seal
from monitor.audit.segments import list_segments
from monitor.audit.testing import crash, example_sample

KEY = b"k" * 32


def build(tmp_path: Path, n: int = 12, **kw: object) -> Path:
    """A closed trail of ``n`` samples over several small segments."""
    config = AuditConfig(directory=tmp_path, writer_id="w1", max_segment_bytes=3000, fsync="every_n",  # type: ignore[arg-type]
                         fsync_every_n=1000, **kw)
    with AuditWriter(config) as w:
        for i in range(n):
            w.append("sample", example_sample(i, n_layers=2))
    return w.trail_dir


def seg_lines(seg: Path) -> list[bytes]:
    return seg.read_bytes().splitlines(keepends=True)


def kind_of(trail: Path, **kw: object) -> str | None:
    brk = verify_trail(trail, **kw).first_break  # type: ignore[arg-type]
    return brk.kind if brk else None


def test_untouched_rotated_trail_is_intact(tmp_path: Path) -> None:
    """A rotated, closed trail verifies with exit code 0."""
    trail = build(tmp_path)
    report = verify_trail(trail)
    assert (report.status, report.exit_code, report.segments > 3) == ("intact", 0, True)


def test_edited_field_is_a_hash_mismatch_at_its_line(tmp_path: Path) -> None:
    """Editing a record's content is reported as hash_mismatch at that segment and line."""
    trail = build(tmp_path)
    seg = list_segments(trail)[1]
    lines = seg_lines(seg)
    rec = json.loads(lines[1])
    rec["score"]["value"] = 0.0
    lines[1] = (seal(body_json(rec), rec["hash"]) + "\n").encode()  # content edited, old hash kept
    seg.write_bytes(b"".join(lines))
    brk = verify_trail(trail).first_break
    assert brk is not None
    assert (brk.kind, brk.segment, brk.line, brk.seq) == ("hash_mismatch", seg.name, 2, rec["seq"])
    assert brk.offset == len(lines[0])


def test_forged_record_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    """A record edited and re-hashed is caught as chain_break at the record after it."""
    trail = build(tmp_path)
    seg = list_segments(trail)[1]
    lines = seg_lines(seg)
    rec = json.loads(lines[1])
    rec["request_id"] = "forged"
    lines[1] = encode_record(rec)
    seg.write_bytes(b"".join(lines))
    brk = verify_trail(trail).first_break
    assert brk is not None and (brk.kind, brk.line) == ("chain_break", 3)


def test_forged_newest_record_contradicts_the_head(tmp_path: Path) -> None:
    """Re-hashing the newest record is caught by the head (head_mismatch)."""
    trail = build(tmp_path)
    seg = list_segments(trail)[-1]
    lines = seg_lines(seg)
    rec = json.loads(lines[-1])
    rec["ts"] = "2000-01-01T00:00:00.000000Z"
    lines[-1] = encode_record(rec)
    seg.write_bytes(b"".join(lines))
    assert kind_of(trail) == "head_mismatch"


def test_byte_change_with_the_same_meaning_is_found(tmp_path: Path) -> None:
    """A change that parses to the same content (a space) still breaks the hash of the bytes."""
    trail = build(tmp_path)
    seg = list_segments(trail)[0]
    seg.write_bytes(seg.read_bytes().replace(b'"seq":2,', b'"seq": 2,', 1))
    assert kind_of(trail) == "hash_mismatch"


def test_line_without_its_hash_fields_is_malformed(tmp_path: Path) -> None:
    """A line whose last fields are not hash (and hmac) is malformed_record."""
    trail = build(tmp_path)
    seg = list_segments(trail)[0]
    lines = seg_lines(seg)
    lines[1] = json.dumps(json.loads(lines[1]), sort_keys=True).encode() + b"\n"
    seg.write_bytes(b"".join(lines))
    brk = verify_trail(trail).first_break
    assert brk is not None and (brk.kind, brk.line) == ("malformed_record", 2)


@pytest.mark.parametrize(("mutate", "kind"), [
    (lambda ls: ls[:1] + ls[2:], "sequence_gap"),
    (lambda ls: ls[:2] + ls[1:], "duplicate_record"),
    (lambda ls: [ls[0], ls[2], ls[1]] + ls[3:], "sequence_order"),
])
def test_line_deletion_duplication_and_swap_are_found(tmp_path: Path, mutate: object, kind: str) -> None:
    """Deleting, duplicating or swapping lines is reported with the matching kind."""
    trail = build(tmp_path)
    seg = list_segments(trail)[1]
    seg.write_bytes(b"".join(mutate(seg_lines(seg))))  # type: ignore[operator]
    assert kind_of(trail) == kind


def test_dropped_middle_segment_is_found(tmp_path: Path) -> None:
    """Removing a segment between two others is dropped_segment at the next one's first line."""
    trail = build(tmp_path)
    segs = list_segments(trail)
    segs[2].unlink()
    brk = verify_trail(trail).first_break
    assert brk is not None and (brk.kind, brk.segment, brk.line) == ("dropped_segment", segs[3].name, 1)


def test_dropped_oldest_segment_is_found(tmp_path: Path) -> None:
    """Removing the oldest segment without prune is dropped_oldest_segment."""
    trail = build(tmp_path)
    list_segments(trail)[0].unlink()
    assert kind_of(trail) == "dropped_oldest_segment"


def test_dropped_newest_segment_is_found(tmp_path: Path) -> None:
    """Removing the newest segment is dropped_newest_segment (the head names it)."""
    trail = build(tmp_path)
    list_segments(trail)[-1].unlink()
    assert kind_of(trail) == "dropped_newest_segment"


def test_tail_cut_at_a_line_boundary_is_a_cut_tail(tmp_path: Path) -> None:
    """Removing the newest records cleanly is cut_tail, located at the end of the trail."""
    trail = build(tmp_path)
    seg = list_segments(trail)[-1]
    lines = seg_lines(seg)
    seg.write_bytes(b"".join(lines[:-1]))
    brk = verify_trail(trail).first_break
    assert brk is not None and (brk.kind, brk.segment, brk.line) == ("cut_tail", seg.name, len(lines))


def test_tail_cut_inside_a_durable_record_is_a_cut_tail_not_a_torn_write(tmp_path: Path) -> None:
    """Truncating inside a record the head covers is cut_tail (exit 1), not torn_write."""
    trail = build(tmp_path)
    seg = list_segments(trail)[-1]
    seg.write_bytes(seg.read_bytes()[:-40])
    report = verify_trail(trail)
    assert report.first_break is not None and (report.first_break.kind, report.exit_code) == ("cut_tail", 1)


def test_partial_write_beyond_the_head_is_a_torn_write(tmp_path: Path) -> None:
    """A crash's partial record after the last durable one is torn_write with exit code 3."""
    config = AuditConfig(directory=tmp_path, writer_id="w1")
    w = AuditWriter(config)
    w.append("sample", example_sample(1))
    crash(w, torn=b'{"flags":[],"hash":"ab')
    report = verify_trail(w.trail_dir)
    assert report.first_break is not None
    assert (report.status, report.exit_code, report.first_break.kind) == ("torn", 3, "torn_write")


def test_renamed_segment_is_found(tmp_path: Path) -> None:
    """A segment whose file name does not match its first record is segment_misnamed."""
    trail = build(tmp_path)
    seg = list_segments(trail)[2]
    seg.rename(trail / "segment-000000099999.jsonl")
    assert kind_of(trail) in {"segment_misnamed", "dropped_segment"}


def test_missing_head_file_is_found(tmp_path: Path) -> None:
    """A trail that declares HEAD.json but lacks it is head_missing."""
    trail = build(tmp_path)
    (trail / "HEAD.json").unlink()
    assert kind_of(trail) == "head_missing"


def test_trail_without_head_is_intact_with_a_warning(tmp_path: Path) -> None:
    """head_store=none verifies, warning that a cut tail cannot be detected."""
    trail = build(tmp_path, head_store="none")
    report = verify_trail(trail)
    assert report.status == "intact" and any("cut tail cannot be detected" in w for w in report.warnings)


def test_require_head_fails_a_trail_without_head(tmp_path: Path) -> None:
    """--require-head turns an unchecked head into a break."""
    trail = build(tmp_path, head_store="none")
    assert kind_of(trail, require_head=True) == "head_missing"


def test_signed_trail_verifies_with_its_key(tmp_path: Path) -> None:
    """A trail written with an HMAC key verifies with that key, signatures checked."""
    trail = build(tmp_path, hmac_key=KEY)
    report = verify_trail(trail, keys=KeyRing([KEY]))
    assert report.status == "intact" and report.signatures.startswith("checked")


def test_signed_trail_fails_with_another_key(tmp_path: Path) -> None:
    """Verifying with a different key is hmac_invalid."""
    trail = build(tmp_path, hmac_key=KEY)
    assert kind_of(trail, keys=KeyRing([b"x" * 32])) == "hmac_invalid"


def test_signed_trail_without_key_warns_that_signatures_are_unchecked(tmp_path: Path) -> None:
    """Without a key a signed trail verifies its chain and warns that signatures were not checked."""
    trail = build(tmp_path, hmac_key=KEY)
    report = verify_trail(trail)
    assert report.status == "intact" and any("signatures not checked" in w for w in report.warnings)


def test_unsigned_trail_fails_when_a_key_is_expected(tmp_path: Path) -> None:
    """Giving a key for an unsigned trail is hmac_missing (signatures stripped look the same)."""
    trail = build(tmp_path)
    assert kind_of(trail, keys=KeyRing([KEY])) == "hmac_missing"


def test_rotated_keys_verify_with_both_keys(tmp_path: Path) -> None:
    """A trail whose writer restarted with a new key verifies given both keys."""
    build(tmp_path, n=3, hmac_key=KEY)
    trail = build(tmp_path, n=3, hmac_key=b"n" * 32)
    assert verify_trail(trail, keys=KeyRing([KEY, b"n" * 32])).status == "intact"


def test_pruned_trail_is_intact_and_says_so(tmp_path: Path) -> None:
    """After prune the remaining chain verifies, with a note of what was pruned."""
    trail = build(tmp_path)
    with AuditWriter(AuditConfig(directory=tmp_path, writer_id="w1")) as w:
        result = w.prune(keep_segments=2)
    assert result.removed
    report = verify_trail(trail)
    assert report.status == "intact" and any(n.startswith("pruned") for n in report.notes)


def test_segment_removed_after_a_prune_is_still_found(tmp_path: Path) -> None:
    """Removing one more segment than the prune did is dropped_oldest_segment."""
    trail = build(tmp_path)
    with AuditWriter(AuditConfig(directory=tmp_path, writer_id="w1")) as w:
        w.prune(keep_segments=3)
    list_segments(trail)[0].unlink()
    assert kind_of(trail) == "dropped_oldest_segment"


def test_retention_prunes_at_rotation(tmp_path: Path) -> None:
    """retention_max_segments keeps the segment count bounded and the trail verifiable."""
    trail = build(tmp_path, n=30, retention_max_segments=3)
    assert len(list_segments(trail)) <= 4
    assert verify_trail(trail).status == "intact"


def test_prune_refuses_to_remove_tampered_segments(tmp_path: Path) -> None:
    """prune() verifies what it would delete and refuses when it is broken."""
    from monitor.errors import AuditIntegrityError

    trail = build(tmp_path)
    seg = list_segments(trail)[0]
    seg.write_bytes(seg.read_bytes().replace(b'"s-00000"', b'"s-99999"', 1))
    with AuditWriter(AuditConfig(directory=tmp_path, writer_id="w1")) as w, pytest.raises(AuditIntegrityError):
        w.prune(keep_segments=2)
    assert seg.exists()
