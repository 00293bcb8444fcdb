"""Redis Streams transport (``redis://`` and ``rediss://``): the production transport.

* publish: pipelined ``XADD ... MAXLEN ~ maxlen`` (approximate trimming keeps XADD O(1));
* read: a Lua script runs ``XREADGROUP ... >`` and counts first-time deliveries in a shared
  counter atomically, so ``stats().trimmed`` (= the group's logical read position minus what was
  really delivered) counts entries trimmed before any replica saw them; when nothing is new it
  polls the script every :data:`POLL_S` until ``block_ms`` has passed (a blocking ``XREAD`` as
  the wake-up would hand the new entry's whole payload to the client, whatever its size);
* reads are bounded in bytes on the server: the script sends an entry whose fields exceed
  ``max_entry_bytes`` as its size only (the payload never crosses the socket; not digested
  either, which would block Redis a while longer), and fields other than the payload are never
  sent. Redis still copies a delivered entry into the script once (about 0.8 s for 100 MB on
  the test machine: a hostile producer's XADD of it took 0.4 s);
* at-least-once: ``XACK`` after processing, ``XAUTOCLAIM`` of entries idle past a timeout, each
  claimed entry with Redis's own delivery counter (``XPENDING``, read in the same script);
* poison entries go to ``<stream>:dead`` with their reason, trimmed exactly at ``dead_maxlen``,
  payloads above ``dead_payload_max_bytes`` kept as size and digest;
* stats come from ``XINFO GROUPS`` (entries read + lag = entries added); only when Redis cannot
  tell the lag (entries were trimmed past the group) is ``XINFO STREAM`` read, inside a script
  that returns only its counter: the command's reply carries the first and last entries, payloads
  included, and even inside a script Redis copies them (about 0.8 s per 100 MB).

Connections come from the process's shared pool (:func:`monitor.backends.redis.connect`, one
set of timeouts); every redis-py error is mapped to :class:`~monitor.errors.TransportError` by
:func:`monitor.backends.redis.mapped_errors`. redis-py reconnects by itself on the next command
once the server is back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import ResponseError

from monitor.backends.redis import Timeouts, connect, mapped_errors
from monitor.errors import TransportClosed, TransportError
from monitor.transport.base import (
    DEAD_MAXLEN,
    DEAD_PAYLOAD_MAX_BYTES,
    DeadLetter,
    Entry,
    StreamStats,
    Transport,
    dead_letter_payload,
)
from monitor.urls import redact_url

# An entry as {id, payload, withheld size or -1, digest ('': Redis does not digest it)}; payloads
# over the limit stay in Redis.
_SHAPE = """
local function shape(e, limit)
  local fields = e[2]
  if not fields then return false end
  local size, data = 0, ''
  for i = 1, #fields, 2 do
    size = size + #fields[i] + #fields[i + 1]
    if fields[i] == 'd' then data = fields[i + 1] end
  end
  if limit > 0 and size > limit then return {e[1], '', size, ''} end
  return {e[1], data, -1, ''}
end
"""

_READ_SCRIPT = _SHAPE + """
local limit = tonumber(ARGV[4])
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if r and r[1] and #r[1][2] > 0 then
  redis.call('INCRBY', KEYS[2], #r[1][2])
  local out = {}
  for i, e in ipairs(r[1][2]) do out[i] = shape(e, limit) or {e[1], '', -1, ''} end
  return out
end
return {}
"""

_ADDED_SCRIPT = """
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'entries-added' then return info[i + 1] end
end
return -1
"""
POLL_S = 0.05  # how often an idle read asks again

_CLAIM_SCRIPT = _SHAPE + """
local limit = tonumber(ARGV[5])
local res = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
local deleted = res[3]
if deleted and #deleted > 0 then redis.call('INCRBY', KEYS[2], #deleted) end
local out = {}
for _, e in ipairs(res[2]) do
  local s = shape(e, limit)
  if s then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    s[5] = (p[1] and p[1][4]) or 1
    out[#out + 1] = s
  end
end
return out
"""


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class RedisTransport(Transport):
    """A Redis stream with consumer groups, a dead-letter stream and delivery accounting."""

    def __init__(self, url: str, *, stream: str = "layerwatch:samples", maxlen: int = 10_000,
                 dead_maxlen: int = DEAD_MAXLEN, dead_payload_max_bytes: int = DEAD_PAYLOAD_MAX_BYTES,
                 socket_timeout: float = 2.0, connect_timeout: float = 1.0,
                 client: redis.Redis | None = None) -> None:
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.dead_maxlen = dead_maxlen
        self.dead_payload_max_bytes = dead_payload_max_bytes
        self.dead_key = f"{stream}:dead"
        self._socket_timeout = socket_timeout
        self._r = client if client is not None else connect(url, Timeouts(connect_timeout, socket_timeout))
        self._read = self._r.register_script(_READ_SCRIPT)
        self._claim = self._r.register_script(_CLAIM_SCRIPT)
        self._added = self._r.register_script(_ADDED_SCRIPT)
        self._closed = False

    def _delivered_key(self, group: str) -> str:
        return f"{self.stream}:delivered:{group}"

    def _lost_key(self, group: str) -> str:
        return f"{self.stream}:lost_pending:{group}"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise TransportClosed(f"{redact_url(self.url)} is closed")
        with mapped_errors(TransportError, f"redis {what} on {self.stream!r} failed", self.url):
            return fn(*args, **kwargs)

    def publish(self, payloads: Sequence[bytes]) -> list[str]:
        def run() -> list[str]:
            pipe = self._r.pipeline(transaction=False)
            for p in payloads:
                pipe.xadd(self.stream, {b"d": p}, maxlen=self.maxlen, approximate=True)
            return [_s(i) for i in pipe.execute()]

        return self._call("XADD", run)  # type: ignore[no-any-return]

    def ensure_group(self, group: str) -> None:
        def run() -> None:
            try:
                self._r.xgroup_create(self.stream, group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        self._call("XGROUP CREATE", run)

    def read(self, group: str, consumer: str, count: int, block_ms: int,
             max_entry_bytes: int | None = None) -> list[Entry]:
        deadline = time.monotonic() + max(0, block_ms) / 1000.0
        keys, args = [self.stream, self._delivered_key(group)], [group, consumer, count, max_entry_bytes or 0]
        while True:
            rows = self._call("XREADGROUP", self._read, keys=keys, args=args)
            left = deadline - time.monotonic()
            if rows or left <= 0 or self._closed:
                return [_entry(row, 1) for row in rows]
            time.sleep(min(POLL_S, left))

    def ack(self, group: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return int(self._call("XACK", self._r.xack, self.stream, group, *ids))

    def claim_stale(self, group: str, consumer: str, min_idle_ms: int, count: int,
                    max_entry_bytes: int | None = None) -> list[Entry]:
        # pending entries trimmed before anyone acked them are counted as lost by the script
        rows = self._call("XAUTOCLAIM", self._claim, keys=[self.stream, self._lost_key(group)],
                          args=[group, consumer, min_idle_ms, count, max_entry_bytes or 0])
        return [_entry(row[:4], int(row[4])) for row in rows]

    def touch(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        if ids:  # JUSTID: the delivery counter stays as it is
            self._call("XCLAIM", self._r.xclaim, self.stream, group, consumer, 0, list(ids), justid=True)

    def dead_letter(self, entry: Entry, reason: str, detail: str) -> None:
        data, size, digest = dead_letter_payload(entry, self.dead_payload_max_bytes)
        fields = {b"d": data, b"reason": reason, b"detail": detail[:1000], b"original_id": entry.id,
                  b"size": size, b"digest": digest, b"deliveries": entry.deliveries}
        self._call("XADD dead-letter", self._r.xadd, self.dead_key, fields,
                   maxlen=self.dead_maxlen, approximate=False)  # exact: the bound is in bytes too

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        rows = self._call("XREVRANGE", self._r.xrevrange, self.dead_key, count=count)
        out = []
        for eid, fields in reversed(rows):
            f = dict(_pairs(fields))
            out.append(DeadLetter(_s(eid), _s(f.get(b"original_id", b"")), _s(f.get(b"reason", b"")),
                                  _s(f.get(b"detail", b"")), f.get(b"d", b""), int(f.get(b"size", 0) or 0),
                                  _s(f.get(b"digest", b"")), int(f.get(b"deliveries", 1) or 1)))
        return out

    def stats(self, group: str) -> StreamStats:
        def run() -> StreamStats:
            pipe = self._r.pipeline(transaction=False)
            pipe.xlen(self.stream)
            pipe.execute_command("XINFO", "GROUPS", self.stream)
            pipe.get(self._delivered_key(group))
            pipe.get(self._lost_key(group))
            pipe.xlen(self.dead_key)
            length, groups, delivered, lost, dead = pipe.execute()
            g = next((_kv(x) for x in groups if _s(_kv(x).get("name")) == group), {})
            pending = int(g.get("pending", 0) or 0)
            entries_read = g.get("entries-read")
            lag = g.get("lag")
            if entries_read is not None and lag is not None:  # the group's own counters (Redis 7)
                added = int(entries_read) + int(lag)
            else:  # lag is unknown after trimming past the group: ask the stream (a script: see above)
                added_raw = int(self._added(keys=[self.stream]))
                added = added_raw if added_raw >= 0 else int(length)  # Redis < 7: no entries-added
            read_pos = int(entries_read) if entries_read is not None else added - int(lag or 0)
            lag_i = int(lag) if lag is not None else max(0, added - read_pos)
            trimmed = max(0, read_pos - int(delivered or 0)) + int(lost or 0)
            return StreamStats(int(length), added, lag_i, pending, trimmed, int(dead))

        try:
            return self._call("XINFO", run)  # type: ignore[no-any-return]
        except TransportError as exc:
            if "no such key" in str(exc).lower():
                return StreamStats(0, 0, 0, 0, 0, 0)
            raise

    def ping(self) -> bool:
        try:
            return bool(self._call("PING", self._r.ping))
        except TransportError:
            return False

    def delete_all(self, group: str | None = None) -> None:
        """Delete the stream, its dead letters and counters (tests and tear-down)."""
        keys = [self.stream, self.dead_key]
        if group:
            keys += [self._delivered_key(group), self._lost_key(group)]
        self._call("DEL", self._r.delete, *keys)

    def close(self) -> None:
        self._closed = True  # the pool is the process's: other components keep using it


def _entry(row: Any, deliveries: int) -> Entry:
    """An entry from the scripts' {id, payload, withheld size or -1, digest}."""
    eid, data, withheld, digest = row
    if int(withheld) >= 0:
        return Entry(_s(eid), b"", deliveries, withheld=int(withheld), digest=_s(digest))
    return Entry(_s(eid), bytes(data), deliveries)


def _pairs(fields: Any) -> list[tuple[bytes, bytes]]:
    if isinstance(fields, dict):
        return list(fields.items())
    return [(fields[i], fields[i + 1]) for i in range(0, len(fields), 2)]


def _kv(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return {_s(k): v for k, v in raw.items()}
    return {_s(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}
