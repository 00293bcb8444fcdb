"""Prompt-window states of a batch of samples, ragged (each sample has its own window count).

What the local anomaly score (:mod:`monitor.drift.local`) reads: the tap's window means
(:mod:`monitor.windows`) of the layers the score uses, with each window's ``[start, end)`` token
offsets. A sample from a tap that captured no windows is *absent* (``prompt_tokens`` -1); a
sample whose prompt was too short for a window has zero windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ABSENT = -1  # prompt_tokens of a sample captured without windows


@dataclass(frozen=True)
class WindowStates:
    """Window means of ``n`` samples: sample ``i`` owns rows ``offsets[i]:offsets[i+1]``."""

    layers: tuple[int, ...]
    means: np.ndarray  # [total windows, L, d] (float16 as shipped, or float32)
    bounds: np.ndarray  # [total windows, 2] int64 token offsets [start, end)
    offsets: np.ndarray  # [n + 1] int64
    prompt_tokens: np.ndarray  # [n] int64, ABSENT where the sample carries no windows

    @property
    def n(self) -> int:
        return int(len(self.prompt_tokens))

    def present(self) -> np.ndarray:
        """[n] bool: the sample's tap captured windows (possibly zero of them)."""
        return np.asarray(self.prompt_tokens != ABSENT)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i``'s means ``[W, L, d]`` and bounds ``[W, 2]``."""
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.means[s:e], self.bounds[s:e]

    def subset(self, idx: Sequence[int] | np.ndarray | slice) -> WindowStates:
        """The samples ``idx`` (in that order)."""
        sel = np.arange(self.n)[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        rows = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in sel]
        r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        counts = np.array([len(x) for x in rows], dtype=np.int64)
        return WindowStates(self.layers, self.means[r], self.bounds[r],
                            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), self.prompt_tokens[sel])

    @classmethod
    def build(cls, layers: Sequence[int], parts: Sequence[tuple[np.ndarray, np.ndarray, int] | None],
              hidden_size: int, dtype: Any = np.float16) -> WindowStates:
        """From per-sample ``(means [W, L, d], bounds [W, 2], prompt_tokens)`` (None: absent)."""
        means = [p[0] for p in parts if p is not None and len(p[1])]
        bounds = [p[1] for p in parts if p is not None and len(p[1])]
        counts = np.array([0 if p is None else len(p[1]) for p in parts], dtype=np.int64)
        return cls(
            tuple(layers),
            np.concatenate(means).astype(dtype, copy=False) if means
            else np.zeros((0, len(layers), hidden_size), dtype=dtype),
            np.concatenate(bounds).astype(np.int64) if bounds else np.zeros((0, 2), dtype=np.int64),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            np.array([ABSENT if p is None else int(p[2]) for p in parts], dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: Sequence[WindowStates]) -> WindowStates:
        """Stack batches of the same layers."""
        first = parts[0]
        if any(p.layers != first.layers for p in parts):
            raise ValueError("window states of different layers cannot be stacked")
        counts = np.concatenate([np.diff(p.offsets) for p in parts])
        return cls(first.layers, np.concatenate([p.means for p in parts]),
                   np.concatenate([p.bounds for p in parts]),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.concatenate([p.prompt_tokens for p in parts]))


def window_states_of(samples: Sequence[Any], layers: Sequence[int]) -> WindowStates | None:
    """The window means of ``layers`` of decoded samples (:class:`monitor.wire.Sample`); None when
    no sample carries windows. A sample lacking one of ``layers`` counts as absent."""
    if not any(getattr(s, "windows", None) is not None for s in samples):
        return None
    parts: list[tuple[np.ndarray, np.ndarray, int] | None] = []
    d = 0
    for s in samples:
        w = s.windows
        pos = {layer: i for i, layer in enumerate(s.layers)}
        if w is None or any(layer not in pos for layer in layers):
            parts.append(None)
            continue
        d = int(w.shape[2])
        means = np.moveaxis(w[[pos[layer] for layer in layers]], 1, 0)  # [W, L, d]
        parts.append((means, np.asarray(s.window_bounds), int(s.prompt_tokens)))
    return WindowStates.build(layers, parts, d)
