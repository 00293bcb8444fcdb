"""End to end: a real Prometheus server scrapes layerwatch's metrics endpoints with the deploy/
scrape config and rules; every dashboard query returns data and an injected drift fires the alert.

What runs for real: the Prometheus server (Debian 2.42) with a config derived from
deploy/prometheus/prometheus.yml (same jobs, file_sd target file, metrics paths; 1 s intervals),
the recording rules as they are and the alert rules with every ``for:`` shortened to 0s (the
``for`` durations are covered by the promtool unit tests); every panel, annotation and variable
query of deploy/grafana/dashboards, substituted as Grafana would.

What is a stand-in (:class:`StandInSource`): the scraped endpoints. Two HTTP servers expose a
``SidecarMetrics`` and a ``TapMetrics`` registry (the real metric objects of monitor/metrics.py)
that a feeder thread fills with plausible traffic; ``inject_drift()`` shifts the per-layer
readings and sets the drift gauge as the sidecar's detector would. Swapping in the real sidecar
fed by a tapped tiny model means replacing the ``metrics_source`` fixture with one that returns
an object with the same attributes (:class:`MetricsSource`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from test_grafana import dashboards_module, load_dashboards
from test_prometheus import PROM_DIR, RULES

from monitor.metrics import TAP_DROP_REASONS, SidecarMetrics, TapMetrics

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server not installed (apt-get install prometheus)")

T = TypeVar("T")


class MetricsSource(Protocol):
    """What the end-to-end test needs from whatever produces layerwatch's metrics."""

    model: str  # value of the `model` label
    sidecar_target: str  # host:port serving the sidecar's /metrics
    tap_target: str  # host:port serving the tap's /metrics (the inference server's)
    variables: dict[str, str]  # dashboard variable values that have data: model, probe, layer
    drifted: bool

    def inject_drift(self) -> None:
        """Make the monitored traffic drift from the baseline (idempotent)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RegistryServer:
    """Serves one prometheus_client registry on http://127.0.0.1:PORT/metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                body = generate_latest(registry)
                self.send_response(200 if self.path.startswith("/metrics") else 404)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.target = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StandInSource:
    """Stand-in for a sidecar fed by a tapped tiny model: the real metric objects, synthetic values.

    Every labelled series the dashboards read is created up front (at 0 where nothing happened,
    as a sidecar should), so rates exist without implying events.
    """

    model = "tiny-gpt2"
    layers = range(5)  # 4 blocks: states 0..4
    probe = "topic"
    labels = ("code", "geography", "other")

    def __init__(self, seed: int = 0) -> None:
        self.sidecar = SidecarMetrics()
        self.tap = TapMetrics()
        self.variables = {"model": self.model, "probe": self.probe, "layer": "2"}
        self.drifted = False
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._init_series()
        self._servers = [RegistryServer(self.sidecar.registry), RegistryServer(self.tap.registry)]
        self.sidecar_target, self.tap_target = (s.target for s in self._servers)
        self._feeder = threading.Thread(target=self._feed, name="stand-in-feeder", daemon=True)
        self._feeder.start()

    def _init_series(self) -> None:
        m, t, model = self.sidecar, self.tap, self.model
        for reason in TAP_DROP_REASONS:
            t.drops.labels(model, reason)
            m.fleet_tap_drops.labels(model, reason)
        t.transport_errors.labels(model)
        m.stream_drops.labels(model, "trimmed")
        m.dead_letters.labels(model, "undecodable")
        m.audit_write_errors.labels(model)
        m.drift_alerts.labels(model)
        for flag in ("kl_shift", "entropy_shift", "probe_shift"):
            m.flags.labels(model, flag)
        m.drift_alert_active.labels(model).set(0)
        m.baseline_learning.labels(model).set(0)
        m.baseline_learning_samples.labels(model).set(0)
        m.baseline_info.labels(model, "baseline-0001").set(1)
        m.lens_provider.labels(model, "CPUExecutionProvider").set(1)
        m.lens_bundle_info.labels(model, "tiny-gpt2-bundle-0001").set(1)

    def inject_drift(self) -> None:
        if not self.drifted:
            self.drifted = True
            self.sidecar.drift_alerts.labels(self.model).inc()
            self.sidecar.drift_alert_active.labels(self.model).set(1)

    def _feed(self) -> None:
        while not self._stop.wait(0.1):
            self._tick(batch=4)

    def _tick(self, batch: int) -> None:
        m, t, model, rng = self.sidecar, self.tap, self.model, self._rng
        t.requests_sampled.labels(model).inc(batch)
        t.requests_skipped.labels(model, "rate").inc(3 * batch)
        t.samples_exported.labels(model).inc(batch)
        if rng.random() < 0.02:
            t.drops.labels(model, "queue_full").inc()
        t.queue_depth.labels(model).set(rng.randint(0, 4))
        t.queue_bytes.labels(model).set(rng.randint(0, 4) * 6_144)
        m.fleet_tap_sampled.labels(model).inc(batch)
        m.samples_processed.labels(model).inc(batch)
        m.batch_size.labels(model).observe(batch)
        m.processing_latency.labels(model).observe(rng.uniform(0.01, 0.05))
        # A steady lag: with a few seconds of data, a noisy one would project (predict_linear) past the alert.
        m.consumer_lag.labels(model).set(rng.randint(2, 4))
        m.consumer_pending.labels(model).set(rng.randint(0, batch))
        m.audit_records.labels(model, "sample").inc(batch)
        last = self.layers[-1]
        for _ in range(batch):
            t.export_latency.labels(model).observe(rng.uniform(0.001, 0.02))
            m.end_to_end_latency.labels(model).observe(rng.uniform(0.05, 0.3))
            depth = rng.randint(2, last) if not self.drifted else rng.randint(3, last)
            m.prediction_depth.labels(model).observe(depth)
            for layer in self.layers:
                depth_left = (last - layer) / last
                shift = 1.5 if self.drifted and 1 <= layer < last else 0.0
                lbl = str(layer)
                m.layer_kl.labels(model, lbl).observe(max(0.0, 4.0 * depth_left + shift + rng.gauss(0, 0.2)))
                m.layer_entropy.labels(model, lbl).observe(max(0.0, 2.0 + 3.0 * depth_left + shift + rng.gauss(0, 0.2)))
                m.layer_samples.labels(model, lbl).inc()
                if layer >= depth:
                    m.layer_top1_agree.labels(model, lbl).inc()
                shares = (0.7, 0.1, 0.2) if self.drifted else (0.1, 0.6, 0.3)
                m.probe_labels.labels(model, lbl, self.probe, rng.choices(self.labels, shares)[0]).inc()
            anomalous = rng.random() < (0.4 if self.drifted else 0.01)
            m.anomaly_score.labels(model).observe(rng.uniform(5, 12) if anomalous else abs(rng.gauss(1.0, 0.5)))
            if anomalous:
                m.anomalies.labels(model).inc()
                m.flags.labels(model, "probe_shift" if self.drifted else "kl_shift").inc()

    def close(self) -> None:
        self._stop.set()
        self._feeder.join(timeout=5)
        for server in self._servers:
            server.close()


class PrometheusServer:
    """A real Prometheus scraping a source with deploy/'s jobs and rules, queried over its HTTP API."""

    def __init__(self, source: MetricsSource, workdir: Path) -> None:
        assert PROMETHEUS is not None
        self.workdir = workdir
        self._write_config(source)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        poll(lambda: self._ready() or None, 30, f"Prometheus ready at {self.url}", self.log_tail)

    def _write_config(self, source: MetricsSource) -> None:
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        for job in config["scrape_configs"]:
            job.update(scrape_interval="1s", scrape_timeout="1s")
            if job["job_name"] == "layerwatch-sidecar":
                (sd,) = job["file_sd_configs"]
                for name in sd["files"]:
                    groups = yaml.safe_load((PROM_DIR / name).read_text())
                    for group in groups:
                        group["targets"] = [source.sidecar_target]
                    (self.workdir / name).parent.mkdir(parents=True, exist_ok=True)
                    (self.workdir / name).write_text(yaml.safe_dump(groups))
            elif job["job_name"] == "layerwatch-tap":
                job["static_configs"] = [{"targets": [source.tap_target]}]
        config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"].startswith("layerwatch-")]
        rules_dir = self.workdir / "rules"
        rules_dir.mkdir()
        shutil.copy(RULES["recording"], rules_dir / "recording.yml")
        alerts = yaml.safe_load(RULES["alerts"].read_text())
        for group in alerts["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"
        (rules_dir / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
        assert config["rule_files"] == ["rules/recording.yml", "rules/alerts.yml"]
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str | list[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the resulting series (an empty list when there is no data)."""
        data = self.api("query", query=expr)
        if data["resultType"] in {"scalar", "string"}:
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def firing(self, alertname: str = "Layerwatch.*") -> list[dict[str, str]]:
        return [s["metric"] for s in self.query(f'ALERTS{{alertname=~"{alertname}", alertstate="firing"}}')]

    def log_tail(self) -> str:
        self.log.flush()
        return "\n".join((self.workdir / "prometheus.log").read_text().splitlines()[-20:])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def poll(check: Callable[[], T | None], timeout_s: float, what: str, detail: Callable[[], str] = str) -> T:
    """Call ``check`` until it returns something truthy, or fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{detail()}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def metrics_source() -> Iterator[MetricsSource]:
    """THE swap point: what Prometheus scrapes. Today the stand-in; later the real sidecar."""
    source = StandInSource()
    yield source
    source.close()


@pytest.fixture(scope="module")
def prometheus(metrics_source: MetricsSource, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A real Prometheus server scraping the source with deploy/'s scrape jobs and rules."""
    server = PrometheusServer(metrics_source, tmp_path_factory.mktemp("prometheus"))
    yield server
    server.close()


def wait_for_recorded_data(prom: PrometheusServer, model: str) -> None:
    """Both jobs are up and the recording rules have produced data for ``model``."""
    poll(lambda: len(prom.query('up{job=~"layerwatch-sidecar|layerwatch-tap"} == 1')) == 2,
         30, "both scrape jobs up", prom.log_tail)
    poll(lambda: prom.query(f'model:layerwatch_samples_processed:rate5m{{model="{model}"}} > 0'),
         30, "recording rules to produce data", prom.log_tail)


def test_drift_alert_fires_only_after_injected_drift(prometheus: PrometheusServer, metrics_source: MetricsSource) -> None:
    """Healthy traffic settles with no layerwatch alert firing; an injected drift fires LayerwatchDriftAlertActive."""
    wait_for_recorded_data(prometheus, metrics_source.model)
    if not metrics_source.drifted:
        # LayerwatchSidecarAbsent fires until the first scrape lands; it must clear, and nothing else fire.
        poll(lambda: not prometheus.firing(), 20, "no layerwatch alert firing on healthy traffic",
             lambda: json.dumps(prometheus.firing(), indent=1))
        assert not prometheus.firing("LayerwatchDriftAlertActive")
    metrics_source.inject_drift()
    (alert,) = poll(lambda: prometheus.firing("LayerwatchDriftAlertActive"), 20, "the drift alert to fire")
    assert alert["model"] == metrics_source.model and alert["severity"] == "warning"
    rules = prometheus.api("rules", type="alert")
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r["name"] == "LayerwatchDriftAlertActive"]
    assert rule["annotations"]["runbook_url"] == "deploy/runbooks.md#layerwatchdriftalertactive"


def test_every_dashboard_query_returns_data(prometheus: PrometheusServer, metrics_source: MetricsSource) -> None:
    """Every panel, annotation and variable selector of every dashboard returns at least one series."""
    metrics_source.inject_drift()  # the active-alerts panel and the drift annotation need a firing alert
    wait_for_recorded_data(prometheus, metrics_source.model)
    poll(lambda: prometheus.firing("LayerwatchDriftAlertActive"), 20, "the drift alert to fire")
    gd = dashboards_module()
    values = {**metrics_source.variables, "__rate_interval": "15s", "__range": "5m"}
    pending = [(q, gd.substitute(q.expr, values)) for dash in load_dashboards().values() for q in gd.queries(dash)]

    def still_empty() -> list[str]:
        nonlocal pending
        pending = [(q, expr) for q, expr in pending if not prometheus.query(expr)]
        return [f"{q.dashboard} {q.where}: {expr}" for q, expr in pending]

    poll(lambda: not still_empty(), 30, "every dashboard query to return data", lambda: "\n".join(still_empty()))


def test_dashboard_variables_list_the_source_values(prometheus: PrometheusServer, metrics_source: MetricsSource) -> None:
    """Each dashboard variable's label_values() query offers the value the source reports."""
    wait_for_recorded_data(prometheus, metrics_source.model)
    gd = dashboards_module()
    for dash in load_dashboards().values():
        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            selector, label = var["query"]["query"].removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
            match = gd.substitute(selector, metrics_source.variables)
            offered = prometheus.api(f"label/{label.strip()}/values", **{"match[]": [match]})
            assert metrics_source.variables[var["name"]] in offered, (dash["uid"], var["name"], offered)


def test_layer_readings_reach_prometheus_per_layer(prometheus: PrometheusServer, metrics_source: MetricsSource) -> None:
    """The per-layer recording rules give one finite KL, entropy and agreement value per layer of the model."""
    wait_for_recorded_data(prometheus, metrics_source.model)
    for series in ("model_layer:layerwatch_layer_kl_to_final_nats:mean_rate5m",
                   "model_layer:layerwatch_layer_entropy_nats:mean_rate5m",
                   "model_layer:layerwatch_layer_top1_agreement:ratio_rate5m"):
        result = poll(lambda s=series: prometheus.query(f'{s}{{model="{metrics_source.model}"}}'), 20, series)
        layers = {r["metric"]["layer"] for r in result}
        assert len(layers) >= 2 and all(math.isfinite(float(r["value"][1])) for r in result), series
