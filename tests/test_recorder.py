"""The sidecar's metrics recorder and the custom collectors behind it (public prometheus_client API only)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from monitor.metrics import NATS_BUCKETS, ArrayHistogram, SidecarMetrics
from monitor.sidecar.recorder import BatchStats, FleetTapTotals, SidecarRecorder
from monitor.transport import StreamStats

ROOT = Path(__file__).resolve().parents[1]


def test_array_histogram_exposes_what_a_loop_of_observe_would() -> None:
    """observe_many on an ArrayHistogram gives the Histogram exposition of the same values
    (buckets incl. values on a bound, +Inf, sum, count)."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.gamma(1.0, 3.0, 500), np.array(NATS_BUCKETS), [0.0, 1e9, np.inf]])
    expo = []
    for vectorised in (False, True):
        reg = CollectorRegistry()
        if vectorised:
            h = ArrayHistogram("x_nats", "x", ["layer"], buckets=NATS_BUCKETS, registry=reg).labels("3")
            h.observe_many(values[:200])
            h.observe_many(values[200:])
        else:
            plain = Histogram("x_nats", "x", ["layer"], buckets=NATS_BUCKETS, registry=reg).labels("3")
            for v in values:
                plain.observe(float(v))
        expo.append("\n".join(x for x in generate_latest(reg).decode().splitlines() if "_created" not in x))
    assert expo[0] == expo[1]
    assert 'x_nats_count{layer="3"} 513.0' in expo[1]


def test_stream_trims_are_read_from_the_transport_and_never_go_down() -> None:
    """layerwatch_stream_drops_total{reason="trimmed"} shows the transport's trim count at scrape
    time; a lower count (a restarted Redis counter) does not make the counter go down."""
    m = SidecarMetrics(CollectorRegistry())
    rec = SidecarRecorder(m, "m")
    key = {"model": "m", "reason": "trimmed"}
    assert m.registry.get_sample_value("layerwatch_stream_drops_total", key) == 0
    rec.stream(StreamStats(length=5, entries_added=9, lag=3, pending=1, trimmed=4, dead_letters=0))
    assert m.registry.get_sample_value("layerwatch_stream_drops_total", key) == 4
    assert m.registry.get_sample_value("layerwatch_consumer_lag", {"model": "m"}) == 3
    rec.stream(StreamStats(length=5, entries_added=9, lag=3, pending=1, trimmed=2, dead_letters=0))
    assert m.registry.get_sample_value("layerwatch_stream_drops_total", key) == 4


def test_fleet_totals_add_each_tap_instances_increase_once() -> None:
    """Headers of the same tap instance add only their increase; instances add up; unknown
    drop reasons and malformed counters are ignored."""
    fleet = FleetTapTotals()
    fleet.add({"instance": "a", "sampled": 3, "drops": {"queue_full": 1, "made_up": 9}})
    fleet.add({"instance": "a", "sampled": 5, "drops": {"queue_full": 1}})
    fleet.add({"instance": "b", "sampled": 2, "drops": {"queue_full": "x"}})
    fleet.add({"sampled": 100})
    assert fleet.sampled() == 7
    assert fleet.drops()["queue_full"] == 1 and "made_up" not in fleet.drops()


def test_recorder_exports_fleet_totals_and_batch_counts() -> None:
    """A batch's processed, duplicate and dead-letter counts, and the fleet totals, reach the registry."""
    m = SidecarMetrics(CollectorRegistry())
    rec = SidecarRecorder(m, "m")
    rec.fleet.add({"instance": "a", "sampled": 4, "drops": {"closed": 2}})
    rec.batch(BatchStats(processed=3, unique=3, duplicates=1))
    rec.dead_letter("dtype")
    rec.dead_letter("dtype")
    r = m.registry
    assert r.get_sample_value("layerwatch_fleet_tap_requests_sampled_total", {"model": "m"}) == 4
    assert r.get_sample_value("layerwatch_fleet_tap_drops_total", {"model": "m", "reason": "closed"}) == 2
    assert r.get_sample_value("layerwatch_samples_processed_total", {"model": "m"}) == 3
    assert r.get_sample_value("layerwatch_samples_duplicate_total", {"model": "m"}) == 1
    assert r.get_sample_value("layerwatch_dead_letters_total", {"model": "m", "reason": "dtype"}) == 2
    assert r.get_sample_value("layerwatch_batch_size_count", {"model": "m"}) == 1


def test_no_private_prometheus_client_attributes_are_used() -> None:
    """No module reads prometheus_client internals (_value, _upper_bounds, _buckets, _sum,
    _labelnames, _name): metrics go through public APIs and custom collectors."""
    pattern = re.compile(r"\._(value|upper_bounds|buckets|sum|labelnames|name)\b")
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in (ROOT / "monitor").rglob("*.py")
                 for m in pattern.finditer(p.read_text())]
    assert offenders == []


def test_local_segment_flags_record_where_the_segment_starts_and_which_layers_carry_it() -> None:
    """Issue 19: a local_segment flag adds its start (as a fraction of the prompt) to the position
    histogram and one count per layer it names; other flags add to neither."""
    from monitor.drift.detector import DetectorUpdate
    from monitor.drift.score import LOCAL_FLAG, Flag, SampleScore

    reg = CollectorRegistry()
    rec = SidecarRecorder(SidecarMetrics(reg), "m")
    local = Flag(LOCAL_FLAG, (12, 20), "windows", {"start": 30, "end": 46, "span": 2, "p": 0.001, "statistic": 9.0,
                                                   "strength": {12: 5.0, 20: 4.0}, "prompt_tokens": 120})
    other = Flag("unusual_pattern", (3,), "pattern", {"share": 0.5})
    scores = [SampleScore(4.0, 16.0, 0.001, True, {12: 1.0}, (local,)),
              SampleScore(3.0, 9.0, 0.002, True, {3: 1.0}, (other,))]
    rec.detector(DetectorUpdate(scores, [], []))
    text = generate_latest(reg).decode()
    assert 'layerwatch_local_segment_position_bucket{le="0.2",model="m"} 0.0' in text
    assert 'layerwatch_local_segment_position_bucket{le="0.3",model="m"} 1.0' in text
    assert 'layerwatch_local_segment_layer_total{layer="12",model="m"} 1.0' in text
    assert 'layerwatch_local_segment_layer_total{layer="20",model="m"} 1.0' in text
    assert 'layerwatch_local_segment_layer_total{layer="3"' not in text
    assert 'layerwatch_flags_total{flag="local_segment",model="m"} 1.0' in text
