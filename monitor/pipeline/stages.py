"""The stages of the pipeline that both the sidecar and the offline tools run.

Data stays data until the last step: :func:`read` returns columnar readings, :func:`explain`
builds narratives (structured readings; their sentences are rendered by
:mod:`monitor.narratives`), scoring returns scores and flags as data
(:mod:`monitor.pipeline.scoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from monitor.errors import WireFormatError
from monitor.lenses.readings import Readings
from monitor.narratives import Narrative, TokenDecoder, default_decoder, narratives_for_batch
from monitor.wire import Sample


class LensReader(Protocol):
    """What the pipeline needs from a lens bank (the ONNX bank or the PyTorch logit lens)."""

    layers: tuple[int, ...]
    hidden_size: int
    fingerprint: str
    bundle_id: str
    provider: str
    probe_labels: dict[str, tuple[str, ...]]

    def read_arrays(self, hidden: np.ndarray) -> Readings:
        """Readings of last-token states [B, L, d] of :attr:`layers`."""
        ...


def read(bank: LensReader, hidden: np.ndarray, context: np.ndarray | None = None) -> Readings:
    """The bank's readings of last-token states ``hidden`` [B, L, d]; when prompt-mean states
    ``context`` [B, L, d] are given and the bank has probes, the probes read them too
    (``<probe>@mean``). The readings carry the labels of every probe reading in them and, from the
    bank's ``probe_bars``, the layers where each may be printed (:mod:`monitor.lenses.trust`)."""
    bars = dict(getattr(bank, "probe_bars", None) or {})  # a bank without bars prints no probe reading
    out = bank.read_arrays(hidden)
    out = out.with_probes({}, dict(bank.probe_labels), {k: bars[k] for k in bank.probe_labels if k in bars})
    read_context = getattr(bank, "read_context", None)
    context_labels = getattr(bank, "context_probe_labels", None)
    if context is not None and read_context is not None and context_labels:
        out = out.with_probes(read_context(context), dict(context_labels),
                              {k: bars[k] for k in context_labels if k in bars})
    return out


class LayerIndex:
    """Where the bank's layers sit inside a sample's captured layers (cached per layer tuple)."""

    def __init__(self, bank_layers: Sequence[int]) -> None:
        self.bank_layers = tuple(bank_layers)
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, layers: tuple[int, ...]) -> np.ndarray:
        """Positions of the bank's layers in ``layers``; WireFormatError(shape_mismatch) if missing."""
        idx = self._cache.get(layers)
        if idx is None:
            pos = {layer: i for i, layer in enumerate(layers)}
            missing = [layer for layer in self.bank_layers if layer not in pos]
            if missing:
                raise WireFormatError("shape_mismatch", f"sample lacks layers {missing} the lens bank reads")
            if len(self._cache) >= 64:  # layer tuples come from producers: keep the cache bounded
                self._cache.clear()
            idx = self._cache[layers] = np.array([pos[layer] for layer in self.bank_layers])
        return idx


def read_samples(bank: LensReader, samples: Sequence[Sample], index: LayerIndex) -> Readings:
    """Readings of decoded samples. The lenses read the last captured position (for "mean": the
    mean vector); when every sample is ``last+mean``, the probes also read the prompt mean."""
    hidden = np.stack([s.hidden[index(s.layers), -1, :] for s in samples])
    context = None
    if all(s.positions == "last+mean" for s in samples):
        context = np.stack([s.hidden[index(s.layers), 0, :] for s in samples])
    return read(bank, hidden, context)


def explain(readings: Readings, samples: Sequence[Sample], decode: TokenDecoder = default_decoder, *,
            include_tokens: bool = False) -> list[Narrative]:
    """The narrative of each sample of a batch; token strings only with ``include_tokens`` (the
    top tokens of a layer can spell the prompt out: see :mod:`monitor.narratives`)."""
    return narratives_for_batch(readings, readings.views(), [(s.sample_id, s.request_id, s.model) for s in samples],
                                decode=decode, metadata=[s.metadata for s in samples], include_tokens=include_tokens)


def concat(parts: Sequence[Readings]) -> Readings:
    """Stack batches of readings of the same layers and probes."""
    first = parts[0]

    def cat(name: str) -> Any:
        return np.concatenate([getattr(p, name) for p in parts], axis=0)

    return Readings(
        layers=first.layers, topk_ids=cat("topk_ids"), topk_probs=cat("topk_probs"), entropy=cat("entropy"),
        kl_to_final=cat("kl_to_final"), final_top1_rank=cat("final_top1_rank"), final_topk_ids=cat("final_topk_ids"),
        final_topk_probs=cat("final_topk_probs"), final_entropy=cat("final_entropy"),
        probes={k: np.concatenate([p.probes[k] for p in parts], axis=0) for k in first.probes},
        probe_labels=dict(first.probe_labels), probe_bars=dict(first.probe_bars))
