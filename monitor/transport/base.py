"""The transport seam: a tiny interface with an in-memory and a Redis Streams implementation.

Semantics follow Redis Streams with one consumer group per sidecar pool:

* ``publish`` appends entries (the stream is bounded: the oldest are trimmed past ``maxlen``);
* ``read`` delivers new entries to one consumer of a group (each entry to one consumer);
* delivered entries stay *pending* until ``ack``; ``claim_stale`` hands entries pending longer
  than ``min_idle_ms`` (their consumer died) to another consumer: at-least-once delivery;
* ``dead_letter`` moves a poison entry to a side stream with its reason;
* ``stats`` reports length, lag (not yet delivered), pending and ``trimmed`` (entries trimmed
  by ``maxlen`` before any consumer saw them: counted as lost).

Backend errors are mapped to :class:`~monitor.errors.TransportError`. The same contract test
suite (tests/test_transport_contract.py) runs against both implementations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One stream entry as delivered to a consumer."""

    id: str
    data: bytes
    deliveries: int = 1  # how many times it has been delivered (>1 after a reclaim)


@dataclass(frozen=True)
class DeadLetter:
    """A poison entry moved aside, with why."""

    id: str
    original_id: str
    reason: str
    detail: str
    data: bytes


@dataclass(frozen=True)
class StreamStats:
    """Health of the stream as seen by one consumer group."""

    length: int  # entries currently in the stream
    entries_added: int  # all entries ever added
    lag: int  # entries not yet delivered to the group
    pending: int  # delivered, not acknowledged
    trimmed: int  # entries trimmed before delivery (lost)
    dead_letters: int  # entries in the dead-letter stream


class Transport(ABC):
    """Publishing side (the tap) and consuming side (the sidecar) of a sample stream.

    Threading: ``publish`` is called from the tap's exporter thread only, never from the
    serving thread; consumers call the rest from the sidecar's worker.
    """

    url: str
    stream: str

    @abstractmethod
    def publish(self, payloads: Sequence[bytes]) -> list[str]:
        """Append payloads; return their entry ids. Raises TransportError on failure."""

    @abstractmethod
    def ensure_group(self, group: str) -> None:
        """Create the consumer group (from the start of the stream) if it does not exist."""

    @abstractmethod
    def read(self, group: str, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Deliver up to ``count`` new entries to ``consumer``, waiting up to ``block_ms``."""

    @abstractmethod
    def ack(self, group: str, ids: Sequence[str]) -> int:
        """Acknowledge entries; return how many were pending."""

    @abstractmethod
    def claim_stale(self, group: str, consumer: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over entries pending longer than ``min_idle_ms`` from any consumer."""

    @abstractmethod
    def dead_letter(self, entry: Entry, reason: str, detail: str) -> None:
        """Move ``entry`` to the dead-letter stream with a reason (the caller then acks it)."""

    @abstractmethod
    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, oldest first."""

    @abstractmethod
    def stats(self, group: str) -> StreamStats:
        """Length, lag, pending, trimmed and dead-letter counts for ``group``."""

    @abstractmethod
    def ping(self) -> bool:
        """True when the backend answers (used by readiness)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. Further calls raise TransportClosed."""
