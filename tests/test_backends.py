"""Backends chosen by URL: one parser, one Redis pool per process, one error mapping."""

from __future__ import annotations

import pytest

from monitor.backends import open_backend
from monitor.backends.ledger import MemoryLedger
from monitor.backends.redis import RedisBackend, connect, mapped_errors
from monitor.drift.store import BaselineStore
from monitor.errors import AuditError, BaselineError, ConfigError, TransportError
from monitor.transport import MemoryTransport
from monitor.urls import parse_url, strip_credentials

DEAD = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def test_url_schemes_are_parsed_in_one_place() -> None:
    """memory:// is the in-process backend, redis/rediss/unix are Redis; anything else is a
    ConfigError naming the field and the schemes that work."""
    assert parse_url("memory://x").kind == "memory" and not parse_url("memory://x").shared
    assert {parse_url(u).kind for u in ("redis://h/0", "rediss://h/0", "unix:///tmp/r.sock")} == {"redis"}
    with pytest.raises(ConfigError, match=r"audit.head_store: unsupported URL 'kafka://x'.*memory://NAME"):
        parse_url("kafka://x", field="audit.head_store")
    assert strip_credentials("redis://user:pw@h:6379/0") == "redis://***@h:6379/0"


def test_memory_backend_hands_out_in_process_parts_and_no_client() -> None:
    """The memory backend gives a memory transport and ledger and no Redis client."""
    b = open_backend("memory://backend-test")
    assert isinstance(b.transport(stream="s", maxlen=100), MemoryTransport)
    assert isinstance(b.ledger(key_prefix="p", ttl_s=60), MemoryLedger)
    assert b.client() is None


def test_one_pool_per_process_and_url(redis_url: str) -> None:
    """Every client of one URL shares one connection pool; the transport and ledger use it."""
    b = RedisBackend(redis_url)
    assert b.client().connection_pool is connect(redis_url).connection_pool
    t = b.transport(stream="lw:test:backend", maxlen=100)
    assert t.ping()
    assert b.ledger(key_prefix="lw:test:backend:ledger", ttl_s=60).seen(["nope"]) == set()


@pytest.mark.parametrize(("error", "what"), [(TransportError, "ledger lookup failed"),
                                             (BaselineError, "baseline store"), (AuditError, "audit head")])
def test_redis_errors_are_mapped_to_the_callers_error_with_what_failed(error: type[Exception], what: str) -> None:
    """An unreachable Redis raises the component's own error, naming what failed, where, and what to do."""
    with pytest.raises(error, match=rf"{what}: Redis at redis://127.0.0.1:1/0 is unavailable .*check the Redis URL"):
        with mapped_errors(error, what, DEAD):  # type: ignore[arg-type]
            connect(DEAD).ping()


def test_components_on_a_dead_redis_fail_with_their_own_errors() -> None:
    """The ledger raises TransportError and the baseline store BaselineError when Redis is down."""
    b = RedisBackend(DEAD)
    with pytest.raises(TransportError, match="ledger"):
        b.ledger(key_prefix="p", ttl_s=60).mark(["a"])
    with pytest.raises(BaselineError, match="baseline store"):
        BaselineStore("m", redis=b.client()).active_id()
