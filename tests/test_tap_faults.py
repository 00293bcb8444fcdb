"""Faults with a real, private Redis server: absent, killed and restarted, paused, queue full,
hook exceptions. In every case the served requests succeed with bit-identical outputs, drops
are counted, and the tap reconnects by itself when Redis is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import RedisServer, drain_samples, make_tiny

import monitor
from monitor.tap import Tap
from monitor.transport import Transport, open_transport

pytestmark = pytest.mark.redis

# Fast failure and recovery: a hung Redis costs the exporter 0.3 s per attempt, and it retries
# at most 0.2 s after a failure.
FAST = dict(transport_timeout_s=0.3, backoff_initial_s=0.05, backoff_max_s=0.2, export_batch=4)


@pytest.fixture
def model() -> torch.nn.Module:
    return make_tiny("llama")


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randint(3, 120, (1, 6))


@pytest.fixture
def reference(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The unhooked model's logits (taken before any tap is attached)."""
    with torch.no_grad():
        return model(input_ids=inputs).logits


@pytest.fixture
def reader(private_redis: RedisServer) -> Iterator[Any]:
    """A consumer transport factory on the private server's stream (one group ``g``)."""
    made: list[Transport] = []

    def make() -> Transport:
        t = open_transport(private_redis.url, stream="faults", socket_timeout=5.0)
        t.ensure_group("g")
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _serve(tap: Tap, model: torch.nn.Module, inputs: torch.Tensor, reference: torch.Tensor, prefix: str,
           n: int) -> None:
    """Serve ``n`` sampled requests; each must succeed with the unhooked model's exact output."""
    for i in range(n):
        with tap.request(f"{prefix}-{i}"), torch.no_grad():
            out = model(input_ids=inputs).logits
        assert torch.equal(out, reference)


def _until_published(tap: Tap, model: torch.nn.Module, inputs: torch.Tensor, reference: torch.Tensor,
                     prefix: str, timeout: float = 20.0) -> int:
    """Keep serving (one request, then a flush) until a sample is published again: the tap must
    reconnect on its own. Returns how many requests it took."""
    before = tap.exporter.exported
    deadline = time.monotonic() + timeout
    i = 0
    while tap.exporter.exported == before:
        assert time.monotonic() < deadline, f"no reconnection within {timeout}s: {tap.stats()}"
        _serve(tap, model, inputs, reference, f"{prefix}{i}", 1)
        tap.flush(5.0)
        i += 1
    return i


def _accounted(tap: Tap) -> None:
    st = tap.stats()
    assert st["sampled"] == st["exported"] + sum(st["drops"].values()), st


def test_redis_absent_when_the_tap_attaches(private_redis: RedisServer, model: Any, inputs: Any,
                                            reference: Any, reader: Any) -> None:
    """With no Redis at attach time requests succeed and drops are counted; once Redis starts,
    samples are published without any action."""
    tap = monitor.attach(model, sample_rate=1.0, transport=private_redis.url, stream="faults", **FAST)
    _serve(tap, model, inputs, reference, "down", 5)
    assert tap.flush(5.0)
    st = tap.stats()
    assert st["exported"] == 0 and st["drops"]["transport_error"] >= 1
    assert st["drops"]["transport_error"] + st["drops"]["transport_down"] == 5
    assert tap.registry.get_sample_value("layerwatch_tap_transport_errors_total", {"model": tap.model_name}) >= 1
    private_redis.start()
    consumer = reader()
    _until_published(tap, model, inputs, reference, "up")
    got = drain_samples(consumer)
    assert got and all(s.request_id.startswith("up") for s in got)
    _accounted(tap)
    assert tap.close(5.0)


def test_redis_killed_mid_stream_and_restarted(private_redis: RedisServer, model: Any, inputs: Any,
                                               reference: Any, reader: Any) -> None:
    """Redis killed with SIGKILL mid-stream: requests keep succeeding, drops are counted, and
    after a restart on the same port the tap publishes again by itself."""
    private_redis.start()
    consumer = reader()
    tap = monitor.attach(model, sample_rate=1.0, transport=private_redis.url, stream="faults", **FAST)
    _serve(tap, model, inputs, reference, "before", 3)
    assert tap.flush(5.0) and tap.exporter.exported == 3
    assert len(drain_samples(consumer)) == 3
    private_redis.kill()
    _serve(tap, model, inputs, reference, "dead", 4)
    assert tap.flush(5.0)
    drops = tap.stats()["drops"]
    assert drops["transport_error"] >= 1 and drops["transport_error"] + drops["transport_down"] == 4
    private_redis.start()  # empty: nothing was persisted
    consumer = reader()
    _until_published(tap, model, inputs, reference, "after")
    got = drain_samples(consumer)
    assert got and all(s.request_id.startswith("after") for s in got)
    _accounted(tap)
    assert tap.close(5.0)


def test_redis_paused(private_redis: RedisServer, model: Any, inputs: Any, reference: Any,
                      reader: Any) -> None:
    """Under CLIENT PAUSE the exporter's publish hangs until its timeout, never the serving
    thread: requests served meanwhile succeed while a sample is still in flight; the stuck batch
    is counted as transport_error and publishing resumes after the pause."""
    private_redis.start()
    consumer = reader()
    tap = monitor.attach(model, sample_rate=1.0, transport=private_redis.url, stream="faults",
                         **{**FAST, "transport_timeout_s": 1.0})
    _serve(tap, model, inputs, reference, "before", 2)
    assert tap.flush(5.0) and tap.exporter.exported == 2
    admin = private_redis.client()
    admin.execute_command("CLIENT", "PAUSE", 2500, "WRITE")
    _serve(tap, model, inputs, reference, "paused", 3)
    assert tap.stats()["queue_depth"] >= 1  # the serving thread did not wait for the publish
    assert tap.flush(10.0)
    assert tap.stats()["drops"]["transport_error"] >= 1
    admin.execute_command("CLIENT", "UNPAUSE")
    _until_published(tap, model, inputs, reference, "after")
    got = {s.request_id for s in drain_samples(consumer)}
    assert {"before-0", "before-1"} <= got and any(r.startswith("after") for r in got)
    _accounted(tap)
    assert tap.close(5.0)
    admin.close()


def test_queue_full_while_redis_is_paused(private_redis: RedisServer, model: Any, inputs: Any,
                                          reference: Any, reader: Any) -> None:
    """With publishing stuck, samples beyond queue_max_items are dropped as queue_full and
    requests still succeed; the queued ones are published once Redis answers."""
    private_redis.start()
    consumer = reader()
    tap = monitor.attach(model, sample_rate=1.0, transport=private_redis.url, stream="faults",
                         queue_max_items=2, **{**FAST, "transport_timeout_s": 10.0})
    admin = private_redis.client()
    admin.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
    try:
        _serve(tap, model, inputs, reference, "r", 6)
        assert tap.stats()["drops"]["queue_full"] == 4
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    assert tap.flush(15.0)
    assert tap.exporter.exported == 2 and {s.request_id for s in drain_samples(consumer)} == {"r-0", "r-1"}
    _accounted(tap)
    assert tap.close(5.0)
    admin.close()


def test_exception_in_a_hook_with_redis(private_redis: RedisServer, model: Any, inputs: Any, reference: Any,
                                        reader: Any, monkeypatch: Any) -> None:
    """A hook that raises costs only that request's sample (hook_error); its output is identical
    and the following requests reach Redis."""
    private_redis.start()
    consumer = reader()
    tap = monitor.attach(model, sample_rate=1.0, transport=private_redis.url, stream="faults", **FAST)
    with monkeypatch.context() as m:
        m.setattr(tap, "_take", lambda *a: 1 / 0)
        _serve(tap, model, inputs, reference, "broken", 2)
    _serve(tap, model, inputs, reference, "fine", 2)
    assert tap.flush(5.0)
    assert tap.hook_errors == 2 and tap.stats()["drops"]["hook_error"] == 2
    assert {s.request_id for s in drain_samples(consumer)} == {"fine-0", "fine-1"}
    _accounted(tap)
    assert tap.close(5.0)


def test_close_is_quick_when_redis_is_gone(private_redis: RedisServer, model: Any, inputs: Any,
                                           reference: Any) -> None:
    """close() with Redis unreachable returns within its deadline and counts what it could not send."""
    tap = monitor.attach(model, sample_rate=1.0, transport=private_redis.url, stream="faults", **FAST)
    _serve(tap, model, inputs, reference, "x", 3)
    t0 = time.monotonic()
    tap.close(2.0)
    assert time.monotonic() - t0 < 3.0
    _accounted(tap)
