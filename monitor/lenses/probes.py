"""Linear concept probes per layer, with the baselines that say what a layer adds.

A probe set is a labelled JSONL file (``{"text": ..., "label": ...}`` per line). Each text is run
through the model once (:mod:`monitor.lenses.probe_states`), which gives the states of both
positions the tap ships at every state 0..N: the *last* token and the prompt *mean*. Each
position gets its own probes, trained on states of that position. Per layer a multinomial
logistic regression (L2, full-batch L-BFGS, features standardised, regularisation chosen on a
validation slice of the training texts) is fitted; its standardisation is folded into the
exported weights. A temperature per layer, fitted on calibration texts the probe never fit,
makes its probabilities mean what they say.

Held-out accuracy, expected calibration error (ECE) and the confident-wrong rate (top probability
>= 0.9 and wrong) per layer are reported beside:

- a **bag-of-tokens** baseline: the same classifier on token counts of the same (truncated) text,
  i.e. what the words alone give;
- a **control task** (Hewitt & Liang 2019): every token type gets a random label (drawn from the
  label distribution), a text gets the control label of its last token, and a probe with the same
  capacity (the same L2 per layer) is fitted on the same states of the same position. High control accuracy means the probe can memorise token
  identity; *selectivity* = accuracy - control accuracy is what the layer encodes about the concept
  beyond that;
- the majority-class rate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from monitor.adapters import ModelParts
from monitor.lenses.model import ProbeSet
from monitor.lenses.probe_data import (  # noqa: F401 - re-exported: the probe data API lived here
    LabelledTexts,
    ProbeDataError,
    check_probe_set,
    read_labelled_jsonl,
    write_probe_jsonl,
)
from monitor.lenses.probe_states import PromptStateCache, prompt_states, token_ids

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
ECE_BINS = 15
CONFIDENT = 0.9  # a reading at least this sure of itself that is wrong is "confident-wrong"


def last_token_states(
    model: nn.Module,
    parts: ModelParts,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = 64,
    batch_size: int = 16,
) -> tuple[np.ndarray, list[list[int]]]:
    """States [n, N+1, d] (float32) at the last token of each text (cut to ``max_tokens``) and
    the token ids read."""
    ids = token_ids(tokenizer, texts, max_tokens)
    pad = getattr(tokenizer, "pad_token_id", None)
    last, _ = prompt_states(model, parts, ids, batch_size=batch_size, pad=0 if pad is None else int(pad))
    return last, ids


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float | torch.Tensor, *, max_iter: int = 100,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression per group: ``x`` [G, n, f], ``y`` [n] -> (W [G, f, C], b [G, C]).

    The G independent problems (one per layer) are solved jointly by L-BFGS on the sum of their
    losses (float32 on standardised features); ``l2`` is a scalar or one value per group (on the
    mean loss, weights only); ``init`` warm-starts from a previous solution."""
    g, _, f = x.shape
    w0 = init[0].clone() if init is not None else torch.zeros(g, f, n_classes)
    b0 = init[1].clone() if init is not None else torch.zeros(g, n_classes)
    w = w0.float().requires_grad_(True)
    b = b0.float().requires_grad_(True)
    lam = torch.as_tensor(l2, dtype=torch.float32).reshape(-1, 1, 1).expand(g, 1, 1)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")
    yy = y.repeat(g)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.bmm(x, w) + b[:, None]
        ce = nn.functional.cross_entropy(logits.reshape(-1, n_classes), yy, reduction="none")
        loss = ce.view(g, -1).mean(1).sum() + (lam * w.pow(2)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mu = x.mean(1, keepdim=True)
    sd = x.std(1, keepdim=True).clamp_min(1e-6)
    return (x - mu) / sd, mu, sd


def _accuracy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    pred = (torch.bmm(x, w) + b[:, None]).argmax(-1)  # [G, n]
    return (pred == y[None]).float().mean(1).numpy()


def fit_probe_layers(
    train_x: np.ndarray, train_y: np.ndarray, n_classes: int, *, seed: int = 0, max_iter: int = 100,
    l2: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Fit one probe per layer on states [n, S, d]; returns weights on *raw* states
    (standardisation folded in) [S, d, C], biases [S, C] and the chosen L2 per layer. A given
    ``l2`` per layer is used as is (the control task gets its probe's)."""
    x = torch.from_numpy(np.ascontiguousarray(train_x.transpose(1, 0, 2))).float()  # [S, n, d]
    y = torch.from_numpy(train_y).long()
    xs, mu, sd = _standardise(x)
    prev = None
    if l2 is None:
        n = x.shape[1]
        perm = np.random.default_rng(seed).permutation(n)
        n_val = max(1, n // 5)
        val, fit = torch.from_numpy(perm[:n_val]), torch.from_numpy(perm[n_val:])
        best = np.full(x.shape[0], -1.0)
        l2 = np.full(x.shape[0], L2_GRID[-1])
        for lam in reversed(L2_GRID):  # strongest regularisation first, each fit warm-starts the next
            w, b = fit_logistic(xs[:, fit], y[fit], n_classes, lam, max_iter=max_iter, init=prev)
            prev = (w, b)
            acc = _accuracy(xs[:, val], w, b, y[val])
            better = acc > best + 1e-9
            best[better], l2[better] = acc[better], lam
    chosen = np.asarray(l2, dtype=np.float64)
    w, b = fit_logistic(xs, y, n_classes, torch.from_numpy(chosen).float(), max_iter=max_iter, init=prev)
    # fold the standardisation: ((h - mu) / sd) @ w + b = h @ (w / sd) + (b - (mu / sd) @ w)
    w_raw = w / sd.transpose(1, 2)
    b_raw = b - torch.bmm(mu / sd, w).squeeze(1)
    return w_raw, b_raw, chosen


def probe_accuracy(states: np.ndarray, labels: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """Accuracy per layer of raw-state probes on states [n, S, d]."""
    x = torch.from_numpy(np.ascontiguousarray(states.transpose(1, 0, 2))).float()
    return _accuracy(x, weight, bias, torch.from_numpy(labels).long())


def bag_of_tokens_accuracy(
    train_ids: list[list[int]], train_y: np.ndarray, test_ids: list[list[int]], test_y: np.ndarray,
    n_classes: int, max_iter: int = 100,
) -> float:
    """Held-out accuracy of a logistic regression on token counts (the words-alone baseline)."""
    vocab = sorted({t for ids in train_ids for t in ids})
    pos = {t: i for i, t in enumerate(vocab)}

    def counts(seqs: list[list[int]]) -> torch.Tensor:
        m = torch.zeros(len(seqs), len(vocab))
        for r, ids in enumerate(seqs):
            for t in ids:
                if t in pos:
                    m[r, pos[t]] += 1
        return torch.log1p(m)

    xtr, xte = counts(train_ids)[None], counts(test_ids)[None]
    ytr, yte = torch.from_numpy(train_y).long(), torch.from_numpy(test_y).long()
    best_acc, best_lam = -1.0, L2_GRID[0]
    n = xtr.shape[1]
    perm = torch.from_numpy(np.random.default_rng(0).permutation(n))
    val, fit = perm[: max(1, n // 5)], perm[max(1, n // 5) :]
    for lam in L2_GRID:
        w, b = fit_logistic(xtr[:, fit], ytr[fit], n_classes, lam, max_iter=max_iter)
        acc = float(_accuracy(xtr[:, val], w, b, ytr[val])[0])
        if acc > best_acc:
            best_acc, best_lam = acc, lam
    w, b = fit_logistic(xtr, ytr, n_classes, best_lam, max_iter=max_iter)
    return float(_accuracy(xte, w, b, yte)[0])


def control_labels(last_ids: Sequence[int], label_dist: np.ndarray, seed: int = 0) -> np.ndarray:
    """Hewitt & Liang control task: each token type gets a fixed random label drawn from
    ``label_dist``; a text gets the control label of its last token."""
    types = sorted(set(last_ids))
    rng = np.random.default_rng(seed)
    assign = dict(zip(types, rng.choice(len(label_dist), size=len(types), p=label_dist), strict=True))
    return np.array([assign[t] for t in last_ids], dtype=np.int64)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per layer, the temperature T that minimises the calibration texts' negative log-likelihood
    of ``softmax(logits / T)`` (``logits`` [G, n, C]); a grid in log space is exact enough and
    cannot diverge."""
    grid = torch.exp(torch.linspace(np.log(0.05), np.log(20.0), 241))
    nll = torch.stack([nn.functional.cross_entropy((logits / t).permute(0, 2, 1), y[None].expand(logits.shape[0], -1),
                                                   reduction="none").mean(1) for t in grid])  # [T, G]
    return grid[nll.argmin(0)].numpy()


def calibration_errors(probs: np.ndarray, y: np.ndarray, *, bins: int = ECE_BINS,
                       confident: float = CONFIDENT) -> tuple[np.ndarray, np.ndarray]:
    """Expected calibration error (top label, ``bins`` equal-width bins) and the confident-wrong
    rate (top probability >= ``confident`` and wrong, over all texts) per layer of ``probs`` [G, n, C]."""
    top = probs.max(-1)
    wrong = probs.argmax(-1) != y[None]
    edges = np.minimum((top * bins).astype(int), bins - 1)
    ece = np.zeros(probs.shape[0])
    for b in range(bins):
        inb = edges == b
        count = inb.sum(1)
        gap = np.abs(np.where(inb, top - (~wrong), 0.0).sum(1))
        ece += np.where(count > 0, gap, 0.0)
    return ece / probs.shape[1], ((top >= confident) & wrong).mean(1)


def _logits(states: np.ndarray, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(states.transpose(1, 0, 2))).float()  # [S, n, d]
    return torch.bmm(x, w) + b[:, None]


def fit_position(
    states: tuple[np.ndarray, np.ndarray, np.ndarray], labels: tuple[np.ndarray, np.ndarray, np.ndarray],
    control: tuple[np.ndarray, np.ndarray], n_classes: int, *, seed: int = 0, max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Fit, calibrate and measure the probes of one position: ``states``/``labels`` are the
    (training, calibration, held-out) parts; ``control`` the control-task labels of training and
    held-out texts. Returns weights [S, d, C], biases [S, C], temperatures [S] and the per-layer
    held-out numbers (accuracy, control accuracy, selectivity, ECE, confident-wrong rate, L2, T)."""
    (xtr, xcal, xte), (ytr, ycal, yte) = states, labels
    w, b, l2 = fit_probe_layers(xtr, ytr, n_classes, seed=seed, max_iter=max_iter)
    temp = fit_temperature(_logits(xcal, w, b), torch.from_numpy(ycal).long())
    z = _logits(xte, w, b) / torch.from_numpy(temp).float()[:, None, None]
    probs = torch.softmax(z, -1).numpy()
    acc = (probs.argmax(-1) == yte[None]).mean(1)
    ece, cw = calibration_errors(probs, yte)
    cw_, cb_, _ = fit_probe_layers(xtr, control[0], n_classes, max_iter=max_iter, l2=l2)  # the same capacity
    ctrl = probe_accuracy(xte, control[1], cw_, cb_)
    metrics = {
        "heldout_accuracy": _r(acc), "control_accuracy": _r(ctrl), "selectivity": _r(acc - ctrl),
        "ece": _r(ece), "confident_wrong": _r(cw), "temperature": _r(temp), "l2": [float(x) for x in l2],
        "best_layer": int(np.argmax(acc)),
    }
    return w, b, torch.from_numpy(temp).float(), metrics


def _r(values: Any) -> list[float]:
    return [round(float(v), 4) for v in values]


def split_calibration(train: LabelledTexts, share: float = 0.2, seed: int = 0) -> tuple[LabelledTexts, LabelledTexts]:
    """A seeded ``share`` of the training texts set apart for calibration (when no calibration
    file is given): the probes never fit them."""
    perm = np.random.default_rng(seed).permutation(len(train.texts))
    cut = max(1, int(len(perm) * share))
    parts = []
    for idx in (sorted(perm[cut:]), sorted(perm[:cut])):
        parts.append(LabelledTexts([train.texts[i] for i in idx], [train.labels[i] for i in idx], train.provenance,
                                   [train.line_of(i) for i in idx]))
    return parts[0], parts[1]


def train_probe_set(
    name: str,
    train: LabelledTexts,
    heldout: LabelledTexts,
    model: nn.Module,
    parts: ModelParts,
    tokenizer: Any,
    *,
    calibration: LabelledTexts | None = None,
    cache: PromptStateCache | None = None,
    max_tokens: int = 96,
    batch_size: int = 16,
    max_iter: int = 60,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ProbeSet:
    """Fit a probe per layer for each position the tap ships (last token, prompt mean), each on
    states of that position: L2 chosen per layer on a validation slice of the training texts,
    a temperature per layer fitted on the calibration texts (default: 20% of the training texts,
    set apart), measured on the held-out texts beside the bag-of-tokens baseline and the control
    task. The returned probe reads the last token; its ``mean`` reads the prompt mean."""
    check_probe_set(name, train, heldout)
    if calibration is None:
        train, calibration = split_calibration(train, seed=seed)
    check_probe_set(name, train, calibration)
    labels = tuple(sorted(set(train.labels)))
    index = {lab: i for i, lab in enumerate(labels)}
    ys = tuple(np.array([index[x] for x in t.labels], np.int64) for t in (train, calibration, heldout))
    cache = PromptStateCache(None, "in-memory", max_tokens) if cache is None else cache
    texts = [train.texts, calibration.texts, heldout.texts]
    cache.fill(model, parts, tokenizer, [t for part in texts for t in part], batch_size=batch_size, progress=progress)
    got = [cache.states(tokenizer, part) for part in texts]
    ids_tr, ids_te = got[0].ids, got[2].ids
    dist = np.bincount(ys[0], minlength=len(labels)) / len(ys[0])
    ctr = control_labels([x[-1] for x in ids_tr + ids_te], dist, seed)  # one assignment for all types
    control = (ctr[: len(ids_tr)], ctr[len(ids_tr) :])
    fits = {pos: fit_position(tuple(g.position(pos) for g in got), ys, control, len(labels), seed=seed,  # type: ignore[arg-type]
                              max_iter=max_iter) for pos in ("last", "mean")}
    bot = bag_of_tokens_accuracy(ids_tr, ys[0], ids_te, ys[2], len(labels), max_iter=max_iter)
    majority = float(np.mean(ys[2] == np.bincount(ys[0]).argmax()))
    common = {
        "provenance": train.provenance,
        "calibration_provenance": calibration.provenance,
        "n_train": len(ys[0]), "n_calibration": len(ys[1]), "n_heldout": len(ys[2]),
        "label_counts_train": dict(Counter(train.labels)),
        "max_tokens": max_tokens,
        "bag_of_tokens_accuracy": round(bot, 4),
        # the control labels' own majority rate: texts often end in the same few token types
        "control_majority_accuracy": round(float(np.mean(control[1] == np.bincount(control[0]).argmax())), 4),
        "majority_accuracy": round(majority, 4),
    }
    layers = tuple(range(parts.n_states))
    w, b, t, last_metrics = fits["last"]
    mw, mb, mt, mean_metrics = fits["mean"]
    mean_metrics = {"position": "prompt mean", **mean_metrics}
    metrics = {**common, "position": "last token", **last_metrics, "positions": {"mean": mean_metrics}}
    mean = ProbeSet(name, labels, layers, mw, mb, mean_metrics, mt)
    return ProbeSet(name, labels, layers, w, b, metrics, t, mean)


def format_probe_table(probe: ProbeSet) -> str:
    """A text table of a probe set's held-out metrics per layer, both positions."""
    m = probe.metrics
    mean = m.get("positions", {}).get("mean")
    lines = [
        f"probe {probe.name}: {len(probe.labels)} labels {list(probe.labels)}; train {m['n_train']}, "
        f"calibration {m.get('n_calibration', '-')}, held-out {m['n_heldout']}; bag-of-tokens "
        f"{m['bag_of_tokens_accuracy']:.3f}, majority {m['majority_accuracy']:.3f}",
        f"{'':>5} {'last token':^34} {'prompt mean':^34}" if mean else "",
        f"{'layer':>5} " + " ".join([f"{'acc':>6} {'ctrl':>6} {'sel':>6} {'ECE':>6} {'cw':>6}"] * (2 if mean else 1)),
    ]
    for i, layer in enumerate(probe.layers):
        cells = [f"{layer:>5}"]
        for pos in (m, mean) if mean else (m,):
            cells.append(" ".join(f"{pos[k][i]:>6.3f}" if k in pos else f"{'-':>6}" for k in
                                  ("heldout_accuracy", "control_accuracy", "selectivity", "ece", "confident_wrong")))
        lines.append(" ".join(cells))
    return "\n".join(line for line in lines if line)


def builtin_probe_sets() -> tuple[str, ...]:
    """Names of the probe sets shipped through :mod:`monitor.corpora`."""
    return ("language", "topic")


def builtin_probe_texts(name: str, split: str, per_label: int) -> LabelledTexts:
    """A shipped probe set's prompts (:func:`monitor.corpora.prompts.probe_prompts`, served
    lengths) for ``split``: ``"train"``, ``"calibration"`` (the corpora's ``heldout`` split) or
    ``"heldout"`` (the corpora's ``test`` split), with its provenance."""
    from monitor import corpora
    from monitor.corpora.prompts import probe_prompts

    source = {"train": "train", "calibration": "heldout", "heldout": "test"}[split]
    pairs = probe_prompts(name, source, per_label)
    srcs = sorted({s.name for s in corpora.SOURCES.values()
                   if name in s.used_for and not s.used_for.startswith("narrative benchmark")})
    prov = f"monitor.corpora.prompts.probe_prompts({name!r}, {source!r}); sources: {', '.join(srcs)} (see docs/corpora.md)"
    return LabelledTexts([t for t, _ in pairs], [lab for _, lab in pairs], prov)
