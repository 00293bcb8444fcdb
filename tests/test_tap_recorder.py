"""The tap's recorder: one place counts, the sample-header counters and the metrics agree."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from monitor.metrics import TapMetrics
from monitor.tap.recorder import DROP_REASONS, SKIP_REASONS, TapRecorder


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_bounded_series_is_visible_as_zero_before_any_traffic() -> None:
    """Dashboards show 0, not "no data", for every skip and drop reason of a fresh tap."""
    reg = CollectorRegistry()
    TapRecorder(TapMetrics(reg), "m")
    for r in SKIP_REASONS:
        assert _value(reg, "layerwatch_tap_requests_skipped_total", model="m", reason=r) == 0
    for r in DROP_REASONS:
        assert _value(reg, "layerwatch_tap_drops_total", model="m", reason=r) == 0
    assert _value(reg, "layerwatch_tap_samples_exported_total", model="m") == 0


def test_header_counters_and_metrics_count_the_same_events() -> None:
    """What rides in sample headers (TapStats) equals what Prometheus shows, reason by reason."""
    reg = CollectorRegistry()
    rec = TapRecorder(TapMetrics(reg), "m")
    rec.sampled(3)
    rec.skipped("rate")
    rec.skipped("rate")
    rec.dropped("queue_full", 2)
    rec.dropped("queue_full", 0)  # nothing to count
    rec.exported([0.0, 0.0])
    rec.queue(4, 1024)
    assert rec.stats.sampled == 3 == _value(reg, "layerwatch_tap_requests_sampled_total", model="m")
    assert rec.stats.skipped["rate"] == 2 == _value(reg, "layerwatch_tap_requests_skipped_total", model="m", reason="rate")
    assert rec.stats.drops.get("queue_full") == 2 == _value(reg, "layerwatch_tap_drops_total", model="m", reason="queue_full")
    assert rec.stats.exported.get("samples") == 2 == _value(reg, "layerwatch_tap_samples_exported_total", model="m")
    assert _value(reg, "layerwatch_tap_export_latency_seconds_count", model="m") == 2
    assert _value(reg, "layerwatch_tap_queue_depth", model="m") == 4
    assert _value(reg, "layerwatch_tap_queue_bytes", model="m") == 1024


def test_a_forked_instance_starts_its_header_counters_at_zero() -> None:
    """reset() (a forked child) zeroes the header counters; the process's metrics keep counting."""
    reg = CollectorRegistry()
    rec = TapRecorder(TapMetrics(reg), "m")
    rec.sampled(5)
    rec.dropped("encode_error")
    rec.stats.reset()
    assert rec.stats.sampled == 0 and rec.stats.drops.get("encode_error") == 0
    rec.sampled()
    assert rec.stats.sampled == 1
    assert _value(reg, "layerwatch_tap_requests_sampled_total", model="m") == 6


def test_attached_gauge_is_one_when_attached_and_zero_with_the_reason_when_not() -> None:
    """layerwatch_tap_attached: 1 for ok, 0 labelled unsupported/error."""
    reg = CollectorRegistry()
    rec = TapRecorder(TapMetrics(reg), "m")
    rec.attached("ok")
    rec.attached("unsupported")
    assert _value(reg, "layerwatch_tap_attached", model="m", reason="ok") == 1
    assert _value(reg, "layerwatch_tap_attached", model="m", reason="unsupported") == 0
