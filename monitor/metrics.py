"""Every Prometheus metric layerwatch exports, defined in one place.

The code that does the work fills plain stats objects; one recorder per side turns them into
metric updates (the sidecar's: :mod:`monitor.sidecar.recorder`; the tap updates
:class:`TapMetrics` from its exporter). This module owns names, HELP texts, units and labels.
Rules:

* base units in names (``_seconds``, ``_bytes``, ``_nats``), ``_total`` on counters;
* an explicit :class:`~prometheus_client.CollectorRegistry` per instance, so tests build a fresh
  one and read ``registry.get_sample_value(...)``;
* bounded labels only: ``model``, ``layer``, ``probe``, ``label``, ``flag``, ``reason``,
  ``kind``, ``provider``; never a request or sample id;
* the tap uses plain Counter / Gauge / Histogram only (no Info/Enum, no custom collectors), so
  prometheus_client's multiprocess mode works for it inside gunicorn/uvicorn workers;
* the sidecar (one process) also uses two kinds of custom collector, through public
  prometheus_client APIs only: :class:`ArrayHistogram` (a histogram that counts whole numpy
  arrays per call: per-layer readings of a micro-batch) and :class:`OwnedCounter` (a counter whose
  value is owned elsewhere, e.g. the stream's trim count or the fleet's tap totals, and read at
  scrape time).

This module imports only prometheus_client and numpy: the tap uses :class:`TapMetrics`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NATS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SCORE_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0)
# where a flagged prompt segment starts, as a fraction of the prompt (0: its first token)
POSITION_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# Drop reasons of the tap (bounded set; documented in the README's metrics reference).
TAP_DROP_REASONS = (
    "queue_full",  # the queue reached its item bound
    "queue_bytes",  # the queue reached its byte bound
    "transport_error",  # publishing failed (connection refused, timeout, ...)
    "transport_down",  # dropped without trying while the transport is backing off
    "hook_error",  # an exception inside a hook (the request itself still succeeds)
    "request_error",  # the request raised inside tap.request(): its partial capture is dropped
    "encode_error",  # the sample could not be encoded (e.g. over the size limit)
    "closed",  # the tap was closed or its flush deadline passed
)


class TapMetrics:
    """Metrics of the tap inside the inference server (``layerwatch_tap_*``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_sampled = _counter(
            "layerwatch_tap_requests_sampled_total",
            "Requests whose hidden states the tap sampled.", ["model"], registry=r)
        self.requests_skipped = _counter(
            "layerwatch_tap_requests_skipped_total",
            "Requests the tap did not sample, by reason (rate, budget).", ["model", "reason"], registry=r)
        self.samples_exported = _counter(
            "layerwatch_tap_samples_exported_total",
            "Samples published to the transport.", ["model"], registry=r)
        self.drops = _counter(
            "layerwatch_tap_drops_total",
            "Sampled requests dropped before reaching the transport, by reason.", ["model", "reason"], registry=r)
        self.queue_depth = _gauge(
            "layerwatch_tap_queue_depth",
            "Samples waiting in the tap's export queue.", ["model"], registry=r)
        self.queue_bytes = _gauge(
            "layerwatch_tap_queue_bytes",
            "Bytes of captured tensors waiting in the tap's export queue.", ["model"], registry=r)
        self.export_latency = _histogram(
            "layerwatch_tap_export_latency_seconds",
            "Time from capture to a successful publish.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.transport_errors = _counter(
            "layerwatch_tap_transport_errors_total",
            "Transport failures seen by the exporter (each may drop a batch).", ["model"], registry=r)
        self.attached = _gauge(
            "layerwatch_tap_attached",
            "1 when the tap is attached to the served model; 0 (reason: unsupported, error) when it "
            "could not attach and nothing is captured (the server serves on).", ["model", "reason"], registry=r)


class SidecarMetrics:
    """Metrics of the sidecar (``layerwatch_*``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- pipeline -------------------------------------------------------------------------
        self.samples_processed = _counter(
            "layerwatch_samples_processed_total",
            "Samples explained, scored and audited.", ["model"], registry=r)
        self.samples_duplicate = _counter(
            "layerwatch_samples_duplicate_total",
            "Re-delivered samples skipped because the ledger had already seen them.", ["model"], registry=r)
        self.processing_latency = _histogram(
            "layerwatch_processing_latency_seconds",
            "Time to process one micro-batch (lens bank, narratives, scoring, audit, ack).",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_latency = _histogram(
            "layerwatch_end_to_end_latency_seconds",
            "Time from capture in the tap to the durable audit record.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = _histogram(
            "layerwatch_batch_size",
            "Samples per micro-batch.", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.consumer_lag = _gauge(
            "layerwatch_consumer_lag",
            "Stream entries not yet delivered to the consumer group.", ["model"], registry=r)
        self.consumer_pending = _gauge(
            "layerwatch_consumer_pending",
            "Entries delivered but not yet acknowledged (group-wide).", ["model"], registry=r)
        self.stream_drops = OwnedCounter(
            "layerwatch_stream_drops_total",
            "Samples lost in the transport before delivery, by reason (trimmed).", ["model", "reason"], registry=r)
        self.dead_letters = _counter(
            "layerwatch_dead_letters_total",
            "Poison messages moved to the dead-letter stream, by reason.", ["model", "reason"], registry=r)
        # --- per-layer readings ---------------------------------------------------------------
        self.layer_entropy = ArrayHistogram(
            "layerwatch_layer_entropy_nats",
            "Entropy of each layer's lens distribution.", ["model", "layer"], buckets=NATS_BUCKETS, registry=r)
        self.layer_kl = ArrayHistogram(
            "layerwatch_layer_kl_to_final_nats",
            "KL divergence from the model's final distribution to each layer's lens distribution.",
            ["model", "layer"], buckets=NATS_BUCKETS, registry=r)
        self.layer_top1_agree = _counter(
            "layerwatch_layer_top1_agreement_total",
            "Samples whose layer lens top-1 equals the model's final top-1.", ["model", "layer"], registry=r)
        self.layer_samples = _counter(
            "layerwatch_layer_samples_total",
            "Samples read at each layer (denominator of the agreement rate).", ["model", "layer"], registry=r)
        self.prediction_depth = ArrayHistogram(
            "layerwatch_prediction_depth",
            "First layer from which the lens top-1 stays equal to the final output.",
            ["model"], buckets=tuple(range(0, 65, 2)), registry=r)
        self.probe_labels = _counter(
            "layerwatch_probe_label_total",
            "Argmax label of each concept probe at each layer.", ["model", "layer", "probe", "label"], registry=r)
        # --- scoring and drift ----------------------------------------------------------------
        self.anomaly_score = _histogram(
            "layerwatch_anomaly_score",
            "Per-sample anomaly score against the baseline.", ["model"], buckets=SCORE_BUCKETS, registry=r)
        self.anomalies = _counter(
            "layerwatch_anomalies_total",
            "Samples flagged anomalous (p-value below the configured false-positive rate).", ["model"], registry=r)
        self.flags = _counter(
            "layerwatch_flags_total",
            "Flags raised on samples, by kind.", ["model", "flag"], registry=r)
        self.local_segment_position = _histogram(
            "layerwatch_local_segment_position",
            "Where in the prompt each local_segment flag's segment starts, as a fraction of the prompt's "
            "tokens (offsets only: never text).", ["model"], buckets=POSITION_BUCKETS, registry=r)
        self.local_segment_layers = _counter(
            "layerwatch_local_segment_layer_total",
            "local_segment flags by each layer named as carrying the segment.", ["model", "layer"], registry=r)
        self.watched_concepts = _counter(
            "layerwatch_watched_concept_total",
            "Samples a watched concept flagged (its own p-value below its share of alpha), by concept "
            "('<probe>=<label>', one series per entry of baseline.watch).", ["model", "concept"], registry=r)
        self.drift_alert_active = _gauge(
            "layerwatch_drift_alert_active",
            "1 while a window drift alert is active.", ["model"], registry=r)
        self.drift_alerts = _counter(
            "layerwatch_drift_alerts_total",
            "Window drift alerts raised.", ["model"], registry=r)
        self.baseline_learning = _gauge(
            "layerwatch_baseline_learning",
            "1 while the sidecar is learning a baseline from live traffic.", ["model"], registry=r)
        self.baseline_learning_samples = _gauge(
            "layerwatch_baseline_learning_samples",
            "Samples collected so far toward a learned baseline.", ["model"], registry=r)
        self.anomaly_expected_fpr = _gauge(
            "layerwatch_anomaly_expected_fpr",
            "The configured per-sample false-positive rate (alpha): the anomaly rate on normal traffic.",
            ["model"], registry=r)
        self.stream_maxlen = _gauge(
            "layerwatch_stream_maxlen",
            "The stream's configured bound; lag approaching it means samples will be trimmed.", ["model"], registry=r)
        self.baseline_info = _gauge(
            "layerwatch_baseline_info",
            "The baseline in use (value 1).", ["model", "baseline"], registry=r)
        # --- lens bank, audit, fleet -----------------------------------------------------------
        self.lens_provider = _gauge(
            "layerwatch_lens_provider_info",
            "The ONNX Runtime execution provider actually running the lens bank (value 1).",
            ["model", "provider"], registry=r)
        self.lens_bundle_info = _gauge(
            "layerwatch_lens_bundle_info",
            "The lens bundle in use (value 1).", ["model", "bundle"], registry=r)
        self.audit_records = ModelBoundedCounter(_counter(
            "layerwatch_audit_records_total",
            "Records appended to the audit trail, by kind (model: a configured name, else 'other').",
            ["model", "kind"], registry=r))
        self.audit_write_errors = _counter(
            "layerwatch_audit_write_errors_total",
            "Failed audit writes or fsyncs.", ["model"], registry=r)
        self.audit_writable = _gauge(
            "layerwatch_audit_writable",
            "1 while the audit trail accepts writes; 0 from a failed write or fsync until the writer has "
            "recovered on its own.", ["model"], registry=r)
        self.audit_recoveries = _counter(
            "layerwatch_audit_recoveries_total",
            "Recovery records the audit writer wrote, by reason: write_failed (recovered after a failed "
            "write or fsync), head_untrusted (a stored head failed verification and was ignored), "
            "tail_lost, head_mismatch.", ["model", "reason"], registry=r)
        self.fleet_tap_sampled = OwnedCounter(
            "layerwatch_fleet_tap_requests_sampled_total",
            "Fleet total of requests sampled by all taps (from sample headers).", ["model"], registry=r)
        self.fleet_tap_drops = OwnedCounter(
            "layerwatch_fleet_tap_drops_total",
            "Fleet total of tap drops by reason (from sample headers).", ["model", "reason"], registry=r)

    def allow_models(self, names: Iterable[str]) -> None:
        """The model names a producer-chosen ``model`` label may take; others count as 'other'."""
        self.audit_records.allow(names)


Labels = tuple[str, ...]

OTHER_MODEL = "other"  # the one label value of every model name outside the configured ones


class ModelBoundedCounter:
    """A counter whose ``model`` label may come from a producer (a sample's own ``model`` field).

    After :meth:`allow`, a name outside the allowed set is counted under :data:`OTHER_MODEL`, so
    a buggy or hostile producer cannot create series (50 names made 54 series before). Until then
    every name passes (tools that write trails outside the sidecar choose their own names)."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._allowed: frozenset[str] | None = None

    def allow(self, names: Iterable[str]) -> None:
        """Only these model names become label values from now on."""
        self._allowed = frozenset(names)

    def labels(self, *values: str, **kw: str) -> Counter:
        """The child of one label set, the model name bounded."""
        if values:
            values = (self._bounded(values[0]), *values[1:])
        elif "model" in kw:
            kw = {**kw, "model": self._bounded(kw["model"])}
        return self._counter.labels(*values, **kw)

    def _bounded(self, model: str) -> str:
        return model if self._allowed is None or model in self._allowed else OTHER_MODEL


@dataclass(frozen=True)
class MetricInfo:
    """What the metrics reference says about one metric family."""

    name: str  # as exposed (counters with ``_total``)
    kind: str
    labels: tuple[str, ...]
    help: str


def describe(metrics: object) -> list[MetricInfo]:
    """Every metric family of a metrics group (:class:`TapMetrics`, :class:`SidecarMetrics`), in
    definition order, read through ``describe()`` of the collectors (public API)."""
    out = []
    for family in metrics.registry.collect():  # type: ignore[attr-defined]
        name = family.name + ("_total" if family.type == "counter" else "")
        out.append(MetricInfo(name, family.type, LABELS.get(name, ()), family.documentation))
    return out


LABELS: dict[str, tuple[str, ...]] = {}  # exposed name -> label names, filled as metrics are defined


def _remember_labels(name: str, labelnames: Sequence[str], kind: str) -> None:
    exposed = name if kind != "counter" or name.endswith("_total") else name + "_total"
    LABELS[exposed] = tuple(labelnames)


class _HistogramChild:
    """One label set of an :class:`ArrayHistogram`: bucket counts and sum as plain numbers."""

    def __init__(self, bounds: np.ndarray) -> None:
        self._bounds = bounds  # upper bounds, the last +Inf
        self._counts = np.zeros(len(bounds), dtype=np.int64)  # per bucket (not cumulative)
        self._total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one value."""
        self.observe_many((value,))

    def observe_many(self, values: object) -> None:
        """Count every value of an array-like in one vectorised step. Same result as a loop of
        ``observe``: a value lands in the first bucket whose upper bound is >= it and is added
        to the sum (a NaN makes the sum NaN and lands in no bucket)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        idx = np.searchsorted(self._bounds, v[~np.isnan(v)], side="left")
        counts = np.bincount(idx, minlength=len(self._bounds))
        with self._lock:
            self._counts += counts
            self._total += float(v.sum())

    def snapshot(self) -> tuple[list[int], float]:
        """(cumulative bucket counts, sum)."""
        with self._lock:
            return np.cumsum(self._counts).tolist(), self._total


class ArrayHistogram(Collector):
    """A histogram family that observes whole arrays at once (the sidecar's per-layer readings).

    prometheus_client's Histogram observes one value per call; a micro-batch has layers x samples
    values per family, and a Python loop of ``observe`` calls cost as much as the rest of the
    per-batch bookkeeping. The exposition is the same as a Histogram's (``_bucket``, ``_count``,
    ``_sum``), rendered at scrape time through :class:`HistogramMetricFamily`.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        bounds = [float(b) for b in buckets]
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._children: dict[Labels, _HistogramChild] = {}
        self._lock = threading.Lock()
        _remember_labels(name, labelnames, "histogram")
        registry.register(self)

    def labels(self, *values: str, **kw: str) -> _HistogramChild:
        """The child of one label set (created on first use)."""
        key = tuple(str(v) for v in values) if values else tuple(str(kw[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, _HistogramChild(self._bounds))
        return child

    def describe(self) -> Iterable[Metric]:
        """The family without samples (registration and the metrics reference)."""
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        """The family with one histogram per label set."""
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        le = [floatToGoString(b) for b in self._bounds]
        for key, child in children:
            cum, total = child.snapshot()
            fam.add_metric(list(key), list(zip(le, cum, strict=True)), total)
        return [fam]


class OwnedCounter(Collector):
    """A counter whose values are owned elsewhere and read at scrape time.

    Examples: the stream's trimmed-entry count (the transport counts it), the fleet's tap totals
    (each tap counts its own; the sidecar keeps the latest totals it saw in sample headers).
    ``bind(read)`` sets the function that returns ``(label values, value)`` pairs; until then the
    family has no samples. The owner guarantees the values never decrease.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 registry: CollectorRegistry) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._read: Callable[[], Iterable[tuple[Labels, float]]] = lambda: ()
        _remember_labels(self.name, labelnames, "counter")
        registry.register(self)

    def bind(self, read: Callable[[], Iterable[tuple[Labels, float]]]) -> None:
        """Read the values from ``read()`` from now on."""
        self._read = read

    def describe(self) -> Iterable[Metric]:
        """The family without samples."""
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        """The family with the owner's current values."""
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self._read():
            fam.add_metric(list(labels), float(value))
        yield fam


def _counter(name: str, documentation: str, labelnames: Sequence[str], **kw: object) -> Counter:
    _remember_labels(name, labelnames, "counter")
    return Counter(name, documentation, labelnames, **kw)  # type: ignore[arg-type]


def _gauge(name: str, documentation: str, labelnames: Sequence[str], **kw: object) -> Gauge:
    _remember_labels(name, labelnames, "gauge")
    return Gauge(name, documentation, labelnames, **kw)  # type: ignore[arg-type]


def _histogram(name: str, documentation: str, labelnames: Sequence[str], **kw: object) -> Histogram:
    _remember_labels(name, labelnames, "histogram")
    return Histogram(name, documentation, labelnames, **kw)  # type: ignore[arg-type]
