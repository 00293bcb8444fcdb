"""Ablation of the drift detector's per-sample scorer (issue 5): ``python -m benchmarks.drift_scorers``.

Reuses the texts, captured states and lens readings that ``python -m benchmarks.drift_eval`` cached
(it captures what is missing, for each ``--positions`` mode) and compares, on the same baseline /
normal / shift sets, per kind AUROC and TPR at 1% FPR (threshold: the 99th percentile of the normal
scores) of:

* ``ref``: the production scorer (:class:`monitor.drift.score.AnomalyScorer`, factor-model
  Mahalanobis over the per-layer feature vector);
* ``pcaK``: a Mahalanobis distance in the K leading principal components of the standardised
  features plus the residual norm over its mean variance;
* ``knnK``: mean squared distance to the K nearest baseline samples in 64 whitened components;

for the tap's ``last`` token readings, the ``mean`` readings, and both feature vectors side by side
(``last+mean``). Two more sections:

* ``--raw-layers 0,6,...``: ``pcaK`` on the *raw* hidden state of single layers (last token and
  prompt mean) instead of the narrative features: what the lenses and probes add over the states;
* ``--sizes 400,800``: the production detector (tap ``last+mean``, context probes, the default
  covariance model) on baselines of that many of the baseline texts (3 random subsets each);
* ``--factors 4,8,16``: the production detector with that many factors, beside the held-out
  log-likelihood of the baseline's calibration split under each covariance model (the one
  unsupervised criterion a baseline could choose its own number of factors by);
* ``--mixture 2,3,4``: a mixture of factor models (k-means clusters of the baseline, one
  production-style detector per cluster, score = distance to the nearest), 3 seeds per k;
* ``--concepts``: one score per probe label (the label's log-probability over the layers, each
  layer standardised on the baseline), the best single label per kind (an *oracle*: chosen with
  the test labels), and the production score combined with all of them (max of tail-normalised
  scores, calibrated like the production score);
* ``--ceiling``: a *supervised* upper bound: a logistic regression that is shown labelled shifted
  texts (5-fold cross-validation, normal test texts vs each kind), on the production feature
  vector and on the raw prompt-mean + last-token states of state 21. A one-class detector
  never sees shifted texts, so this is what the readings could give at most: where it is far
  above the detector, the information is in the readings and the gap is the one-class score.

Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Scorer = Callable[[np.ndarray], np.ndarray]


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = x.mean(0), x.std(0)
    sd[sd < 1e-9] = 1.0  # constant features: no NaN
    return mu, sd


def pca_mahalanobis(base: np.ndarray, k: int) -> Scorer:
    """Squared whitened distance in the first ``k`` components + residual over its mean variance."""
    mu, sd = _standardiser(base)
    z = (base - mu) / sd
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    var = s**2 / len(z)
    v, lam = vt[:k], np.maximum(var[:k], 1e-9)
    res_var = max(float(var[k:].mean()) if len(var) > k else 1e-6, 1e-6)

    def score(x: np.ndarray) -> np.ndarray:
        zz = (x - mu) / sd
        c = zz @ v.T
        return np.asarray((c**2 / lam).sum(1) + ((zz - c @ v) ** 2).sum(1) / res_var)

    return score


def supervised_ceiling(neg: np.ndarray, pos: np.ndarray, folds: int = 5, l2: float = 1e-2,
                       seed: int = 0) -> np.ndarray:
    """Out-of-fold logits of a logistic regression separating ``pos`` from ``neg`` (same order,
    ``neg`` first): features standardised on each training fold, L2 on the mean loss."""
    import torch

    from monitor.lenses.probes import fit_logistic

    x = np.concatenate([neg, pos]).astype(np.float64)
    y = np.r_[np.zeros(len(neg), dtype=np.int64), np.ones(len(pos), dtype=np.int64)]
    fold = np.empty(len(y), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in (0, 1):  # stratified: each fold holds the same share of both classes
        idx = rng.permutation(np.nonzero(y == c)[0])
        fold[idx] = np.arange(len(idx)) % folds
    out = np.empty(len(y))
    for f in range(folds):
        tr, te = fold != f, fold == f
        mu, sd = _standardiser(x[tr])
        xt = torch.from_numpy(((x[tr] - mu) / sd).astype(np.float32))[None]
        w, b = fit_logistic(xt, torch.from_numpy(y[tr]), 2, l2, max_iter=200)
        logits = torch.from_numpy(((x[te] - mu) / sd).astype(np.float32)) @ w[0] + b[0]
        out[te] = (logits[:, 1] - logits[:, 0]).numpy()
    return out


def knn_distance(base: np.ndarray, k: int, components: int = 64) -> Scorer:
    """Mean squared distance to the ``k`` nearest baseline samples in whitened PCA space."""
    mu, sd = _standardiser(base)
    z = (base - mu) / sd
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    proj = vt[:components] / np.maximum(s[:components, None] / np.sqrt(len(z)), 1e-9)
    zb = z @ proj.T

    def score(x: np.ndarray) -> np.ndarray:
        q = ((x - mu) / sd) @ proj.T
        d = ((q[:, None, :] - zb[None]) ** 2).sum(-1)
        return np.asarray(np.sort(d, 1)[:, :k].mean(1))

    return score


def factor_mixture(base: np.ndarray, k: int, seed: int = 0, components: int = 16, clip: float | None = 4.0,
                   pcs: int = 32, restarts: int = 5, min_size: int = 60) -> Scorer:
    """Mixture of factor models: k-means clusters of ``base`` and one detector per cluster.

    Clusters: k-means (k-means++ seeding, best of ``restarts``) in the ``pcs`` leading whitened
    principal components of the standardised (winsorised) features. Each cluster of at least
    ``min_size`` samples gets its own :meth:`Mahalanobis.fit` (``components`` factors, ``clip``);
    a sample's score is its least squared distance to any cluster's model.
    """
    from monitor.drift.stats import Mahalanobis

    z = Mahalanobis.fit(base, components=components, clip=clip).standardise(base)
    u, _, _ = np.linalg.svd(z - z.mean(0), full_matrices=False)
    y = u[:, :pcs] * np.sqrt(len(z))
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(restarts):
        centres = [y[rng.integers(len(y))]]
        for _ in range(1, k):  # k-means++: next centre drawn by squared distance to the nearest
            d = np.min(((y[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
            centres.append(y[rng.choice(len(y), p=d / d.sum())])
        c = np.asarray(centres)
        for _ in range(100):
            lab = np.argmin(((y[:, None] - c[None]) ** 2).sum(-1), 1)
            new = np.asarray([y[lab == j].mean(0) if np.any(lab == j) else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = float(((y - c[lab]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, lab)
    assert best is not None
    lab = best[1]
    models = [Mahalanobis.fit(base[lab == j], components=components, clip=clip)
              for j in range(k) if np.sum(lab == j) >= min_size]
    if not models:  # every cluster too small: one model of everything
        models = [Mahalanobis.fit(base, components=components, clip=clip)]

    def score(x: np.ndarray) -> np.ndarray:
        return np.asarray(np.min(np.stack([m.distance2(x) for m in models]), 0))

    return score


def heldout_log_likelihood(det: Any, x: np.ndarray) -> float:
    """Mean Gaussian log-likelihood of ``x`` under a detector's covariance model, per sample and
    up to a constant, in its standardised (winsorised) feature space: higher is a better fit."""
    _, logdet = np.linalg.slogdet(det.precision)
    return float(0.5 * logdet - 0.5 * np.mean(det.distance2(x)))


def concept_scores(fit: Any, a: Any) -> dict[str, np.ndarray]:
    """Per probe label (``"probe=label"``): the mean over layers of the label's log-probability,
    each layer standardised on the baseline samples ``fit`` (median, half the 16-84% range): the
    score of a watched concept (:class:`monitor.drift.concepts.ConceptReference`)."""
    from monitor.drift.concepts import ConceptReference

    return ConceptReference.standardisation(fit).scores(a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="lens bundle directory")
    ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "layerwatch", "drift_eval"))
    ap.add_argument("--out", default="bench-results/drift_scorers.json")
    ap.add_argument("--modes", default="last,mean", help="comma-separated capture modes (last, mean)")
    ap.add_argument("--n-baseline", type=int, default=1200)
    ap.add_argument("--n-normal", type=int, default=1000)
    ap.add_argument("--n-shift", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--raw-layers", default="", help="comma-separated states to score raw (e.g. 0,6,12,18,24,30)")
    ap.add_argument("--sizes", default="", help="comma-separated baseline sizes for the production detector")
    ap.add_argument("--factors", default="", help="comma-separated factor counts (with held-out likelihood)")
    ap.add_argument("--mixture", default="", help="comma-separated cluster counts of a mixture of factor models")
    ap.add_argument("--concepts", action="store_true", help="per probe label scores and their combination")
    ap.add_argument("--ceiling", action="store_true",
                    help="supervised upper bound (cross-validated logistic regression that sees shifted texts)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from benchmarks.drift_eval import (
        Cache,
        auroc,
        readings_for,
        states_for,
        states_key,
        tail_normaliser,
        texts_for_eval,
        tpr_at_fpr,
    )
    from monitor.adapters import model_fingerprint
    from monitor.drift.baseline import build_baseline, fit_calibration_split
    from monitor.drift.features import feature_matrix
    from monitor.drift.score import AnomalyScorer
    from monitor.drift.stats import Mahalanobis
    from monitor.lenses import LensBank
    from monitor.refmodel import load_reference_model

    modes = [m for m in args.modes.split(",") if m]
    model, tok = load_reference_model()
    fp = model_fingerprint(model)
    cache = Cache(Path(args.cache_dir))
    sets = texts_for_eval(cache, args.n_baseline, args.n_normal, args.n_shift)
    bank = LensBank.load(args.bundle, threads=os.cpu_count() or 1)
    feats: dict[str, dict[str, np.ndarray]] = {name: {} for name in sets}
    results: dict[str, dict[str, dict[str, float]]] = {}

    def evaluate(label: str, scores: dict[str, np.ndarray]) -> None:
        neg = scores["normal"]
        results[label] = {k[6:]: {"auroc": round(auroc(neg, v), 4), "tpr_at_1pct_fpr": round(tpr_at_fpr(neg, v), 4)}
                          for k, v in scores.items() if k.startswith("shift:")}

    for mode in modes:
        readings = {}
        for name, texts in sets.items():
            states, layers = states_for(cache, name, texts, model, tok, fp, args.max_tokens, 16, mode)
            readings[name] = readings_for(cache, states_key(fp, args.max_tokens, texts, mode), states, layers, bank, 16)
        baseline = build_baseline(readings["baseline"], model="SmolLM2-135M-Instruct", model_fingerprint=fp,
                                  bundle_id=bank.bundle_id, source=f"english_prose heldout short ({mode})")
        scorer = AnomalyScorer(baseline)
        evaluate(f"ref {mode}", {n: scorer.score_arrays(a)[0] for n, a in readings.items() if n != "baseline"})
        for name, a in readings.items():
            feats[name][mode] = feature_matrix(a, baseline.tokens)
    combos = [[m] for m in modes] + ([modes] if len(modes) > 1 else [])
    for combo in combos:
        x = {n: np.nan_to_num(np.concatenate([feats[n][m] for m in combo], 1), posinf=50.0, neginf=-50.0)
             for n in sets}
        tag = "+".join(combo)
        for k in (16, 32, 64):
            f = pca_mahalanobis(x["baseline"], k)
            evaluate(f"pca{k} {tag}", {n: f(v) for n, v in x.items() if n != "baseline"})
        for k in (5, 20):
            f = knn_distance(x["baseline"], k)
            evaluate(f"knn{k} {tag}", {n: f(v) for n, v in x.items() if n != "baseline"})

    raw_layers = [int(x) for x in args.raw_layers.split(",") if x]
    for mode in modes if raw_layers else []:
        states = {n: states_for(cache, n, t, model, tok, fp, args.max_tokens, 16, mode)[0] for n, t in sets.items()}
        for layer in raw_layers:
            for k in (16, 64):
                f = pca_mahalanobis(states["baseline"][:, layer].astype(np.float64), k)
                evaluate(f"raw {mode} L{layer} pca{k}",
                         {n: f(v[:, layer].astype(np.float64)) for n, v in states.items() if n != "baseline"})
    prod: dict[str, Any] = {}
    best_labels: dict[str, str] = {}

    def production() -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
        """The production setting, computed once: tap ``last+mean`` readings per set, the raw
        state 21 per set ([n, 2 d]) and the baseline built from all baseline texts."""
        if not prod:
            both, states = {}, {}
            for name, texts in sets.items():
                st, layers = states_for(cache, name, texts, model, tok, fp, args.max_tokens, 16, "last+mean")
                both[name] = readings_for(cache, states_key(fp, args.max_tokens, texts, "last+mean"), st, layers,
                                          bank, 16)
                states[name] = st[:, layers.index(21)].reshape(len(texts), -1).astype(np.float64)
            prod["readings"], prod["states"] = both, states
            prod["baseline"] = build_baseline(both["baseline"], model="SmolLM2-135M-Instruct", model_fingerprint=fp,
                                              bundle_id=bank.bundle_id, source="english_prose heldout short")
        return prod["readings"], prod["states"], prod["baseline"]

    def mean_of(label: str, runs: list[dict[str, dict[str, float]]]) -> None:
        results[label] = {k: {m: round(float(np.mean([r[k][m] for r in runs])), 4) for m in ("auroc", "tpr_at_1pct_fpr")}
                          for k in runs[0]}

    def evaluated(label: str, scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        evaluate(label, scores)
        return results.pop(label)

    sizes = [int(x) for x in args.sizes.split(",") if x]
    if sizes:
        both, _, _ = production()
        for size in sizes:
            runs = []
            for seed in range(3):
                idx = np.sort(np.random.default_rng(seed).permutation(both["baseline"].n)[:size])
                bl = build_baseline(both["baseline"].subset(idx), model="SmolLM2-135M-Instruct", model_fingerprint=fp,
                                    bundle_id=bank.bundle_id, source=f"english_prose heldout short ({size})")
                sc = AnomalyScorer(bl)
                runs.append(evaluated("size", {n: sc.score_arrays(a)[0] for n, a in both.items() if n != "baseline"}))
            mean_of(f"ref last+mean n={size}", runs)

    factors = [int(x) for x in args.factors.split(",") if x]
    mixture = [int(x) for x in args.mixture.split(",") if x]
    if factors or mixture:
        both, _, bl = production()
        fit_idx, cal_idx = fit_calibration_split(both["baseline"].n)
        x_fit = feature_matrix(both["baseline"].subset(fit_idx), bl.tokens, leave_one_out=True)
        x_cal = feature_matrix(both["baseline"].subset(cal_idx), bl.tokens)
        x = {n: feature_matrix(a, bl.tokens) for n, a in both.items() if n != "baseline"}
        for k in factors:
            det = Mahalanobis.fit(x_fit, components=k, clip=bl.detector.clip)
            label = f"factor{k} (ll {heldout_log_likelihood(det, x_cal):.0f})"
            evaluate(label, {n: det.distance2(v) for n, v in x.items()})
        for k in mixture:
            runs = []
            for seed in range(3):
                f = factor_mixture(x_fit, k, seed, bl.detector.components, bl.detector.clip)
                runs.append(evaluated("mix", {n: f(v) for n, v in x.items()}))
                results[f"mixture k={k} seed{seed}"] = runs[-1]
            mean_of(f"mixture k={k} mean", runs)

    if args.concepts:
        both, _, bl = production()
        fit_idx, _ = fit_calibration_split(both["baseline"].n)
        fit = both["baseline"].subset(fit_idx)
        conc = {n: concept_scores(fit, a) for n, a in both.items()}
        labels = list(conc["normal"])
        per_label = {c: evaluated(c, {n: v[c] for n, v in conc.items() if n != "baseline"}) for c in labels}
        kinds_ = list(per_label[labels[0]])
        results["best single label (oracle)"] = {
            k: max((per_label[c][k] for c in labels), key=lambda r: (r["tpr_at_1pct_fpr"], r["auroc"])) for k in kinds_}
        best_labels.update({
            k: max(labels, key=lambda c: (per_label[c][k]["tpr_at_1pct_fpr"], per_label[c][k]["auroc"]))
            for k in kinds_})
        scorer = AnomalyScorer(bl)
        ref = {n: scorer.score_arrays(a)[0] for n, a in both.items()}
        # normalise each score on the fit split, combine by max; the max is then ranked like any score
        norm = {c: tail_normaliser(conc["baseline"][c][fit_idx]) for c in labels}
        norm_ref = tail_normaliser(ref["baseline"][fit_idx])
        evaluate("max(ref, all labels)", {
            n: np.max(np.stack([norm_ref(ref[n])] + [norm[c](conc[n][c]) for c in labels]), 0)
            for n in both if n != "baseline"})

    if args.ceiling:
        both, states, bl = production()
        x = {n: np.nan_to_num(feature_matrix(a, bl.tokens), posinf=50.0, neginf=-50.0) for n, a in both.items()}
        for label, data in (("ceiling features", x), ("ceiling raw L21", states)):
            per_kind = {}
            for name in [n for n in sets if n.startswith("shift:")]:
                logit = supervised_ceiling(data["normal"], data[name])
                neg, pos = logit[:len(data["normal"])], logit[len(data["normal"]):]
                per_kind[name[6:]] = {"auroc": round(auroc(neg, pos), 4), "tpr_at_1pct_fpr": round(tpr_at_fpr(neg, pos), 4)}
            results[label] = per_kind

    kinds = list(next(iter(results.values())))
    print(f"{'scorer':22s} " + " ".join(f"{k:>14s}" for k in kinds) + "  mean AUROC / TPR  (AUROC/TPR@1%FPR)")
    for label, r in results.items():
        cells = " ".join(f"{r[k]['auroc']:.3f}/{r[k]['tpr_at_1pct_fpr']:.2f}".rjust(14) for k in kinds)
        print(f"{label:22s} {cells}  {np.mean([r[k]['auroc'] for k in kinds]):.3f}"
              f" / {np.mean([r[k]['tpr_at_1pct_fpr'] for k in kinds]):.3f}")
    if best_labels:
        print("best single label per kind: " + ", ".join(f"{k} {c}" for k, c in best_labels.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"bundle_id": bank.bundle_id, "settings": vars(args), "results": results,
                                          "best_single_label": best_labels},
                                         indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
