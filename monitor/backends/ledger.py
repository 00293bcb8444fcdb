"""Idempotency ledger: remembers which sample ids already reached the audit trail.

Shared by all replicas (Redis), so a sample re-delivered after a replica died is not audited a
second time. The write order in the sidecar is: audit record -> fsync -> ledger mark -> XACK.
The only window for a duplicate is a replica dying between its fsync and its ledger mark; the
re-delivered copy is then audited with ``redelivered: true`` and the review tools deduplicate.

Each id is stored with a digest of its entry's bytes: a re-delivery carries the same bytes (a
duplicate, acked), another entry reusing the id does not (dead-lettered as ``duplicate_id``).
Ids are remembered for at least ``ttl_s`` (two generations, so at most twice that).

:class:`MemoryLedger` lives here; the Redis ledger is :mod:`monitor.backends.ledger_redis`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol


def payload_digest(data: bytes) -> str:
    """The digest (hex) a ledger keeps of an entry's bytes."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Ledger(Protocol):
    """Which sample ids were audited. Raises TransportError when the backend fails."""

    def lookup(self, sample_ids: Iterable[str]) -> dict[str, str]:
        """The payload digest recorded for each of ``sample_ids`` already marked ("" if none)."""
        ...

    def seen(self, sample_ids: Iterable[str]) -> set[str]:
        """The ids of ``sample_ids`` already marked."""
        ...

    def mark(self, sample_ids: Iterable[str], digests: Mapping[str, str] | None = None) -> None:
        """Remember ``sample_ids`` as audited, with their payload digests."""
        ...


class MemoryLedger:
    """In-process ledger (embedded mode): two generations of ``ttl_s``, like the Redis one."""

    def __init__(self, ttl_s: float = 24 * 3600, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._gen = int(clock() // ttl_s)
        self._current: dict[str, str] = {}
        self._previous: dict[str, str] = {}
        self._lock = threading.Lock()

    def _rotate(self) -> None:
        gen = int(self._clock() // self.ttl_s)
        if gen != self._gen:
            self._previous = self._current if gen == self._gen + 1 else {}
            self._current, self._gen = {}, gen

    def lookup(self, sample_ids: Iterable[str]) -> dict[str, str]:
        """The payload digests of the ids already marked."""
        with self._lock:
            self._rotate()
            out = {}
            for s in sample_ids:
                d = self._current.get(s, self._previous.get(s))
                if d is not None:
                    out[s] = d
            return out

    def seen(self, sample_ids: Iterable[str]) -> set[str]:
        """The ids already marked."""
        return set(self.lookup(sample_ids))

    def mark(self, sample_ids: Iterable[str], digests: Mapping[str, str] | None = None) -> None:
        """Remember the ids."""
        with self._lock:
            self._rotate()
            for s in sample_ids:
                self._current[s] = (digests or {}).get(s, "")
