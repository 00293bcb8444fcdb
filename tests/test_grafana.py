"""Grafana dashboards and provisioning (deploy/grafana), validated offline.

No Grafana server runs here: the structure the dashboards rely on is checked with a JSON Schema,
every query is parsed by promtool (written as recording rules after substituting the dashboard
variables), and tests/test_deploy_e2e.py runs them against a live Prometheus.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from test_prometheus import (
    ROOT,
    known_series_names,
    needs_promtool,
    referenced_layerwatch_names,
    run_promtool,
)

GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
# Values for the dashboard variables when a query is checked outside Grafana.
VARIABLE_VALUES = {"model": "m", "probe": "topic", "layer": "3"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


@cache
def dashboards_module() -> ModuleType:
    """deploy/grafana/generate_dashboards.py, the dashboards' source and query walker."""
    from monitor.docsgen import dashboards_module as load

    return load()  # type: ignore[no-any-return]


def load_dashboards() -> dict[str, dict[str, Any]]:
    """Committed dashboards by file name."""
    return {p.name: json.loads(p.read_text()) for p in DASHBOARD_FILES}


_DS = {"type": "object", "required": ["type", "uid"],
       "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string"}}}
_GRID = {"type": "object", "required": ["x", "y", "w", "h"],
         "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 23},
                        "y": {"type": "integer", "minimum": 0},
                        "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        "h": {"type": "integer", "minimum": 1}}}
_TARGET = {"type": "object", "required": ["refId", "expr", "datasource"],
           "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"},
                          "expr": {"type": "string", "minLength": 1},
                          "datasource": _DS,
                          "format": {"enum": ["time_series", "table", "heatmap"]},
                          "instant": {"type": "boolean"}, "range": {"type": "boolean"},
                          "legendFormat": {"type": "string"}}}
_PANEL_TYPES = ["row", "stat", "timeseries", "heatmap", "table", "bargauge", "barchart"]
# The subset of Grafana's dashboard model (schemaVersion 39) these dashboards rely on.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time", "tags"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-z0-9-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "tags": {"type": "array", "contains": {"const": "layerwatch"}},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "type"],
            "properties": {"type": {"enum": ["datasource", "query", "custom", "interval"]}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": _PANEL_TYPES},
                "title": {"type": "string", "minLength": 1},
                "gridPos": _GRID,
                "datasource": _DS,
                "targets": {"type": "array", "items": _TARGET},
                "fieldConfig": {"type": "object", "required": ["defaults", "overrides"]},
            },
            "if": {"properties": {"type": {"not": {"const": "row"}}}},
            "then": {"required": ["datasource", "targets", "fieldConfig", "description"],
                     "properties": {"targets": {"minItems": 1}}},
        }},
    },
}


def test_committed_dashboards_match_their_generator() -> None:
    """The JSON files are exactly what generate_dashboards.py writes (regenerate after editing)."""
    rendered = dashboards_module().render()
    assert sorted(rendered) == [p.name for p in DASHBOARD_FILES]
    for path in DASHBOARD_FILES:
        assert path.read_text() == rendered[path.name], f"{path.name} is stale: run `make generate`"


@pytest.mark.parametrize("name", [p.name for p in DASHBOARD_FILES])
def test_dashboard_matches_schema(name: str) -> None:
    """Each dashboard has the structure Grafana's provisioning and our panels rely on."""
    jsonschema.validate(load_dashboards()[name], DASHBOARD_SCHEMA)


def test_dashboard_uids_are_unique_and_panel_ids_unique_per_dashboard() -> None:
    """Dashboard uids are unique, and panel ids are unique within each dashboard."""
    dashes = load_dashboards()
    uids = [d["uid"] for d in dashes.values()]
    assert len(uids) == len(set(uids))
    for name, dash in dashes.items():
        ids = [p["id"] for p in dashboards_module().all_panels(dash)]
        assert len(ids) == len(set(ids)), name


def test_panels_do_not_overlap_on_the_grid() -> None:
    """Panels fit the 24-column grid and no two panels share a cell."""
    for name, dash in load_dashboards().items():
        taken: dict[tuple[int, int], int] = {}
        for p in dashboards_module().all_panels(dash):
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, (name, p["title"])
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in taken, f"{name}: panel {p['id']} overlaps panel {taken[(x, y)]}"
                    taken[(x, y)] = p["id"]


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    """Panels, targets, annotations and variables all point at the ${datasource} Prometheus variable."""
    for name, dash in load_dashboards().items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for p in dashboards_module().all_panels(dash):
            if p["type"] == "row":
                continue
            assert p["datasource"] == DATASOURCE_REF, (name, p["title"])
            for t in p["targets"]:
                assert t["datasource"] == DATASOURCE_REF, (name, p["title"], t["refId"])
        for a in dash["annotations"]["list"]:
            assert a["datasource"] == DATASOURCE_REF, name
        for v in variables.values():
            if v["type"] == "query":
                assert v["datasource"] == DATASOURCE_REF, (name, v["name"])


def test_queries_use_only_defined_variables() -> None:
    """Every $variable in a query is a template variable of its dashboard or a Grafana interval."""
    gd = dashboards_module()
    for name, dash in load_dashboards().items():
        defined = {v["name"] for v in dash["templating"]["list"]} | set(gd.GRAFANA_INTERVALS)
        for q in gd.queries(dash):
            assert gd.variables_used(q.expr) <= defined, (name, q.where, q.expr)


def test_queries_read_only_exported_metrics_and_recorded_series() -> None:
    """Every layerwatch name in a query is a metric of monitor/metrics.py or a recording rule."""
    known = known_series_names()
    for name, dash in load_dashboards().items():
        for q in dashboards_module().queries(dash):
            unknown = referenced_layerwatch_names(q.expr) - known
            assert not unknown, f"{name} {q.where}: {sorted(unknown)}"


@needs_promtool
def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    """promtool parses every panel, annotation and variable query once variables are substituted."""
    gd = dashboards_module()
    groups = []
    for dash in load_dashboards().values():
        prefix = dash["uid"].replace("-", "_")
        rules = [{"record": f"dashboard:{prefix}_query_{i}:check", "expr": gd.substitute(q.expr, VARIABLE_VALUES)}
                 for i, q in enumerate(gd.queries(dash))]
        groups.append({"name": dash["uid"], "rules": rules})
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = run_promtool("check", "rules", "--lint-fatal", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr
    total = sum(len(g["rules"]) for g in groups)
    assert f"SUCCESS: {total} rules found" in result.stdout


def _exprs_by_panel_type(dash: dict[str, Any], ptype: str) -> list[str]:
    return [t["expr"] for p in dashboards_module().all_panels(dash) if p["type"] == ptype for t in p["targets"]]


def test_layer_view_has_the_per_layer_heatmaps_depth_and_probe_panels() -> None:
    """The layer view shows heatmaps of KL, entropy and agreement, prediction depth and probe shares."""
    dash = load_dashboards()["layerwatch-layers.json"]
    heatmaps = " ".join(_exprs_by_panel_type(dash, "heatmap"))
    for series in ("model_layer:layerwatch_layer_kl_to_final_nats:mean_rate5m",
                   "model_layer:layerwatch_layer_entropy_nats:mean_rate5m",
                   "model_layer:layerwatch_layer_top1_agreement:ratio_rate5m",
                   "layerwatch_prediction_depth_bucket"):
        assert series in heatmaps, series
    everything = " ".join(q.expr for q in dashboards_module().queries(dash))
    assert "model_layer_probe_label:layerwatch_probe_label:share_rate5m" in everything


def test_layer_view_shows_local_segment_flags_their_layers_and_positions() -> None:
    """Issue 19: the layer view has a panel row for local anomalies: the rate of local_segment
    flags, the layers that carry them and where in the prompt they start."""
    dash = load_dashboards()["layerwatch-layers.json"]
    everything = " ".join(q.expr for q in dashboards_module().queries(dash))
    for series in ('flag="local_segment"', "layerwatch_local_segment_layer_total",
                   "layerwatch_local_segment_position_bucket"):
        assert series in everything, series


def test_overview_covers_sampling_drops_throughput_lag_anomalies_and_alerts() -> None:
    """The overview reads sampling, drops, throughput, lag, anomaly rate and firing alerts."""
    dash = load_dashboards()["layerwatch-overview.json"]
    everything = " ".join(q.expr for q in dashboards_module().queries(dash))
    for needle in ("layerwatch_tap_requests_sampled_total", "layerwatch_tap_requests_skipped_total",
                   "layerwatch_tap_drops_total", "layerwatch_stream_drops_total",
                   "layerwatch_samples_processed_total", "model:layerwatch_consumer_lag:max",
                   "model:layerwatch_anomalies:ratio_rate5m", 'ALERTS{alertname=~"Layerwatch.*"'):
        assert needle in everything, needle


def test_tap_health_covers_queue_latency_drops_and_transport_errors() -> None:
    """The tap-health dashboard reads every tap metric."""
    dash = load_dashboards()["layerwatch-tap.json"]
    everything = " ".join(q.expr for q in dashboards_module().queries(dash))
    for metric in ("layerwatch_tap_requests_sampled_total", "layerwatch_tap_requests_skipped_total",
                   "layerwatch_tap_samples_exported_total", "layerwatch_tap_drops_total",
                   "layerwatch_tap_queue_depth", "layerwatch_tap_queue_bytes",
                   "layerwatch_tap_export_latency_seconds_bucket", "layerwatch_tap_transport_errors_total"):
        assert metric in everything, metric


def test_layer_series_are_zero_padded_so_layers_sort_by_depth() -> None:
    """Per-layer heatmap and table queries pad single-digit layers so rows sort 00, 01, ... 30."""
    dash = load_dashboards()["layerwatch-layers.json"]
    for p in dashboards_module().all_panels(dash):
        if p["type"] in {"heatmap", "table", "barchart"}:
            for t in p["targets"]:
                if "model_layer" in t["expr"]:
                    assert t["expr"].startswith("label_replace(") and '"0$1"' in t["expr"], p["title"]


def test_provisioning_defines_the_default_prometheus_datasource() -> None:
    """The provisioned datasource is a default Prometheus with a fixed uid."""
    doc = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = doc["datasources"]
    assert doc["apiVersion"] == 1
    assert ds["type"] == "prometheus" and ds["isDefault"] is True and ds["uid"]
    assert ds["url"].startswith("http://")


def test_dashboard_provider_loads_a_folder_of_files() -> None:
    """The dashboards provider is a file provider with an absolute path in the container."""
    doc = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "layerwatch.yml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()
