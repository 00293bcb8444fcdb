"""End to end: a real Prometheus server scrapes a real layerwatch pipeline with the deploy/ scrape
config and rules; every dashboard query returns data and an injected drift fires the alert.

Everything that runs is real (:class:`LivePipeline`):

* the served model: a tiny random Llama (``make_tiny("llama")``: 2 blocks, states 0..2, vocab 128)
  with the tap attached (``monitor.attach``, sample rate 0.5, batched serving through
  ``tap.batch``); the tap's own ``/metrics`` (``tap.serve_metrics``) is the ``layerwatch-tap``
  target;
* the transport: the in-memory stream (``memory://``) with the sidecar's consumer group;
* the lens bank: an ONNX bundle written by ``monitor.lenses.writer.write_bundle`` for this model
  (logit lens on every state plus one concept probe, ``vocab_half``: a logistic-regression probe
  fitted here, on states the tap captured, to tell prompts drawn from the lower half of the
  vocabulary from prompts drawn from the upper half), loaded and checksum-verified by
  ``LensBank.load`` and run by ONNX Runtime (``CPUExecutionProvider``);
* the sidecar: ``Sidecar`` + ``SidecarHTTPServer`` (the ``layerwatch-sidecar`` target), writing
  its audit trail to a temporary directory, learning its baseline from the first
  ``LEARN_SAMPLES`` samples of live traffic and then scoring every sample and testing sliding
  windows with its drift detector;
* Prometheus (Debian 2.42) with a config derived from deploy/prometheus/prometheus.yml (same jobs,
  file_sd target file, metrics paths; 1 s intervals), the recording rules as they are and the
  alert rules with every ``for:`` shortened to 0s (the ``for`` durations are covered by the
  promtool unit tests); every panel, annotation and variable query of deploy/grafana/dashboards,
  substituted as Grafana would.

Traffic: a feeder thread serves batches of random prompts. Normal traffic draws a quarter of the
prompts from the upper half of the vocabulary; the injected drift draws all of them from it (a
shift of the request mix), which moves the probe's label shares and the per-layer readings, and
the sidecar's own detector raises the alert: nothing sets a drift gauge by hand.

Why ``LEARN_SAMPLES = 1500`` and ``WINDOW = 100`` (not the 400/50 minimum): with 400 learning
samples the conformal calibration set has 120 scores and the realised per-sample false-positive
rate wobbles around alpha; measured on this pipeline, the window tests then raised 3 false drift
alerts in 8000 healthy samples, while 1500 learning samples gave none in 12750. The sidecar learns
1500 samples in ~2 s here (the feeder goes as fast as the sidecar keeps up while it learns).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pytest
import yaml
from test_grafana import dashboards_module, load_dashboards
from test_prometheus import PROM_DIR, RULES

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server not installed (apt-get install prometheus)")

T = TypeVar("T")


class MetricsSource(Protocol):
    """What the end-to-end test needs from whatever produces layerwatch's metrics."""

    model: str  # value of the `model` label
    sidecar_target: str  # host:port serving the sidecar's /metrics
    tap_target: str  # host:port serving the tap's /metrics (the inference server's)
    variables: dict[str, str]  # dashboard variable values that have data: model, probe, layer
    layers: tuple[int, ...]  # the states the lens bank reads
    probe_labels: dict[str, tuple[str, ...]]  # the lens bank's concept probes and their labels
    alpha: float  # the sidecar's configured per-sample false-positive rate
    stream_maxlen: int  # the sidecar's configured stream bound
    drifted: bool

    def inject_drift(self) -> None:
        """Make the monitored traffic drift from the baseline (idempotent)."""

    def describe(self) -> str:
        """The source's state, for failure messages."""

    def detector_alert(self) -> dict[str, Any]:
        """The sidecar's own drift alert state (``active``, ``sentence``, ...)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the real pipeline
VOCAB = 128  # tests/conftest.py tiny configs
HALF = VOCAB // 2
NORMAL_UPPER_SHARE = 0.25  # share of normal prompts drawn from the upper half of the vocabulary
LEARN_SAMPLES = 1500
WINDOW = 100
ALPHA = 0.01
STREAM_MAXLEN = 20_000  # not the default 10000: the lag alert's bound must come from the configuration
PROBE = "vocab_half"
OPT_IN_SERIES = ("layerwatch_local_segment_", 'flag="local_segment"')  # issue 19, off by default
PROBE_LABELS = ("lower", "upper")


def random_prompts(rng: np.random.Generator, rows: int, upper_share: float) -> tuple[Any, np.ndarray]:
    """``rows`` prompts of one random length (4..8 tokens: no padding in a batch), each drawn
    uniformly from the lower half of the vocabulary (ids 1..63) or, with ``upper_share``, the
    upper half (64..127). Returns (input_ids [rows, length], whether each row is upper)."""
    import torch

    length = int(rng.integers(4, 9))
    upper = rng.random(rows) < upper_share
    low = np.where(upper, HALF, 1)[:, None]
    high = np.where(upper, VOCAB, HALF)[:, None]
    return torch.from_numpy(rng.integers(low, high, size=(rows, length))), upper


def capture_last_states(model: Any, batches: int, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """States [n, n_states, d] of the last prompt token, captured by the real tap and decoded from
    the wire exactly as the sidecar decodes them, with each prompt's half (1 = upper)."""
    import torch

    import monitor
    from monitor import wire
    from monitor.transport import open_transport

    transport = open_transport(f"memory://e2e-probe-{uuid.uuid4().hex[:8]}")
    transport.ensure_group("probe")
    tap = monitor.attach(model, sample_rate=1.0, transport=transport, queue_max_items=batches * rows + 16)
    is_upper: dict[str, int] = {}
    try:
        for b in range(batches):
            ids, upper = random_prompts(rng, rows, 0.5)
            rids = [f"probe-{b}-{i}" for i in range(rows)]
            is_upper.update(zip(rids, upper.astype(int).tolist(), strict=True))
            with torch.no_grad(), tap.batch(rids, force=True):
                model(input_ids=ids)
        assert tap.flush(30), "the tap did not publish the probe's training samples"
    finally:
        tap.close()
    states, labels = [], []
    while got := transport.read("probe", "trainer", 1000, block_ms=0):
        for entry in got:
            sample = wire.decode(entry.data)
            states.append(sample.hidden[:, -1, :].astype(np.float64))
            labels.append(is_upper[sample.request_id])
    transport.close()
    return np.stack(states), np.array(labels, dtype=np.float64)


def fit_probe(states: np.ndarray, labels: np.ndarray, layers: tuple[int, ...]) -> Any:
    """A two-class logistic-regression probe per state (Newton steps, L2 1e-2), as a ProbeSet
    whose softmax equals the fitted sigmoid; its training accuracy per layer goes in the manifest."""
    import torch

    from monitor.lenses.model import ProbeSet

    n, n_layers, d = states.shape
    weights, biases, accuracy = [], [], []
    for i in range(n_layers):
        a = np.hstack([states[:, i, :], np.ones((n, 1))])
        w = np.zeros(d + 1)
        for _ in range(25):
            p = 1.0 / (1.0 + np.exp(-a @ w))
            grad = a.T @ (p - labels) + 1e-2 * w
            hess = (a * (p * (1 - p))[:, None]).T @ a + 1e-2 * np.eye(d + 1)
            w -= np.linalg.solve(hess, grad)
        accuracy.append(float(((a @ w > 0) == (labels > 0.5)).mean()))
        weights.append(np.stack([-w[:d] / 2, w[:d] / 2], axis=-1))  # softmax([-z/2, z/2]) = sigmoid(z)
        biases.append(np.array([-w[d] / 2, w[d] / 2]))
    return ProbeSet(PROBE, PROBE_LABELS, layers, torch.tensor(np.stack(weights), dtype=torch.float32),
                    torch.tensor(np.stack(biases), dtype=torch.float32), {"train_accuracy": accuracy})


def build_probe_bundle(model: Any, out: Path, rng: np.random.Generator) -> Path:
    """A verified ONNX lens bundle for ``model``: the logit lens on every state and the probe."""
    from monitor.adapters import find_parts
    from monitor.lenses.model import Translators
    from monitor.lenses.writer import write_bundle

    parts = find_parts(model)
    layers = tuple(range(parts.n_states))
    states, labels = capture_last_states(model, batches=32, rows=16, rng=rng)
    probe = fit_probe(states, labels, layers)
    assert min(probe.metrics["train_accuracy"]) > 0.6, probe.metrics  # it reads something real
    write_bundle(out, model, Translators.identity(layers, parts.hidden_size), (probe,), model_name="tiny-llama")
    return out


class LivePipeline:
    """A tapped tiny model served by a feeder thread -> memory stream -> the real sidecar.

    Targets: the sidecar's ``SidecarHTTPServer`` and the tap's ``serve_metrics`` endpoint.
    """

    model = "tiny-llama"

    def __init__(self, workdir: Path, seed: int = 0) -> None:
        import torch
        from conftest import make_tiny

        import monitor
        from monitor.adapters import model_fingerprint
        from monitor.lenses.runtime import LensBank
        from monitor.sidecar.config import load_settings
        from monitor.sidecar.http import SidecarHTTPServer
        from monitor.sidecar.service import Sidecar
        from monitor.transport import open_transport

        self._torch = torch
        self.lm = make_tiny("llama", seed=0)
        self._rng = np.random.default_rng(seed)
        bundle = build_probe_bundle(self.lm, workdir / "bundle", self._rng)
        bank = LensBank.load(bundle, expected_fingerprint=model_fingerprint(self.lm), providers="cpu", threads=1)
        self.layers = tuple(bank.layers)
        self.probe_labels = dict(bank.probe_labels)
        url = f"memory://e2e-{uuid.uuid4().hex[:8]}"
        self.settings = load_settings(
            transport=url, group="layerwatch", consumer="e2e-sidecar-0", model_name=self.model, http_port=0,
            batch_wait_ms=10, stats_interval_s=1.0, stream_maxlen=STREAM_MAXLEN, audit={"directory": workdir / "audit"},
            # the drift (every prompt from the upper half) is what the probe's 'upper' label reads:
            # watching it feeds the watched-concept panel
            baseline={"learn_samples": LEARN_SAMPLES, "window": WINDOW, "alpha": ALPHA, "watch": [f"{PROBE}=upper"]})
        self.alpha = self.settings.baseline.alpha
        self.stream_maxlen = self.settings.stream_maxlen
        self.variables = {"model": self.model, "probe": PROBE, "layer": str(self.layers[len(self.layers) // 2])}
        self.drifted = False
        self.feeder_error: str | None = None
        self._stop = threading.Event()
        self._stats = open_transport(url)  # the feeder's own handle on the stream (lag for back-pressure)
        self.sidecar = Sidecar(self.settings, bank=bank).start()
        self.http = SidecarHTTPServer(self.sidecar, "127.0.0.1", 0).start()
        self.sidecar_target = f"127.0.0.1:{self.http.port}"
        self.tap = monitor.attach(self.lm, sample_rate=0.5, transport=url, model_name=self.model,
                                  stream_maxlen=self.stream_maxlen)
        self.tap_target = self._serve_tap_metrics()
        self._feeder = threading.Thread(target=self._feed, name="e2e-feeder", daemon=True)
        self._feeder.start()

    def _serve_tap_metrics(self) -> str:
        for _ in range(20):  # free_port() can race with another process: try another one
            port = free_port()
            try:
                self.tap.serve_metrics(port, addr="127.0.0.1")
                return f"127.0.0.1:{port}"
            except OSError:
                continue
        raise AssertionError("no free port for the tap's /metrics")

    @property
    def learning(self) -> bool:
        return self.sidecar.detector is None

    def wait_until_scoring(self, timeout_s: float = 60) -> None:
        """Block until the sidecar has learned its baseline from live traffic and scores samples."""
        poll(lambda: not self.learning, timeout_s, f"the sidecar to learn its baseline ({LEARN_SAMPLES} samples)",
             self.describe)

    def inject_drift(self) -> None:
        self.drifted = True

    def detector_alert(self) -> dict[str, Any]:
        detector = self.sidecar.detector
        return dict(detector.alert) if detector is not None else {"active": False}

    def _feed(self) -> None:
        """Serve batches: as fast as the tap and the sidecar keep up while it learns (at most 64
        samples queued in the tap or undelivered in the stream: no drops, no lag trend), then 8
        requests every 50 ms (about 80 sampled requests per second at sample rate 0.5)."""
        n = 0
        try:
            while not self._stop.is_set():
                learning = self.learning
                if learning and (self.tap.stats()["queue_depth"] > 64 or self._stats.stats(self.settings.group).lag > 64):
                    self._stop.wait(0.01)
                    continue
                ids, _ = random_prompts(self._rng, 32 if learning else 8, 1.0 if self.drifted else NORMAL_UPPER_SHARE)
                rids = [f"req-{n}-{i}" for i in range(len(ids))]
                n += 1
                with self._torch.no_grad(), self.tap.batch(rids):
                    self.lm(input_ids=ids)
                self._stop.wait(0.0 if learning else 0.05)
        except BaseException as exc:  # surfaced by describe(): a dead feeder must not look like a slow one
            self.feeder_error = repr(exc)
            raise

    def describe(self) -> str:
        """The pipeline's state, for failure messages."""
        detector = self.sidecar.detector
        return json.dumps({
            "feeder_alive": self._feeder.is_alive(), "feeder_error": self.feeder_error,
            "sidecar_alive": self.sidecar.running,
            "processed": self.sidecar.processed_total, "learning": self.learning,
            "detector": None if detector is None else {"alert": detector.alert, "scored": detector.stats.scored,
                                                       "anomalies": detector.stats.anomalies},
            "tap": self.tap.stats(),
        }, default=str)

    def close(self) -> None:
        self._stop.set()
        self._feeder.join(timeout=10)
        self.tap.close()
        self.sidecar.stop(timeout=10)
        self.http.close()
        self._stats.close()


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
                job.pop("file_sd_configs", None)  # the vLLM override's extra tap targets: none here
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
def metrics_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsSource]:
    """What Prometheus scrapes: the real pipeline, scoring against a baseline learned from live traffic."""
    source = LivePipeline(tmp_path_factory.mktemp("pipeline"))
    try:
        source.wait_until_scoring()
        yield source
    finally:
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
    """Healthy traffic settles with no layerwatch alert firing; a drifted request mix makes the
    sidecar's detector raise its alert and Prometheus fire LayerwatchDriftAlertActive."""
    wait_for_recorded_data(prometheus, metrics_source.model)
    if not metrics_source.drifted:
        # LayerwatchSidecarAbsent fires until the first scrape lands, and a trend alert may flicker
        # on the first seconds of a noisy series; they must clear, and nothing else fire.
        poll(lambda: not prometheus.firing(), 20, "no layerwatch alert firing on healthy traffic",
             lambda: json.dumps(prometheus.firing(), indent=1) + "\n" + metrics_source.describe())
        assert not prometheus.firing("LayerwatchDriftAlertActive")
        assert not metrics_source.detector_alert()["active"], metrics_source.detector_alert()
    metrics_source.inject_drift()
    state = poll(lambda: (a := metrics_source.detector_alert())["active"] and a, 30,
                 "the sidecar's drift detector to raise its alert", metrics_source.describe)
    (alert,) = poll(lambda: prometheus.firing("LayerwatchDriftAlertActive"), 20, "the drift alert to fire")
    assert alert["model"] == metrics_source.model and alert["severity"] == "warning"
    assert state["sentence"], state  # the detector says which layers and readings moved
    rules = prometheus.api("rules", type="alert")
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r["name"] == "LayerwatchDriftAlertActive"]
    assert rule["annotations"]["runbook_url"] == "deploy/runbooks.md#layerwatchdriftalertactive"


def test_every_dashboard_query_returns_data(prometheus: PrometheusServer, metrics_source: MetricsSource) -> None:
    """Every panel, annotation and variable selector of every dashboard returns at least one series."""
    metrics_source.inject_drift()  # the active-alerts panel, the drift annotation and the flags panel need it
    wait_for_recorded_data(prometheus, metrics_source.model)
    poll(lambda: prometheus.firing("LayerwatchDriftAlertActive"), 30, "the drift alert to fire")
    gd = dashboards_module()
    values = {**metrics_source.variables, "__rate_interval": "15s", "__range": "5m"}
    pending = [(q, gd.substitute(q.expr, values)) for dash in load_dashboards().values() for q in gd.queries(dash)]
    assert len(pending) > 40
    # the local-anomaly row reads series only an opt-in feature writes (tap windows > 0 and
    # baseline.local_score, both off by default and here): exactly its three queries are left out
    opt_in = [(q, e) for q, e in pending if any(m in e for m in OPT_IN_SERIES)]
    assert len(opt_in) == 3, [q.where for q, _ in opt_in]
    pending = [(q, e) for q, e in pending if (q, e) not in opt_in]

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
            match, name = gd.substitute(selector, metrics_source.variables), label.strip()
            offered = poll(lambda m=match, n=name: prometheus.api(f"label/{n}/values", **{"match[]": [m]}),
                           20, f"values of {var['name']}")
            assert metrics_source.variables[var["name"]] in offered, (dash["uid"], var["name"], offered)


def test_layer_readings_reach_prometheus_per_layer(prometheus: PrometheusServer, metrics_source: MetricsSource) -> None:
    """The per-layer recording rules give one finite KL, entropy and agreement value for every state
    the lens bank reads, and the probe's label shares sum to 1 at every layer."""
    wait_for_recorded_data(prometheus, metrics_source.model)
    want = {str(layer) for layer in metrics_source.layers}
    sel = f'{{model="{metrics_source.model}"}}'
    for series in ("model_layer:layerwatch_layer_kl_to_final_nats:mean_rate5m",
                   "model_layer:layerwatch_layer_entropy_nats:mean_rate5m",
                   "model_layer:layerwatch_layer_top1_agreement:ratio_rate5m"):
        result = poll(lambda s=series: (r := prometheus.query(s + sel)) and {x["metric"]["layer"] for x in r} == want and r,
                      20, f"{series} for layers {sorted(want)}")
        assert all(math.isfinite(float(r["value"][1])) for r in result), series
    # The last state's lens is the model's own output: it always agrees with itself, at no KL.
    (last,) = prometheus.query(f'model_layer:layerwatch_layer_top1_agreement:ratio_rate5m{{model="{metrics_source.model}", '
                               f'layer="{metrics_source.layers[-1]}"}}')
    assert float(last["value"][1]) == 1.0
    for probe, labels in metrics_source.probe_labels.items():
        shares = poll(lambda p=probe: prometheus.query(
            f'sum by (layer) (model_layer_probe_label:layerwatch_probe_label:share_rate5m{{model="{metrics_source.model}", probe="{p}"}})'),
            20, f"probe {probe} shares")
        assert {s["metric"]["layer"] for s in shares} == want, shares
        assert all(abs(float(s["value"][1]) - 1) < 1e-9 for s in shares), shares
        offered = prometheus.api("label/label/values", **{"match[]": [f'layerwatch_probe_label_total{{probe="{probe}"}}']})
        assert set(offered) == set(labels), offered


def test_alert_thresholds_come_from_the_sidecars_configuration(prometheus: PrometheusServer, metrics_source: MetricsSource) -> None:
    """The configured false-positive rate and stream bound reach the recording rules the anomaly
    and lag alerts compare against, through the sidecar's own gauges."""
    wait_for_recorded_data(prometheus, metrics_source.model)
    for series, want in (("model:layerwatch_anomaly_expected_fpr:config", metrics_source.alpha),
                         ("model:layerwatch_stream_maxlen:config", metrics_source.stream_maxlen)):
        (got,) = poll(lambda s=series: prometheus.query(f'{s}{{model="{metrics_source.model}"}}'), 20, series)
        assert float(got["value"][1]) == pytest.approx(want), series
