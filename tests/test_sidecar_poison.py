"""Poison isolation, delivery counting and bounds of the sidecar loop (issue 17, Why 1, 2, 3, 7).

Each test reproduces one "Why" item as a buggy or hostile producer would, through a real sidecar
(the tiny seeded Llama's logit lens, the real audit writer, memory or the real Redis), and fails
on the loop as it was at af6c262.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from monitor.errors import AuditError, AuditWriteError
from monitor.lenses.torch_lens import TorchLogitLens
from monitor.sidecar.bootstrap import open_audit
from monitor.sidecar.config import load_settings
from monitor.sidecar.service import Sidecar
from monitor.transport import MemoryTransport, Transport, open_transport
from tests.conftest import make_tiny
from tests.test_sidecar import _good_sample, _mutate_header, audit_records

MODEL = {"model": "LlamaForCausalLM"}


@pytest.fixture
def tiny() -> torch.nn.Module:
    return make_tiny("llama", seed=0)


@pytest.fixture
def good(tiny: torch.nn.Module) -> bytes:
    """One valid sample's bytes from a real tap on the tiny model."""
    MemoryTransport.reset_all()
    return _good_sample(tiny, "memory://probe")


@pytest.fixture
def make(tmp_path: Path, tiny: torch.nn.Module) -> Iterator[Any]:
    made: list[Sidecar] = []

    def build(transport: str, audit: Any = None, ledger: Any = None, **kw: Any) -> Sidecar:
        kw.setdefault("claim_idle_ms", 100)
        settings = load_settings(transport=transport, group="g", http_port=0, batch_wait_ms=10, batch_max=8,
                                 claim_interval_s=0.05, audit={"directory": tmp_path / f"audit-{len(made)}"},
                                 baseline={"learn_samples": 400, "window": 50}, **kw)
        parts = {"audit": audit(settings)} if audit else {}
        sc = Sidecar(settings, bank=TorchLogitLens(tiny), ledger=ledger, **parts)
        made.append(sc)
        return sc

    yield build
    for sc in made:
        sc.stop(5)


def _goods(good: bytes, n: int, prefix: str = "good") -> list[bytes]:
    return [_mutate_header(good, sample_id=f"{prefix}-{i}") for i in range(n)]


def _with_raw_header(good: bytes, raw: bytes) -> bytes:
    hlen = struct.unpack_from("<I", good, 4)[0]
    return good[:4] + struct.pack("<I", len(raw)) + raw + good[8 + hlen:]


def _steps(sc: Sidecar, n: int) -> None:
    for _ in range(n):
        sc.step()


def _sample_ids(sc: Sidecar) -> Counter[str]:
    return Counter(r["sample_id"] for r in audit_records(sc.settings.audit.directory) if r["kind"] == "sample")


def _memory(url: str) -> MemoryTransport:
    t = MemoryTransport(url)
    t.ensure_group("g")
    return t


# --------------------------------------------------------------------------- Why 1
def test_deeply_nested_header_is_dead_lettered_and_the_batch_is_processed(make: Any, good: bytes) -> None:
    """An entry whose JSON header nests 50,000 levels is dead-lettered as too_deep at once; the
    three good samples of its batch are audited and nothing stays pending (it retried forever)."""
    sc = make("memory://why1")
    t = _memory("memory://why1")
    t.publish(_goods(good, 3) + [_with_raw_header(good, b"[" * 50_000)])
    _steps(sc, 8)
    assert [d.reason for d in t.dead_letters()] == ["too_deep"]
    assert t.stats("g").pending == 0
    assert _sample_ids(sc) == Counter({f"good-{i}": 1 for i in range(3)})


# --------------------------------------------------------------------------- Why 2
def test_nan_metadata_and_empty_ids_are_dead_lettered_and_good_samples_audited_once(make: Any, good: bytes) -> None:
    """NaN/Infinity in metadata and an empty sample_id are dead-lettered with their reasons; the
    replica stays ready, each good sample is audited once and learned once (it was 8 copies, 3 as 18)."""
    sc = make("memory://why2")
    t = _memory("memory://why2")
    hlen = struct.unpack_from("<I", good, 4)[0]
    hdr = json.loads(good[8:8 + hlen])
    nan_meta = _with_raw_header(good, json.dumps({**hdr, "sample_id": "nan", "metadata": {"t": float("nan")}}).encode())
    inf_meta = _with_raw_header(good, json.dumps({**hdr, "sample_id": "inf", "metadata": {"t": float("inf")}}).encode())
    t.publish(_goods(good, 3) + [nan_meta, inf_meta, _mutate_header(good, sample_id="")])
    _steps(sc, 8)
    assert sorted(d.reason for d in t.dead_letters()) == ["bad_id", "non_finite", "non_finite"]
    assert _sample_ids(sc) == Counter({f"good-{i}": 1 for i in range(3)})
    assert sc.learner.collected == 3
    assert sc.readiness()[0] is True
    assert t.stats("g").pending == 0


class RejectingAudit:
    """The real audit writer, refusing the record of one sample id as it refuses a value JSON
    cannot hold (AuditError from ValueError): a message-caused failure the wire format can no
    longer produce, injected to show the loop handles it whatever the message was."""

    def __init__(self, inner: Any, poison_id: str) -> None:
        self.inner, self.poison_id = inner, poison_id

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> Any:
        if any(f.get("sample_id") == self.poison_id for _, f in items):
            try:
                raise ValueError("Out of range float values are not JSON compliant")
            except ValueError as exc:
                raise AuditError(str(exc)) from exc
        return self.inner.append_many(items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_audit_error_a_message_causes_dead_letters_that_message_only(make: Any, good: bytes) -> None:
    """When the audit writer refuses one sample's record, that sample is dead-lettered as
    audit_rejected, the batch's good samples are audited and learned once, and /readyz stays ready
    (the loop took it for a disk failure: whole batch pending, 503, good samples re-audited)."""
    from monitor.metrics import SidecarMetrics

    sc = make("memory://why2b", audit=lambda s: RejectingAudit(open_audit(s, SidecarMetrics(), None), "good-2"))
    t = _memory("memory://why2b")
    t.publish(_goods(good, 6))
    _steps(sc, 8)
    assert [(d.reason, d.original_id) for d in t.dead_letters()] == [("audit_rejected", "3-0")]
    assert _sample_ids(sc) == Counter({f"good-{i}": 1 for i in range(6) if i != 2})
    assert sc.learner.collected == 5
    assert sc.readiness()[0] is True
    assert t.stats("g").pending == 0


class FailingDisk:
    """The real audit writer behind a disk that refuses the first ``failures`` writes (ENOSPC)."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner, self.failures = inner, failures

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise AuditWriteError("cannot write to the trail: No space left on device")
        return self.inner.append_many(items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_disk_failure_holds_the_batch_and_nothing_is_learned_twice(make: Any, good: bytes) -> None:
    """A failed audit write dead-letters nothing: the batch is retried in place, /readyz is 503
    meanwhile, and once the disk takes writes each sample is audited once and learned once."""
    from monitor.metrics import SidecarMetrics

    disk: list[FailingDisk] = []

    def audit(settings: Any) -> FailingDisk:
        disk.append(FailingDisk(open_audit(settings, SidecarMetrics(), None), failures=3))
        return disk[0]

    sc = make("memory://why2c", audit=audit)
    t = _memory("memory://why2c")
    t.publish(_goods(good, 3))
    sc.step()
    assert sc.readiness()[0] is False and sc.learner.collected == 0
    for _ in range(200):
        if disk[0].failures == 0 and t.stats("g").pending == 0:
            break
        sc.step()
    assert t.dead_letters() == []
    assert _sample_ids(sc) == Counter({f"good-{i}": 1 for i in range(3)})
    assert sc.learner.collected == 3
    assert sc.readiness()[0] is True
    assert [e.deliveries for e in sc._held] == []


class FlakyLedger:
    """The in-process ledger behind a Redis that drops the first ``failures`` marks (TransportError)."""

    def __init__(self, failures: int) -> None:
        from monitor.backends.ledger import MemoryLedger

        self.inner, self.failures = MemoryLedger(), failures

    def mark(self, ids: Any, digests: Any = None) -> None:
        from monitor.errors import TransportError

        if self.failures > 0:
            self.failures -= 1
            raise TransportError("ledger mark failed: Redis is unavailable (Timeout reading from socket)")
        self.inner.mark(ids, digests)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_ledger_outage_after_the_fsync_neither_loses_nor_repeats_a_sample(make: Any, good: bytes) -> None:
    """Records made durable before Redis failed to mark the ledger are marked on the retry and the
    entries acked as duplicates: each sample audited and learned once, nothing dead-lettered."""
    ledger = FlakyLedger(failures=2)
    sc = make("memory://ledger-outage", ledger=ledger)
    t = _memory("memory://ledger-outage")
    t.publish(_goods(good, 4))
    for _ in range(100):
        if ledger.failures == 0 and t.stats("g").pending == 0:
            break
        sc.step()
    assert t.dead_letters() == []
    assert _sample_ids(sc) == Counter({f"good-{i}": 1 for i in range(4)})
    assert sc.learner.collected == 4
    assert sc.processor.unmarked == {}


def test_any_exception_in_the_lens_bank_dead_letters_only_its_sample(make: Any, good: bytes,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample that makes the lens bank raise (any type) is found by halving the batch and
    dead-lettered as processing_error; the other samples of its batch are audited once."""
    import monitor.sidecar.batch as batch_mod

    sc = make("memory://bank")
    poison = _mutate_header(good, sample_id="poison", request_id="boom")
    real = batch_mod.read_samples

    def read_samples(bank: Any, samples: Any, index: Any) -> Any:  # a bank that fails on one input
        if any(s.request_id == "boom" for s in samples):
            raise KeyError("the bank cannot read this one")
        return real(bank, samples, index)

    monkeypatch.setattr(batch_mod, "read_samples", read_samples)
    t = _memory("memory://bank")
    t.publish(_goods(good, 3) + [poison] + _goods(good, 3, "late"))
    _steps(sc, 4)
    assert [d.reason for d in t.dead_letters()] == ["processing_error"]
    assert sorted(_sample_ids(sc)) == sorted([f"good-{i}" for i in range(3)] + [f"late-{i}" for i in range(3)])
    assert sc.learner.collected == 6


# --------------------------------------------------------------------------- Why 3
@pytest.mark.redis
def test_an_entry_redelivered_past_max_deliveries_is_dead_lettered(make: Any, good: bytes, redis_url: str,
                                                                    stream_name: str) -> None:
    """An entry Redis has delivered more than max_deliveries times (replicas died holding it) is
    dead-lettered as max_deliveries with its real delivery count; a fresh entry is processed."""
    import time

    t = open_transport(redis_url, stream=stream_name)
    t.ensure_group("g")
    t.publish([_mutate_header(good, sample_id="crashes-replicas")])
    t.read("g", "dead-1", 1, 0)
    for consumer in ("dead-2", "dead-3"):  # two more replicas take it over and die
        deadline = time.monotonic() + 5
        while not t.claim_stale("g", consumer, 20, 10) and time.monotonic() < deadline:
            pass
    time.sleep(0.15)
    t.publish(_goods(good, 2))
    sc = make(redis_url, stream=stream_name, max_deliveries=3)
    deadline = time.monotonic() + 20
    while (t.stats("g").pending or t.stats("g").lag) and time.monotonic() < deadline:
        sc.step()
    dead = t.dead_letters()
    assert [(d.reason, d.deliveries) for d in dead] == [("max_deliveries", 4)]
    assert _sample_ids(sc) == Counter({"good-0": 1, "good-1": 1})


def test_max_deliveries_is_a_validated_setting() -> None:
    """max_deliveries exists (the docstring promised it) and a value below 1 fails at start-up naming it."""
    from monitor.errors import ConfigError

    assert load_settings(max_deliveries=2).max_deliveries == 2
    with pytest.raises(ConfigError, match="max_deliveries"):
        load_settings(max_deliveries=0)


# --------------------------------------------------------------------------- Why 7
def test_dead_letters_keep_big_payloads_as_digest_and_size(make: Any, good: bytes) -> None:
    """A dead-lettered payload above dead_letter_payload_max_bytes is kept as size and sha256 only,
    and the dead-letter stream keeps at most dead_letter_maxlen entries."""
    import hashlib

    sc = make("memory://why7dl", dead_letter_payload_max_bytes=1024, dead_letter_maxlen=3)
    big = _mutate_header(good, schema=99) + b"\x00" * 4096
    t = _memory("memory://why7dl")
    t.publish([big] + [b"junk-%d" % i for i in range(4)])
    _steps(sc, 3)
    dead = sc.transport.dead_letters()
    assert len(dead) == 3 and all(d.data.startswith(b"junk") for d in dead)
    assert sc.registry.get_sample_value("layerwatch_dead_letters_total", {**MODEL, "reason": "schema_version"}) == 1
    sc.transport.publish([big])
    _steps(sc, 2)
    last = sc.transport.dead_letters()[-1]
    assert (last.reason, last.data, last.size) == ("schema_version", b"", len(big))
    assert last.digest == "sha256:" + hashlib.sha256(big).hexdigest()


def test_producer_model_names_do_not_become_metric_series(make: Any, good: bytes) -> None:
    """Fifty model names in sample headers give no new series: the model label takes the
    configured names only and counts the rest as 'other' (50 names made 54 series)."""
    from prometheus_client import generate_latest

    sc = make("memory://why7m", metric_models=["chat-v2"])
    t = _memory("memory://why7m")
    t.publish([_mutate_header(good, sample_id=f"m{i}", model=f"model-{i}") for i in range(50)]
              + [_mutate_header(good, sample_id="known", model="chat-v2")])
    _steps(sc, 10)
    assert sc.processed_total == 51
    models = {line.split('model="', 1)[1].split('"', 1)[0]
              for line in generate_latest(sc.registry).decode().splitlines()
              if line.startswith("layerwatch_") and 'model="' in line}
    assert models == {"LlamaForCausalLM", "chat-v2", "other"}
    assert sc.registry.get_sample_value("layerwatch_audit_records_total", {"model": "other", "kind": "sample"}) == 50


@pytest.mark.redis
def test_a_huge_entry_never_reaches_the_replica(make: Any, good: bytes, redis_url: str, stream_name: str) -> None:
    """A 20 MB entry is dead-lettered as oversized by its size: Redis neither sends the payload to
    the reader nor keeps it in the dead-letter stream (it kept whole payloads)."""
    t: Transport = open_transport(redis_url, stream=stream_name)
    t.ensure_group("g")
    huge = good + b"\x00" * (20 * 1024 * 1024)
    t.publish([huge] + _goods(good, 2))
    sc = make(redis_url, stream=stream_name, max_payload_bytes=1024 * 1024)
    _steps(sc, 3)
    (dead,) = t.dead_letters()
    assert (dead.reason, dead.data) == ("oversized", b"")
    assert dead.size >= len(huge)
    assert _sample_ids(sc) == Counter({"good-0": 1, "good-1": 1})


def test_producer_layer_lists_do_not_grow_the_layer_index() -> None:
    """A producer sending a thousand different (valid) layer lists leaves the layer index's cache bounded."""
    from monitor.pipeline.stages import LayerIndex

    index = LayerIndex([0, 1, 2])
    for n in range(1000):
        index((0, 1, 2, 3 + n))
    assert len(index._cache) <= 64
    assert index((0, 1, 2, 5)).tolist() == [0, 1, 2]
