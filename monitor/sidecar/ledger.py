"""Idempotency ledger: remembers which sample ids already reached the audit trail.

Shared by all replicas (Redis), so a sample re-delivered after a replica died is not audited a
second time. The write order in the sidecar is: audit record -> fsync -> ledger mark -> XACK.
The only window for a duplicate is a replica dying between its fsync and its ledger mark; the
re-delivered copy is then audited with ``redelivered: true`` and the review tools deduplicate.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from monitor.errors import TransportError


class MemoryLedger:
    """In-process ledger (embedded mode)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def seen(self, sample_ids: Iterable[str]) -> set[str]:
        with self._lock:
            return {s for s in sample_ids if s in self._seen}

    def mark(self, sample_ids: Iterable[str]) -> None:
        with self._lock:
            self._seen.update(sample_ids)


class RedisLedger:
    """One Redis key per sample id with a TTL: ``<prefix>:<sample_id>``."""

    def __init__(self, url: str, prefix: str, ttl_s: int) -> None:
        import redis

        self._r = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0)
        self.prefix = prefix
        self.ttl_s = ttl_s

    def seen(self, sample_ids: Iterable[str]) -> set[str]:
        ids = list(sample_ids)
        if not ids:
            return set()
        from redis.exceptions import RedisError

        try:
            flags = self._r.pipeline(transaction=False)
            for s in ids:
                flags.exists(f"{self.prefix}:{s}")
            return {s for s, f in zip(ids, flags.execute(), strict=True) if f}
        except RedisError as exc:
            raise TransportError(f"ledger lookup failed: {exc}") from exc

    def mark(self, sample_ids: Iterable[str]) -> None:
        from redis.exceptions import RedisError

        try:
            pipe = self._r.pipeline(transaction=False)
            for s in sample_ids:
                pipe.set(f"{self.prefix}:{s}", 1, ex=self.ttl_s)
            pipe.execute()
        except RedisError as exc:
            raise TransportError(f"ledger mark failed: {exc}") from exc
