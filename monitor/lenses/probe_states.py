"""The states the concept probes read, per prompt: last token and prompt mean, every layer, cached.

The tap ships two positions per sampled prompt (``positions="last+mean"``): the residual state at
the last real token and the mean over the prompt's real tokens. A probe is trained, calibrated and
measured on states of the position it reads, so one forward pass per prompt yields both.

Forward passes are what probe training costs (~2-5 prompts/s for the reference model on two
busy CPU cores), so :class:`PromptStateCache` keeps them on disk as float16 (what the tap ships),
keyed by the model's fingerprint, the token cap and the text: a rebuild, a second probe over the
same texts or the narrative benchmark never runs the model twice on one prompt. Shards are
written atomically as they fill, so an interrupted build resumes.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monitor.adapters import ModelParts, collect_states

SHARD_ROWS = 128


@dataclass
class PromptStates:
    """States of ``n`` prompts: ``last`` and ``mean`` float16 [n, S, d]; ``ids`` the tokens read."""

    last: np.ndarray
    mean: np.ndarray
    ids: list[list[int]]

    def position(self, name: str) -> np.ndarray:
        """The states of position ``"last"`` or ``"mean"``."""
        if name not in ("last", "mean"):
            raise ValueError(f"position must be 'last' or 'mean', got {name!r}")
        return self.last if name == "last" else self.mean


def token_ids(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text's token ids (no special tokens), cut to ``max_tokens`` (an empty text reads token 0)."""
    return [tokenizer(t, add_special_tokens=False).input_ids[:max_tokens] or [0] for t in texts]


@torch.no_grad()
def prompt_states(
    model: nn.Module, parts: ModelParts, ids: Sequence[Sequence[int]], *, batch_size: int = 16, pad: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Last-token and prompt-mean states [n, S, d] (float32) of token sequences ``ids``, batched
    by length with right padding (causal models do not look at the padding)."""
    n = len(ids)
    # the blocks' states need no LM head: the backbone alone saves its logits (~20% of the cost)
    backbone = getattr(model, "base_model", model)
    last = np.zeros((n, parts.n_states, parts.hidden_size), np.float32)
    mean = np.zeros_like(last)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        batch = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            batch[r, : len(ids[i])] = torch.tensor(list(ids[i]))
            mask[r, : len(ids[i])] = 1
        states = collect_states(backbone, parts, batch, mask).float()  # [S, b, T, d]
        lengths = mask.sum(1)
        last[idx] = states[:, torch.arange(len(idx)), lengths - 1].permute(1, 0, 2).numpy()
        m = (states * mask[None, :, :, None]).sum(2) / lengths[None, :, None]  # [S, b, d]
        mean[idx] = m.permute(1, 0, 2).numpy()
    return last, mean


class PromptStateCache:
    """Float16 last-token and prompt-mean states of prompts, on disk under ``root``."""

    def __init__(self, root: str | os.PathLike[str] | None, fingerprint: str, max_tokens: int) -> None:
        """``root`` None keeps the states in memory only."""
        tag = hashlib.sha256(f"{fingerprint}\x00{max_tokens}".encode()).hexdigest()[:16]
        self.root = None if root is None else Path(root) / tag
        self.max_tokens = max_tokens
        self._index: dict[str, tuple[Path, int]] = {}
        self._shards: dict[Path, dict[str, np.ndarray]] = {}
        if self.root is not None and self.root.is_dir():
            for f in sorted(self.root.glob("shard-*.npz")):
                with np.load(f) as z:
                    for row, key in enumerate(z["keys"].tolist()):
                        self._index[str(key)] = (f, row)

    @staticmethod
    def key(text: str) -> str:
        """The cache key of a prompt."""
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def __contains__(self, text: str) -> bool:
        return self.key(text) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def fill(
        self, model: nn.Module, parts: ModelParts, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16,
        deadline: float | None = None, progress: Callable[[int], None] | None = None,
    ) -> int:
        """Run the model on the texts not cached yet, in order, a shard at a time, until
        ``deadline`` (``time.monotonic()``); returns how many texts are cached now."""
        todo = list(dict.fromkeys(t for t in texts if t not in self))
        pad = getattr(tokenizer, "pad_token_id", None)
        for start in range(0, len(todo), SHARD_ROWS):
            if deadline is not None and time.monotonic() >= deadline:
                break
            chunk = todo[start : start + SHARD_ROWS]
            last, mean = prompt_states(model, parts, token_ids(tokenizer, chunk, self.max_tokens),
                                       batch_size=batch_size, pad=0 if pad is None else int(pad))
            self._write([self.key(t) for t in chunk], last, mean)
            if progress is not None:
                progress(len(chunk))
        return sum(t in self for t in dict.fromkeys(texts))

    def _write(self, keys: list[str], last: np.ndarray, mean: np.ndarray) -> None:
        arrays = {"last": last.astype(np.float16), "mean": mean.astype(np.float16)}
        if self.root is None:
            path = Path(f"memory-{len(self._shards)}")
            self._shards[path] = arrays
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / f"shard-{len(list(self.root.glob('shard-*.npz'))):05d}-{os.getpid()}-{keys[0][:8]}.npz"
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, keys=np.array(keys), last=arrays["last"], mean=arrays["mean"])
            os.replace(tmp, path)
        for row, key in enumerate(keys):
            self._index[key] = (path, row)

    def states(self, tokenizer: Any, texts: Sequence[str]) -> PromptStates:
        """The cached states of ``texts`` (all must be cached: :meth:`fill` first)."""
        missing = [t for t in texts if t not in self]
        if missing:
            raise KeyError(f"{len(missing)} prompts have no cached states (first: {missing[0][:60]!r})")
        rows = [self._index[self.key(t)] for t in texts]
        first = self._shard(rows[0][0])["last"] if rows else np.zeros((0, 0, 0), np.float16)
        last = np.zeros((len(texts), *first.shape[1:]), np.float16)
        mean = np.zeros_like(last)
        for i, (path, row) in enumerate(rows):
            shard = self._shard(path)
            last[i], mean[i] = shard["last"][row], shard["mean"][row]
        return PromptStates(last, mean, token_ids(tokenizer, texts, self.max_tokens))

    def _shard(self, path: Path) -> dict[str, np.ndarray]:
        if path not in self._shards:
            with np.load(path) as z:
                self._shards[path] = {"last": z["last"], "mean": z["mean"]}
        return self._shards[path]
