"""Cost of the layerwatch plugin inside vLLM's OpenAI server (default compiled configuration).

Starts one server per configuration side by side (``baseline``: no plugin loaded at all,
``VLLM_PLUGINS=""``; ``rate0``, ``rate0.01``, ``rate1``: the plugin exporting to Redis) and
runs the same fixed workload against each, in interleaved rounds (the configuration order is
shuffled per round with a fixed seed), so slow drift of the machine hits every configuration
alike. Workload: prompts of random token ids with lengths spread over 32-1,024 tokens, 64
output tokens each (``ignore_eos``), 8 concurrent streaming clients; request ids
``lwbench0-<i>-r<round>`` are the same for every configuration, so rate 0.01 samples the same requests in
every round (how many is printed).

Per configuration: output tokens/s of each round, time to first token and inter-token latency
of each request; medians with a bootstrap 95% confidence interval, and ratios to the baseline
(tokens/s: baseline / configuration, so > 1 means slower).

Run in the vLLM virtualenv (``scripts/vllm-env.sh``)::

    .venv-vllm/bin/python -m benchmarks.vllm_overhead --rounds 5 --requests 40 --out bench-results/vllm_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, str]] = {
    "baseline": {"VLLM_PLUGINS": ""},
    "rate0": {"LAYERWATCH_TAP_SAMPLE_RATE": "0"},
    "rate0.01": {"LAYERWATCH_TAP_SAMPLE_RATE": "0.01"},
    "rate1": {"LAYERWATCH_TAP_SAMPLE_RATE": "1.0"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, name: str, extra_env: dict[str, str], log_dir: Path, eager: bool) -> tuple[Any, int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERWATCH_TAP_")}
    env.update(HF_HUB_OFFLINE="1", LAYERWATCH_TAP_TRANSPORT="redis://127.0.0.1:6379/0",
               LAYERWATCH_TAP_STREAM=f"layerwatch:bench:{name}", LAYERWATCH_TAP_STREAM_MAXLEN="1000")
    if extra_env.get("VLLM_PLUGINS") == "":
        env = {k: v for k, v in env.items() if not k.startswith("LAYERWATCH_TAP_")}
    env.update(extra_env)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 30),
           "--max-model-len", "2048", "--served-model-name", "smollm2", "--disable-log-stats"]
    if eager:
        cmd.append("--enforce-eager")
    log = open(log_dir / f"vllm-{name}.log", "w")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), port


async def wait_ready(port: int, proc: Any, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server on {port} exited with {proc.returncode}")
            try:
                if (await c.get(f"http://127.0.0.1:{port}/health", timeout=2)).status_code == 200:
                    return
            except Exception:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"server on {port} not ready after {timeout} s")


async def one_request(client: Any, port: int, rid: str, prompt: list[int], out_tokens: int) -> dict[str, float]:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": out_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                             headers={"X-Request-Id": rid}, timeout=600) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": statistics.fmean(gaps) if gaps else float("nan"), "tokens": len(stamps)}


async def run_round(port: int, work: list[tuple[str, list[int]]], clients: int, out_tokens: int) -> dict[str, Any]:
    import httpx

    queue = list(work)
    results: list[dict[str, float]] = []

    async def worker(c: Any) -> None:
        while queue:
            rid, prompt = queue.pop(0)
            results.append(await one_request(c, port, rid, prompt, out_tokens))

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "ttft": [r["ttft"] for r in results], "itl": [r["itl"] for r in results]}


def median_ci(xs: list[float], seed: int = 0, n: int = 2000) -> tuple[float, float, float]:
    xs = [x for x in xs if x == x]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return statistics.median(xs), meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def workload(n: int, seed: int) -> list[tuple[str, list[int]]]:
    rng = random.Random(seed)
    lengths = [int(32 * (1024 / 32) ** (i / max(1, n - 1))) for i in range(n)]  # log-spread 32..1024
    rng.shuffle(lengths)
    return [(f"lwbench0-{i}", [rng.randrange(100, 49000) for _ in range(n_tok)]) for i, n_tok in enumerate(lengths)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/layerwatch/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=40, help="requests per round")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out-tokens", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--eager", action="store_true", help="--enforce-eager servers (default: compiled)")
    ap.add_argument("--out", default="bench-results/vllm_overhead.json")
    args = ap.parse_args()
    from monitor.tap.sampler import hash_unit

    names = args.configs.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rounds = [workload(args.requests, seed=r) for r in range(args.rounds)]
    for r, work in enumerate(rounds):  # distinct ids per round
        rounds[r] = [(f"{rid}-r{r}", p) for rid, p in work]
    n_sampled_001 = sum(hash_unit(rid) < 0.01 for work in rounds for rid, _ in work)
    servers = {n: start_server(args.model, n, CONFIGS[n], out.parent, args.eager) for n in names}
    try:
        asyncio.run(_all_ready(servers))
        # warm-up: one short round each (first requests pay one-off costs)
        for n in names:
            asyncio.run(run_round(servers[n][1], workload(args.clients, seed=99), args.clients, 8))
        res: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        order_rng = random.Random(7)
        for r, work in enumerate(rounds):
            order = list(names)
            order_rng.shuffle(order)
            for n in order:
                got = asyncio.run(run_round(servers[n][1], work, args.clients, args.out_tokens))
                res[n].append(got)
                print(f"round {r} {n:9s} {got['tokens_per_s']:7.1f} tok/s  wall {got['wall_s']:.1f} s", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = summarise(res, names)
    doc = {"config": vars(args), "sampled_at_0.01": n_sampled_001,
           "requests_per_config": args.rounds * args.requests, "summary": summary, "rounds": res}
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nrequests per configuration: {args.rounds * args.requests}; sampled at rate 0.01: {n_sampled_001}")
    print(f"{'config':10s} {'tok/s (95% CI)':>24s} {'x':>6s} {'TTFT ms (95% CI)':>24s} {'x':>6s} "
          f"{'ITL ms (95% CI)':>22s} {'x':>6s}")
    for n in names:
        s = summary[n]
        print(f"{n:10s} {_fmt(s['tokens_per_s'], 1):>24s} {s['slowdown_tokens_per_s']:6.3f} "
              f"{_fmt(s['ttft_ms'], 1):>24s} {s['ratio_ttft']:6.3f} {_fmt(s['itl_ms'], 2):>22s} {s['ratio_itl']:6.3f}")
    print(f"JSON: {out}")


def summarise(res: dict[str, list[dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for n in names:
        summary[n] = {
            "tokens_per_s": median_ci([r["tokens_per_s"] for r in res[n]]),
            "ttft_ms": median_ci([1000 * x for r in res[n] for x in r["ttft"]]),
            "itl_ms": median_ci([1000 * x for r in res[n] for x in r["itl"]]),
        }
    base = summary.get("baseline", summary[names[0]])
    for n in names:
        s = summary[n]
        s["slowdown_tokens_per_s"] = base["tokens_per_s"][0] / s["tokens_per_s"][0]
        s["ratio_ttft"] = s["ttft_ms"][0] / base["ttft_ms"][0]
        s["ratio_itl"] = s["itl_ms"][0] / base["itl_ms"][0]
    return summary


def _fmt(m: tuple[float, float, float], nd: int) -> str:
    return f"{m[0]:.{nd}f} ({m[1]:.{nd}f}-{m[2]:.{nd}f})"


async def _all_ready(servers: dict[str, tuple[Any, int]]) -> None:
    await asyncio.gather(*(wait_ready(port, proc, 900) for proc, port in servers.values()))


if __name__ == "__main__":
    main()
