"""What a sampled request costs the vLLM step that carries it (CPU backend, default compiled mode).

One offline engine with the plugin at rate 0 and request control on, so each batch chooses
whether its requests are sampled (``extra_args={"layerwatch": "force"}``). Interleaved rounds of
the same batch shape (8 prompts of 32-1,024 tokens, one output token: the time is the prefill)
in three arms:

* ``compiled``: no request sampled: vLLM's compiled graph as without the plugin;
* ``in-graph capture``: every request sampled, captured by the ``layerwatch::tap`` ops inside
  the compiled graph (:mod:`monitor.tap.vllm.graph`), what the plugin does here;
* ``uncompiled``: no request sampled, but the step forced to run uncompiled (``skip_compiled``),
  what a sampled step cost before the in-graph capture (and still costs where CUDA graphs
  are on): the reason for the rate-1.0 time-to-first-token gap in ``benchmarks.vllm_overhead``.

Reports per arm the median batch time and the median of per-round ratios to ``compiled``
(paired within a round, so a machine that slows down for a while moves both). Same engine, same
process: only the step's path differs.

    .venv-vllm/bin/python -m benchmarks.vllm_step_cost --rounds 8 --out bench-results/vllm_step_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

LENGTHS = (32, 128, 256, 512, 1024, 64, 384, 768)
ARMS = ("compiled", "in-graph capture", "uncompiled")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default="bench-results/vllm_step_cost.json")
    args = ap.parse_args(argv)
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
                       "LAYERWATCH_TAP_SAMPLE_RATE": "0", "LAYERWATCH_TAP_ALLOW_REQUEST_CONTROL": "true",
                       "LAYERWATCH_TAP_TRANSPORT": "memory://step-cost"})
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.forward_context import get_forward_context
    from vllm.inputs import TokensPrompt

    from monitor.refmodel import cached_model_dir
    from monitor.tap.vllm.frontend import taps

    llm = LLM(model=str(cached_model_dir()), dtype="float32", max_model_len=2048, seed=0,
              enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30)
    tap = taps()[0]
    if not tap.in_graph:
        raise SystemExit("the tap is not capturing in the compiled graph here (enforce_eager or CUDA graphs?)")
    orig = tap._orig_forward
    eager = [False]

    def forward(*a: Any, **k: Any) -> Any:  # the "uncompiled" arm: skip the compiled graph
        if not eager[0]:
            return orig(*a, **k)
        ctx = get_forward_context()
        saved, ctx.skip_compiled = ctx.skip_compiled, True
        try:
            return orig(*a, **k)
        finally:
            ctx.skip_compiled = saved

    tap._orig_forward = forward
    rng = np.random.default_rng(0)

    def batch(sampled: bool) -> float:
        prompts = [TokensPrompt(prompt_token_ids=rng.integers(100, 40000, n).tolist()) for n in LENGTHS]
        params = [SamplingParams(max_tokens=1, temperature=0.0, extra_args={"layerwatch": "force"} if sampled else None)
                  for _ in LENGTHS]
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    for _ in range(2):  # warm-up of both paths
        batch(False)
        batch(True)
    assert tap.core is not None
    tap.core.exporter.flush(30)  # the warm-up's samples are counted before, not in, the rounds
    before = tap.core.stats()["exported"]
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    for _ in range(args.rounds):
        for arm in ARMS:
            eager[0] = arm == "uncompiled"
            times[arm].append(batch(arm == "in-graph capture"))
    eager[0] = False
    tap.core.exporter.flush(30)
    exported = tap.core.stats()["exported"] - before
    base = np.array(times["compiled"])
    rows = {a: {"median_s": float(np.median(v)), "paired_ratio": float(np.median(np.array(v) / base)),
                "ratio_range": [float(np.min(np.array(v) / base)), float(np.max(np.array(v) / base))]}
            for a, v in times.items()}
    result = {"rounds": args.rounds, "prompt_lengths": list(LENGTHS), "arms": rows, "times_s": times,
              "samples_exported": int(exported), "expected_samples": args.rounds * len(LENGTHS),
              "load_average": list(os.getloadavg())}
    print(f"{'arm':<18} {'median batch s':>15} {'paired ratio':>13} {'range':>15}")
    for a, r in rows.items():
        lo, hi = r["ratio_range"]
        print(f"{a:<18} {r['median_s']:>15.3f} {r['paired_ratio']:>13.3f} {lo:>7.2f}-{hi:<7.2f}")
    print(f"samples exported by the in-graph arm: {exported} of {args.rounds * len(LENGTHS)}; "
          f"load average {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
