"""Typed output of the lens bank: what each watched layer of one sample "says".

This is the contract between the lens bank (producer), narratives, the drift detector and the
audit trail (consumers). Arrays are numpy; ``BankOutput`` is the batch form straight out of ONNX
Runtime, ``SampleReadings`` the per-sample view built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CONTEXT_SUFFIX = "@mean"  # probe readings on the prompt mean (tap positions "last+mean")


@dataclass(frozen=True)
class BankOutput:
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

    @property
    def batch_size(self) -> int:
        return int(self.entropy.shape[0])


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


def split_batch(out: BankOutput, probe_labels: dict[str, tuple[str, ...]]) -> list[SampleReadings]:
    """Turn a batch ``BankOutput`` into one ``SampleReadings`` per sample."""
    # One ``tolist`` per array (C speed) instead of a numpy scalar conversion per value.
    ids, probs = out.topk_ids.tolist(), out.topk_probs.tolist()
    ent, kl, rank = out.entropy.tolist(), out.kl_to_final.tolist(), out.final_top1_rank.tolist()
    probes = {k: v.tolist() for k, v in out.probes.items()}
    f_ids, f_probs, f_ent = out.final_topk_ids.tolist(), out.final_topk_probs.tolist(), out.final_entropy.tolist()
    labels = dict(probe_labels)
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
