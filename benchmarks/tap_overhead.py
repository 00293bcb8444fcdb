"""Tap overhead on the real SmolLM2-135M-Instruct on CPU, with Redis and a live consumer.

    python -m benchmarks.tap_overhead [--rounds 30] [--gen-rounds 8] [--threads 1]

Measures, interleaved in one run (every round runs each configuration once, in a shuffled
order, on the same model; the tap's hooks are removed for the unhooked calls):

* a 128-token prefill unhooked, hooked at sample_rate 0, 0.01 and 1.0 (all 31 states, last
  token), and with ``output_hidden_states=True`` for comparison;
* ``generate`` of 32 new tokens (greedy) unhooked and hooked at 1.0;

while a separate consumer process drains the Redis stream with XREADGROUP + XACK (decoding
every sample), and reports per row how many samples were taken, delivered and dropped. Wall
clock is the latency; the serving thread's CPU time is reported beside it because on a shared
machine it is far less noisy (with ``--threads 1`` the whole forward runs on that thread). Then it
fills the tap's queue with the exporter stuck and reports the tap's memory (queue bytes and the
RSS delta) against the configured bound, once with the default bounds (the item bound binds)
and once with 128 positions per sample (the byte bound binds).

Prints a table and writes ``bench-results/tap_overhead.json``. Not a CI gate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TARGETS = {"prefill-r0": None, "prefill-r0.01": 1.01, "prefill-r1": 1.03, "generate-r1": 1.02}
TEXT = (
    "The tap is the only part of layerwatch that lives inside the inference server. Users will only "
    "attach it if it is invisible: no measurable latency when it is not sampling, a few percent at most "
    "when it samples everything, and never a failed or altered request. The sidecar reads what each "
    "layer thinks on a small sample of real requests, compares that layer-by-layer narrative with a "
    "baseline, and raises drift and anomaly signals as Prometheus metrics and as an audit trail. "
)


# --------------------------------------------------------------------------- consumer process
def consume(url: str, stream: str, group: str, stop_key: str) -> None:
    """Drain the stream (XREADGROUP + XACK), decode every sample, count by request-id prefix."""
    import redis

    from monitor.transport import open_transport
    from monitor.wire import decode

    t = open_transport(url, stream=stream)
    t.ensure_group(group)
    r = redis.Redis.from_url(url)
    counts: dict[str, int] = {}
    bad = 0
    idle_after_stop = 0
    while True:
        entries = t.read(group, "bench-consumer", count=64, block_ms=200)
        for e in entries:
            try:
                rid = decode(e.data).request_id
                key = rid.rsplit("-", 1)[0]
                counts[key] = counts.get(key, 0) + 1
            except Exception:
                bad += 1
        if entries:
            t.ack(group, [e.id for e in entries])
            idle_after_stop = 0
        elif r.exists(stop_key):
            idle_after_stop += 1
            if idle_after_stop >= 2:
                break
    print(json.dumps({"delivered": counts, "undecodable": bad}))


# --------------------------------------------------------------------------- helpers
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> bool:
    """Give freed heap pages back to the OS (glibc keeps the forward's freed temporaries)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def median_ms(xs: Sequence[float]) -> float:
    return statistics.median(xs) * 1e3


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _gated_transport() -> Any:
    """An in-memory transport whose publish blocks until ``.gate`` opens (a hung backend)."""
    from monitor.transport import MemoryTransport

    class Gated(MemoryTransport):
        def __init__(self) -> None:
            super().__init__(f"memory://bench-mem-{uuid.uuid4().hex}")
            self.gate = threading.Event()

        def publish(self, payloads: Sequence[bytes]) -> list[str]:
            self.gate.wait(600)
            return super().publish(payloads)

    return Gated()


def fill_queue(model: Any, ids: Any, n_max: int, **tap_kwargs: Any) -> dict[str, Any]:
    """Attach a tap whose exporter is stuck, serve until the queue drops, report its memory."""
    import torch

    import monitor

    gated = _gated_transport()
    tap = monitor.attach(model, sample_rate=0.0, transport=gated, **tap_kwargs)
    with tap.request("warm"), torch.inference_mode():
        model(input_ids=ids)  # unsampled: the forward's own memory is in the baseline
    gc.collect()
    trim_heap()
    base = rss_bytes()
    served = 0
    while served < n_max:
        with tap.request(f"fill-{served}", force=True), torch.inference_mode():
            model(input_ids=ids)
        served += 1
        drops = tap.stats()["drops"]
        if drops["queue_full"] or drops["queue_bytes"]:
            break
    gc.collect()
    raw = rss_bytes() - base
    trim_heap()
    st = tap.stats()
    out = {
        "positions": tap.settings.positions, "tokens": int(ids.shape[1]), "requests": served,
        "queue_items": st["queue_depth"], "queue_max_items": tap.settings.queue_max_items,
        "queue_bytes": st["queue_bytes"], "queue_max_bytes": tap.settings.queue_max_bytes,
        "rss_delta_bytes": raw, "rss_delta_live_bytes": rss_bytes() - base,
        "drops": {k: v for k, v in st["drops"].items() if v},
    }
    gated.gate.set()
    tap.close(30.0)
    return out


def per_forward_cost(model: Any, tap_factory: Callable[[], Any], reps: int) -> dict[str, Any]:
    """The tap's absolute cost per forward, on a 1-token forward (a decode step), where it is
    large enough to resolve: serving-thread CPU time unhooked, hooked unsampled and sampled
    (interleaved; the exporter is stuck on a gated transport, so only the serving thread runs)."""
    import torch

    tap = tap_factory()
    ids = torch.tensor([[42]])
    res: dict[str, list[float]] = {"unhooked": [], "unsampled": [], "sampled": []}
    for i in range(reps + 3):
        for kind in res:
            if kind == "unhooked":
                tap.detach()
            elif not tap._handles:
                tap._install_hooks()
            tap.sampler.rate = 1.0 if kind == "sampled" else 0.0
            gc.collect()
            with torch.inference_mode():
                c0 = time.thread_time()
                with tap.request(f"micro-{kind}-{i}"):
                    model(input_ids=ids)
                dc = time.thread_time() - c0
            if i >= 3:
                res[kind].append(dc)
    tap.close(0.0)  # what was queued is dropped as "closed"
    gate = getattr(tap.exporter._factory(), "gate", None)
    if gate is not None:
        gate.set()
    base = statistics.median(res["unhooked"])
    return {
        "reps": reps, "unhooked_cpu_ms": round(base * 1e3, 3),
        "unsampled_extra_us": round((statistics.median(res["unsampled"]) - base) * 1e6, 1),
        "sampled_extra_us": round((statistics.median(res["sampled"]) - base) * 1e6, 1),
    }


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30, help="prefill rounds (each runs every prefill row once)")
    p.add_argument("--gen-rounds", type=int, default=8, help="generate rounds")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--positions", default="last+mean", help="the tap's positions setting (default: its default)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a busy box)")
    p.add_argument("--redis", default=os.environ.get("LAYERWATCH_BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--micro-reps", type=int, default=60, help="rounds of the 1-token per-forward cost probe")
    p.add_argument("--consume", nargs=4, metavar=("URL", "STREAM", "GROUP", "STOP_KEY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.consume:
        consume(*args.consume)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import redis
    import torch

    import monitor
    from monitor.refmodel import load_reference_model

    torch.set_num_threads(args.threads)
    model, tok = load_reference_model()
    ids = tok(TEXT * 8, return_tensors="pt")["input_ids"][:, : args.prompt_tokens]
    assert ids.shape[1] == args.prompt_tokens
    mask = torch.ones_like(ids)
    load_start = load_avg()

    stream = f"layerwatch:bench:{uuid.uuid4().hex[:8]}"
    stop_key = stream + ":stop"
    rc = redis.Redis.from_url(args.redis)
    rc.ping()
    consumer = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.tap_overhead", "--consume", args.redis, stream, "bench", stop_key],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    tap = monitor.attach(model, sample_rate=0.0, transport=args.redis, stream=stream, layers="all",
                         positions=args.positions, model_name="SmolLM2-135M-Instruct")
    hooked = [True]

    def set_hooked(flag: bool) -> None:
        if flag != hooked[0]:
            tap.detach() if not flag else tap._install_hooks()
            hooked[0] = flag

    sampled: dict[str, int] = {}

    def run_tapped(name: str, rate: float, call: Callable[[], Any], rnd: int) -> Callable[[], Any]:
        def go() -> Any:
            with tap.request(f"{name}-{rnd}") as h:
                out = call()
            sampled[name] = sampled.get(name, 0) + int(h.sampled)
            return out

        def prep() -> None:
            set_hooked(True)
            tap.sampler.rate = rate

        go.prep = prep  # type: ignore[attr-defined]
        return go

    def run_plain(call: Callable[[], Any]) -> Callable[[], Any]:
        def go() -> Any:
            return call()

        go.prep = lambda: set_hooked(False)  # type: ignore[attr-defined]
        return go

    def prefill() -> Any:
        return model(input_ids=ids, attention_mask=mask)

    def prefill_ohs() -> Any:
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    def generate() -> Any:
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.gen_tokens,
                              min_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=tok.eos_token_id)

    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    rng = random.Random(0)

    def timed(label: str, fn: Any) -> None:
        fn.prep()
        gc.collect()
        with torch.inference_mode():
            c0 = time.thread_time()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            dc = time.thread_time() - c0
        times.setdefault(label, []).append(dt)
        cpu.setdefault(label, []).append(dc)

    # warm-up (not timed)
    for fn in (run_plain(prefill), run_tapped("warm", 1.0, prefill, 0), run_plain(prefill_ohs)):
        fn.prep()  # type: ignore[attr-defined]
        with torch.inference_mode():
            fn()
    t_start = time.time()
    for rnd in range(args.rounds):
        rows = [
            ("prefill-unhooked", run_plain(prefill)),
            ("prefill-r0", run_tapped("prefill-r0", 0.0, prefill, rnd)),
            ("prefill-r0.01", run_tapped("prefill-r0.01", 0.01, prefill, rnd)),
            ("prefill-r1", run_tapped("prefill-r1", 1.0, prefill, rnd)),
            ("prefill-ohs", run_plain(prefill_ohs)),
        ]
        rng.shuffle(rows)
        for label, fn in rows:
            timed(label, fn)
        print(f"prefill round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for rnd in range(args.gen_rounds):
        rows = [("generate-unhooked", run_plain(generate)), ("generate-r1", run_tapped("generate-r1", 1.0, generate, rnd))]
        rng.shuffle(rows)
        for label, fn in rows:
            timed(label, fn)
        print(f"generate round {rnd + 1}/{args.gen_rounds}", file=sys.stderr, flush=True)
    wall = time.time() - t_start
    set_hooked(True)
    tap.flush(30.0)
    tap_stats = tap.stats()
    tap.close(30.0)
    rc.set(stop_key, 1, ex=600)
    out_text, _ = consumer.communicate(timeout=120)
    delivered = json.loads(out_text.strip().splitlines()[-1])
    rc.delete(stream, stop_key, f"{stream}:dead", f"{stream}:delivered:bench", f"{stream}:lost_pending:bench")

    def paired(label: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(times[label], times[base], strict=False))

    table = []
    for label, base in (("prefill-r0", "prefill-unhooked"), ("prefill-r0.01", "prefill-unhooked"),
                        ("prefill-r1", "prefill-unhooked"), ("prefill-ohs", "prefill-unhooked"),
                        ("generate-r1", "generate-unhooked")):
        n_sampled = sampled.get(label, 0)
        n_deliv = delivered["delivered"].get(label, 0)
        table.append({
            "row": label, "n": len(times[label]), "median_ms": round(median_ms(times[label]), 2),
            "unhooked_median_ms": round(median_ms(times[base]), 2),
            "ratio": round(statistics.median(times[label]) / statistics.median(times[base]), 4),
            "paired_ratio": round(paired(label, base), 4), "target": TARGETS.get(label),
            "cpu_ms": round(median_ms(cpu[label]), 2),
            "cpu_ratio": round(statistics.median(cpu[label]) / statistics.median(cpu[base]), 4),
            "sampled": n_sampled, "delivered": n_deliv, "dropped": n_sampled - n_deliv,
        })
    micro = per_forward_cost(model, tap_factory=lambda: monitor.attach(
        model, sample_rate=1.0, transport=_gated_transport(), model_name="micro", positions=args.positions,
        queue_max_items=args.micro_reps + 8), reps=args.micro_reps)
    memory = []
    if not args.skip_memory:
        short = ids[:, :8]
        memory.append(fill_queue(model, short, 2000, positions="last", model_name="mem-last"))
        memory.append(fill_queue(model, ids, 200, positions="all", max_positions=128,
                                 queue_max_bytes=32 * 1024 * 1024, model_name="mem-all"))
    result = {
        "benchmark": "tap_overhead", "model": "SmolLM2-135M-Instruct", "device": "cpu",
        "torch": torch.__version__, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens, "rounds": args.rounds, "gen_rounds": args.gen_rounds,
        "positions": args.positions, "cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": load_avg(),
        "wall_s": round(wall, 1), "rows": table, "tap_stats": tap_stats, "consumer": delivered,
        "per_forward_cost": micro, "memory": memory,
        "raw_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in times.items()},
        "raw_cpu_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in cpu.items()}, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tap_overhead.json"
    path.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"\nwrote {path}")
    return 0


def render(result: dict[str, Any]) -> str:
    lines = [
        f"tap overhead: {result['model']} on CPU ({result['threads']} thread(s)), prompt {result['prompt_tokens']} "
        f"tokens, generate {result['gen_tokens']}; load avg {result['load_avg_start']} -> {result['load_avg_end']}",
        f"{'row':<15}{'n':>4}{'median ms':>11}{'unhooked ms':>13}{'ratio':>8}{'paired':>8}{'cpu ratio':>11}"
        f"{'target':>8}{'sampled':>9}{'delivered':>10}{'dropped':>9}",
    ]
    for r in result["rows"]:
        target = f"<={r['target']}" if r["target"] else "-"
        lines.append(f"{r['row']:<15}{r['n']:>4}{r['median_ms']:>11.1f}{r['unhooked_median_ms']:>13.1f}"
                     f"{r['ratio']:>8.3f}{r['paired_ratio']:>8.3f}{r['cpu_ratio']:>11.3f}{target:>8}"
                     f"{r['sampled']:>9}{r['delivered']:>10}{r['dropped']:>9}")
    lines.append("ratio: median/median (wall clock); paired: median of per-round ratios; cpu ratio: serving "
                 "thread CPU time (with 1 torch thread the whole forward runs on it; robust to a busy machine)")
    c = result["per_forward_cost"]
    lines.append(f"tap cost per forward (1-token forward, {c['unhooked_cpu_ms']:.1f} ms CPU unhooked, median of "
                 f"{c['reps']}): +{c['unsampled_extra_us']:.0f} us unsampled, +{c['sampled_extra_us']:.0f} us sampled "
                 f"(all 31 states, positions {result['positions']})")
    for m in result["memory"]:
        lines.append(
            f"memory at a full queue ({m['positions']}, {m['tokens']} tokens): {m['queue_items']}/"
            f"{m['queue_max_items']} items, {m['queue_bytes'] / 2**20:.1f}/{m['queue_max_bytes'] / 2**20:.0f} MiB "
            f"queued; RSS +{m['rss_delta_live_bytes'] / 2**20:.1f} MiB live (+{m['rss_delta_bytes'] / 2**20:.1f} "
            f"MiB before malloc_trim); drops {m['drops']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
