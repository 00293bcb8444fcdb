"""Idempotency ledger: remembers which sample ids already reached the audit trail.

Shared by all replicas (Redis), so a sample re-delivered after a replica died is not audited a
second time. The write order in the sidecar is: audit record -> fsync -> ledger mark -> XACK.
The only window for a duplicate is a replica dying between its fsync and its ledger mark; the
re-delivered copy is then audited with ``redelivered: true`` and the review tools deduplicate.

:class:`MemoryLedger` lives here; the Redis ledger is in :mod:`monitor.backends.redis`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol


class Ledger(Protocol):
    """Which sample ids were audited. Raises TransportError when the backend fails."""

    def seen(self, sample_ids: Iterable[str]) -> set[str]:
        """The ids of ``sample_ids`` already marked."""
        ...

    def mark(self, sample_ids: Iterable[str]) -> None:
        """Remember ``sample_ids`` as audited."""
        ...


class MemoryLedger:
    """In-process ledger (embedded mode)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def seen(self, sample_ids: Iterable[str]) -> set[str]:
        """The ids already marked."""
        with self._lock:
            return {s for s in sample_ids if s in self._seen}

    def mark(self, sample_ids: Iterable[str]) -> None:
        """Remember the ids."""
        with self._lock:
            self._seen.update(sample_ids)
