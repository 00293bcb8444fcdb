"""Prometheus configuration, recording and alert rules (deploy/prometheus), checked with promtool.

promtool comes from Debian's ``prometheus`` package (scripts/services.sh installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.metrics import SidecarMetrics, TapMetrics

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = {name: PROM_DIR / "rules" / f"{name}.yml" for name in ("recording", "alerts")}
ALERT_TESTS = PROM_DIR / "tests" / "alerts_test.yml"
RUNBOOKS = ROOT / "deploy" / "runbooks.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def run_promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run promtool; the caller asserts on the result (output is kept for the message)."""
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def load_rules(name: str) -> list[dict[str, Any]]:
    """All rules of one rules file, flattened over groups."""
    doc = yaml.safe_load(RULES[name].read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return load_rules("alerts")


def exported_series_names() -> set[str]:
    """Every series name layerwatch exports (monitor/metrics.py), with histogram and counter suffixes."""
    names: set[str] = set()
    for metrics in (SidecarMetrics(), TapMetrics()):
        for family in metrics.registry.collect():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return names


def known_series_names() -> set[str]:
    """Series a rule or dashboard may read: exported metrics, recording rules, up and ALERTS."""
    recorded = {rule["record"] for rule in load_rules("recording")}
    return exported_series_names() | recorded | {"up", "ALERTS"}


def referenced_layerwatch_names(expr: str) -> set[str]:
    """Metric and recording-rule names mentioning layerwatch in a PromQL expression."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {tok for tok in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", without_strings) if "layerwatch" in tok}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


@needs_promtool
def test_scrape_config_is_valid_for_promtool() -> None:
    """promtool accepts prometheus.yml and the rule files it loads."""
    result = run_promtool("check", "config", PROM_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


@needs_promtool
def test_rule_files_pass_promtool_check() -> None:
    """promtool parses both rule files without errors or lint findings."""
    result = run_promtool("check", "rules", "--lint=all", "--lint-fatal", *RULES.values())
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    """Every promtool unit test of the alerts and recording rules passes."""
    result = run_promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    """Each alert has at least one promtool case expecting it to fire and one expecting silence."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


def test_required_alerts_exist() -> None:
    """The alert set covers drift, anomaly rate, tap drops, lag, sidecar down, audit and CPU fallback."""
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "LayerwatchDriftAlertActive", "LayerwatchAnomalyRateAboveBaseline", "LayerwatchTapDropRateHigh",
        "LayerwatchConsumerLagGrowing", "LayerwatchSidecarDown", "LayerwatchAuditWriteFailures",
        "LayerwatchLensProviderCPUFallback",
    } <= names


def test_lag_alert_projects_the_trend() -> None:
    """The consumer-lag alert is a trend alert: it uses deriv and predict_linear."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "LayerwatchConsumerLagGrowing"]
    assert "deriv(" in rule["expr"] and "predict_linear(" in rule["expr"]


def test_alerts_carry_severity_summary_description_and_runbook() -> None:
    """Every alert has a severity label and summary, description and runbook_url annotations."""
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]


def test_runbook_urls_point_at_runbook_sections() -> None:
    """Each runbook_url names deploy/runbooks.md and an anchor of one of its sections, one per alert."""
    headings = re.findall(r"^## (.+)$", RUNBOOKS.read_text(), flags=re.M)
    anchors = {github_anchor(h) for h in headings}
    alerts = alert_rules()
    for rule in alerts:
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "deploy/runbooks.md", rule["alert"]
        assert anchor == github_anchor(rule["alert"]) and anchor in anchors, rule["alert"]
    assert {github_anchor(r["alert"]) for r in alerts} == anchors, "runbook sections without an alert"


def test_rules_read_only_exported_metrics_and_recorded_series() -> None:
    """Every layerwatch name in a rule is a metric of monitor/metrics.py or a recording rule."""
    known = known_series_names()
    for name in RULES:
        for rule in load_rules(name):
            unknown = referenced_layerwatch_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('record') or rule.get('alert')}: {sorted(unknown)}"


def test_recording_rule_names_follow_level_metric_operation() -> None:
    """Recording rules are named level:metric:operation, unique, and never shadow a raw metric."""
    records = [rule["record"] for rule in load_rules("recording")]
    assert len(records) == len(set(records))
    for record in records:
        level, metric, operation = record.split(":")
        assert level and metric.startswith("layerwatch_") and operation, record


def test_alert_tests_use_only_dead_letter_reasons_the_sidecar_emits() -> None:
    """The rule unit tests feed layerwatch_dead_letters_total with reasons that exist (a renamed
    reason would leave an alert tested against series that never occur)."""
    import re

    from monitor.sidecar.recorder import DEAD_LETTER_REASONS

    used = set(re.findall(r'layerwatch_dead_letters_total\{[^}]*reason="([^"]+)"', ALERT_TESTS.read_text()))
    assert used and used <= set(DEAD_LETTER_REASONS), used - set(DEAD_LETTER_REASONS)
