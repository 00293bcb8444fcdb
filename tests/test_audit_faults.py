"""Disk faults and trust in what the audit writer reads back: recovery after a failed write or
fsync (issue 17, Why 4), liveness after a bound, and heads that fail verification (Why 6)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from monitor.audit import AuditConfig, AuditWriter, KeyRing, RedisHeadStore, verify_trail
from monitor.audit.heads import FileHeadStore, Head
from monitor.audit.segments import QUARANTINE_DIR, list_segments
from monitor.audit.testing import example_sample
from monitor.errors import AuditWriteError
from monitor.metrics import SidecarMetrics

KEY = b"k" * 32
URL = "redis://127.0.0.1:6379/0"


def cfg(tmp_path: Path, **kw: object) -> AuditConfig:
    return AuditConfig(directory=tmp_path, writer_id="w1", **kw)  # type: ignore[arg-type]


def records(trail: Path) -> list[dict]:
    return [json.loads(x) for seg in list_segments(trail) for x in seg.read_text().splitlines()]


def sample_ids(trail: Path) -> list[str]:
    return [r["sample_id"] for r in records(trail) if r["kind"] == "sample"]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class FailingDisk:
    """Makes the writer's writes or fsyncs fail with ENOSPC until ``heal()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, what: str, after: int = 0) -> None:
        import os

        self.real = getattr(os, what)
        self.calls = 0
        self.after = after
        self.broken = True

        def faulty(*args: object) -> object:
            self.calls += 1
            if self.broken and self.calls > self.after:
                raise OSError(28, "No space left on device")
            return self.real(*args)

        monkeypatch.setattr(f"monitor.audit.pipeline.os.{what}", faulty)

    def heal(self) -> None:
        self.broken = False


def test_a_batch_cut_off_by_a_full_disk_is_audited_once_when_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of a call that failed half-way (disk full on its 2nd write) are discarded at
    recovery, so retrying the batch leaves each sample in the trail exactly once."""
    with AuditWriter(cfg(tmp_path)) as w:
        w.append("sample", example_sample(0))
        disk = FailingDisk(monkeypatch, "write", after=1)
        batch = [("sample", example_sample(i)) for i in (1, 2, 3)]
        with pytest.raises(AuditWriteError, match="No space left"):
            w.append_many(batch)
        disk.heal()
        w.append_many(batch)
    ids = sample_ids(w.trail_dir)
    assert sorted(ids) == sorted({*ids}) and len(ids) == 4
    report = verify_trail(w.trail_dir)
    assert report.status == "intact", report.first_break
    assert any("recovered from a failed write" in n for n in report.notes)


def test_writes_are_refused_while_the_disk_stays_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While fsync keeps failing every call raises AuditWriteError, health() says not writable,
    the layerwatch_audit_writable gauge is 0; nothing the caller did not see durable is kept."""
    metrics = SidecarMetrics(CollectorRegistry())
    w = AuditWriter(cfg(tmp_path, unhealthy_after_s=3600), metrics=metrics, model="m")
    durable = w.durable_seq
    FailingDisk(monkeypatch, "fdatasync")
    for i in range(3):
        with pytest.raises(AuditWriteError):
            w.append("sample", example_sample(i))
    health = w.health()
    assert (health["writable"], health["live"], health["durable_seq"]) == (False, True, durable)
    assert "No space left" in health["error"]
    assert metrics.registry.get_sample_value("layerwatch_audit_writable", {"model": "m"}) == 0
    monkeypatch.undo()
    w.close()
    assert sample_ids(w.trail_dir) == []
    assert verify_trail(w.trail_dir).status == "intact"


def test_health_turns_not_live_once_the_failure_outlasts_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """health()['live'] is False once writes have failed for longer than audit.unhealthy_after_s."""
    w = AuditWriter(cfg(tmp_path, unhealthy_after_s=0.2, recover_interval_s=0.05))
    FailingDisk(monkeypatch, "fdatasync")
    with pytest.raises(AuditWriteError):
        w.append("sample", example_sample(0))
    assert w.health()["live"]
    assert wait_for(lambda: not w.health()["live"])
    monkeypatch.undo()
    w.close()


def test_an_fsync_that_hangs_past_the_bound_makes_the_writer_not_live(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that hangs never fails: health()['live'] is False while one fsync has run for longer
    than unhealthy_after_s, and True again once it returns (health() does not wait for it)."""
    import os
    import threading

    w = AuditWriter(cfg(tmp_path, unhealthy_after_s=0.2))
    release, entered = threading.Event(), threading.Event()
    real = os.fdatasync

    def hanging(fd: int) -> None:
        entered.set()
        release.wait(30)
        real(fd)

    monkeypatch.setattr("monitor.audit.pipeline.os.fdatasync", hanging)
    appender = threading.Thread(target=w.append, args=("sample", example_sample(0)))
    appender.start()
    assert entered.wait(10)
    assert wait_for(lambda: not w.health()["live"])
    assert w.health()["fsync_running_s"] >= 0.2
    release.set()
    appender.join(10)
    assert w.health()["live"] and w.health()["fsync_running_s"] is None
    monkeypatch.undo()
    w.close()


def test_the_writer_recovers_on_its_own_thread_once_the_disk_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no further call, the writer's own thread recovers it within recover_interval_s of the
    disk working again, and counts the recovery."""
    metrics = SidecarMetrics(CollectorRegistry())
    w = AuditWriter(cfg(tmp_path, recover_interval_s=0.05), metrics=metrics, model="m")
    disk = FailingDisk(monkeypatch, "fdatasync")
    with pytest.raises(AuditWriteError):
        w.append("sample", example_sample(0))
    disk.heal()
    assert wait_for(lambda: w.health()["writable"])
    assert metrics.registry.get_sample_value("layerwatch_audit_recoveries_total",
                                             {"model": "m", "reason": "write_failed"}) == 1
    assert metrics.registry.get_sample_value("layerwatch_audit_writable", {"model": "m"}) == 1
    w.append("sample", example_sample(1))
    w.close()
    rec = [r for r in records(w.trail_dir) if r["kind"] == "recovery"][-1]["recovery"]
    assert rec["reason"] == "write_failed" and rec["discarded"]["from_seq"] == rec["discarded"]["to_seq"]
    assert list((w.trail_dir / QUARANTINE_DIR).iterdir())  # the never-durable record is kept aside
    assert sample_ids(w.trail_dir) == [example_sample(1)["sample_id"]]
    assert verify_trail(w.trail_dir).status == "intact"


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``mnt``: a real filesystem that runs full (mounting needs root; the
    test is skipped otherwise)."""
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "tmpfs", "512k") as mnt:
        yield mnt


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``path`` with one file but ``leave`` bytes; returns the file (delete
    it to free the space)."""
    filler = path / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\1" * 4096)
        except OSError:
            pass
        f.truncate(max(0, f.tell() - leave))
    return filler


def test_a_real_full_filesystem_loses_nothing_synced_and_audits_each_sample_once(small_tmpfs: Path) -> None:
    """On a tmpfs that runs full: appends fail while it is full, every sample whose sync returned
    is in the trail once, and after space returns the retried samples are written once each."""
    w = AuditWriter(AuditConfig(directory=small_tmpfs / "audit", writer_id="w1", head_store="none"))
    synced: list[str] = []
    failed: list[str] = []
    filler = fill(small_tmpfs, leave=32 * 1024)
    for i in range(50):
        smp = example_sample(i)
        try:
            w.append_many([("sample", smp)])
            w.sync()
            synced.append(smp["sample_id"])
        except AuditWriteError:
            failed.append(smp["sample_id"])
    assert synced and failed and not w.health()["writable"]
    filler.unlink()
    for sid in failed:  # what the sidecar does: the entries stay pending and are delivered again
        w.append_many([("sample", example_sample(int(sid.rsplit("-", 1)[-1])))])
    w.close()
    ids = sample_ids(w.trail_dir)
    assert sorted(ids) == sorted(synced + failed)
    assert verify_trail(w.trail_dir).status == "intact"


# --- heads that fail verification ------------------------------------------------------------------

@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"lw-test-faults-{uuid.uuid4().hex[:10]}:"
    yield value
    client = redis.Redis.from_url(URL)
    keys = list(client.scan_iter(match=value + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def planted(seq: int, hmac: str | None = None) -> Head:
    return Head("w1", seq, "f" * 64, "segment-000000000001.jsonl", "2030-01-01T00:00:00.000000Z", hmac)


@pytest.mark.redis
@pytest.mark.parametrize("hmac", [None, "0123456789abcdef:" + "0" * 64], ids=["unsigned", "forged"])
def test_a_head_planted_in_redis_is_reported_and_never_trusted(tmp_path: Path, prefix: str, hmac: str | None) -> None:
    """With an HMAC key, a head written into Redis by someone else (unsigned, or with a wrong
    signature) claiming later records does not make the writer record them lost: it writes a
    head_untrusted recovery record, counts it, and the trail verifies intact."""
    config = cfg(tmp_path, hmac_key=KEY, head_store=URL, head_key_prefix=prefix)
    with AuditWriter(config) as w:
        for i in range(3):
            w.append("sample", example_sample(i))
    store = RedisHeadStore(URL, key_prefix=prefix)
    store.publish(planted(w.last_seq + 50, hmac))
    metrics = SidecarMetrics(CollectorRegistry())
    with AuditWriter(config, metrics=metrics, model="m") as w2:
        assert [r["reason"] for r in w2.recoveries] == ["head_untrusted"]
        assert w2.flush_head()
    assert metrics.registry.get_sample_value("layerwatch_audit_recoveries_total",
                                             {"model": "m", "reason": "head_untrusted"}) == 1
    report = verify_trail(w.trail_dir, keys=KeyRing([KEY]), head_store=store)
    assert report.status == "intact", report.first_break
    assert any("not trusted" in n for n in report.notes)


@pytest.mark.redis
def test_verify_reports_a_planted_head_instead_of_lost_records(tmp_path: Path, prefix: str) -> None:
    """verify reads a head that fails its signature as head_invalid, never as records lost."""
    config = cfg(tmp_path, hmac_key=KEY, head_store=URL, head_key_prefix=prefix)
    with AuditWriter(config) as w:
        w.append("sample", example_sample(0))
    store = RedisHeadStore(URL, key_prefix=prefix)
    store.publish(planted(w.last_seq + 50))
    report = verify_trail(w.trail_dir, keys=KeyRing([KEY]), head_store=store)
    assert report.first_break is not None and report.first_break.kind == "head_invalid"
    assert "not used" in report.first_break.message


def test_an_unsigned_head_beside_a_signed_trail_is_reported_even_without_the_key(tmp_path: Path) -> None:
    """Without the key, verify still refuses an unsigned head of a signed trail (head_invalid),
    rather than reading its seq as a cut tail."""
    with AuditWriter(cfg(tmp_path, hmac_key=KEY)) as w:
        w.append("sample", example_sample(0))
    FileHeadStore(w.trail_dir / "HEAD.json").publish(planted(w.last_seq + 5))
    report = verify_trail(w.trail_dir)
    assert report.first_break is not None and report.first_break.kind == "head_invalid"


def test_heads_are_signed_in_the_file_store_when_a_key_is_set(tmp_path: Path) -> None:
    """With an HMAC key the file head store holds a head whose signature checks with that key."""
    with AuditWriter(cfg(tmp_path, hmac_key=KEY)) as w:
        w.append("sample", example_sample(0))
    head = FileHeadStore(w.trail_dir / "HEAD.json").load("w1")
    assert head is not None and head.check_signature(KeyRing([KEY])) is None


def test_a_rotation_that_fails_half_way_is_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new segment created but not made durable (the disk fails during rotation) is removed at
    recovery; the retried samples are written once and the trail verifies."""
    import monitor.audit.writer as writer_module

    with AuditWriter(cfg(tmp_path, max_segment_bytes=4096)) as w:
        real = writer_module.fsync_dir
        calls = {"n": 0}

        def fsync_dir_fails_once(path: Path) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(28, "No space left on device")
            real(path)

        monkeypatch.setattr(writer_module, "fsync_dir", fsync_dir_fails_once)
        done: list[int] = []
        for i in range(20):
            try:
                w.append("sample", example_sample(i))
                done.append(i)
            except AuditWriteError:
                w.append("sample", example_sample(i))  # the caller retries; the writer recovers first
                done.append(i)
        assert calls["n"] >= 2 and len(list_segments(w.trail_dir)) >= 2
    assert sample_ids(w.trail_dir) == [example_sample(i)["sample_id"] for i in done]
    report = verify_trail(w.trail_dir)
    assert report.status == "intact", report.first_break
    assert any("recovered from a failed write" in n for n in report.notes)
