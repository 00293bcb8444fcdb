"""The hostile-producer suite (issue 17, "Must show"): two sidecar replicas as separate processes
on the real Redis, one hostile entry of each class per four good samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.hostile_producer import RSS_BOUND_MB, hostile_entries, run, run_crashing
from tests.test_sidecar import _good_sample


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_two_replicas_dead_letter_every_hostile_entry_and_audit_every_good_sample_once(
        redis_url: str, stream_name: str, tmp_path: Path) -> None:
    """Every hostile entry (24 classes, a 100 MB one included, plus id replays) is dead-lettered
    with its reason, every good sample is audited exactly once across both trails, both replicas
    answer /readyz 200 throughout and neither goes above 1.2 GB of RSS."""
    res = run(redis_url, stream_name, tmp_path, good_per_hostile=4, huge_mb=100)
    print(res)
    assert res.hostile >= 15 + 2
    assert res.not_dead_lettered == [] and res.wrong_reason == []
    assert res.good_audited_not_once == {} and res.hostile_audited == []
    assert res.good == 4 * res.hostile
    assert set(res.not_ready_polls.values()) == {0}
    assert all(0 < mb < RSS_BOUND_MB for mb in res.peak_rss_mb.values()), res.peak_rss_mb
    assert res.pending_left == 0


def test_the_suite_covers_at_least_fifteen_distinct_hostile_classes() -> None:
    """The hostile classes are distinct, at least 15, and name the reasons the issue lists."""
    from monitor.transport import MemoryTransport
    from tests.conftest import make_tiny

    MemoryTransport.reset_all()
    good = _good_sample(make_tiny("llama", seed=0), "memory://classes")
    classes = hostile_entries(good, "t", 1)
    names = [c for c, _, _ in classes]
    assert len(set(names)) == len(names) >= 15
    assert {"too_deep", "non_finite", "bad_id", "shape_mismatch", "oversized", "not_utf8", "fingerprint", "dtype",
            "missing_field", "schema_version", "unknown_layer"} <= {r for _, r, _ in classes}


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_a_message_that_kills_its_replica_is_dead_lettered_after_max_deliveries(
        redis_url: str, stream_name: str, tmp_path: Path) -> None:
    """A message that kills whichever replica reads it (restarted each time) is dead-lettered as
    max_deliveries at its fourth delivery with max_deliveries 3, counted by Redis; the good samples
    of its batch are redelivered one at a time and audited exactly once."""
    res = run_crashing(redis_url, stream_name, tmp_path, max_deliveries=3)
    print(res)
    assert res.dead_letters == [("max_deliveries", 4)]
    assert res.crashes == 3
    assert set(res.good_audited.values()) == {1}
    assert res.pending_left == 0
