"""Generate layerwatch's Grafana dashboards (deploy/grafana/dashboards/*.json).

The JSON files are committed so Grafana provisioning, the Helm chart and reviewers read them
directly; this script is their one source, so ids, grid positions and datasource references stay
consistent. Edit here, then run ``make generate`` (``python -m monitor.docsgen --write``), which
writes deploy/grafana/dashboards/ and the Helm chart's copies in helm/layerwatch/files/.

tests/test_grafana.py fails when the committed JSON differs from what this script writes, and
parses every panel query with promtool. Queries use only the metric names of
monitor/metrics.py and the recording rules of deploy/prometheus/rules/recording.yml.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
# Single-digit layers get a leading zero so that series (and heatmap rows) sort by depth up to
# layer 99 and the y axis reads 00, 01, ... 30 instead of 0, 1, 10, 11, ... 2, 20.
PAD_LAYER = 'label_replace({expr}, "layer", "0$1", "layer", "([0-9])")'

Panel = dict[str, Any]


def target(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False,
           fmt: str = "time_series") -> dict[str, Any]:
    """One Prometheus query of a panel."""
    return {
        "datasource": DS,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "format": fmt,
    }


def targets(*items: tuple[str, str]) -> list[dict[str, Any]]:
    """Several range queries, refIds A, B, C..."""
    return [target(e, legend, ref=chr(ord("A") + i)) for i, (e, legend) in enumerate(items)]


class Layout:
    """Hands out panel ids and grid positions row by row (24 columns wide)."""

    def __init__(self) -> None:
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.newline()
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def newline(self) -> None:
        self.y += self.row_h
        self.x = 0
        self.row_h = 0

    def panel(self, ptype: str, title: str, description: str, tgts: list[dict[str, Any]],
              w: int, h: int, *, unit: str = "short", options: dict[str, Any] | None = None,
              defaults: dict[str, Any] | None = None, transformations: list[Any] | None = None,
              ) -> Panel:
        pid = self.next_id
        self.next_id += 1
        field_defaults: dict[str, Any] = {"unit": unit}
        field_defaults.update(defaults or {})
        p: Panel = {
            "id": pid,
            "type": ptype,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": self.place(w, h),
            "targets": tgts,
            "fieldConfig": {"defaults": field_defaults, "overrides": []},
            "options": options or {},
        }
        if transformations:
            p["transformations"] = transformations
        return p

    def row(self, title: str) -> Panel:
        if self.x:
            self.newline()
        pid = self.next_id
        self.next_id += 1
        p: Panel = {"id": pid, "type": "row", "title": title, "collapsed": False,
                    "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []}
        self.y += 1
        return p


def stat(lay: Layout, title: str, description: str, expr: str, legend: str, unit: str,
         *, thresholds: list[tuple[float | None, str]] | None = None,
         mappings: list[Any] | None = None) -> Panel:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    return lay.panel(
        "stat", title, description, [target(expr, legend)], 4, 4, unit=unit,
        options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                 "colorMode": "background", "graphMode": "area", "textMode": "value_and_name"},
        defaults={"thresholds": {"mode": "absolute", "steps": steps}, "mappings": mappings or []},
    )


def timeseries(lay: Layout, title: str, description: str, tgts: list[dict[str, Any]], unit: str,
               *, w: int = 12, h: int = 8, stack: str = "none", min0: bool = True) -> Panel:
    defaults: dict[str, Any] = {"custom": {"stacking": {"mode": stack, "group": "A"},
                                           "fillOpacity": 20 if stack != "none" else 5}}
    if min0:
        defaults["min"] = 0
    return lay.panel("timeseries", title, description, tgts, w, h, unit=unit, defaults=defaults,
                     options={"legend": {"displayMode": "table", "placement": "bottom",
                                         "calcs": ["lastNotNull", "max"]},
                              "tooltip": {"mode": "multi", "sort": "desc"}})


def bargauge_options(orientation: str) -> dict[str, Any]:
    """A bar gauge of the last value of each series (totals over the time range)."""
    return {"orientation": orientation, "displayMode": "basic",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "showUnfilled": True}


def layer_heatmap(lay: Layout, title: str, description: str, expr: str, unit: str,
                  scheme: str, *, reverse: bool = False) -> Panel:
    """Layers (rows, bottom = embeddings) over time, coloured by a per-layer reading."""
    return lay.panel(
        "heatmap", title, description,
        [target(PAD_LAYER.format(expr=expr), "{{layer}}")], 24, 10, unit=unit,
        options={
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": scheme, "steps": 64, "reverse": reverse},
            "yAxis": {"axisPlacement": "left", "axisLabel": "layer", "reverse": False},
            "rowsFrame": {"layout": "auto"},
            "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
        },
    )


def templating(model_metric: str, *, multi: bool, extra: list[dict[str, Any]] | None = None,
               ) -> dict[str, Any]:
    def query_var(name: str, label: str, query: str, *, multi_: bool) -> dict[str, Any]:
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "sort": 3 if name == "layer" else 1,
            "multi": multi_, "includeAll": multi_, "current": {},
        }

    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
        query_var("model", "Model", f"label_values({model_metric}, model)", multi_=multi),
        *(query_var(**e) for e in (extra or [])),
    ]}


def dashboard(uid: str, title: str, description: str, panels: list[Panel],
              templ: dict[str, Any]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["layerwatch"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "links": [{"type": "dashboards", "tags": ["layerwatch"], "asDropdown": False,
                   "includeVars": True, "keepTime": True, "title": "layerwatch"}],
        "annotations": {"list": [{
            "name": "Drift alerts", "datasource": DS, "enable": True, "iconColor": "red",
            "expr": 'ALERTS{alertname="LayerwatchDriftAlertActive", alertstate="firing", model=~"$model"}',
            "step": "60s", "titleFormat": "Drift: {{model}}", "useValueForTime": False,
        }]},
        "templating": templ,
        "panels": panels,
    }


M = 'model=~"$model"'


def overview() -> dict[str, Any]:
    lay = Layout()
    p: list[Panel] = [lay.row("Now")]
    p.append(stat(lay, "Samples processed", "Samples the sidecars explained, scored and audited, per second (5m).",
                  f"sum(model:layerwatch_samples_processed:rate5m{{{M}}})", "processed", "reqps"))
    p.append(stat(lay, "Effective sample rate", "Share of requests the taps sampled (after the budget), 5m.",
                  f"model:layerwatch_tap_sampled:ratio_rate5m{{{M}}}", "{{model}}", "percentunit"))
    p.append(stat(lay, "Tap drop ratio", "Share of sampled requests that never reached the transport (5m). Alert above 5%.",
                  f"model:layerwatch_tap_drops:ratio_rate5m{{{M}}}", "{{model}}", "percentunit",
                  thresholds=[(None, "green"), (0.01, "yellow"), (0.05, "red")]))
    p.append(stat(lay, "Consumer lag", "Stream entries not yet delivered to the sidecars' consumer group.",
                  f"model:layerwatch_consumer_lag:max{{{M}}}", "{{model}}", "short",
                  thresholds=[(None, "green"), (1000, "yellow"), (5000, "red")]))
    p.append(stat(lay, "Anomaly rate", "Share of samples flagged anomalous (5m); the baseline calibrates this to the configured FPR.",
                  f"model:layerwatch_anomalies:ratio_rate5m{{{M}}}", "{{model}}", "percentunit",
                  thresholds=[(None, "green"), (0.02, "yellow"), (0.03, "red")]))
    p.append(stat(lay, "Drift", "Whether a window drift alert is active in any sidecar.",
                  f"max by (model) (layerwatch_drift_alert_active{{{M}}})", "{{model}}", "none",
                  thresholds=[(None, "green"), (1, "red")],
                  mappings=[{"type": "value", "options": {"0": {"text": "stable"}, "1": {"text": "DRIFT"}}}]))

    p.append(lay.row("Flow"))
    p.append(timeseries(lay, "Throughput", "Requests sampled by the taps, samples processed and dead-lettered by the sidecars.",
                        targets(
                            (f"sum by (model) (rate(layerwatch_tap_requests_sampled_total{{{M}}}[$__rate_interval]))", "sampled {{model}}"),
                            (f"sum by (model) (rate(layerwatch_samples_processed_total{{{M}}}[$__rate_interval]))", "processed {{model}}"),
                            (f"sum by (model) (rate(layerwatch_dead_letters_total{{{M}}}[$__rate_interval]))", "dead-lettered {{model}}"),
                        ), "reqps"))
    p.append(timeseries(lay, "Sampling decisions", "Requests the taps sampled, and skipped by reason (rate, budget).",
                        targets(
                            (f"sum by (model) (rate(layerwatch_tap_requests_sampled_total{{{M}}}[$__rate_interval]))", "sampled {{model}}"),
                            (f"sum by (model, reason) (rate(layerwatch_tap_requests_skipped_total{{{M}}}[$__rate_interval]))", "skipped: {{reason}} {{model}}"),
                        ), "reqps", stack="normal"))
    p.append(timeseries(lay, "Drops by reason", "Samples lost before a sidecar read them: in the tap (by reason) and in the stream (trimmed).",
                        targets(
                            (f"sum by (model, reason) (rate(layerwatch_tap_drops_total{{{M}}}[$__rate_interval]))", "tap: {{reason}} {{model}}"),
                            (f"sum by (model, reason) (rate(layerwatch_stream_drops_total{{{M}}}[$__rate_interval]))", "stream: {{reason}} {{model}}"),
                        ), "reqps", stack="normal"))
    p.append(timeseries(lay, "Consumer lag and pending", "Entries not yet delivered to the group (lag) and delivered but not acknowledged (pending).",
                        targets(
                            (f"model:layerwatch_consumer_lag:max{{{M}}}", "lag {{model}}"),
                            (f"max by (model) (layerwatch_consumer_pending{{{M}}})", "pending {{model}}"),
                        ), "short"))
    p.append(timeseries(lay, "Latency", "p50 and p99 from capture in the tap to the durable audit record, and p99 of one micro-batch.",
                        targets(
                            (f"histogram_quantile(0.5, sum by (model, le) (rate(layerwatch_end_to_end_latency_seconds_bucket{{{M}}}[$__rate_interval])))", "end-to-end p50 {{model}}"),
                            (f"histogram_quantile(0.99, sum by (model, le) (rate(layerwatch_end_to_end_latency_seconds_bucket{{{M}}}[$__rate_interval])))", "end-to-end p99 {{model}}"),
                            (f"histogram_quantile(0.99, sum by (model, le) (rate(layerwatch_processing_latency_seconds_bucket{{{M}}}[$__rate_interval])))", "batch p99 {{model}}"),
                        ), "s"))
    p.append(timeseries(lay, "Batch size", "Mean samples per micro-batch.",
                        targets((f"sum by (model) (rate(layerwatch_batch_size_sum{{{M}}}[$__rate_interval])) / sum by (model) (rate(layerwatch_batch_size_count{{{M}}}[$__rate_interval]))", "{{model}}"),),
                        "short"))

    p.append(lay.row("Anomalies and drift"))
    p.append(timeseries(lay, "Anomaly rate vs alert threshold", "Share of samples flagged anomalous (5m) against 3x the calibrated false-positive rate.",
                        targets(
                            (f"model:layerwatch_anomalies:ratio_rate5m{{{M}}}", "anomaly rate {{model}}"),
                            (f"3 * model:layerwatch_anomaly_expected_fpr:config{{{M}}}", "alert threshold {{model}}"),
                        ), "percentunit"))
    p.append(lay.panel("heatmap", "Anomaly score distribution", "Per-sample anomaly scores against the baseline over time.",
                       [target(f"sum by (le) (rate(layerwatch_anomaly_score_bucket{{{M}}}[$__rate_interval]))", "{{le}}", fmt="heatmap")],
                       12, 8, unit="short",
                       options={"calculate": False, "cellGap": 1,
                                "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                                "yAxis": {"axisPlacement": "left", "axisLabel": "score"},
                                "rowsFrame": {"layout": "le"},
                                "tooltip": {"mode": "single", "yHistogram": True}}))
    p.append(timeseries(lay, "Flags by kind", "Flags raised on samples, by kind (which readings moved).",
                        targets((f"sum by (model, flag) (rate(layerwatch_flags_total{{{M}}}[$__rate_interval]))", "{{flag}} {{model}}"),),
                        "reqps", stack="normal"))
    p.append(timeseries(lay, "Watched concepts", "Samples each watched concept (baseline.watch) flagged: the traffic you named.",
                        targets((f"sum by (model, concept) (rate(layerwatch_watched_concept_total{{{M}}}[$__rate_interval]))", "{{concept}} {{model}}"),),
                        "reqps"))
    p.append(lay.panel("table", "Active alerts", "layerwatch alerts firing now (Prometheus ALERTS).",
                       [target('ALERTS{alertname=~"Layerwatch.*", alertstate="firing"}', "", instant=True, fmt="table")],
                       12, 8, unit="none",
                       transformations=[{"id": "organize", "options": {
                           "excludeByName": {"Time": True, "Value": True, "__name__": True, "alertstate": True},
                           "renameByName": {}}}],
                       options={"showHeader": True}))

    p.append(lay.row("Configuration"))
    p.append(lay.panel("table", "Lens bank, bundle and baseline", "What each sidecar runs: execution provider, lens bundle, baseline, and baseline learning progress.",
                       [target(f"max by (instance, model, provider) (layerwatch_lens_provider_info{{{M}}})", "", ref="A", instant=True, fmt="table"),
                        target(f"max by (instance, model, bundle) (layerwatch_lens_bundle_info{{{M}}})", "", ref="B", instant=True, fmt="table"),
                        target(f"max by (instance, model, baseline) (layerwatch_baseline_info{{{M}}})", "", ref="C", instant=True, fmt="table"),
                        target(f"max by (instance, model) (layerwatch_baseline_learning_samples{{{M}}} * layerwatch_baseline_learning{{{M}}})", "", ref="D", instant=True, fmt="table")],
                       24, 7, unit="none",
                       transformations=[{"id": "merge", "options": {}},
                                        {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {
                                            "Value #A": "provider up", "Value #B": "bundle", "Value #C": "baseline",
                                            "Value #D": "learning samples"}}}],
                       options={"showHeader": True}))
    return dashboard("layerwatch-overview", "layerwatch / Overview",
                     "Sampling, drops, throughput, lag, anomaly rate, drift and active alerts of the monitored models.",
                     p, templating("layerwatch_samples_processed_total", multi=True))


S = 'model="$model"'


def layers() -> dict[str, Any]:
    lay = Layout()
    p: list[Panel] = [lay.row("Convergence over layers and time")]
    p.append(layer_heatmap(lay, "KL to final by layer", "Mean KL divergence (nats) from the model's final distribution to each layer's lens distribution (5m). Early layers are far; a change in where it drops is a change in how the model computes.",
                           f"model_layer:layerwatch_layer_kl_to_final_nats:mean_rate5m{{{S}}}", "none", "Blues", reverse=True))
    p.append(layer_heatmap(lay, "Entropy by layer", "Mean entropy (nats) of each layer's lens distribution (5m).",
                           f"model_layer:layerwatch_layer_entropy_nats:mean_rate5m{{{S}}}", "none", "Purples", reverse=True))
    p.append(layer_heatmap(lay, "Top-1 agreement with the final output by layer", "Share of samples whose lens top-1 at the layer equals the model's final top-1 (5m).",
                           f"model_layer:layerwatch_layer_top1_agreement:ratio_rate5m{{{S}}}", "percentunit", "Greens"))

    p.append(lay.row("Prediction depth"))
    p.append(lay.panel("heatmap", "Prediction depth over time", "First layer from which the lens top-1 stays equal to the final output: distribution over time.",
                       [target(f"sum by (le) (rate(layerwatch_prediction_depth_bucket{{{S}}}[$__rate_interval]))", "{{le}}", fmt="heatmap")],
                       12, 9, unit="short",
                       options={"calculate": False, "cellGap": 1,
                                "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                                "yAxis": {"axisPlacement": "left", "axisLabel": "layer"},
                                "rowsFrame": {"layout": "le"},
                                "tooltip": {"mode": "single", "yHistogram": True}}))
    p.append(lay.panel("bargauge", "Prediction depth distribution (time range)", "How many samples settled on their final answer by each layer, over the selected time range.",
                       [target(f"sum by (le) (increase(layerwatch_prediction_depth_bucket{{{S}}}[$__range]))", "{{le}}", instant=True, fmt="heatmap")],
                       6, 9, unit="short",
                       options=bargauge_options("vertical")))
    p.append(timeseries(lay, "Mean prediction depth", "Mean prediction depth (5m): deeper means the model settles later.",
                        targets((f"model:layerwatch_prediction_depth:mean_rate5m{{{S}}}", "mean depth"),), "short", w=6, h=9))

    p.append(lay.row("Concept probes"))
    p.append(lay.panel("barchart", "Probe label shares by layer: $probe", "Share of each label of probe $probe at every layer (5m, now).",
                       [target(PAD_LAYER.format(expr=f'model_layer_probe_label:layerwatch_probe_label:share_rate5m{{{S}, probe="$probe"}}'),
                               "", instant=True, fmt="table")],
                       14, 10, unit="percentunit",
                       transformations=[{"id": "groupingToMatrix", "options": {
                           "columnField": "label", "rowField": "layer", "valueField": "Value"}},
                           {"id": "sortBy", "options": {"sort": [{"field": "layer\\label"}]}}],
                       defaults={"custom": {"fillOpacity": 80}, "min": 0, "max": 1},
                       options={"orientation": "horizontal", "stacking": "percent", "showValue": "never",
                                "xField": "layer\\label", "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}))
    p.append(timeseries(lay, "Probe $probe at layer $layer", "Label shares of probe $probe at layer $layer over time (5m).",
                        targets((f'model_layer_probe_label:layerwatch_probe_label:share_rate5m{{{S}, probe="$probe", layer="$layer"}}', "{{label}}"),),
                        "percentunit", w=10, h=10, stack="normal"))

    p.append(lay.row("Local anomalies: a foreign segment inside a prompt"))
    p.append(timeseries(lay, "Samples flagged for a local segment", "Samples whose flag is local_segment (a run of prompt windows unlike normal text, e.g. injected instructions) beside all flagged samples (per second).",
                        targets((f'sum(rate(layerwatch_flags_total{{{S}, flag="local_segment"}}[$__rate_interval]))', "local segment"),
                                (f"sum(rate(layerwatch_anomalies_total{{{S}}}[$__rate_interval]))", "all anomalies")),
                        "reqps", w=10, h=9))
    p.append(lay.panel("bargauge", "Layers carrying local segments (time range)", "How often each layer was named as carrying a flagged segment (its window statistic among the strongest), over the selected time range.",
                       [target(PAD_LAYER.format(expr=f"sum by (model, layer) (increase(layerwatch_local_segment_layer_total{{{S}}}[$__range]))"),
                               "{{layer}}", instant=True)],
                       7, 9, unit="short",
                       options=bargauge_options("horizontal")))
    p.append(lay.panel("bargauge", "Where in the prompt segments start (time range)", "Start of each flagged segment as a fraction of its prompt (0.1 = in the first tenth), over the selected time range: injected prefixes pile up at the start, pasted payloads at the end. Offsets only, never text.",
                       [target(f"sum by (le) (increase(layerwatch_local_segment_position_bucket{{{S}}}[$__range]))", "{{le}}", instant=True, fmt="heatmap")],
                       7, 9, unit="short",
                       options=bargauge_options("vertical")))

    p.append(lay.row("Readings per layer (now)"))
    p.append(lay.panel("table", "Per-layer readings", "Mean KL to final, mean entropy and top-1 agreement per layer over the last 5m.",
                       [target(PAD_LAYER.format(expr=f"model_layer:layerwatch_layer_kl_to_final_nats:mean_rate5m{{{S}}}"), "", ref="A", instant=True, fmt="table"),
                        target(PAD_LAYER.format(expr=f"model_layer:layerwatch_layer_entropy_nats:mean_rate5m{{{S}}}"), "", ref="B", instant=True, fmt="table"),
                        target(PAD_LAYER.format(expr=f"model_layer:layerwatch_layer_top1_agreement:ratio_rate5m{{{S}}}"), "", ref="C", instant=True, fmt="table")],
                       24, 12, unit="none",
                       transformations=[{"id": "merge", "options": {}},
                                        {"id": "organize", "options": {"excludeByName": {"Time": True, "model": True}, "renameByName": {
                                            "Value #A": "KL to final (nats)", "Value #B": "entropy (nats)", "Value #C": "top-1 agreement"}}},
                                        {"id": "sortBy", "options": {"sort": [{"field": "layer"}]}}],
                       options={"showHeader": True}))
    extra = [
        {"name": "probe", "label": "Probe", "query": f"label_values(layerwatch_probe_label_total{{{S}}}, probe)", "multi_": False},
        {"name": "layer", "label": "Layer", "query": f"label_values(layerwatch_layer_samples_total{{{S}}}, layer)", "multi_": False},
    ]
    return dashboard("layerwatch-layers", "layerwatch / Layers",
                     "What each layer of the served model 'thinks': convergence to the final output, prediction depth, concept probes, local anomalies.",
                     p, templating("layerwatch_layer_samples_total", multi=False, extra=extra))


def tap() -> dict[str, Any]:
    lay = Layout()
    p: list[Panel] = [lay.row("Now")]
    p.append(stat(lay, "Sampled", "Requests sampled per second by all taps (5m).",
                  f"sum(model:layerwatch_tap_requests_sampled:rate5m{{{M}}})", "sampled", "reqps"))
    p.append(stat(lay, "Effective sample rate", "Share of requests sampled (5m).",
                  f"model:layerwatch_tap_sampled:ratio_rate5m{{{M}}}", "{{model}}", "percentunit"))
    p.append(stat(lay, "Drop ratio", "Share of sampled requests dropped before the transport (5m). Alert above 5%.",
                  f"model:layerwatch_tap_drops:ratio_rate5m{{{M}}}", "{{model}}", "percentunit",
                  thresholds=[(None, "green"), (0.01, "yellow"), (0.05, "red")]))
    p.append(stat(lay, "Queue depth", "Samples waiting in the export queues of all taps.",
                  f"sum(layerwatch_tap_queue_depth{{{M}}})", "queued", "short"))
    p.append(stat(lay, "Transport errors", "Transport failures per second seen by the exporters (5m).",
                  f"sum(rate(layerwatch_tap_transport_errors_total{{{M}}}[5m]))", "errors", "reqps",
                  thresholds=[(None, "green"), (0.001, "red")]))
    p.append(stat(lay, "Tap targets up", "Inference server /metrics endpoints Prometheus scrapes successfully.",
                  'sum(up{job="layerwatch-tap"})', "up", "none"))

    p.append(lay.row("Exporter"))
    p.append(timeseries(lay, "Sampled, skipped and exported", "Per second: requests sampled, skipped by reason, samples published.",
                        targets(
                            (f"sum by (model) (rate(layerwatch_tap_requests_sampled_total{{{M}}}[$__rate_interval]))", "sampled {{model}}"),
                            (f"sum by (model, reason) (rate(layerwatch_tap_requests_skipped_total{{{M}}}[$__rate_interval]))", "skipped: {{reason}} {{model}}"),
                            (f"sum by (model) (rate(layerwatch_tap_samples_exported_total{{{M}}}[$__rate_interval]))", "exported {{model}}"),
                        ), "reqps"))
    p.append(timeseries(lay, "Drops by reason", "Sampled requests dropped by each tap, by reason, and the sidecars' fleet totals from sample headers.",
                        targets(
                            (f"sum by (model, reason) (rate(layerwatch_tap_drops_total{{{M}}}[$__rate_interval]))", "{{reason}} {{model}}"),
                            (f"sum by (model, reason) (rate(layerwatch_fleet_tap_drops_total{{{M}}}[$__rate_interval]))", "fleet: {{reason}} {{model}}"),
                        ), "reqps", stack="normal"))
    p.append(timeseries(lay, "Queue depth by server", "Samples waiting in each tap's export queue.",
                        targets((f"layerwatch_tap_queue_depth{{{M}}}", "{{instance}} {{model}}"),), "short"))
    p.append(timeseries(lay, "Queue bytes by server", "Bytes of captured tensors waiting in each tap's export queue.",
                        targets((f"layerwatch_tap_queue_bytes{{{M}}}", "{{instance}} {{model}}"),), "bytes"))
    p.append(timeseries(lay, "Export latency", "Time from capture in the hook to a successful publish.",
                        targets(
                            (f"histogram_quantile(0.5, sum by (model, le) (rate(layerwatch_tap_export_latency_seconds_bucket{{{M}}}[$__rate_interval])))", "p50 {{model}}"),
                            (f"histogram_quantile(0.99, sum by (model, le) (rate(layerwatch_tap_export_latency_seconds_bucket{{{M}}}[$__rate_interval])))", "p99 {{model}}"),
                        ), "s"))
    p.append(timeseries(lay, "Transport errors", "Transport failures per second seen by each tap's exporter.",
                        targets((f"sum by (instance, model) (rate(layerwatch_tap_transport_errors_total{{{M}}}[$__rate_interval]))", "{{instance}} {{model}}"),),
                        "reqps"))
    return dashboard("layerwatch-tap", "layerwatch / Tap health",
                     "The tap inside the inference servers: sampling, export queue, latency, drops and transport errors.",
                     p, templating("layerwatch_tap_requests_sampled_total", multi=True))


DASHBOARDS = {
    "layerwatch-overview.json": overview,
    "layerwatch-layers.json": layers,
    "layerwatch-tap.json": tap,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(build(), indent=2, sort_keys=False) + "\n" for name, build in DASHBOARDS.items()}


# --- reading dashboards back (used by the tests) ------------------------------------------------

# Grafana's own interval variables, with the values the tests substitute.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
# ($1 in a label_replace replacement is a regex group, not a variable: names start with a letter.)
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard and where it sits."""

    dashboard: str
    where: str  # "panel 7 'Throughput' target B", "annotation 'Drift alerts'", "variable model"
    expr: str
    instant: bool = False


def _all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_all_panels(p.get("panels", [])))
    return out


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard, including those nested in rows."""
    return _all_panels(dash.get("panels", []))


def queries(dash: dict[str, Any]) -> list[Query]:
    """Every PromQL expression of a dashboard: panel targets, annotations, and the series
    selectors inside ``label_values(...)`` variable queries."""
    uid = dash["uid"]
    out = []
    for p in all_panels(dash):
        for t in p.get("targets", []):
            out.append(Query(uid, f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"],
                             bool(t.get("instant"))))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append(Query(uid, f"annotation {a['name']!r}", a["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"].strip())
            if m is None:
                raise ValueError(f"{uid}: variable {v['name']}: expected label_values(selector, label)")
            out.append(Query(uid, f"variable {v['name']}", m.group(1), True))
    return out


def variables_used(expr: str) -> set[str]:
    """Names of the ``$var`` / ``${var}`` references in an expression."""
    return {a or b for a, b in _VARIABLE.findall(expr)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace dashboard and Grafana variables by concrete values (KeyError on an unknown one)."""
    merged = {**GRAFANA_INTERVALS, **values}
    return _VARIABLE.sub(lambda m: merged[m.group(1) or m.group(2)], expr)


def main() -> int:
    print("run `make generate`: it writes deploy/grafana/dashboards/ and the Helm chart's copies", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
