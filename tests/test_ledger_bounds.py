"""The Redis ledger's memory per sample, measured with MEMORY USAGE, and its generations."""

from __future__ import annotations

import uuid

import pytest

from monitor.backends.ledger import MemoryLedger, payload_digest
from monitor.backends.ledger_redis import RedisLedger
from monitor.backends.redis import connect

BYTES_PER_SAMPLE_BOUND = 40  # the README's figure is ~28 B; one key per sample cost 177 B


def _usage(client, prefix: str) -> int:  # noqa: ANN001
    return sum(int(client.memory_usage(k, samples=0) or 0) for k in client.scan_iter(match=prefix + ":*", count=1000))


@pytest.mark.redis
def test_ledger_memory_per_sample_is_bounded(redis_url: str, stream_name: str) -> None:
    """Sharded hashes keep an audited sample in under 40 bytes of Redis memory (MEMORY USAGE),
    where one key per sample took 177: measured at the load each shard is sized for (~100 ids)."""
    client = connect(redis_url)
    shards, n = 64, 64 * 100
    ledger = RedisLedger(client, f"{stream_name}:ledger", ttl_s=3600, shards=shards)
    ids = [f"{uuid.uuid4().hex}-{i}" for i in range(n)]
    for i in range(0, n, 500):
        chunk = ids[i:i + 500]
        ledger.mark(chunk, {s: payload_digest(s.encode()) for s in chunk})
    per_sample = _usage(client, f"{stream_name}:ledger") / n
    print(f"ledger: {per_sample:.1f} bytes per sample ({n} samples, {shards} shards)")
    assert per_sample < BYTES_PER_SAMPLE_BOUND
    assert ledger.lookup(ids[:3] + ["never"]) == {s: payload_digest(s.encode()) for s in ids[:3]}


@pytest.mark.redis
def test_ledger_remembers_an_id_for_at_least_its_ttl_and_then_forgets(redis_url: str, stream_name: str) -> None:
    """An id marked in one generation is still seen in the next and gone in the one after; keys expire."""
    import time

    start = float(int(time.time()) // 100 * 100)  # a generation boundary (Redis expires on real time)
    now = [start]
    client = connect(redis_url)
    ledger = RedisLedger(client, f"{stream_name}:ledger", ttl_s=100, clock=lambda: now[0])
    ledger.mark(["a"], {"a": "00ff00ff00ff00ff"})
    now[0] = start + 199  # the next generation: kept at least ttl_s
    assert ledger.lookup(["a"]) == {"a": "00ff00ff00ff00ff"}
    now[0] = start + 200
    assert ledger.seen(["a"]) == set()
    key = next(iter(client.scan_iter(match=f"{stream_name}:ledger:*")))
    assert 0 < client.ttl(key) <= 200 + 100  # EXPIREAT the end of the next generation


def test_memory_ledger_forgets_after_two_generations() -> None:
    """The in-process ledger is bounded the same way (it grew forever)."""
    now = [0.0]
    ledger = MemoryLedger(ttl_s=10, clock=lambda: now[0])
    ledger.mark(["a"])
    now[0] = 15.0
    ledger.mark(["b"])
    assert ledger.seen(["a", "b"]) == {"a", "b"}
    now[0] = 25.0
    assert ledger.seen(["a", "b"]) == {"b"}
    now[0] = 45.0
    assert ledger.seen(["a", "b"]) == set()
