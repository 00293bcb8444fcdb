"""One contract suite for every transport: memory and the real Redis server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from monitor.errors import ConfigError, TransportClosed
from monitor.transport import MemoryTransport, Transport, open_transport


@pytest.fixture(params=["memory", "redis"])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    """A fresh transport of each kind with a small maxlen (8) so trimming is testable."""
    if request.param == "memory":
        t: Transport = MemoryTransport(f"memory://{uuid.uuid4().hex}", maxlen=8)
    else:
        url = request.getfixturevalue("redis_url")
        stream = request.getfixturevalue("stream_name")
        t = open_transport(url, stream=stream, maxlen=8)
    yield t
    t.close()  # the stream_name fixture deletes the Redis keys


def _drain(t: Transport, group: str, consumer: str) -> list[bytes]:
    out = []
    while True:
        got = t.read(group, consumer, count=100, block_ms=0)
        if not got:
            return out
        out += [e.data for e in got]
        t.ack(group, [e.id for e in got])


def test_published_entries_are_delivered_in_order_once(transport: Transport) -> None:
    """Entries reach the group in publish order and a second read returns nothing new."""
    transport.ensure_group("g")
    transport.publish([b"a", b"b", b"c"])
    assert _drain(transport, "g", "c1") == [b"a", b"b", b"c"]
    assert transport.read("g", "c1", count=10, block_ms=0) == []


def test_two_consumers_split_the_work(transport: Transport) -> None:
    """Two consumers of one group never receive the same entry."""
    transport.ensure_group("g")
    transport.publish([bytes([i]) for i in range(6)])
    a = transport.read("g", "c1", count=3, block_ms=0)
    b = transport.read("g", "c2", count=10, block_ms=0)
    assert {e.data for e in a}.isdisjoint({e.data for e in b})
    assert len(a) + len(b) == 6


def test_unacked_entries_are_reclaimed_after_idle_timeout(transport: Transport) -> None:
    """An entry delivered but never acked (its consumer died) is claimed by another consumer."""
    transport.ensure_group("g")
    transport.publish([b"x"])
    first = transport.read("g", "dead-consumer", count=1, block_ms=0)
    assert [e.data for e in first] == [b"x"]
    assert transport.claim_stale("g", "c2", min_idle_ms=10_000, count=10) == []
    deadline = time.monotonic() + 5.0  # the entry becomes claimable once it has been idle 20 ms
    while not (claimed := transport.claim_stale("g", "c2", min_idle_ms=20, count=10)) and time.monotonic() < deadline:
        pass
    assert [e.data for e in claimed] == [b"x"]
    assert claimed[0].deliveries >= 2
    assert transport.stats("g").pending == 1
    assert transport.ack("g", [claimed[0].id]) == 1
    assert transport.stats("g").pending == 0


def _claim(t: Transport, consumer: str, **kw: object) -> list:
    deadline = time.monotonic() + 5.0  # claimable once idle 20 ms
    while not (got := t.claim_stale("g", consumer, min_idle_ms=20, count=10, **kw)) and time.monotonic() < deadline:  # type: ignore[arg-type]
        pass
    return got


def test_reclaims_carry_the_real_delivery_count(transport: Transport) -> None:
    """Each reclaim counts one more delivery, as the backend counts it (issue 17: Redis reported 2 every time)."""
    transport.ensure_group("g")
    transport.publish([b"x"])
    assert [e.deliveries for e in transport.read("g", "c1", count=1, block_ms=0)] == [1]
    assert [e.deliveries for e in _claim(transport, "c2")] == [2]
    assert [e.deliveries for e in _claim(transport, "c3")] == [3]
    assert [e.deliveries for e in _claim(transport, "c2")] == [4]


def test_touch_keeps_an_entry_without_counting_a_delivery(transport: Transport) -> None:
    """touch() resets an entry's idle time (nobody can claim it yet) and leaves its delivery count alone."""
    transport.ensure_group("g")
    transport.publish([b"x"])
    (e,) = transport.read("g", "c1", count=1, block_ms=0)
    time.sleep(0.3)
    transport.touch("g", "c1", [e.id])
    assert transport.claim_stale("g", "c2", min_idle_ms=250, count=10) == []
    assert [x.deliveries for x in _claim(transport, "c2")] == [2]


def test_reads_withhold_payloads_over_the_byte_limit(transport: Transport) -> None:
    """An entry over max_entry_bytes arrives as its size and digest, without its payload, on read and on reclaim."""
    transport.ensure_group("g")
    big = b"\x01" * 100_000
    transport.publish([b"small", big])
    small, withheld = transport.read("g", "c1", count=10, block_ms=0, max_entry_bytes=50_000)
    assert (small.data, small.withheld) == (b"small", None)
    assert withheld.data == b"" and withheld.withheld is not None and withheld.withheld >= len(big)
    (again,) = _claim(transport, "c2", max_entry_bytes=50_000) if transport.ack("g", [small.id]) else []
    assert again.data == b"" and again.withheld == withheld.withheld and again.deliveries == 2


def test_dead_letters_are_bounded_in_entries_and_bytes(transport: Transport) -> None:
    """Payloads over the dead-letter cap are kept as size and sha256; only dead_maxlen entries are kept."""
    import hashlib

    transport.dead_maxlen = 3  # type: ignore[attr-defined]
    transport.dead_payload_max_bytes = 100  # type: ignore[attr-defined]
    transport.ensure_group("g")
    big = b"\x02" * 1000
    transport.publish([big] + [b"p%d" % i for i in range(5)])
    for e in transport.read("g", "c1", count=10, block_ms=0):
        transport.dead_letter(e, "undecodable", "x")
    dead = transport.dead_letters()
    assert [d.data for d in dead] == [b"p2", b"p3", b"p4"]
    assert transport.stats("g").dead_letters == 3
    transport.publish([big])
    (e,) = transport.read("g", "c1", count=1, block_ms=0)
    transport.dead_letter(e, "oversized", "x")
    last = transport.dead_letters()[-1]
    assert (last.data, last.size, last.digest) == (b"", 1000, "sha256:" + hashlib.sha256(big).hexdigest())


def test_trimmed_entries_are_counted_as_lost(transport: Transport) -> None:
    """Entries trimmed by maxlen before any delivery show up in stats().trimmed."""
    transport.ensure_group("g")
    # Redis trims approximately (whole macro-nodes of 100 entries): publish well past maxlen.
    transport.publish([b"%d" % i for i in range(400)])
    st = transport.stats("g")
    assert st.entries_added == 400
    got = _drain(transport, "g", "c1")
    st = transport.stats("g")
    assert st.lag == 0
    assert st.trimmed == 400 - len(got) > 0
    assert got[-1] == b"399"


def test_lag_counts_undelivered_entries(transport: Transport) -> None:
    """stats().lag is the number of entries not yet delivered to the group."""
    transport.ensure_group("g")
    transport.publish([b"1", b"2", b"3"])
    assert transport.stats("g").lag == 3
    transport.read("g", "c1", count=2, block_ms=0)
    st = transport.stats("g")
    assert (st.lag, st.pending) == (1, 2)


def test_dead_letters_keep_reason_and_bytes(transport: Transport) -> None:
    """A dead-lettered entry is kept with its reason, detail and original bytes."""
    transport.ensure_group("g")
    transport.publish([b"garbage"])
    (e,) = transport.read("g", "c1", count=1, block_ms=0)
    transport.dead_letter(e, "undecodable", "missing magic")
    transport.ack("g", [e.id])
    (dl,) = transport.dead_letters()
    assert (dl.reason, dl.detail, dl.data, dl.original_id) == ("undecodable", "missing magic", b"garbage", e.id)
    assert transport.stats("g").dead_letters == 1


def test_blocking_read_wakes_on_publish(transport: Transport) -> None:
    """A read that blocks returns as soon as an entry is published from another thread."""
    import threading

    transport.ensure_group("g")
    transport.read("g", "c1", count=1, block_ms=0)
    threading.Timer(0.1, lambda: transport.publish([b"late"])).start()
    t0 = time.monotonic()
    got = transport.read("g", "c1", count=1, block_ms=1500)
    assert [e.data for e in got] == [b"late"]
    assert time.monotonic() - t0 < 1.4


def test_closed_transport_refuses_use(transport: Transport) -> None:
    """After close(), calls raise TransportClosed instead of touching the backend."""
    transport.close()
    with pytest.raises(TransportClosed):
        transport.publish([b"x"])


def test_unknown_url_scheme_is_a_config_error() -> None:
    """An unsupported URL fails with a ConfigError naming the transport field."""
    with pytest.raises(ConfigError, match="transport"):
        open_transport("kafka://x")
