"""The readings: what each watched layer of each sample "says", in one columnar type.

This is the contract between the lens bank (producer), narratives, the drift detector and the
audit trail (consumers). :class:`Readings` holds a batch as numpy columns ([B, L, ...]) straight
out of the lens bank; :meth:`Readings.views` gives the per-sample views (:class:`SampleReadings`,
plain Python values) that narratives read. The drift statistics take the same object
(:meth:`monitor.drift.features.ReadingArrays.from_readings` only widens it to float64).

Prediction depth has one definition, :func:`prediction_depth`: the first watched layer from which
the lens top-1 equals the model's final top-1 through the last watched layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

CONTEXT_SUFFIX = "@mean"  # probe readings on the prompt mean (tap positions "last+mean")


def prediction_depth(top1: np.ndarray, final_top1: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """First watched layer from which the lens top-1 equals the final top-1 through the end ([B]).

    ``top1`` [B, L] lens top-1 ids, ``final_top1`` [B] the model's own top-1. A sample whose last
    watched layer disagrees gets ``layers[-1]`` (only the output itself agrees)."""
    agree = np.asarray(top1) == np.asarray(final_top1)[:, None]  # [B, L]
    n_layers = agree.shape[1]
    # trailing run of agreement: reverse cumulative AND
    trailing = np.flip(np.cumprod(np.flip(agree, axis=1), axis=1), axis=1).astype(bool)
    first = np.where(trailing.any(axis=1), np.argmax(trailing, axis=1), n_layers)
    lay = np.asarray([*layers, layers[-1]]) if len(layers) else np.zeros(1, dtype=np.int64)
    return lay[first].astype(np.int64)


@dataclass(frozen=True)
class Readings:
    """One batch of lens readings. B = samples, L = watched layers, k = top-k, C = classes."""

    layers: tuple[int, ...]
    topk_ids: np.ndarray  # int64 [B, L, k]      lens top-k token ids
    topk_probs: np.ndarray  # float32 [B, L, k]  their probabilities
    entropy: np.ndarray  # float32 [B, L]        entropy of the lens distribution (nats)
    kl_to_final: np.ndarray  # float32 [B, L]    KL(final || lens) (nats)
    final_top1_rank: np.ndarray  # int64 [B, L]  rank of the model's final top-1 under the lens (0 = top-1)
    final_topk_ids: np.ndarray  # int64 [B, k]   the model's own output (from state N)
    final_topk_probs: np.ndarray  # float32 [B, k]
    final_entropy: np.ndarray  # float32 [B]
    probes: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [B, L, C]
    probe_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> class names

    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.entropy.shape[0])

    @cached_property
    def depth(self) -> np.ndarray:
        """Prediction depth of each sample ([B] layer numbers; :func:`prediction_depth`)."""
        return prediction_depth(self.topk_ids[:, :, 0], self.final_topk_ids[:, 0], self.layers)

    def with_probes(self, probes: dict[str, np.ndarray], labels: dict[str, tuple[str, ...]]) -> Readings:
        """These readings plus more probe readings (e.g. the probes on the prompt mean)."""
        from dataclasses import replace

        return replace(self, probes={**self.probes, **probes}, probe_labels={**self.probe_labels, **labels})

    def views(self) -> list[SampleReadings]:
        """One per-sample view per sample (plain Python values)."""
        return split_batch(self, self.probe_labels)


BankOutput = Readings  # the former name of the batch form (kept for callers)


@dataclass(frozen=True)
class LayerReading:
    """What one layer's lens says for one sample."""

    layer: int
    topk_ids: tuple[int, ...]
    topk_probs: tuple[float, ...]
    entropy: float
    kl_to_final: float
    final_top1_rank: int
    probes: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def top1(self) -> int:
        return self.topk_ids[0]

    @property
    def confidence(self) -> float:
        return self.topk_probs[0]


@dataclass(frozen=True)
class SampleReadings:
    """Per-layer readings of one sample plus the model's own final prediction."""

    layers: tuple[LayerReading, ...]
    final_topk_ids: tuple[int, ...]
    final_topk_probs: tuple[float, ...]
    final_entropy: float
    probe_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def final_top1(self) -> int:
        return self.final_topk_ids[0]


def split_batch(out: Readings, probe_labels: dict[str, tuple[str, ...]] | None = None) -> list[SampleReadings]:
    """One :class:`SampleReadings` view per sample of ``out`` (labels default to its own)."""
    # One ``tolist`` per array (C speed) instead of a numpy scalar conversion per value.
    ids, probs = out.topk_ids.tolist(), out.topk_probs.tolist()
    ent, kl, rank = out.entropy.tolist(), out.kl_to_final.tolist(), out.final_top1_rank.tolist()
    probes = {k: v.tolist() for k, v in out.probes.items()}
    f_ids, f_probs, f_ent = out.final_topk_ids.tolist(), out.final_topk_probs.tolist(), out.final_entropy.tolist()
    labels = dict(out.probe_labels if probe_labels is None else probe_labels)
    result: list[SampleReadings] = []
    for b in range(out.batch_size):
        layers = tuple(
            LayerReading(
                layer=layer,
                topk_ids=tuple(ids[b][i]),
                topk_probs=tuple(probs[b][i]),
                entropy=ent[b][i],
                kl_to_final=kl[b][i],
                final_top1_rank=rank[b][i],
                probes={k: tuple(v[b][i]) for k, v in probes.items()},
            )
            for i, layer in enumerate(out.layers)
        )
        result.append(
            SampleReadings(
                layers=layers,
                final_topk_ids=tuple(f_ids[b]),
                final_topk_probs=tuple(f_probs[b]),
                final_entropy=f_ent[b],
                probe_labels=labels,
            )
        )
    return result
