"""Local anomalies inside a prompt (issue 19): ``python -m benchmarks.segment_eval``
(also ``python -m benchmarks.drift_eval --segments``).

Every text goes through the real tap -> wire -> lens bank on the real SmolLM2, prompt windows
included (:func:`monitor.pipeline.offline.capture_with_windows`), and is scored by the sidecar's
own scorer (:class:`monitor.drift.score.AnomalyScorer`, the code path of ``layerwatch score``)
against one baseline built from normal traffic of both lengths: ``english-short`` held-out texts
(as :mod:`benchmarks.drift_eval`) plus held-out host prompts of 64-1,024 tokens
(:mod:`benchmarks.segments`). Scored: the grid of segment cells over test-split hosts (negatives:
the same hosts, clean), and drift_eval's shift kinds against its normal texts, each with the
whole-text score alone and combined with the local score (the whole-text score must not lose
power), and the held-out normal traffic's flag rate at ``alpha``.

Per cell: per-sample AUROC and TPR at 1% FPR (threshold: the 99th percentile of the negatives'
scores) of the scorer's ranking statistic (:meth:`AnomalyScorer.rank_scores`), and the
conformal flag rate at ``alpha`` (``p < alpha``: the sidecar's own verdict). States are cached
(``--cache-dir``), so reruns only score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import segments
from benchmarks.drift_eval import Cache, _key, load_bank, texts_for_eval
from monitor.drift.prompt_windows import WindowStates
from monitor.lenses.readings import Readings


def capture(cache: Cache, name: str, texts: list[str], model: Any, tok: Any, fp: str, max_tokens: int,
            batch_size: int) -> tuple[np.ndarray, WindowStates, tuple[int, ...]]:
    """last+mean states [n, L, 2, d] and window states of every layer, cached."""
    from monitor.pipeline.offline import capture_with_windows

    key = _key("states+windows", fp, max_tokens, texts)
    p = cache.path(key, "npz")
    if p.exists():
        z = np.load(p)
        layers = tuple(int(x) for x in z["layers"])
        win = WindowStates(layers, z["means"], z["bounds"], z["offsets"], z["prompt_tokens"])
        return z["states"], win, layers
    t0 = time.time()

    def prog(done: int, total: int) -> None:
        if done % (batch_size * 8) == 0 or done == total:
            print(f"  [{name}] captured {done}/{total} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    states, win, layers, _ = capture_with_windows(model, tok, texts, batch_size=batch_size, max_tokens=max_tokens,
                                                  positions="last+mean", progress=prog)
    assert win is not None
    np.savez(p, states=states, layers=np.asarray(layers), means=win.means, bounds=win.bounds, offsets=win.offsets,
             prompt_tokens=win.prompt_tokens)
    return states, win, layers


def eval_texts(cache: Cache, tok: Any, n_hosts: int, n_normal_hosts: int, n_baseline_hosts: int,
               drift_sizes: tuple[int, int, int]) -> dict[str, list[str]]:
    """Every set scored or used as baseline, frozen in the cache on first use. The cells modify
    the first ``n_hosts`` of the ``n_normal_hosts`` clean test hosts."""
    from monitor import corpora

    p = cache.path(_key("segment-texts", n_hosts, n_normal_hosts, n_baseline_hosts, drift_sizes), "texts.json")
    if p.exists():
        return dict(json.loads(p.read_text()))

    def count(t: str) -> int:
        return len(tok(t)["input_ids"])

    sets: dict[str, list[str]] = {}
    short = texts_for_eval(cache, *drift_sizes)
    sets["baseline_short"] = short.pop("baseline")
    sets["baseline_hosts"] = segments.hosts(corpora.english_prose("heldout"), n_baseline_hosts, count)
    test_hosts = segments.hosts(corpora.english_prose("test"), max(n_hosts, n_normal_hosts), count)
    sets["normal_hosts"] = test_hosts
    sets.update({f"cell:{k}": v for k, v in segments.cells(test_hosts[:n_hosts], count).items()})
    sets["normal_short"] = short.pop("normal")
    sets.update(short)  # shift:<kind>
    p.write_text(json.dumps(sets))
    return sets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "layerwatch", "drift_eval"))
    ap.add_argument("--out", default="bench-results/segment_eval.json")
    ap.add_argument("--bank", choices=("auto", "bundle", "logit"), default="auto")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--n-hosts", type=int, default=20, help="host prompts per cell (--full: 200)")
    ap.add_argument("--n-normal-hosts", type=int, default=60, help="clean test hosts (the cells' negatives)")
    ap.add_argument("--n-baseline-hosts", type=int, default=120)
    ap.add_argument("--n-baseline", type=int, default=500, help="english-short baseline texts (drift_eval: 1200)")
    ap.add_argument("--n-normal", type=int, default=300)
    ap.add_argument("--n-shift", type=int, default=100)
    ap.add_argument("--full", action="store_true", help="the full grid: 200 hosts per cell, 500 clean hosts, "
                                                        "600 baseline hosts, drift_eval's 1200/1000/400 short texts")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--capture-only", action="store_true")
    args = ap.parse_args(argv)
    if args.full:
        args.n_hosts, args.n_normal_hosts, args.n_baseline_hosts = 200, 500, 600
        args.n_baseline, args.n_normal, args.n_shift = 1200, 1000, 400

    import torch

    from monitor.adapters import model_fingerprint
    from monitor.refmodel import load_reference_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.time()
    model, tok = load_reference_model()
    fp = model_fingerprint(model)
    cache = Cache(Path(args.cache_dir))
    sets = eval_texts(cache, tok, args.n_hosts, args.n_normal_hosts, args.n_baseline_hosts,
                      (args.n_baseline, args.n_normal, args.n_shift))
    captured: dict[str, tuple[np.ndarray, WindowStates, tuple[int, ...]]] = {}
    for name, texts in sets.items():
        long = not (name.endswith("_short") or name.startswith("shift:"))
        captured[name] = capture(cache, name, texts, model, tok, fp, 1100 if long else 64,
                                 args.batch_size if long else 16)
        print(f"  [{name}] {len(texts)} texts ready", file=sys.stderr, flush=True)
    if args.capture_only:
        return 0
    bank = load_bank(args.bank, model, args.bundle)
    result = evaluate(args, cache, bank, fp, captured)
    result["seconds"] = round(time.time() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")
    return 0


def evaluate(args: argparse.Namespace, cache: Cache, bank: Any, fp: str,
             captured: dict[str, tuple[np.ndarray, WindowStates, tuple[int, ...]]]) -> dict[str, Any]:
    raise NotImplementedError


def print_table(r: dict[str, Any]) -> None:
    raise NotImplementedError


def readings_of(cache: Cache, name: str, states: np.ndarray, layers: tuple[int, ...], bank: Any) -> Readings:
    from benchmarks.drift_eval import readings_for

    return readings_for(cache, _key("segment", name, states.shape, float(states[:8].astype(np.float32).sum())),
                        states, layers, bank, 32)


if __name__ == "__main__":
    sys.exit(main())
