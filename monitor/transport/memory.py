"""In-memory transport: the embedded default (``memory://NAME``) and the demo's transport.

Brokers are process-global and keyed by name, so a tap and an embedded sidecar in the same
process that open ``memory://demo`` share one stream. It implements the full consumer-group
contract (pending entries, reclaim, trimming, dead letters) so the same tests run on it and on
Redis.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from monitor.errors import TransportClosed
from monitor.transport.base import (
    DEAD_MAXLEN,
    DEAD_PAYLOAD_MAX_BYTES,
    DeadLetter,
    Entry,
    StreamStats,
    Transport,
    dead_letter_payload,
)


@dataclass
class _Pending:
    consumer: str
    delivered_at: float
    deliveries: int


@dataclass
class _Group:
    last_delivered: int = 0  # sequence number of the last delivered entry
    delivered_total: int = 0  # first-time deliveries
    pending: dict[int, _Pending] = field(default_factory=dict)


class _Broker:
    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.cond = threading.Condition()
        self.entries: OrderedDict[int, bytes] = OrderedDict()
        self.added = 0
        self.groups: dict[str, _Group] = {}
        self.dead: list[DeadLetter] = []
        self.dead_added = 0


_BROKERS: dict[str, _Broker] = {}
_BROKERS_LOCK = threading.Lock()


def _id(seq: int) -> str:
    return f"{seq}-0"


def _seq(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _entry(seq: int, data: bytes, deliveries: int, max_entry_bytes: int | None) -> Entry:
    if max_entry_bytes is not None and len(data) > max_entry_bytes:
        return Entry(_id(seq), b"", deliveries, withheld=len(data), digest="sha256:" + hashlib.sha256(data).hexdigest())
    return Entry(_id(seq), data, deliveries)


class MemoryTransport(Transport):
    """Consumer-group stream held in this process's memory."""

    def __init__(self, url: str = "memory://default", *, stream: str = "layerwatch:samples",
                 maxlen: int = 10_000, dead_maxlen: int = DEAD_MAXLEN,
                 dead_payload_max_bytes: int = DEAD_PAYLOAD_MAX_BYTES) -> None:
        self.url = url
        name = url.split("://", 1)[1] or "default"
        self.stream = stream
        self.dead_maxlen = dead_maxlen
        self.dead_payload_max_bytes = dead_payload_max_bytes
        key = f"{name}/{stream}"
        with _BROKERS_LOCK:
            broker = _BROKERS.get(key)
            if broker is None:
                broker = _BROKERS[key] = _Broker(maxlen)
        self._b = broker
        self._closed = False

    @staticmethod
    def reset_all() -> None:
        """Forget every in-memory stream (tests)."""
        with _BROKERS_LOCK:
            _BROKERS.clear()

    def _check(self) -> None:
        if self._closed:
            raise TransportClosed(f"{self.url} is closed")

    def publish(self, payloads: Sequence[bytes]) -> list[str]:
        self._check()
        b = self._b
        ids = []
        with b.cond:
            for p in payloads:
                b.added += 1
                b.entries[b.added] = bytes(p)
                ids.append(_id(b.added))
            while len(b.entries) > b.maxlen:
                b.entries.popitem(last=False)
            b.cond.notify_all()
        return ids

    def ensure_group(self, group: str) -> None:
        self._check()
        with self._b.cond:
            self._b.groups.setdefault(group, _Group())

    def read(self, group: str, consumer: str, count: int, block_ms: int,
             max_entry_bytes: int | None = None) -> list[Entry]:
        self._check()
        b = self._b
        deadline = time.monotonic() + block_ms / 1000.0
        with b.cond:
            g = b.groups.setdefault(group, _Group())
            while True:
                fresh = [s for s in b.entries if s > g.last_delivered][:count]
                if fresh:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return []
                b.cond.wait(left)
            now = time.monotonic()
            out = []
            for s in fresh:
                g.pending[s] = _Pending(consumer, now, 1)
                out.append(_entry(s, b.entries[s], 1, max_entry_bytes))
            g.last_delivered = fresh[-1]
            g.delivered_total += len(fresh)
            return out

    def ack(self, group: str, ids: Sequence[str]) -> int:
        self._check()
        with self._b.cond:
            g = self._b.groups.setdefault(group, _Group())
            return sum(1 for i in ids if g.pending.pop(_seq(i), None) is not None)

    def claim_stale(self, group: str, consumer: str, min_idle_ms: int, count: int,
                    max_entry_bytes: int | None = None) -> list[Entry]:
        self._check()
        b = self._b
        now = time.monotonic()
        out: list[Entry] = []
        with b.cond:
            g = b.groups.setdefault(group, _Group())
            for s, p in sorted(g.pending.items()):
                if len(out) >= count:
                    break
                if (now - p.delivered_at) * 1000.0 < min_idle_ms:
                    continue
                data = b.entries.get(s)
                if data is None:  # trimmed while pending (like XAUTOCLAIM's deleted ids)
                    del g.pending[s]
                    continue
                p.consumer, p.delivered_at, p.deliveries = consumer, now, p.deliveries + 1
                out.append(_entry(s, data, p.deliveries, max_entry_bytes))
        return out

    def touch(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        self._check()
        now = time.monotonic()
        with self._b.cond:
            g = self._b.groups.setdefault(group, _Group())
            for i in ids:
                p = g.pending.get(_seq(i))
                if p is not None:
                    p.consumer, p.delivered_at = consumer, now

    def dead_letter(self, entry: Entry, reason: str, detail: str) -> None:
        self._check()
        data, size, digest = dead_letter_payload(entry, self.dead_payload_max_bytes)
        with self._b.cond:
            dl = self._b.dead
            self._b.dead_added += 1
            dl.append(DeadLetter(f"{self._b.dead_added}-0", entry.id, reason, detail[:1000], data, size, digest,
                                 entry.deliveries))
            del dl[: max(0, len(dl) - self.dead_maxlen)]

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        self._check()
        with self._b.cond:
            return list(self._b.dead[-count:])

    def stats(self, group: str) -> StreamStats:
        self._check()
        b = self._b
        with b.cond:
            g = b.groups.setdefault(group, _Group())
            lag = sum(1 for s in b.entries if s > g.last_delivered)
            # Every entry ever added is delivered, still waiting (lag), or was trimmed unseen.
            trimmed = b.added - g.delivered_total - lag
            return StreamStats(len(b.entries), b.added, lag, len(g.pending), trimmed, len(b.dead))

    def ping(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True
        with self._b.cond:
            self._b.cond.notify_all()
