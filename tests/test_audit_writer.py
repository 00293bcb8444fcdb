"""The audit writer: records, chain, fsync policy, rotation, lock, recovery, failures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.audit import AuditConfig, AuditWriter, verify_trail
from monitor.audit.records import GENESIS_HASH, record_hash
from monitor.audit.segments import list_segments
from monitor.audit.testing import FakeClock, example_sample
from monitor.errors import AuditError, AuditIntegrityError, AuditLockedError, AuditWriteError
from monitor.metrics import SidecarMetrics


def cfg(tmp_path: Path, **kw: object) -> AuditConfig:
    return AuditConfig(directory=tmp_path, writer_id="w1", **kw)  # type: ignore[arg-type]


def lines(trail: Path) -> list[dict]:
    return [json.loads(x) for seg in list_segments(trail) for x in seg.read_text().splitlines()]


def test_trail_starts_with_a_checkpoint_from_the_genesis_hash(tmp_path: Path) -> None:
    """A new trail's first record is an 'open' checkpoint at seq 1 chained to the genesis hash."""
    with AuditWriter(cfg(tmp_path)) as w:
        trail = w.trail_dir
    first = lines(trail)[0]
    assert (first["seq"], first["kind"], first["prev_hash"]) == (1, "checkpoint", GENESIS_HASH)
    assert first["checkpoint"]["reason"] == "open"


def test_append_returns_the_record_chained_to_the_previous_one(tmp_path: Path) -> None:
    """append() returns the written record, whose prev_hash is the hash of the record before it."""
    with AuditWriter(cfg(tmp_path)) as w:
        a = w.append("sample", example_sample(1))
        b = w.append("drift_alert_raised", {"model": "m", "alert": {"layers": [3]}})
    assert b.seq == a.seq + 1
    assert b["prev_hash"] == a.hash
    assert record_hash(a.data) == a.hash


def test_sample_record_has_the_documented_fields(tmp_path: Path) -> None:
    """A sample record carries envelope, ids, fingerprint, bundle, baseline, narrative, score and flags."""
    with AuditWriter(cfg(tmp_path)) as w:
        rec = w.append("sample", example_sample(5))
    want = {"v", "seq", "ts", "writer", "kind", "sample_id", "request_id", "model", "model_fingerprint", "bundle_id",
            "baseline_id", "narrative", "score", "flags", "prev_hash", "hash"}
    assert want <= set(rec.data)
    assert rec.ts.endswith("Z")


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    """An unknown record kind raises AuditError naming the valid kinds."""
    with AuditWriter(cfg(tmp_path)) as w, pytest.raises(AuditError, match="drift_alert_raised"):
        w.append("samples", {})


def test_writer_only_kinds_are_refused(tmp_path: Path) -> None:
    """Callers cannot write checkpoint or recovery records."""
    with AuditWriter(cfg(tmp_path)) as w, pytest.raises(AuditError, match="written by the audit writer"):
        w.append("checkpoint", {})


def test_reserved_field_is_refused(tmp_path: Path) -> None:
    """A caller field that collides with the envelope (seq, hash, ...) is refused."""
    with AuditWriter(cfg(tmp_path)) as w, pytest.raises(AuditError, match="seq"):
        w.append("sample", {"sample_id": "x", "seq": 7})


def test_sample_without_sample_id_is_refused(tmp_path: Path) -> None:
    """A sample record needs a sample id (the review tools key on it)."""
    with AuditWriter(cfg(tmp_path)) as w, pytest.raises(AuditError, match="sample_id"):
        w.append("sample", {"request_id": "r"})


def test_nan_is_refused_without_consuming_a_sequence_number(tmp_path: Path) -> None:
    """A NaN value raises and the next record still gets the next sequence number."""
    with AuditWriter(cfg(tmp_path)) as w:
        before = w.last_seq
        with pytest.raises(AuditError, match="JSON"):
            w.append("sample", {"sample_id": "x", "score": {"value": math.nan}})
        rec = w.append("sample", {"sample_id": "y"})
    assert rec.seq == before + 1
    assert verify_trail(w.trail_dir).status == "intact"


def test_numpy_values_are_written_as_plain_numbers(tmp_path: Path) -> None:
    """numpy scalars and arrays in a payload are stored as JSON numbers and lists."""
    with AuditWriter(cfg(tmp_path)) as w:
        rec = w.append("sample", {"sample_id": "x", "score": {"value": np.float32(1.5), "v": np.arange(2)}})
    assert rec["score"] == {"value": 1.5, "v": [0, 1]}


def test_every_record_policy_makes_each_append_durable(tmp_path: Path) -> None:
    """With fsync=every_record the durable seq equals the last seq after each append."""
    with AuditWriter(cfg(tmp_path)) as w:
        rec = w.append("sample", {"sample_id": "x"})
        assert w.durable_seq == rec.seq


def test_every_n_policy_syncs_after_n_records(tmp_path: Path) -> None:
    """With fsync=every_n the durable seq moves only once n records are unsynced."""
    with AuditWriter(cfg(tmp_path, fsync="every_n", fsync_every_n=3)) as w:
        start = w.durable_seq
        w.append("sample", {"sample_id": "a"})
        w.append("sample", {"sample_id": "b"})
        assert w.durable_seq == start
        c = w.append("sample", {"sample_id": "c"})
        assert w.durable_seq == c.seq


def test_interval_policy_syncs_once_the_interval_has_passed(tmp_path: Path) -> None:
    """With fsync=interval an append after the interval makes everything durable."""
    clock = FakeClock()
    with AuditWriter(cfg(tmp_path, fsync="interval", fsync_interval_s=60), clock=clock) as w:
        a = w.append("sample", {"sample_id": "a"})
        assert w.durable_seq < a.seq
        clock.advance(61)
        b = w.append("sample", {"sample_id": "b"})
        assert w.durable_seq == b.seq


def test_sync_makes_everything_durable_and_notifies_listeners(tmp_path: Path) -> None:
    """sync() fsyncs, returns the durable seq and calls the durable listeners with it."""
    seen: list[int] = []
    with AuditWriter(cfg(tmp_path, fsync="every_n", fsync_every_n=1000)) as w:
        w.add_durable_listener(seen.append)
        recs = w.append_many([("sample", {"sample_id": str(i)}) for i in range(5)])
        assert w.sync() == recs[-1].seq
    assert recs[-1].seq in seen


def test_head_is_published_after_each_sync(tmp_path: Path) -> None:
    """The head file names the last durable seq and hash."""
    with AuditWriter(cfg(tmp_path)) as w:
        rec = w.append("sample", {"sample_id": "x"})
        assert w.flush_head()
        head = json.loads((w.trail_dir / "HEAD.json").read_text())
    assert (head["seq"], head["hash"]) == (rec.seq, rec.hash)


def test_segments_rotate_by_size_and_the_chain_continues(tmp_path: Path) -> None:
    """Small segments rotate; each new segment starts with a checkpoint continuing the last."""
    with AuditWriter(cfg(tmp_path, max_segment_bytes=4096)) as w:
        for i in range(20):
            w.append("sample", example_sample(i))
    segs = list_segments(w.trail_dir)
    assert len(segs) > 3
    first = json.loads(segs[2].read_text().splitlines()[0])
    assert first["checkpoint"]["reason"] == "rotate"
    assert first["checkpoint"]["continues_from"]["hash"] == first["prev_hash"]
    assert verify_trail(w.trail_dir).status == "intact"


def test_segments_rotate_by_age(tmp_path: Path) -> None:
    """A segment older than max_segment_age_s is rotated at the next append."""
    clock = FakeClock()
    with AuditWriter(cfg(tmp_path, max_segment_age_s=10), clock=clock) as w:
        w.append("sample", {"sample_id": "a"})
        clock.advance(11)
        w.append("sample", {"sample_id": "b"})
        assert len(list_segments(w.trail_dir)) == 2


def test_reopening_continues_the_chain_in_a_new_segment(tmp_path: Path) -> None:
    """A restarted writer starts a new segment whose checkpoint continues the old chain."""
    with AuditWriter(cfg(tmp_path)) as w:
        w.append("sample", {"sample_id": "a"})
    with AuditWriter(cfg(tmp_path)) as w2:
        assert w2.segment is not None
        opened = json.loads(w2.segment.read_text().splitlines()[0])
    assert opened["checkpoint"]["continues_from"]["seq"] == w.last_seq == opened["seq"] - 1
    assert verify_trail(w.trail_dir).status == "intact"


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    """Opening a trail that a writer holds raises AuditLockedError naming the holder."""
    with AuditWriter(cfg(tmp_path)), pytest.raises(AuditLockedError, match=f"pid {os.getpid()}"):
        AuditWriter(cfg(tmp_path))


def test_second_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    """A writer in another process cannot open a trail this process holds."""
    code = ("import sys; from monitor.audit import AuditConfig, AuditWriter; from monitor.errors import AuditLockedError\n"
            f"try:\n    AuditWriter(AuditConfig(directory={str(tmp_path)!r}, writer_id='w1'))\n"
            "except AuditLockedError as e:\n    print(e); sys.exit(7)\n")
    with AuditWriter(cfg(tmp_path)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert "already being written" in proc.stdout


def test_lock_is_released_on_close(tmp_path: Path) -> None:
    """After close() another writer can open the trail."""
    AuditWriter(cfg(tmp_path)).close()
    AuditWriter(cfg(tmp_path)).close()


def test_torn_last_line_is_quarantined_and_recorded(tmp_path: Path) -> None:
    """A partial last line is moved to quarantine/ and a recovery record says so; the trail verifies."""
    with AuditWriter(cfg(tmp_path)) as w:
        w.append("sample", {"sample_id": "a"})
        seg = w.segment
    assert seg is not None
    torn = b'{"hash":"12ab","kind":"sam'
    with seg.open("ab") as f:
        f.write(torn)
    with AuditWriter(cfg(tmp_path)) as w2:
        assert w2.recoveries[0]["reason"] == "torn_write"
    quarantined = list((w.trail_dir / "quarantine").iterdir())
    assert [q.read_bytes() for q in quarantined] == [torn]
    assert not seg.read_bytes().endswith(torn)
    report = verify_trail(w.trail_dir)
    assert report.status == "intact" and any("torn write" in n for n in report.notes)


def test_torn_segment_holding_only_garbage_is_moved_aside(tmp_path: Path) -> None:
    """A newest segment with no complete record (crash right after creating it) is quarantined whole."""
    with AuditWriter(cfg(tmp_path)) as w:
        w.append("sample", {"sample_id": "a"})
        nxt = w.trail_dir / f"segment-{w.last_seq + 1:012d}.jsonl"
    nxt.write_bytes(b"\x00\x00\x00")
    with AuditWriter(cfg(tmp_path)):
        pass
    assert verify_trail(w.trail_dir).status == "intact"


def test_cut_tail_found_at_start_up_is_recorded_as_lost(tmp_path: Path) -> None:
    """If the head is ahead of the files at start-up, a recovery record names the lost records and verify fails."""
    with AuditWriter(cfg(tmp_path)) as w:
        w.append("sample", {"sample_id": "a"})
        seg = w.segment
    assert seg is not None
    data = seg.read_bytes().splitlines(keepends=True)
    seg.write_bytes(b"".join(data[:-1]))
    with AuditWriter(cfg(tmp_path)) as w2:
        assert w2.recoveries[-1]["reason"] == "tail_lost"
    report = verify_trail(w.trail_dir)
    assert report.first_break is not None and report.first_break.kind == "records_lost"


def test_edited_newest_record_stops_the_writer(tmp_path: Path) -> None:
    """A writer refuses to continue a trail whose newest record fails its hash."""
    with AuditWriter(cfg(tmp_path)) as w:
        w.append("sample", {"sample_id": "a"})
        seg = w.segment
    assert seg is not None
    seg.write_bytes(seg.read_bytes().replace(b'"reason":"close"', b'"reason":"CLOSE"'))
    with pytest.raises(AuditIntegrityError, match="does not match its hash"):
        AuditWriter(cfg(tmp_path))


def test_failed_write_leaves_no_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way is cut back off the file, counted, and the trail still verifies."""
    metrics = SidecarMetrics(CollectorRegistry())
    with AuditWriter(cfg(tmp_path), metrics=metrics, model="m") as w:
        real_write = os.write

        def half_then_fail(fd: int, data: bytes | memoryview) -> int:
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("monitor.audit.pipeline.os.write", half_then_fail)
        with pytest.raises(AuditWriteError, match="No space left"):
            w.append("sample", {"sample_id": "a"})
        monkeypatch.undo()
        w.append("sample", {"sample_id": "b"})
    assert metrics.registry.get_sample_value("layerwatch_audit_write_errors_total", {"model": "m"}) == 1
    assert verify_trail(w.trail_dir).status == "intact"


def test_failed_fsync_is_recovered_from_without_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fsync the next call recovers the writer in place: the record of the failed
    call (never durable) is moved to quarantine, the chain continues, the trail verifies."""
    w = AuditWriter(cfg(tmp_path))

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("monitor.audit.pipeline.os.fdatasync", fail)
    with pytest.raises(AuditWriteError):
        w.append("sample", {"sample_id": "a"})
    monkeypatch.undo()
    w.append("sample", {"sample_id": "b"})
    w.close()
    ids = [r["sample_id"] for r in lines(w.trail_dir) if r["kind"] == "sample"]
    assert ids == ["b"]
    assert verify_trail(w.trail_dir).status == "intact"


def test_records_are_counted_by_model_and_kind(tmp_path: Path) -> None:
    """layerwatch_audit_records_total counts appended records by model and kind."""
    metrics = SidecarMetrics(CollectorRegistry())
    with AuditWriter(cfg(tmp_path), metrics=metrics, model="m") as w:
        w.append_many([("sample", {"sample_id": "a"}), ("sample", {"sample_id": "b"})])
    assert metrics.registry.get_sample_value("layerwatch_audit_records_total", {"model": "m", "kind": "sample"}) == 2


def test_closed_writer_refuses_appends(tmp_path: Path) -> None:
    """append() after close() raises AuditError."""
    w = AuditWriter(cfg(tmp_path))
    w.close()
    with pytest.raises(AuditError, match="closed"):
        w.append("sample", {"sample_id": "a"})


def test_writer_killed_with_sigkill_recovers_to_a_verifiable_trail(tmp_path: Path) -> None:
    """A writer process killed mid-stream (3 times) leaves a trail that verifies after each restart."""
    code = ("import sys\nfrom monitor.audit import AuditConfig, AuditWriter\nfrom monitor.audit.testing import example_sample\n"
            f"w = AuditWriter(AuditConfig(directory={str(tmp_path)!r}, writer_id='w1', fsync='every_n', fsync_every_n=7,"
            " max_segment_bytes=20000))\n"
            "i = 0\nwhile True:\n    w.append('sample', example_sample(i))\n    i += 1\n"
            "    print(i, flush=True)\n")
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for _ in range(25 + 10 * round_):
            proc.stdout.readline()
        proc.kill()
        proc.wait(timeout=30)
        assert verify_trail(tmp_path / "w1").status in ("intact", "torn")
        AuditWriter(cfg(tmp_path)).close()
        report = verify_trail(tmp_path / "w1")
        assert report.status == "intact", report.first_break
