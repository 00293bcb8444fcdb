"""An on-disk cache of hidden states for lens training and evaluation (bounded memory).

Each calibration chunk is run through the model once; the states of *all* layers are written to a
float16 memory-mapped array ``states.npy`` [capacity, N+1, d] together with each position's token
id and next token id. Training then samples rows from the file, so RAM holds one batch, not the
corpus, and all translators learn from the same single forward pass. ``meta.json`` records how
many rows and chunks are done, so an interrupted collection resumes where it stopped.

Float16 is also what the tap sends, so the lenses are trained on exactly the precision they read.
Position 0 of every chunk is skipped: it has no context and carries the attention-sink state
(massive activations) that no request's sampled position looks like.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monitor.adapters import ModelParts, collect_states

STATES = "states.npy"
TOKENS = "tokens.npy"
META = "meta.json"


def token_chunks(tokenizer: Any, texts: Iterable[str], chunk_len: int) -> Iterator[list[int]]:
    """Pack texts (separated by the EOS token when there is one) into chunks of ``chunk_len`` ids."""
    sep = getattr(tokenizer, "eos_token_id", None)
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if sep is not None:
            buf.append(int(sep))
        while len(buf) >= chunk_len + 1:
            yield buf[: chunk_len + 1]  # one extra id: the next token of the chunk's last position
            buf = buf[chunk_len:]


@dataclass
class StateCache:
    """A directory holding ``states.npy`` (float16 [capacity, S, d]), ``tokens.npy`` (int64
    [capacity, 2]: token id, next token id) and ``meta.json``."""

    root: Path
    states: np.ndarray
    tokens: np.ndarray
    meta: dict[str, Any]

    @property
    def rows(self) -> int:
        """Rows filled so far."""
        return int(self.meta["rows"])

    @property
    def capacity(self) -> int:
        return int(self.states.shape[0])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete")) or self.rows >= self.capacity

    @classmethod
    def open(cls, root: Path, capacity: int, n_states: int, hidden: int, source: str) -> StateCache:
        """Open the cache at ``root``, creating it if absent or if it was made for other data."""
        root.mkdir(parents=True, exist_ok=True)
        meta_path = root / META
        want = {"capacity": capacity, "n_states": n_states, "hidden": hidden, "source": source}
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in want.items()) and (root / STATES).exists():
                states = np.load(root / STATES, mmap_mode="r+", allow_pickle=False)
                tokens = np.load(root / TOKENS, mmap_mode="r+", allow_pickle=False)
                return cls(root, states, tokens, meta)
        states = np.lib.format.open_memmap(root / STATES, mode="w+", dtype=np.float16,
                                           shape=(capacity, n_states, hidden))
        tokens = np.lib.format.open_memmap(root / TOKENS, mode="w+", dtype=np.int64, shape=(capacity, 2))
        meta = {**want, "rows": 0, "chunks": 0, "seconds": 0.0, "complete": False}
        cache = cls(root, states, tokens, meta)
        cache.save_meta()
        return cache

    def save_meta(self) -> None:
        for arr in (self.states, self.tokens):
            if isinstance(arr, np.memmap):
                arr.flush()
        tmp = self.root / (META + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self.root / META)

    def append(self, states: np.ndarray, tokens: np.ndarray) -> int:
        """Write rows (as many as fit); returns how many were written."""
        n = min(len(states), self.capacity - self.rows)
        r = self.rows
        self.states[r : r + n] = states[:n]
        self.tokens[r : r + n] = tokens[:n]
        self.meta["rows"] = r + n
        return n

    def view(self, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The filled part (states, tokens) as memory maps."""
        n = self.rows if rows is None else min(rows, self.rows)
        return self.states[:n], self.tokens[:n]


@torch.no_grad()
def fill_cache(
    cache: StateCache,
    model: nn.Module,
    parts: ModelParts,
    tokenizer: Any,
    texts: Iterable[str],
    *,
    chunk_len: int = 128,
    batch_chunks: int = 8,
    deadline: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> StateCache:
    """Run chunks of ``texts`` through ``model`` until the cache is full, the texts run out or
    ``deadline`` (``time.monotonic()``) passes; resumes after the chunks already stored."""
    if cache.complete:
        return cache
    chunks = token_chunks(tokenizer, texts, chunk_len)
    for _ in range(int(cache.meta["chunks"])):  # skip what a previous run stored
        if next(chunks, None) is None:
            break
    t_start = time.monotonic()
    base_seconds = float(cache.meta["seconds"])
    exhausted = False
    while not cache.complete:
        batch = [c for _, c in zip(range(batch_chunks), chunks, strict=False)]
        if not batch:
            exhausted = True
            break
        ids = torch.tensor(batch)  # [b, T+1]
        states = collect_states(model, parts, ids[:, :-1])  # [S, b, T, d]
        rows = states[:, :, 1:].permute(1, 2, 0, 3).reshape(-1, parts.n_states, parts.hidden_size)
        tok = torch.stack([ids[:, 1:-1], ids[:, 2:]], -1).reshape(-1, 2)
        n = cache.append(rows.to(torch.float16).numpy(), tok.numpy())
        cache.meta["chunks"] = int(cache.meta["chunks"]) + len(batch)
        cache.meta["seconds"] = base_seconds + time.monotonic() - t_start
        cache.save_meta()
        if progress is not None:
            progress(n)
        if deadline is not None and time.monotonic() >= deadline:
            break
    if exhausted or cache.rows >= cache.capacity:
        cache.meta["complete"] = True
        cache.save_meta()
    return cache
