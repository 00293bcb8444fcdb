"""Synthetic lens readings for tests and examples: cheap, seeded, with a known structure.

Layers 0..L-1; the last one is state N (KL 0, rank 0). A latent per-sample factor drives entropy
across layers (so features are correlated, as in real models); a "topic" probe with three labels
mostly reads 'prose'. ``shift`` moves entropy at ``shift_layers``; ``code`` pushes the probe
toward 'code' at ``shift_layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monitor.lenses.readings import Readings

LABELS = ("prose", "news", "code")


def synth(n: int, *, n_layers: int = 12, seed: int = 0, shift: float = 0.0, code: float = 0.0,
          shift_layers: Sequence[int] = (4, 5, 6, 7)) -> Readings:
    """``n`` samples of synthetic readings."""
    rng = np.random.default_rng(seed)
    lay = tuple(range(n_layers))
    latent = rng.normal(size=(n, 1))
    ent = 3.0 + 0.5 * latent + 0.3 * rng.normal(size=(n, n_layers))
    kl = np.abs(np.linspace(5, 0, n_layers) + 0.5 * rng.normal(size=(n, n_layers)))
    kl[:, -1] = 0.0
    conf = np.clip(0.3 + 0.1 * rng.normal(size=(n, n_layers)), 0.01, 1.0)
    rank = (np.linspace(40, 0, n_layers) * rng.random((n, n_layers))).astype(np.int64)
    rank[:, -1] = 0
    logits = rng.normal(size=(n, n_layers, 3))
    logits[:, :, 0] += 2.5
    sl = list(shift_layers)
    ent[:, sl] += shift
    logits[:, sl, 2] += code
    probs = np.exp(logits)
    probs /= probs.sum(axis=2, keepdims=True)
    # lens top-1 ids: a handful of common tokens per layer; ``code`` draws from other ids
    top1 = rng.integers(0, 20, size=(n, n_layers)) + 100 * np.arange(n_layers)
    if code:
        top1[:, sl] += 5000
    return Readings.from_columns(
        lay, entropy=ent, kl_to_final=kl, confidence=conf, final_top1_rank=rank, final_entropy=ent[:, -1].copy(),
        final_confidence=conf[:, -1].copy(), probes={"topic": probs}, probe_labels={"topic": LABELS},
        top1=top1, final_top1=top1[:, -1].copy(),
    )
