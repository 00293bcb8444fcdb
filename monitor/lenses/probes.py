"""Linear concept probes per layer, with the baselines that say what a layer adds.

A probe set is a labelled JSONL file (``{"text": ..., "label": ...}`` per line). Each text is run
through the model once; the probe reads the residual state at the *last* token, the position the
tap samples by default, at every state 0..N. Per layer a multinomial logistic regression (L2,
full-batch L-BFGS, features standardised, regularisation chosen on a validation slice of the
training texts) is fitted; its standardisation is folded into the exported weights.

Held-out accuracy per layer is reported beside:

- a **bag-of-tokens** baseline: the same classifier on token counts of the same (truncated) text,
  i.e. what the words alone give;
- a **control task** (Hewitt & Liang 2019): every token type gets a random label (drawn from the
  label distribution), a text gets the control label of its last token, and a probe with the same
  capacity is fitted on the same states. High control accuracy means the probe can memorise token
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

from monitor.adapters import ModelParts, collect_states
from monitor.lenses.model import ProbeSet
from monitor.lenses.probe_data import (  # noqa: F401 - re-exported: the probe data API lived here
    LabelledTexts,
    ProbeDataError,
    check_probe_set,
    read_labelled_jsonl,
    write_probe_jsonl,
)

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def last_token_states(
    model: nn.Module,
    parts: ModelParts,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = 64,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[list[int]]]:
    """States [n, N+1, d] (float32) at the last token of each text (cut to ``max_tokens``) and
    the token ids read. Texts are batched by length with right padding (causal models do not
    look at the padding when reading the last real token)."""
    ids = [tokenizer(t, add_special_tokens=False).input_ids[:max_tokens] or [0] for t in texts]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(texts), parts.n_states, parts.hidden_size), np.float32)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        batch = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            batch[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        states = collect_states(model, parts, batch, mask)  # [S, b, T, d]
        last = torch.tensor([len(ids[i]) - 1 for i in idx])
        sel = states[:, torch.arange(len(idx)), last]  # [S, b, d]
        out[idx] = sel.permute(1, 0, 2).float().numpy()
        if progress is not None:
            progress(len(idx))
    return out, ids


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
    train_x: np.ndarray, train_y: np.ndarray, n_classes: int, *, seed: int = 0, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Fit one probe per layer on states [n, S, d]; returns weights on *raw* states
    (standardisation folded in) [S, d, C], biases [S, C] and the chosen L2 per layer."""
    x = torch.from_numpy(np.ascontiguousarray(train_x.transpose(1, 0, 2))).float()  # [S, n, d]
    y = torch.from_numpy(train_y).long()
    xs, mu, sd = _standardise(x)
    n = x.shape[1]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = max(1, n // 5)
    val, fit = torch.from_numpy(perm[:n_val]), torch.from_numpy(perm[n_val:])
    best = np.full(x.shape[0], -1.0)
    chosen = np.full(x.shape[0], L2_GRID[-1])
    prev = None
    for lam in reversed(L2_GRID):  # strongest regularisation first, each fit warm-starts the next
        w, b = fit_logistic(xs[:, fit], y[fit], n_classes, lam, max_iter=max_iter, init=prev)
        prev = (w, b)
        acc = _accuracy(xs[:, val], w, b, y[val])
        better = acc > best + 1e-9
        best[better], chosen[better] = acc[better], lam
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


def train_probe_set(
    name: str,
    train: LabelledTexts,
    heldout: LabelledTexts,
    model: nn.Module,
    parts: ModelParts,
    tokenizer: Any,
    *,
    max_tokens: int = 64,
    batch_size: int = 16,
    max_iter: int = 100,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ProbeSet:
    """Fit a probe per layer and measure it on held-out texts beside its baselines."""
    check_probe_set(name, train, heldout)
    labels = tuple(sorted(set(train.labels)))
    index = {lab: i for i, lab in enumerate(labels)}
    ytr = np.array([index[x] for x in train.labels], np.int64)
    yte = np.array([index[x] for x in heldout.labels], np.int64)
    xtr, ids_tr = last_token_states(model, parts, tokenizer, train.texts, max_tokens=max_tokens,
                                    batch_size=batch_size, progress=progress)
    xte, ids_te = last_token_states(model, parts, tokenizer, heldout.texts, max_tokens=max_tokens,
                                    batch_size=batch_size, progress=progress)
    w, b, l2 = fit_probe_layers(xtr, ytr, len(labels), seed=seed, max_iter=max_iter)
    acc = probe_accuracy(xte, yte, w, b)
    dist = np.bincount(ytr, minlength=len(labels)) / len(ytr)
    ctr_tr = control_labels([x[-1] for x in ids_tr + ids_te], dist, seed)  # one assignment for all types
    ctr_te, ctr_tr = ctr_tr[len(ids_tr) :], ctr_tr[: len(ids_tr)]
    cw, cb, _ = fit_probe_layers(xtr, ctr_tr, len(labels), seed=seed, max_iter=max_iter)
    ctrl = probe_accuracy(xte, ctr_te, cw, cb)
    bot = bag_of_tokens_accuracy(ids_tr, ytr, ids_te, yte, len(labels), max_iter=max_iter)
    majority = float(np.mean(yte == np.bincount(ytr).argmax()))
    layers = tuple(range(parts.n_states))
    metrics = {
        "provenance": train.provenance,
        "n_train": len(ytr),
        "n_heldout": len(yte),
        "label_counts_train": dict(Counter(train.labels)),
        "position": "last token",
        "max_tokens": max_tokens,
        "heldout_accuracy": [round(float(a), 4) for a in acc],
        "control_accuracy": [round(float(a), 4) for a in ctrl],
        "selectivity": [round(float(a - c), 4) for a, c in zip(acc, ctrl, strict=True)],
        "bag_of_tokens_accuracy": round(bot, 4),
        # the control labels' own majority rate: texts often end in the same few token types
        "control_majority_accuracy": round(float(np.mean(ctr_te == np.bincount(ctr_tr).argmax())), 4),
        "majority_accuracy": round(majority, 4),
        "l2": [float(x) for x in l2],
        "best_layer": int(np.argmax(acc)),
    }
    return ProbeSet(name, labels, layers, w, b, metrics)


def format_probe_table(probe: ProbeSet) -> str:
    """A text table of a probe set's held-out metrics per layer."""
    m = probe.metrics
    lines = [
        f"probe {probe.name}: {len(probe.labels)} labels {list(probe.labels)}; train {m['n_train']}, "
        f"held-out {m['n_heldout']}; bag-of-tokens {m['bag_of_tokens_accuracy']:.3f}, "
        f"majority {m['majority_accuracy']:.3f}",
        f"{'layer':>5} {'accuracy':>9} {'control':>8} {'selectivity':>11}",
    ]
    for i, layer in enumerate(probe.layers):
        lines.append(f"{layer:>5} {m['heldout_accuracy'][i]:>9.3f} {m['control_accuracy'][i]:>8.3f} "
                     f"{m['selectivity'][i]:>11.3f}")
    return "\n".join(lines)


def builtin_probe_sets() -> tuple[str, ...]:
    """Names of the probe sets shipped through :mod:`monitor.corpora`."""
    return ("language", "topic")


def builtin_probe_texts(name: str, split: str, per_label: int) -> LabelledTexts:
    """A shipped probe set from :func:`monitor.corpora.labelled`, with its provenance."""
    from monitor import corpora

    pairs = corpora.labelled(name, split, per_label=per_label)
    srcs = sorted({s.name for s in corpora.SOURCES.values() if name in s.used_for})
    prov = f"monitor.corpora.labelled({name!r}, {split!r}); sources: {', '.join(srcs)} (see docs/corpora.md)"
    return LabelledTexts([t for t, _ in pairs], [lab for _, lab in pairs], prov)
