"""Sampling decisions: deterministic by request id, rate, per-process budget, force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch
from conftest import drain_samples, make_tiny

import monitor
from monitor.tap.sampler import Sampler, TokenBucket, hash_unit

IDS = [f"req-{i}" for i in range(400)]


def test_hash_unit_is_stable_and_in_unit_interval() -> None:
    """hash_unit is a pure function of the id (sha256) with values in [0, 1)."""
    values = [hash_unit(r) for r in IDS]
    assert values == [hash_unit(r) for r in IDS]
    assert all(0.0 <= v < 1.0 for v in values)
    assert hash_unit("r-123") == int.from_bytes(__import__("hashlib").sha256(b"r-123").digest()[:8], "big") / 2**64


def test_two_processes_with_different_hash_seeds_agree() -> None:
    """A subprocess with another PYTHONHASHSEED samples exactly the same request ids."""
    code = (
        "import json, sys\n"
        "from monitor.tap.sampler import Sampler\n"
        "s = Sampler(0.3)\n"
        "print(json.dumps([s.decide(f'req-{i}') is None for i in range(400)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    theirs = json.loads(out.stdout)
    mine = [Sampler(0.3).decide(r) is None for r in IDS]
    assert theirs == mine
    assert 0 < sum(mine) < len(mine)


def test_rate_samples_that_fraction_of_ids() -> None:
    """At rate 0.1 about 10% of 20,000 distinct ids are sampled (binomial, 5 sigma)."""
    s = Sampler(0.1)
    n = 20_000
    hits = sum(s.decide(f"id-{i}") is None for i in range(n))
    assert abs(hits / n - 0.1) < 5 * (0.1 * 0.9 / n) ** 0.5


def test_rate_zero_and_one_are_absolute() -> None:
    """Rate 0 never samples (reason 'rate') and rate 1 always samples."""
    assert all(Sampler(0.0).decide(r) == "rate" for r in IDS)
    assert all(Sampler(1.0).decide(r) is None for r in IDS)


def test_budget_caps_samples_per_second() -> None:
    """With max 5 samples/s a burst of 20 sampled-by-rate requests gets 5; the rest say 'budget'."""
    s = Sampler(1.0, max_per_s=5)
    decisions = [s.decide(r) for r in IDS[:20]]
    assert decisions.count(None) == 5
    assert decisions.count("budget") == 15


def test_budget_refills_with_time(monkeypatch: Any) -> None:
    """The token bucket regains tokens at its rate (clock patched, no sleeping)."""
    now = [1000.0]
    monkeypatch.setattr("monitor.tap.sampler.time.monotonic", lambda: now[0])
    bucket = TokenBucket(2.0)
    assert bucket.try_acquire() and bucket.try_acquire() and not bucket.try_acquire()
    now[0] += 0.5  # one token at 2/s
    assert bucket.try_acquire() and not bucket.try_acquire()


def test_force_bypasses_rate_and_budget() -> None:
    """force=True samples even at rate 0 and with the budget exhausted."""
    s = Sampler(0.0, max_per_s=1)
    assert s.decide("x", force=True) is None
    s2 = Sampler(1.0, max_per_s=1)
    assert s2.decide("a") is None and s2.decide("b") == "budget"
    assert s2.decide("c", force=True) is None


def test_request_without_id_gets_a_fresh_generated_one(memory_transport: Any) -> None:
    """tap.request() with no id yields a new 32-hex id each time, and the sample carries it."""
    model = make_tiny("gpt2")
    tap = monitor.attach(model, sample_rate=1.0, transport=memory_transport)
    ids = []
    for _ in range(3):
        with tap.request() as handle, torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
        ids.append(handle.request_id)
    assert tap.flush(5.0)
    tap.close()
    assert len(set(ids)) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert sorted(s.request_id for s in drain_samples(memory_transport)) == sorted(ids)


def test_tap_counts_skips_by_reason(memory_transport: Any) -> None:
    """The tap counts unsampled requests by reason and samples exactly the ids the sampler picks."""
    model = make_tiny("gpt2")
    tap = monitor.attach(model, sample_rate=0.5, transport=memory_transport, max_samples_per_s=1000)
    expected = [r for r in IDS[:40] if Sampler(0.5).decide(r) is None]
    for r in IDS[:40]:
        with tap.request(r):
            pass  # the decision is taken on entry; the model need not run
    assert tap.sampled == len(expected)
    assert tap.skipped["rate"] == 40 - len(expected) and tap.skipped["budget"] == 0
    tap.close()
