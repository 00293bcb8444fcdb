"""The transport seam: a tiny interface with an in-memory and a Redis Streams implementation.

Semantics follow Redis Streams with one consumer group per sidecar pool:

* ``publish`` appends entries (the stream is bounded: the oldest are trimmed past ``maxlen``);
* ``read`` delivers new entries to one consumer of a group (each entry to one consumer);
* delivered entries stay *pending* until ``ack``; ``claim_stale`` hands entries pending longer
  than ``min_idle_ms`` (their consumer died) to another consumer: at-least-once delivery;
* ``dead_letter`` moves a poison entry to a side stream with its reason; that stream is bounded
  in entries (``dead_maxlen``) and in bytes: a payload above ``dead_payload_max_bytes`` is kept
  as its size and sha256 digest only;
* reads are bounded in count and in bytes: ``read``/``claim_stale`` never hand over a payload
  larger than ``max_entry_bytes``; such an entry arrives with ``data`` empty and
  ``withheld`` set to its size (and ``digest`` when the backend computed one: memory does,
  Redis does not), so a 100 MB entry costs a consumer nothing but its dead letter;
* ``deliveries`` is the backend's own delivery count (1 on first delivery, +1 per reclaim);
* ``stats`` reports length, lag (not yet delivered), pending and ``trimmed`` (entries trimmed
  by ``maxlen`` before any consumer saw them: counted as lost).

Backend errors are mapped to :class:`~monitor.errors.TransportError`. The same contract test
suite (tests/test_transport_contract.py) runs against both implementations.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

DEAD_MAXLEN = 1000  # dead letters kept (the oldest are trimmed)
DEAD_PAYLOAD_MAX_BYTES = 64 * 1024  # larger payloads are kept as size + sha256 only


@dataclass(frozen=True)
class Entry:
    """One stream entry as delivered to a consumer."""

    id: str
    data: bytes
    deliveries: int = 1  # the backend's delivery count: 1 at first, +1 at every reclaim
    withheld: int | None = None  # size of a payload over the read limit (``data`` is then empty)
    digest: str = ""  # the backend's digest of a withheld payload ("sha1:..."), when it has one

    @property
    def size(self) -> int:
        """Bytes of the entry's payload as stored (withheld or not)."""
        return self.withheld if self.withheld is not None else len(self.data)


@dataclass(frozen=True)
class DeadLetter:
    """A poison entry moved aside, with why. ``data`` is empty when the payload was above the
    dead-letter cap (or withheld at read): ``size`` and ``digest`` then identify it."""

    id: str
    original_id: str
    reason: str
    detail: str
    data: bytes
    size: int = 0
    digest: str = ""
    deliveries: int = 1


def dead_letter_payload(entry: Entry, cap: int) -> tuple[bytes, int, str]:
    """(kept bytes, size, digest) of a poison entry under a dead-letter payload cap of ``cap``."""
    if entry.withheld is not None:
        return b"", entry.withheld, entry.digest
    if len(entry.data) <= cap:
        return entry.data, len(entry.data), ""
    return b"", len(entry.data), "sha256:" + hashlib.sha256(entry.data).hexdigest()


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
    def read(self, group: str, consumer: str, count: int, block_ms: int,
             max_entry_bytes: int | None = None) -> list[Entry]:
        """Deliver up to ``count`` new entries to ``consumer``, waiting up to ``block_ms``; payloads
        over ``max_entry_bytes`` are withheld (see the module docstring)."""

    @abstractmethod
    def ack(self, group: str, ids: Sequence[str]) -> int:
        """Acknowledge entries; return how many were pending."""

    @abstractmethod
    def claim_stale(self, group: str, consumer: str, min_idle_ms: int, count: int,
                    max_entry_bytes: int | None = None) -> list[Entry]:
        """Take over entries pending longer than ``min_idle_ms`` from any consumer; each carries
        its delivery count, this delivery included."""

    @abstractmethod
    def touch(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        """Keep ``ids`` pending with ``consumer`` and reset their idle time, without counting a
        delivery (a consumer retrying them after an infrastructure failure keeps them)."""

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
