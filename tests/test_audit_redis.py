"""The Redis head store, against the real Redis server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from monitor.audit import AuditConfig, AuditWriter, KeyRing, RedisHeadStore, verify_trail
from monitor.audit.heads import Head
from monitor.audit.segments import list_segments
from monitor.audit.testing import example_sample

pytestmark = pytest.mark.redis
URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix unique to the test; its keys are deleted afterwards."""
    value = f"lw-test-audit-{uuid.uuid4().hex[:10]}:"
    yield value
    client = redis.Redis.from_url(URL)
    keys = list(client.scan_iter(match=value + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_head_round_trips_through_redis(prefix: str) -> None:
    """publish() then load() returns the same signed head."""
    store = RedisHeadStore(URL, key_prefix=prefix)
    head = Head("w1", 7, "a" * 64, "segment-000000000001.jsonl", "2025-01-01T00:00:00.000000Z").signed(KeyRing([b"k" * 16]))
    store.publish(head)
    assert store.load("w1") == head
    store.close()


def test_writer_publishes_its_head_to_redis(tmp_path: Path, prefix: str) -> None:
    """A writer with head_store=redis:// keeps the last durable seq and hash under prefix+writer_id."""
    config = AuditConfig(directory=tmp_path, writer_id="w1", head_store=URL, head_key_prefix=prefix)
    with AuditWriter(config) as w:
        rec = w.append("sample", example_sample(1))
        assert w.flush_head()
        head = RedisHeadStore(URL, key_prefix=prefix).load("w1")
    assert head is not None and (head.seq, head.hash) == (rec.seq, rec.hash)


def test_cut_tail_is_found_with_the_redis_head(tmp_path: Path, prefix: str) -> None:
    """Removing the newest records is cut_tail when verify reads the head from Redis."""
    config = AuditConfig(directory=tmp_path, writer_id="w1", head_store=URL, head_key_prefix=prefix)
    with AuditWriter(config) as w:
        for i in range(3):
            w.append("sample", example_sample(i))
    seg = list_segments(w.trail_dir)[-1]
    seg.write_bytes(b"".join(seg.read_bytes().splitlines(keepends=True)[:-2]))
    store = RedisHeadStore(URL, key_prefix=prefix)
    report = verify_trail(w.trail_dir, head_store=store)
    store.close()
    assert report.first_break is not None and report.first_break.kind == "cut_tail"


def test_trail_with_redis_head_warns_when_verified_without_it(tmp_path: Path, prefix: str) -> None:
    """Verifying without --head says where the head is kept instead of silently passing."""
    config = AuditConfig(directory=tmp_path, writer_id="w1", head_store=URL, head_key_prefix=prefix)
    with AuditWriter(config) as w:
        w.append("sample", example_sample(1))
    report = verify_trail(w.trail_dir)
    assert report.status == "intact" and any("pass --head" in x for x in report.warnings)


def test_redis_outage_does_not_stop_the_writer(tmp_path: Path) -> None:
    """With Redis unreachable, appends stay durable and head publish failures are counted."""
    config = AuditConfig(directory=tmp_path, writer_id="w1", head_store="redis://127.0.0.1:1/0")
    with AuditWriter(config) as w:
        rec = w.append("sample", example_sample(1))
        w.flush_head()
        assert w.durable_seq == rec.seq
        assert w.head_publish_errors >= 1
