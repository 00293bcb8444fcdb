"""Every Prometheus metric layerwatch exports, defined in one place.

The code that does the work fills plain stats objects or calls the small ``record_*`` helpers;
this module owns names, HELP texts, units and labels. Rules:

* base units in names (``_seconds``, ``_bytes``, ``_nats``), ``_total`` on counters;
* an explicit :class:`~prometheus_client.CollectorRegistry` per instance, so tests build a fresh
  one and read ``registry.get_sample_value(...)``;
* bounded labels only: ``model``, ``layer``, ``probe``, ``label``, ``flag``, ``reason``,
  ``kind``, ``provider``; never a request or sample id;
* plain Counter / Gauge / Histogram (no Info/Enum), so prometheus_client's multiprocess mode
  works for the tap inside gunicorn/uvicorn workers.

This module imports only prometheus_client: the tap uses :class:`TapMetrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NATS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SCORE_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0)

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
        self.requests_sampled = Counter(
            "layerwatch_tap_requests_sampled_total",
            "Requests whose hidden states the tap sampled.", ["model"], registry=r)
        self.requests_skipped = Counter(
            "layerwatch_tap_requests_skipped_total",
            "Requests the tap did not sample, by reason (rate, budget).", ["model", "reason"], registry=r)
        self.samples_exported = Counter(
            "layerwatch_tap_samples_exported_total",
            "Samples published to the transport.", ["model"], registry=r)
        self.drops = Counter(
            "layerwatch_tap_drops_total",
            "Sampled requests dropped before reaching the transport, by reason.", ["model", "reason"], registry=r)
        self.queue_depth = Gauge(
            "layerwatch_tap_queue_depth",
            "Samples waiting in the tap's export queue.", ["model"], registry=r)
        self.queue_bytes = Gauge(
            "layerwatch_tap_queue_bytes",
            "Bytes of captured tensors waiting in the tap's export queue.", ["model"], registry=r)
        self.export_latency = Histogram(
            "layerwatch_tap_export_latency_seconds",
            "Time from capture to a successful publish.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.transport_errors = Counter(
            "layerwatch_tap_transport_errors_total",
            "Transport failures seen by the exporter (each may drop a batch).", ["model"], registry=r)
        self.attached = Gauge(
            "layerwatch_tap_attached",
            "1 when the tap is attached to the served model; 0 (reason: unsupported, error) when it "
            "could not attach and nothing is captured (the server serves on).", ["model", "reason"], registry=r)


class SidecarMetrics:
    """Metrics of the sidecar (``layerwatch_*``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- pipeline -------------------------------------------------------------------------
        self.samples_processed = Counter(
            "layerwatch_samples_processed_total",
            "Samples explained, scored and audited.", ["model"], registry=r)
        self.samples_duplicate = Counter(
            "layerwatch_samples_duplicate_total",
            "Re-delivered samples skipped because the ledger had already seen them.", ["model"], registry=r)
        self.processing_latency = Histogram(
            "layerwatch_processing_latency_seconds",
            "Time to process one micro-batch (lens bank, narratives, scoring, audit, ack).",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_latency = Histogram(
            "layerwatch_end_to_end_latency_seconds",
            "Time from capture in the tap to the durable audit record.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "layerwatch_batch_size",
            "Samples per micro-batch.", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.consumer_lag = Gauge(
            "layerwatch_consumer_lag",
            "Stream entries not yet delivered to the consumer group.", ["model"], registry=r)
        self.consumer_pending = Gauge(
            "layerwatch_consumer_pending",
            "Entries delivered but not yet acknowledged (group-wide).", ["model"], registry=r)
        self.stream_drops = Counter(
            "layerwatch_stream_drops_total",
            "Samples lost in the transport before delivery, by reason (trimmed).", ["model", "reason"], registry=r)
        self.dead_letters = Counter(
            "layerwatch_dead_letters_total",
            "Poison messages moved to the dead-letter stream, by reason.", ["model", "reason"], registry=r)
        # --- per-layer readings ---------------------------------------------------------------
        self.layer_entropy = Histogram(
            "layerwatch_layer_entropy_nats",
            "Entropy of each layer's lens distribution.", ["model", "layer"], buckets=NATS_BUCKETS, registry=r)
        self.layer_kl = Histogram(
            "layerwatch_layer_kl_to_final_nats",
            "KL divergence from the model's final distribution to each layer's lens distribution.",
            ["model", "layer"], buckets=NATS_BUCKETS, registry=r)
        self.layer_top1_agree = Counter(
            "layerwatch_layer_top1_agreement_total",
            "Samples whose layer lens top-1 equals the model's final top-1.", ["model", "layer"], registry=r)
        self.layer_samples = Counter(
            "layerwatch_layer_samples_total",
            "Samples read at each layer (denominator of the agreement rate).", ["model", "layer"], registry=r)
        self.prediction_depth = Histogram(
            "layerwatch_prediction_depth",
            "First layer from which the lens top-1 stays equal to the final output.",
            ["model"], buckets=tuple(range(0, 65, 2)), registry=r)
        self.probe_labels = Counter(
            "layerwatch_probe_label_total",
            "Argmax label of each concept probe at each layer.", ["model", "layer", "probe", "label"], registry=r)
        # --- scoring and drift ----------------------------------------------------------------
        self.anomaly_score = Histogram(
            "layerwatch_anomaly_score",
            "Per-sample anomaly score against the baseline.", ["model"], buckets=SCORE_BUCKETS, registry=r)
        self.anomalies = Counter(
            "layerwatch_anomalies_total",
            "Samples flagged anomalous (p-value below the configured false-positive rate).", ["model"], registry=r)
        self.flags = Counter(
            "layerwatch_flags_total",
            "Flags raised on samples, by kind.", ["model", "flag"], registry=r)
        self.watched_concepts = Counter(
            "layerwatch_watched_concept_total",
            "Samples a watched concept flagged (its own p-value below its share of alpha), by concept "
            "('<probe>=<label>', one series per entry of baseline.watch).", ["model", "concept"], registry=r)
        self.drift_alert_active = Gauge(
            "layerwatch_drift_alert_active",
            "1 while a window drift alert is active.", ["model"], registry=r)
        self.drift_alerts = Counter(
            "layerwatch_drift_alerts_total",
            "Window drift alerts raised.", ["model"], registry=r)
        self.baseline_learning = Gauge(
            "layerwatch_baseline_learning",
            "1 while the sidecar is learning a baseline from live traffic.", ["model"], registry=r)
        self.baseline_learning_samples = Gauge(
            "layerwatch_baseline_learning_samples",
            "Samples collected so far toward a learned baseline.", ["model"], registry=r)
        self.anomaly_expected_fpr = Gauge(
            "layerwatch_anomaly_expected_fpr",
            "The configured per-sample false-positive rate (alpha): the anomaly rate on normal traffic.",
            ["model"], registry=r)
        self.stream_maxlen = Gauge(
            "layerwatch_stream_maxlen",
            "The stream's configured bound; lag approaching it means samples will be trimmed.", ["model"], registry=r)
        self.baseline_info = Gauge(
            "layerwatch_baseline_info",
            "The baseline in use (value 1).", ["model", "baseline"], registry=r)
        # --- lens bank, audit, fleet -----------------------------------------------------------
        self.lens_provider = Gauge(
            "layerwatch_lens_provider_info",
            "The ONNX Runtime execution provider actually running the lens bank (value 1).",
            ["model", "provider"], registry=r)
        self.lens_bundle_info = Gauge(
            "layerwatch_lens_bundle_info",
            "The lens bundle in use (value 1).", ["model", "bundle"], registry=r)
        self.audit_records = Counter(
            "layerwatch_audit_records_total",
            "Records appended to the audit trail, by kind.", ["model", "kind"], registry=r)
        self.audit_write_errors = Counter(
            "layerwatch_audit_write_errors_total",
            "Failed audit writes or fsyncs.", ["model"], registry=r)
        self.fleet_tap_sampled = Counter(
            "layerwatch_fleet_tap_requests_sampled_total",
            "Fleet total of requests sampled by all taps (from sample headers).", ["model"], registry=r)
        self.fleet_tap_drops = Counter(
            "layerwatch_fleet_tap_drops_total",
            "Fleet total of tap drops by reason (from sample headers).", ["model", "reason"], registry=r)


def observe_many(child: Histogram, values: object) -> None:
    """``child.observe(v)`` for every value of ``values`` (an array-like), in one vectorised step.

    The sidecar observes per-layer readings of whole micro-batches (layers x samples values per
    histogram family); a Python loop of ``observe`` calls cost as much as the rest of the
    per-sample bookkeeping. Same result as the loop: each value is counted in the first bucket
    whose upper bound is >= the value, and added to the sum (a NaN makes the sum NaN and lands
    in no bucket, as with ``observe``). Uses the child's bucket and sum values, which prometheus_client has kept since 0.4;
    a test compares the exposition with the plain ``observe`` loop.
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return
    bounds = np.asarray(child._upper_bounds, dtype=np.float64)  # noqa: SLF001 - see docstring
    idx = np.searchsorted(bounds, v[~np.isnan(v)], side="left")  # first bound >= v (the last is +Inf)
    counts = np.bincount(idx, minlength=len(bounds))
    child._sum.inc(float(v.sum()))  # noqa: SLF001
    for i in np.flatnonzero(counts):
        child._buckets[int(i)].inc(int(counts[i]))  # noqa: SLF001
