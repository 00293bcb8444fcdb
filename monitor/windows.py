"""Prompt windows: where the tap pools a sampled prompt so a short segment anywhere in it shows.

The prompt mean dilutes a short foreign segment and the last token sees only the tail (issue
19). Between the two, the tap ships the means of contiguous *windows* of the prompt's tokens at
every captured layer: at most ``max_windows`` of them whatever the prompt's length, so the bytes
on the wire are bounded (``max_windows x layers x d x 2`` bytes in float16: 64 x 31 x 576 x 2 =
2.3 MB for SmolLM2-135M at the defaults, for any prompt length).

The windows cover prompt positions ``1 .. n-1``: position 0 is the attention sink (its state is
an outlier of a much larger norm at every layer, the same for every prompt) and would only add
noise to the first window. Windows are as equal in length as integer bounds allow and at least
``min_tokens`` long (fewer windows for a short prompt); the sidecar can merge neighbours (the
mean of two adjacent windows is their length-weighted mean) to scan at coarser scales, so the
tap ships the finest scale the budget allows. A prompt of one token (or none) has no windows.

Both tap front ends (Hugging Face hooks and the vLLM plugin) and the evaluation code pool with
these functions, so a window means the same thing everywhere.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_WINDOWS = 64
DEFAULT_MIN_TOKENS = 4
FIRST_POSITION = 1  # position 0 (the attention sink) is in no window


def window_bounds(n_tokens: int, max_windows: int = DEFAULT_MAX_WINDOWS,
                  min_tokens: int = DEFAULT_MIN_TOKENS) -> np.ndarray:
    """``[W, 2]`` int64 ``[start, end)`` offsets into the prompt's own tokens (``W`` may be 0).

    ``W = min(max_windows, max(1, (n - 1) // min_tokens))`` windows over positions ``1..n-1``,
    with bounds ``1 + floor(i (n - 1) / W)``: lengths differ by at most one token.
    """
    if max_windows < 1 or min_tokens < 1:
        raise ValueError(f"max_windows and min_tokens must be >= 1 (got {max_windows}, {min_tokens})")
    m = int(n_tokens) - FIRST_POSITION
    if m < 1:
        return np.zeros((0, 2), dtype=np.int64)
    w = min(max_windows, max(1, m // min_tokens))
    edges = FIRST_POSITION + (np.arange(w + 1, dtype=np.int64) * m) // w
    return np.stack([edges[:-1], edges[1:]], axis=1)


def window_weights(bounds: np.ndarray, n_tokens: int) -> np.ndarray:
    """``[W, n_tokens]`` float32 averaging matrix: row ``i`` is ``1/len`` over window ``i``."""
    out = np.zeros((len(bounds), int(n_tokens)), dtype=np.float32)
    for i, (s, e) in enumerate(np.asarray(bounds, dtype=np.int64)):
        out[i, s:e] = 1.0 / float(e - s)
    return out


def pool_windows(states: np.ndarray, bounds: np.ndarray, axis: int = 0) -> np.ndarray:
    """Window means of ``states`` along ``axis`` (the token axis), in float32.

    ``states [T, ...]`` (``axis=0``) gives ``[W, ...]``. The reference the tap's capture is
    tested against: a cumulative sum in float64, so long windows lose no precision.
    """
    x = np.moveaxis(np.asarray(states), axis, 0).astype(np.float64)
    b = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    if len(b) == 0:
        return np.moveaxis(np.zeros((0,) + x.shape[1:], dtype=np.float32), 0, axis)
    if b.min() < 0 or b[:, 1].max() > x.shape[0] or np.any(b[:, 1] <= b[:, 0]):
        raise ValueError(f"window bounds {b.tolist()} do not fit {x.shape[0]} tokens")
    cs = np.concatenate([np.zeros((1,) + x.shape[1:]), np.cumsum(x, axis=0)], axis=0)
    lens = (b[:, 1] - b[:, 0]).astype(np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    out = ((cs[b[:, 1]] - cs[b[:, 0]]) / lens).astype(np.float32)
    return np.moveaxis(out, 0, axis)


def merge_adjacent(means: np.ndarray, bounds: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """Means and bounds of every run of ``span`` adjacent windows (a coarser scan scale).

    ``means [W, ...]`` -> ``[W - span + 1, ...]``; exact (length-weighted), so the sidecar scans
    several scales from the one the tap shipped.
    """
    b = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    w = len(b)
    if span < 1 or span > w:
        return np.zeros((0,) + np.asarray(means).shape[1:], dtype=np.float32), np.zeros((0, 2), dtype=np.int64)
    lens = (b[:, 1] - b[:, 0]).astype(np.float64)
    weighted = np.asarray(means, dtype=np.float64) * lens.reshape((-1,) + (1,) * (np.ndim(means) - 1))
    cs = np.concatenate([np.zeros((1,) + weighted.shape[1:]), np.cumsum(weighted, axis=0)], axis=0)
    cl = np.concatenate([[0.0], np.cumsum(lens)])
    tot = (cl[span:] - cl[:-span]).reshape((-1,) + (1,) * (np.ndim(means) - 1))
    merged = ((cs[span:] - cs[:-span]) / tot).astype(np.float32)
    return merged, np.stack([b[: w - span + 1, 0], b[span - 1:, 1]], axis=1)
