"""Transports for samples, chosen by URL: ``memory://NAME``, ``redis://``, ``rediss://``."""

from __future__ import annotations

from typing import Any

from monitor.transport.base import DeadLetter, Entry, StreamStats, Transport
from monitor.transport.memory import MemoryTransport
from monitor.urls import parse_url

__all__ = ["DeadLetter", "Entry", "StreamStats", "Transport", "MemoryTransport", "open_transport"]


def open_transport(url: str, **options: Any) -> Transport:
    """Open the transport a URL names (:func:`monitor.urls.parse_url`; ConfigError for an
    unsupported one). redis is imported only for a Redis URL."""
    if parse_url(url).kind == "memory":
        return MemoryTransport(url, **options)
    from monitor.transport.redis import RedisTransport

    return RedisTransport(url, **options)
