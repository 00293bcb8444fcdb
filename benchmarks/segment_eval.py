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
from benchmarks.drift_eval import Cache, _key, auroc, load_bank, texts_for_eval, tpr_at_fpr
from monitor.drift.local import local_layers
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
        wl = tuple(int(x) for x in z["window_layers"]) if "window_layers" in z.files else (
            layers if z["means"].shape[1] == len(layers) else local_layers(layers))  # caches before the key
        win = WindowStates(wl, z["means"], z["bounds"], z["offsets"], z["prompt_tokens"])
        return z["states"], win, layers
    t0 = time.time()

    def prog(done: int, total: int) -> None:
        if done % (batch_size * 8) == 0 or done == total:
            print(f"  [{name}] captured {done}/{total} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    states, got, layers, _ = capture_with_windows(model, tok, texts, batch_size=batch_size, max_tokens=max_tokens,
                                                  positions="last+mean", progress=prog)
    assert got is not None
    win = got
    np.savez(p, states=states, layers=np.asarray(layers), window_layers=np.asarray(win.layers), means=win.means,
             bounds=win.bounds, offsets=win.offsets, prompt_tokens=win.prompt_tokens)
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
    ap.add_argument("--n-hosts", type=int, default=10, help="host prompts per cell (--full: 200)")
    ap.add_argument("--n-normal-hosts", type=int, default=40, help="clean test hosts (the cells' negatives)")
    ap.add_argument("--n-baseline-hosts", type=int, default=120)
    ap.add_argument("--n-baseline", type=int, default=500, help="english-short baseline texts (drift_eval: 1200)")
    ap.add_argument("--n-normal", type=int, default=200)
    ap.add_argument("--n-shift", type=int, default=50)
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
    """Build the baseline, score every set with the sidecar's scorer, report every cell."""
    from monitor.drift.baseline import build_baseline
    from monitor.drift.score import AnomalyScorer

    layers = next(iter(captured.values()))[2]
    want = local_layers(layers)

    def wins(name: str) -> WindowStates:
        w = captured[name][1]
        sel = [w.layers.index(x) for x in want]
        return WindowStates(want, np.asarray(w.means[:, sel], dtype=np.float32), w.bounds, w.offsets, w.prompt_tokens)

    readings = {name: readings_of(cache, name, st, lay, bank) for name, (st, _, lay) in captured.items()}
    base_names = ("baseline_short", "baseline_hosts")
    t0 = time.time()
    baseline = build_baseline(Readings.concat([readings[n] for n in base_names]), model="SmolLM2-135M-Instruct",
                              model_fingerprint=fp, bundle_id=bank.bundle_id,
                              source="english_prose heldout: short texts + 64-1024-token hosts",
                              windows=WindowStates.concat([wins(n) for n in base_names]))
    build_s = time.time() - t0
    scorer = AnomalyScorer(baseline, alpha=args.alpha, local=True)
    scored: dict[str, dict[str, np.ndarray]] = {}
    score_s, n_scored = 0.0, 0
    for name in captured:
        if name in base_names:
            continue
        a, w = readings[name], wins(name)
        rank_both, rank_whole = scorer.rank_scores(a, w), scorer.rank_scores(a)
        _, p_both, _ = scorer.score_arrays(a, w)
        _, p_whole, _ = scorer.score_arrays(a)
        t0 = time.time()
        scores = scorer.score(a, w)  # the sidecar's per-sample verdicts (flags, offsets)
        score_s += time.time() - t0
        n_scored += a.n
        scored[name] = {"rank_both": rank_both, "rank_whole": rank_whole, "p_both": p_both, "p_whole": p_whole,
                        "local_flag": np.array([any(f.kind == "local_segment" for f in s.flags) for s in scores])}

    def row(kind: str, pos: str, neg: str) -> dict[str, Any]:
        P, N = scored[pos], scored[neg]
        out: dict[str, Any] = {"kind": kind, "n": int(len(P["p_both"])), "negatives": neg}
        for tag in ("both", "whole"):
            out[f"auroc_{tag}"] = auroc(N[f"rank_{tag}"], P[f"rank_{tag}"])
            out[f"tpr_at_1pct_fpr_{tag}"] = tpr_at_fpr(N[f"rank_{tag}"], P[f"rank_{tag}"])
            out[f"flagged_at_alpha_{tag}"] = float(np.mean(P[f"p_{tag}"] < args.alpha))
        out["local_segment_flags"] = float(np.mean(P["local_flag"]))
        if pos.startswith("cell:"):  # the same hosts, clean: no host-to-host difference in the comparison
            n = len(P["rank_both"])
            out["auroc_both_paired"] = auroc(N["rank_both"][:n], P["rank_both"])
            out["auroc_whole_paired"] = auroc(N["rank_whole"][:n], P["rank_whole"])
        return out

    cells = [row(k.split(":", 1)[1], k, "normal_hosts") for k in scored if k.startswith("cell:")]
    kinds = [row(k.split(":", 1)[1], k, "normal_short") for k in scored if k.startswith("shift:")]
    null = {n: {"n": int(len(scored[n]["p_both"])), "flagged_at_alpha_both": float(np.mean(scored[n]["p_both"] < args.alpha)),
                "flagged_at_alpha_whole": float(np.mean(scored[n]["p_whole"] < args.alpha))}
            for n in ("normal_short", "normal_hosts")}
    big = [c for c in cells if c["kind"].startswith("shuffle") or float(c["kind"].split(":")[1]) >= 0.10]
    return {
        "benchmark": "segment_eval", "model": "SmolLM2-135M-Instruct", "model_fingerprint": fp, "bank": bank.bundle_id,
        "baseline_id": baseline.id, "n_baseline": baseline.n_samples, "n_calibration": baseline.n_calibration,
        "local_layers": list(want), "alpha": args.alpha,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")},
        "cells": cells, "kinds": kinds, "null": null,
        "targets": {
            "cells>=10%_and_shuffle_auroc>=0.95": all(c["auroc_both"] >= 0.95 for c in big),
            "cells>=10%_and_shuffle_tpr>=0.8": all(c["tpr_at_1pct_fpr_both"] >= 0.8 for c in big),
            "kinds_auroc_drop<=0.01": all(k["auroc_both"] >= k["auroc_whole"] - 0.01 for k in kinds),
            "kinds_tpr_drop<=0.02": all(k["tpr_at_1pct_fpr_both"] >= k["tpr_at_1pct_fpr_whole"] - 0.02 for k in kinds),
            "normal_flagged<=alpha": all(v["flagged_at_alpha_both"] <= args.alpha for v in null.values()),
        },
        "build_seconds": round(build_s, 1), "score_ms_per_sample": round(1000 * score_s / max(1, n_scored), 2),
    }


def print_table(r: dict[str, Any]) -> None:
    """Every cell: AUROC and TPR at 1% FPR with the local score folded in and without it (cells:
    also AUROC against the same hosts clean, "paired")."""
    print(f"segment_eval: {r['model']} bank={r['bank']} baseline={r['baseline_id']} (n={r['n_baseline']}, "
          f"{r['n_calibration']} calibration; local layers {r['local_layers']}), alpha={r['alpha']}")
    hdr = ("cell/kind", "n", "AUROC", "AUROC whole", "TPR@1%", "TPR@1% whole", "flag@a", "flag@a whole", "local flag",
           "AUROC paired", "whole paired")
    print("  ".join(f"{h:>14}" for h in hdr))
    for row in r["cells"] + r["kinds"]:
        vals = (row["kind"], row["n"], row["auroc_both"], row["auroc_whole"], row["tpr_at_1pct_fpr_both"],
                row["tpr_at_1pct_fpr_whole"], row["flagged_at_alpha_both"], row["flagged_at_alpha_whole"],
                row["local_segment_flags"], row.get("auroc_both_paired", "-"), row.get("auroc_whole_paired", "-"))
        print("  ".join(f"{v:>14.3f}" if isinstance(v, float) else f"{v!s:>14}" for v in vals))
    for name, v in r["null"].items():
        print(f"{name} ({v['n']} held-out normal texts): flagged at alpha {v['flagged_at_alpha_both']:.3f} "
              f"(whole-text score alone {v['flagged_at_alpha_whole']:.3f})")
    print("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["targets"].items()))


def readings_of(cache: Cache, name: str, states: np.ndarray, layers: tuple[int, ...], bank: Any) -> Readings:
    from benchmarks.drift_eval import readings_for

    return readings_for(cache, _key("segment", name, states.shape, float(states[:8].astype(np.float32).sum())),
                        states, layers, bank, 32)


if __name__ == "__main__":
    sys.exit(main())
