"""The sidecar: delivery guarantees under kill -9, poison messages, SIGTERM, readiness, HTTP."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import monitor
from monitor.lenses.torch_lens import TorchLogitLens
from monitor.sidecar.config import load_settings
from monitor.sidecar.http import SidecarHTTPServer
from monitor.sidecar.service import Sidecar
from monitor.transport import MemoryTransport, open_transport
from monitor.wire import encode
from tests.conftest import make_tiny

WORKER = Path(__file__).with_name("sidecar_worker.py")


def audit_records(root: Path) -> list[dict[str, Any]]:
    """Every JSON record under an audit directory (all writers, all segments)."""
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix not in (".jsonl", ".log", ""):
            continue
        for line in p.read_bytes().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "kind" in rec:
                out.append(rec)
    return out


def publish_samples(url: str, stream: str, n: int, seed: int = 0, positions: str = "last") -> list[str]:
    """Publish ``n`` real samples from the tapped tiny model (inputs drawn with ``seed``); return their ids."""
    model = make_tiny("llama", seed=0)  # the same weights as the workers' lens (fingerprint)
    tap = monitor.attach(model, sample_rate=1.0, transport=url, stream=stream, stream_maxlen=100_000,
                         queue_max_items=n + 10, positions=positions, transport_timeout_s=30.0)
    ids: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        with tap.request(f"req-{i}") as h:
            model(input_ids=torch.randint(0, 128, (1, 5), generator=gen))
        ids += list(h.sample_ids)
    assert tap.flush(60)
    drops = {k: v for k, v in tap.stats()["drops"].items() if v}
    tap.close()
    assert not drops, f"the test's tap dropped samples (a loaded machine?): {drops}"
    return ids


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_worker(url: str, stream: str, consumer: str, audit: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "--transport", url, "--stream", stream, "--consumer", consumer,
         "--audit", str(audit)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), f"worker did not start: {line!r}"
    return proc


@pytest.mark.redis
@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", range(2))
def test_kill9_at_random_points_never_loses_a_sample(redis_url: str, stream_name: str, tmp_path: Path, run: int) -> None:
    """Two replicas killed with SIGKILL at random points and restarted audit every sample; duplicates are marked."""
    rng = random.Random(1000 + run)
    ids = publish_samples(redis_url, stream_name, 120, seed=run)
    audit = tmp_path / "audit"
    procs = {c: start_worker(redis_url, stream_name, c, audit) for c in ("a", "b")}
    t = open_transport(redis_url, stream=stream_name)
    try:
        for _ in range(3):
            time.sleep(rng.uniform(0.05, 0.8))
            victim = rng.choice(sorted(procs))
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            procs[victim] = start_worker(redis_url, stream_name, victim, audit)

        def done() -> bool:
            st = t.stats("g")
            return st.lag == 0 and st.pending == 0 and len({r["sample_id"] for r in audit_records(audit) if r["kind"] == "sample"}) >= len(ids)

        try:
            wait_for(done, 120, "all samples audited and acked")
        except AssertionError as exc:
            st = t.stats("g")
            got = {r["sample_id"] for r in audit_records(audit) if r["kind"] == "sample"}
            raise AssertionError(f"{exc}: stats {st}, audited {len(got)}/{len(ids)}, dead letters "
                                 f"{[(d.reason, d.detail) for d in t.dead_letters()]}, alive "
                                 f"{ {c: p.poll() for c, p in procs.items()} }") from None
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=30)
        t.close()
    samples = [r for r in audit_records(audit) if r["kind"] == "sample"]
    seen = Counter(r["sample_id"] for r in samples)
    assert set(seen) == set(ids), "a published sample is missing from the audit trail"
    for sid, n in seen.items():
        if n > 1:  # only a replica dying between fsync and ledger mark may duplicate; later copies are marked
            copies = [r for r in samples if r["sample_id"] == sid]
            assert all(c.get("redelivered") for c in copies[1:]), f"unmarked duplicate of {sid}"


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_sigterm_finishes_the_batch_acks_and_exits_zero(redis_url: str, stream_name: str, tmp_path: Path) -> None:
    """SIGTERM mid-stream: the replica exits 0, nothing it took stays pending, and the stop is audited."""
    ids = publish_samples(redis_url, stream_name, 120)
    audit = tmp_path / "audit"
    proc = start_worker(redis_url, stream_name, "solo", audit)
    wait_for(lambda: any(r["kind"] == "sample" for r in audit_records(audit)), 60, "first sample")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    t = open_transport(redis_url, stream=stream_name)
    st = t.stats("g")
    t.close()
    assert st.pending == 0
    recs = [r for r in audit_records(audit) if r["kind"] != "checkpoint"]
    assert recs[-1]["kind"] == "sidecar_stop"
    audited = {r["sample_id"] for r in recs if r["kind"] == "sample"}
    assert audited <= set(ids)
    assert len(audited) + st.lag == len(ids)


# --------------------------------------------------------------------------- in-process tests
@pytest.fixture
def tiny() -> torch.nn.Module:
    return make_tiny("llama", seed=0)


@pytest.fixture
def sidecar_factory(tmp_path: Path, tiny: torch.nn.Module) -> Any:
    made: list[Sidecar] = []

    def make(transport: str, **kw: Any) -> Sidecar:
        settings = load_settings(transport=transport, group="g", http_port=0, batch_wait_ms=10,
                                 audit={"directory": tmp_path / f"audit-{len(made)}"},
                                 baseline={"learn_samples": 400, "window": 50}, **kw)
        sc = Sidecar(settings, bank=TorchLogitLens(tiny))
        made.append(sc)
        return sc

    yield make
    for sc in made:
        sc.stop(5)


def _good_sample(tap_model: torch.nn.Module, url: str) -> bytes:
    """Bytes of one valid sample taken by a real tap on ``tap_model``."""
    t = MemoryTransport(url)
    t.ensure_group("probe")
    tap = monitor.attach(tap_model, sample_rate=1.0, transport=url)
    with tap.request("good"):
        tap_model(input_ids=torch.tensor([[1, 2, 3]]))
    tap.flush(5)
    tap.close()
    (e,) = t.read("probe", "p", 1, 0)
    return e.data


def _mutate_header(data: bytes, **changes: Any) -> bytes:
    hlen = struct.unpack_from("<I", data, 4)[0]
    hdr = json.loads(data[8:8 + hlen])
    for k, v in changes.items():
        if v is None:
            hdr.pop(k, None)
        else:
            hdr[k] = v
    raw = json.dumps(hdr).encode()
    return data[:4] + struct.pack("<I", len(raw)) + raw + data[8 + hlen:]


def test_each_poison_class_is_dead_lettered_and_the_sidecar_keeps_running(sidecar_factory: Any, tiny: torch.nn.Module) -> None:
    """Undecodable, schema, fingerprint, shape, dtype, NaN, oversized and missing-field messages are dead-lettered by reason."""
    url = "memory://poison"
    good = _good_sample(tiny, url)
    hlen = struct.unpack_from("<I", good, 4)[0]
    hdr = json.loads(good[8:8 + hlen])
    nan = np.full(hdr["shape"], np.nan, dtype=np.float16)
    poison = {
        "undecodable": b"\x00garbage",
        "schema_version": _mutate_header(good, schema=99),
        "fingerprint": _mutate_header(good, model_fingerprint="sha256:other"),
        "shape_mismatch": good[:-2],
        "dtype": _mutate_header(good, dtype="int8"),
        "non_finite": encode({k: v for k, v in hdr.items() if k not in ("shape", "dtype", "windows", "prompt_tokens")},
                             nan),
        "oversized": good + b"\x00" * (17 * 1024 * 1024),
        "missing_field": _mutate_header(good, sample_id=None),
    }
    MemoryTransport.reset_all()
    sc = sidecar_factory(url)
    t = MemoryTransport(url)
    t.ensure_group("g")
    t.publish(list(poison.values()) + [good])
    for _ in range(3):
        sc.step()
    reasons = Counter(d.reason for d in t.dead_letters())
    assert reasons == Counter(poison.keys())
    for reason in poison:
        assert sc.registry.get_sample_value("layerwatch_dead_letters_total", {"model": "LlamaForCausalLM", "reason": reason}) == 1
    assert sc.processed_total == 1
    assert t.stats("g").pending == 0


def test_redelivered_sample_already_in_the_ledger_is_not_audited_twice(sidecar_factory: Any, tiny: torch.nn.Module) -> None:
    """A sample delivered again after it was audited is acked and counted as a duplicate, not re-audited."""
    url = "memory://dup"
    MemoryTransport.reset_all()
    good = _good_sample(tiny, url)
    sc = sidecar_factory(url)
    t = MemoryTransport(url)
    t.ensure_group("g")
    t.publish([good])  # a second copy in the same micro-batch as the first
    sc.step()
    t.publish([good])  # a later re-delivery, after the first was audited
    sc.step()
    assert sc.processed_total == 1
    assert sc.registry.get_sample_value("layerwatch_samples_duplicate_total", {"model": "LlamaForCausalLM"}) == 2


def test_fleet_tap_totals_come_from_the_sample_headers(sidecar_factory: Any, tiny: torch.nn.Module) -> None:
    """The tap counters in audited samples' headers reach the fleet totals, each increase once."""
    url = "memory://fleet"
    MemoryTransport.reset_all()
    good = _good_sample(tiny, url)
    sc = sidecar_factory(url)
    t = MemoryTransport(url)
    t.ensure_group("g")
    t.publish([good, _mutate_header(good, sample_id="second")])  # the same tap instance, same counters
    sc.step()
    assert sc.processed_total == 2
    lbl = {"model": "LlamaForCausalLM"}
    assert sc.registry.get_sample_value("layerwatch_fleet_tap_requests_sampled_total", lbl) == 1
    assert sc.registry.get_sample_value("layerwatch_fleet_tap_drops_total", {**lbl, "reason": "queue_full"}) == 0


def test_http_endpoints_serve_metrics_health_readiness_and_narratives(sidecar_factory: Any, tiny: torch.nn.Module) -> None:
    """/metrics, /healthz, /readyz (learning baseline) and /narratives/{id} (served on loopback)
    answer with the right content."""
    MemoryTransport.reset_all()
    sc = sidecar_factory("memory://http", narratives={"serve": True})
    http = SidecarHTTPServer(sc, "127.0.0.1", 0).start()
    try:
        tap = monitor.attach(tiny, sample_rate=1.0, transport="memory://http")
        with tap.request("r1") as h:
            tiny(input_ids=torch.tensor([[5, 6, 7]]))
        tap.flush(5)
        tap.close()
        sc.step()
        base = f"http://127.0.0.1:{http.port}"
        assert json.load(urllib.request.urlopen(base + "/healthz"))["status"] == "alive"
        ready = json.load(urllib.request.urlopen(base + "/readyz"))
        assert ready["ready"] and ready["baseline"]["state"] == "learning" and ready["baseline"]["collected"] == 1
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        assert 'layerwatch_samples_processed_total{model="LlamaForCausalLM"} 1.0' in text
        assert "layerwatch_layer_kl_to_final_nats_bucket" in text
        for layer in sc.bank.layers:  # one observation per layer and sample, counted once
            assert f'layerwatch_layer_entropy_nats_count{{layer="{layer}",model="LlamaForCausalLM"}} 1.0' in text
            assert f'layerwatch_layer_samples_total{{layer="{layer}",model="LlamaForCausalLM"}} 1.0' in text
        item = json.load(urllib.request.urlopen(base + f"/narratives/{h.sample_ids[0]}"))
        assert item["request_id"] == "r1" and len(item["narrative"]["layers"]) == 3
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/narratives/nope")
        assert err.value.code == 404
    finally:
        http.close()


def test_metrics_never_carry_request_or_sample_ids(sidecar_factory: Any, tiny: torch.nn.Module) -> None:
    """No exported label value is a request id or a sample id (bounded cardinality, no PII)."""
    MemoryTransport.reset_all()
    sc = sidecar_factory("memory://labels")
    tap = monitor.attach(tiny, sample_rate=1.0, transport="memory://labels")
    sids = []
    for i in range(5):
        with tap.request(f"secret-request-{i}") as h:
            tiny(input_ids=torch.tensor([[i + 1, 2, 3]]))
        sids += h.sample_ids
    tap.flush(5)
    tap.close()
    sc.step()
    from prometheus_client import generate_latest

    text = generate_latest(sc.registry).decode()
    assert "secret-request" not in text
    assert not any(s in text for s in sids)


def test_config_errors_name_the_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Invalid settings from the environment or YAML fail at start-up naming the field and its variable."""
    from monitor.errors import ConfigError

    monkeypatch.setenv("LAYERWATCH_BATCH_MAX", "0")
    with pytest.raises(ConfigError, match="batch_max.*LAYERWATCH_BATCH_MAX"):
        load_settings()
    monkeypatch.delenv("LAYERWATCH_BATCH_MAX")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("audit:\n  fsync: sometimes\n")
    with pytest.raises(ConfigError, match="audit.fsync"):
        load_settings(cfg)
    cfg.write_text("http_port: 9500\n")
    monkeypatch.setenv("LAYERWATCH_HTTP_PORT", "9600")
    assert load_settings(cfg).http_port == 9600  # the environment overrides the file


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_readiness_reflects_a_redis_outage_and_recovers(tmp_path: Path, tiny: torch.nn.Module) -> None:
    """/readyz turns 503 while the sidecar's Redis is down and 200 again once it is back."""
    from tests.redis_server import PrivateRedis

    with PrivateRedis(tmp_path) as srv:
        settings = load_settings(transport=srv.url, group="g", http_port=0, audit={"directory": tmp_path / "a"},
                                 baseline={"learn_samples": 400})
        sc = Sidecar(settings, bank=TorchLogitLens(tiny)).start()
        http = SidecarHTTPServer(sc, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{http.port}/readyz"

        def status() -> int:
            try:
                return int(urllib.request.urlopen(url).status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        try:
            wait_for(lambda: status() == 200, 20, "ready")
            srv.stop()
            wait_for(lambda: status() == 503, 20, "not ready during the outage")
            srv.start()
            wait_for(lambda: status() == 200, 30, "ready again")
        finally:
            http.close()
            sc.stop(10)


def test_narratives_print_tokens_with_the_configured_tokenizer(tmp_path: Path, reference_model: Any) -> None:
    """With ``tokenizer`` set and tokens included, narrative sentences show decoded tokens
    (' Paris'), not ids."""
    model, tok = reference_model
    MemoryTransport.reset_all()
    settings = load_settings(transport="memory://tok", group="g", http_port=0, batch_wait_ms=10,
                             tokenizer=tok.name_or_path, audit={"directory": tmp_path / "a"},
                             baseline={"learn_samples": 400}, narratives={"include_tokens": True})
    sc = Sidecar(settings, bank=TorchLogitLens(model))
    tap = monitor.attach(model, sample_rate=1.0, transport="memory://tok")
    with tap.request("capital") as h, torch.no_grad():
        model(**tok("The capital of France is", return_tensors="pt"))
    tap.flush(10)
    tap.close()
    sc.step()
    item = sc.narrative(h.sample_ids[0])
    assert item is not None
    assert item["narrative"]["final"]["top"][0][0] == " Paris"
    assert "L30: leaning ' Paris'" in item["text"]
    sc.stop(5)


def test_last_plus_mean_samples_get_context_probe_readings(tmp_path: Path, tiny: torch.nn.Module) -> None:
    """A sample shipped with positions 'last+mean' is read like a 'last' one (lens on the last
    token) plus the bundle's probes on the prompt mean ('<probe>@mean'), which reach the narrative
    and the probe metrics. A 'last' sample sent to the same sidecar afterwards does not fit the
    baseline it is learning and is dead-lettered with a reason; a sidecar fed 'last' samples
    reads them without context probes and with the same lens readings."""
    from prometheus_client import generate_latest

    from monitor.lenses.runtime import LensBank
    from monitor.lenses.writer import write_bundle
    from tests.test_lens_bank import random_lens

    tr, probes = random_lens(tiny)
    write_bundle(tmp_path / "bundle", tiny, tr, probes, model_name="tiny-llama", k=4)
    MemoryTransport.reset_all()
    narratives: dict[str, Any] = {}
    sidecars = {}
    try:
        for name, modes in (("context", ("last+mean", "last")), ("plain", ("last",))):
            url = f"memory://{name}"
            settings = load_settings(transport=url, group="g", http_port=0, batch_wait_ms=10,
                                     audit={"directory": tmp_path / f"audit-{name}"}, baseline={"learn_samples": 400})
            sc = sidecars[name] = Sidecar(settings, bank=LensBank.load(tmp_path / "bundle"))
            for mode in modes:
                tap = monitor.attach(tiny, sample_rate=1.0, transport=url, positions=mode)
                with tap.request(mode) as h, torch.no_grad():
                    tiny(input_ids=torch.tensor([[5, 6, 7, 8]]))
                tap.flush(5)
                tap.close()
                tap.detach()
                sc.step()
                narratives[f"{name}:{mode}"] = sc.narrative(h.sample_ids[0])
        both, plain = narratives["context:last+mean"], narratives["plain:last"]
        assert both is not None and plain is not None and narratives["context:last"] is None
        dead = MemoryTransport("memory://context").dead_letters()
        assert [d.reason for d in dead] == ["processing_error"]
        layer = both["narrative"]["layers"][1]
        assert set(layer["probes"]) == {"topic", "lang", "topic@mean", "lang@mean"}
        assert set(plain["narrative"]["layers"][1]["probes"]) == {"topic", "lang"}
        assert layer["entropy"] == plain["narrative"]["layers"][1]["entropy"]  # same prompt, same last token
        assert 'probe="topic@mean"' in generate_latest(sidecars["context"].registry).decode()
    finally:
        for sc in sidecars.values():
            sc.stop(5)
