"""Sidecar load: throughput at saturation, latency at half rate, lag and RSS over time.

    python -m benchmarks.sidecar_load [--saturation-s 120] [--steady-s 240] [--redis URL]

Real Redis, the real SmolLM2 lens bundle (all 31 states), real samples (captured by the tap from
English prose, re-published with fresh sample ids and timestamps by this publisher process). The
sidecar runs as a separate ``layerwatch sidecar`` process pinned to one core (``taskset -c 0``)
with ONNX Runtime on one thread and ``fsync: every_record`` audit records.

Phase 1 publishes faster than the sidecar can keep up (lag rises) and measures its processed
rate; phase 2 publishes at half that rate and measures end-to-end latency from publish to the
audit record (record time minus the sample's capture time). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


Captured = tuple[dict[str, Any], np.ndarray, "np.ndarray | None"]


def capture_samples(n: int) -> list[Captured]:
    """Real samples of the reference model: (header, hidden, prompt windows) captured through the
    tap at its default settings."""
    import monitor
    from monitor import corpora
    from monitor.refmodel import MODEL_NAME, load_reference_model
    from monitor.transport import MemoryTransport
    from monitor.wire import decode

    model, tok = load_reference_model()
    texts = corpora.english_prose("test", unit="short")[:n]
    url = "memory://load-capture"
    t = MemoryTransport(url, maxlen=n + 10)
    t.ensure_group("c")
    tap = monitor.attach(model, sample_rate=1.0, transport=url, model_name=MODEL_NAME, queue_max_items=n + 10)
    import torch

    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=128)
            with tap.request():
                model(**ids)
    tap.flush(60)
    tap.close()
    out = []
    for e in t.read("c", "c", n + 10, 0):
        s = decode(e.data)
        hdr = {"schema": s.schema, "sample_id": s.sample_id, "request_id": s.request_id, "model": s.model,
               "model_fingerprint": s.model_fingerprint, "layers": list(s.layers), "n_states": s.n_states,
               "positions": s.positions, "created_at": s.created_at, "metadata": {}}
        if s.windows is not None and s.window_bounds is not None:
            hdr.update(windows=s.window_bounds.tolist(), prompt_tokens=s.prompt_tokens)
        out.append((hdr, np.array(s.hidden), None if s.windows is None else np.array(s.windows)))
    return out


def build_baseline_file(bundle: str, samples: list[Captured], path: Path, model_name: str) -> Path:
    """A baseline from the readings of the captured samples, as ``layerwatch baseline build`` would."""
    from types import SimpleNamespace

    from monitor.drift.baseline import build_baseline
    from monitor.drift.features import as_arrays
    from monitor.drift.local import local_layers
    from monitor.drift.prompt_windows import window_states_of
    from monitor.lenses import LensBank
    from monitor.pipeline import read

    bank = LensBank.load(bundle)
    hidden = np.stack([h[:, -1, :] for _, h, _ in samples]).astype(np.float32)
    context = None
    if all(hdr["positions"] == "last+mean" for hdr, _, _ in samples):
        context = np.stack([h[:, 0, :] for _, h, _ in samples]).astype(np.float32)
    a = as_arrays(read(bank, hidden, context))
    decoded = [SimpleNamespace(layers=tuple(hdr["layers"]), windows=w, window_bounds=np.asarray(hdr.get("windows")),
                               prompt_tokens=hdr.get("prompt_tokens")) for hdr, _, w in samples]
    windows = window_states_of(decoded, local_layers(tuple(samples[0][0]["layers"])))  # the local score's too
    b = build_baseline(a, model=model_name, model_fingerprint=bank.fingerprint, bundle_id=bank.bundle_id,
                       source="sidecar_load: captured English prose samples", windows=windows)
    path.write_text(b.dumps())
    return path


def reference_model_dir() -> Path:
    """The cached reference model directory (its tokenizer.json prints tokens in narratives)."""
    from monitor.refmodel import MODEL_NAME, default_cache_dir

    return Path(default_cache_dir()) / "models" / MODEL_NAME


class Publisher(threading.Thread):
    """Publishes samples at ``rate``/s (fresh ids, created_at = publish time) until stopped."""

    def __init__(self, transport: Any, samples: list[Captured], rate: float) -> None:
        super().__init__(daemon=True)
        self.t, self.samples, self.rate = transport, samples, rate
        self.stop_event = threading.Event()
        self.published = 0

    def run(self) -> None:
        import uuid

        from monitor.wire import encode

        start = time.monotonic()
        while not self.stop_event.is_set():
            due = int((time.monotonic() - start) * self.rate) - self.published
            if due <= 0:
                time.sleep(0.005)
                continue
            batch = []
            for _ in range(min(due, 64)):
                hdr, hidden, windows = self.samples[self.published % len(self.samples)]
                h = dict(hdr, sample_id=uuid.uuid4().hex, created_at=time.time())
                batch.append(encode(h, hidden, windows=windows))
                self.published += 1
            self.t.publish(batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--saturation-s", type=float, default=120.0)
    ap.add_argument("--steady-s", type=float, default=240.0)
    ap.add_argument("--samples", type=int, default=600,
                    help="distinct real samples to cycle through (>= 400: the baseline is built from them)")
    ap.add_argument("--bundle", default=None, help="lens bundle (default: the cached reference bundle)")
    ap.add_argument("--out", default="bench-results/sidecar_load.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from monitor.lenses import ensure_reference_bundle
    from monitor.refmodel import MODEL_NAME, default_cache_dir
    from monitor.transport import open_transport

    bundle = args.bundle or str(ensure_reference_bundle(default_cache_dir(), budget="demo"))
    print(f"bundle {bundle}; capturing {args.samples} real samples ...", flush=True)
    samples = capture_samples(args.samples)
    stream = f"layerwatch:load:{int(time.time())}"
    work = Path(tempfile.mkdtemp(prefix="lw-load-"))
    # Steady state of a production sidecar: a baseline loaded, every sample scored by the detector.
    baseline_file = build_baseline_file(bundle, samples, work / "baseline.json", MODEL_NAME)
    port = 9470
    env = {**os.environ, "LAYERWATCH_TRANSPORT": args.redis, "LAYERWATCH_STREAM": stream,
           "LAYERWATCH_GROUP": "load", "LAYERWATCH_CONSUMER": "load-0", "LAYERWATCH_MODEL_NAME": MODEL_NAME,
           "LAYERWATCH_BUNDLE": bundle, "LAYERWATCH_HTTP_PORT": str(port), "LAYERWATCH_ORT_THREADS": "1",
           "LAYERWATCH_BATCH_MAX": "16", "LAYERWATCH_BATCH_WAIT_MS": "50", "LAYERWATCH_STREAM_MAXLEN": "100000",
           "LAYERWATCH_AUDIT__DIRECTORY": str(work / "audit"), "LAYERWATCH_BASELINE__FILE": str(baseline_file),
           "LAYERWATCH_TOKENIZER": str(reference_model_dir()),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monitor.cli", "sidecar"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = open_transport(args.redis, stream=stream, maxlen=100_000)
    timeline: list[dict[str, float]] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                _metric(port, "layerwatch_samples_processed_total")
                break
            except OSError:
                time.sleep(0.5)

        def sample_point(phase: str, t0: float) -> dict[str, float]:
            st = t.stats("load")
            p = {"phase": phase, "t": round(time.monotonic() - t0, 1),
                 "processed": _metric(port, "layerwatch_samples_processed_total"),
                 "lag": st.lag, "pending": st.pending, "rss_mb": round(_rss_mb(proc.pid), 1)}
            timeline.append(p)  # type: ignore[arg-type]
            return p

        # Phase 1: saturation (publish well above capacity; lag rises).
        pub = Publisher(t, samples, rate=100.0)
        t0 = time.monotonic()
        p0 = sample_point("saturation", t0)
        pub.start()
        warm = 20.0
        time.sleep(warm)
        pw = sample_point("saturation", t0)
        while time.monotonic() - t0 < args.saturation_s:
            time.sleep(5)
            sample_point("saturation", t0)
        pub.stop_event.set()
        pub.join()
        p1 = sample_point("saturation", t0)
        sat_rate = (p1["processed"] - pw["processed"]) / max(1e-9, p1["t"] - pw["t"])
        del p0
        # Skip the saturation backlog (draining it would take minutes): move the group to the end
        # of the stream, then wait for the entries already delivered to be acked.
        import redis

        redis.Redis.from_url(args.redis).xgroup_setid(stream, "load", "$")
        while t.stats("load").pending > 0:
            time.sleep(0.5)
        # Phase 2: half rate, latency from capture to the audit record.
        half = sat_rate / 2
        mark = time.time()
        pub = Publisher(t, samples, rate=half)
        t1 = time.monotonic()
        pub.start()
        while time.monotonic() - t1 < args.steady_s:
            time.sleep(5)
            sample_point("half-rate", t1)
        pub.stop_event.set()
        pub.join()
        time.sleep(3)
        sample_point("half-rate", t1)
    finally:
        proc.terminate()
        proc.wait(30)
        t.close()
    from datetime import datetime

    from monitor.audit import Query, search

    lat = []
    for e in search([work / "audit"], Query(kinds=["sample"])):
        rec = e.record
        cap = rec.get("captured_at")
        if isinstance(cap, (int, float)) and cap >= mark:
            ts = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            lat.append(ts - cap)
    lat_a = np.array(lat) if lat else np.array([float("nan")])
    steady_rss = [p["rss_mb"] for p in timeline if p["phase"] == "half-rate"]
    after_warm = [p["rss_mb"] for p in timeline if p["phase"] == "saturation"][2:] + steady_rss
    growth = (after_warm[-1] - after_warm[0]) / after_warm[0] if len(after_warm) > 1 else float("nan")
    result = {
        "bundle": bundle, "saturation_samples_per_s": round(sat_rate, 2), "half_rate_samples_per_s": round(half, 2),
        "latency_p50_s": round(float(np.percentile(lat_a, 50)), 3), "latency_p99_s": round(float(np.percentile(lat_a, 99)), 3),
        "latency_samples": len(lat), "rss_mb_max": max(p["rss_mb"] for p in timeline),
        "rss_growth_after_warmup": round(growth, 4), "max_lag_saturation": max(p["lag"] for p in timeline if p["phase"] == "saturation"),
        "max_lag_half_rate": max((p["lag"] for p in timeline if p["phase"] == "half-rate"), default=0),
        "config": {"cpu_pin": "taskset -c 0" if shutil.which("taskset") else "none", "ort_threads": 1,
                   "batch_max": 16, "fsync": "every_record", "states": 31, "baseline": "loaded (scoring)",
                   "tokenizer": "tokenizer.json"},
        "timeline": timeline, "machine_load_1m": os.getloadavg()[0],
    }
    rows = [("throughput at saturation (samples/s, 1 core)", result["saturation_samples_per_s"], ">= 40"),
            ("half rate (samples/s)", result["half_rate_samples_per_s"], ""),
            ("end-to-end latency p50 (s)", result["latency_p50_s"], ""),
            ("end-to-end latency p99 (s)", result["latency_p99_s"], "<= 2"),
            ("max consumer lag, saturation / half rate", f"{result['max_lag_saturation']} / {result['max_lag_half_rate']}", ""),
            ("RSS max (MB)", result["rss_mb_max"], "<= 1024"),
            ("RSS growth after warm-up", f"{100 * result['rss_growth_after_warmup']:.1f}%", "<= 5%")]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'metric':{w}s}  {'value':>12s}  target")
    for name, val, target in rows:
        print(f"{name:{w}s}  {val!s:>12s}  {target}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
