"""Synthetic lens readings for tests and examples: cheap, seeded, with a known structure.

Layers 0..L-1; the last one is state N (KL 0, rank 0). A latent per-sample factor drives entropy
across layers (so features are correlated, as in real models); a "topic" probe with three labels
mostly reads 'prose'. ``shift`` moves entropy at ``shift_layers``; ``code`` pushes the probe
toward 'code' at ``shift_layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monitor.drift.prompt_windows import WindowStates
from monitor.lenses.readings import Readings
from monitor.windows import window_bounds

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


def synth_windows(n: int, *, layers: Sequence[int] = (0, 4, 8, 11), d: int = 24, seed: int = 0,
                  lengths: Sequence[int] = (20, 64, 200, 900), segment: tuple[float, float] | None = None,
                  shift: float = 0.0) -> WindowStates:
    """Prompt windows of ``n`` synthetic prompts (lengths cycling through ``lengths``).

    A window mean is a fixed per-layer mean plus low-rank structure plus noise whose size falls
    with the window's length (a mean over more tokens), and the first window is offset (the
    attention sink's neighbour), as in real models. ``segment=(where, fraction)`` with ``shift``
    moves the windows of that part of the prompt along one direction unseen in normal windows.
    """
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(12345)  # the "model": the same for every seed
    n_l = len(layers)
    mean = base.normal(size=(n_l, d))
    mix = base.normal(size=(n_l, d, 4)) / 2
    first_offset = base.normal(size=(n_l, d))
    direction = np.zeros(d)
    direction[-1] = 1.0  # normal windows barely vary along the last axis
    parts: list[tuple[np.ndarray, np.ndarray, int] | None] = []
    for i in range(n):
        t = int(lengths[i % len(lengths)])
        b = window_bounds(t)
        lens = (b[:, 1] - b[:, 0]).astype(np.float64)
        z = rng.normal(size=(len(b), n_l, 4))
        noise = rng.normal(size=(len(b), n_l, d)) / np.sqrt(lens)[:, None, None]
        noise[..., -1] *= 0.05
        means = mean + np.einsum("lda,wla->wld", mix, z) * 0.5 + noise
        means[0] += first_offset
        if segment is not None:
            lo = int(segment[0] * (t - 1)) + 1
            hi = lo + max(8, int(segment[1] * t))
            inside = np.clip(np.minimum(b[:, 1], hi) - np.maximum(b[:, 0], lo), 0, None) / lens  # share of each window
            means += shift * inside[:, None, None] * direction
        parts.append((means.astype(np.float32), b, t))
    return WindowStates.build(tuple(layers), parts, d, dtype=np.float32)
