"""Transports for samples, chosen by URL: ``memory://NAME``, ``redis://``, ``rediss://``."""

from __future__ import annotations

from typing import Any

from monitor.errors import ConfigError
from monitor.transport.base import DeadLetter, Entry, StreamStats, Transport
from monitor.transport.memory import MemoryTransport

__all__ = ["DeadLetter", "Entry", "StreamStats", "Transport", "MemoryTransport", "open_transport"]


def open_transport(url: str, **options: Any) -> Transport:
    """Open the transport a URL names. redis is imported only for a redis URL."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "memory":
        return MemoryTransport(url, **options)
    if scheme in ("redis", "rediss", "unix"):
        from monitor.transport.redis import RedisTransport

        return RedisTransport(url, **options)
    raise ConfigError(f"transport: unsupported URL {url!r}; use memory://NAME, redis://HOST:PORT/DB or rediss://...")
