"""Backends: where shared state lives, chosen once by URL (:func:`monitor.urls.parse_url`).

A backend hands out everything the sidecar keeps outside its own process:

* the sample **transport** (:class:`monitor.transport.Transport`);
* the idempotency **ledger** (:class:`~monitor.backends.ledger.Ledger`);
* a Redis **client** for the baseline store and the audit head store, or None for the
  in-memory backend (baselines then come from files, heads live beside the trail).

:class:`~monitor.backends.memory.MemoryBackend` serves ``memory://NAME`` (one process: the
embedded default and the demo); :class:`~monitor.backends.redis.RedisBackend` serves
``redis://``, ``rediss://`` and ``unix://`` with one connection pool per process, one set of
timeouts and one error mapping (:mod:`monitor.backends.redis`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from monitor.urls import BackendURL, parse_url

if TYPE_CHECKING:  # pragma: no cover
    from monitor.backends.ledger import Ledger
    from monitor.config import RedisSettings
    from monitor.transport.base import Transport

__all__ = ["Backend", "open_backend"]


class Backend(Protocol):
    """What a backend hands out. Built once per process by the composition root."""

    url: BackendURL

    def transport(self, *, stream: str, maxlen: int, **options: Any) -> Transport:
        """The sample stream (``options``: the transport's keywords, e.g. the dead-letter bounds)."""
        ...

    def ledger(self, *, key_prefix: str, ttl_s: int) -> Ledger:
        """The idempotency ledger shared by the replicas reading this backend."""
        ...

    def client(self) -> Any | None:
        """A Redis client on the process's shared pool, or None (memory backend)."""
        ...

    def close(self) -> None:
        """Release what this backend opened."""
        ...


def open_backend(url: str, *, field: str = "transport", redis: RedisSettings | None = None) -> Backend:
    """The backend ``url`` names (redis is imported only for a Redis URL); ``redis``: the
    credentials and TLS files of a Redis backend."""
    parsed = parse_url(url, field=field)
    if parsed.kind == "memory":
        from monitor.backends.memory import MemoryBackend

        return MemoryBackend(parsed)
    from monitor.backends.redis import NO_SETTINGS, RedisBackend

    return RedisBackend(parsed, settings=redis if redis is not None else NO_SETTINGS)
