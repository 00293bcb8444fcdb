"""The in-memory backend (``memory://NAME``): one process, nothing shared, nothing to close."""

from __future__ import annotations

from typing import Any

from monitor.backends.ledger import MemoryLedger
from monitor.transport.base import Transport
from monitor.transport.memory import MemoryTransport
from monitor.urls import BackendURL


class MemoryBackend:
    """Hands out an in-process transport and ledger; no Redis client."""

    def __init__(self, url: BackendURL) -> None:
        self.url = url

    def transport(self, *, stream: str, maxlen: int, **options: Any) -> Transport:
        """The process-global broker named by the URL."""
        return MemoryTransport(self.url.url, stream=stream, maxlen=maxlen, **options)

    def ledger(self, *, key_prefix: str, ttl_s: int) -> MemoryLedger:
        """A ledger private to this process (the key prefix only matters for Redis)."""
        return MemoryLedger(ttl_s)

    def client(self) -> None:
        """No Redis client: baselines come from files, audit heads stay beside the trail."""
        return None

    def close(self) -> None:
        """Nothing to release."""
