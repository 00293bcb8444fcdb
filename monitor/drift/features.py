"""From lens readings to the arrays and the compact feature vector the detector works on.

The lens bank hands out :class:`~monitor.lenses.readings.Readings` (columnar, with per-sample
views for narratives); the statistics read the same type, widened to float64 (:func:`as_arrays`),
so the sidecar and the offline tools compute on the same columns.

The per-sample feature vector, per watched layer: entropy, log(1 + KL to final), log of the lens
confidence (top-1 probability), log(1 + rank of the final top-1 under the lens), the surprisal of
the lens top-1 token under the baseline's token table (:class:`TokenTable`), and the log class
probabilities of every concept probe; then four global features: prediction depth, the final
distribution's entropy, its log top-1 probability and the surprisal of the final top-1 token. Logs because KL, ranks and
probabilities are heavy-tailed, and Mahalanobis distance assumes something closer to Gaussian.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monitor.lenses.readings import Readings, SampleReadings

# Scalar readings per layer, in feature order.
READINGS = ("entropy", "kl_to_final", "confidence", "final_top1_rank")
GLOBAL_FEATURES = ("prediction_depth", "final_entropy", "final_confidence", "final_top1_surprisal")
GLOBAL_LAYER = -1  # layer index used for the global features in contribution tables
_EPS = 1e-6


def as_arrays(readings: Readings | Sequence[SampleReadings]) -> Readings:
    """The readings the statistics compute on: columns (from per-sample views if need be) in float64."""
    return (readings if isinstance(readings, Readings) else Readings.from_views(list(readings))).widened()


@dataclass(frozen=True)
class TokenTable:
    """How often normal traffic's lens top-1 is each token, per watched layer (+ final output).

    Its surprisal, ``-log((count + 1) / (n + 1))``, says whether a layer "thinks" of a token
    normal traffic thinks of there: other languages, code or garbage move it at once, and a flag
    can name the tokens. Counted on the baseline's fit split only.
    """

    n: int
    counts: tuple[dict[int, int], ...]  # one table per watched layer, then the final top-1

    @classmethod
    def count(cls, ids: np.ndarray) -> TokenTable:
        """Tables from token ids [n, L+1] (see :meth:`Readings.token_ids`)."""
        tables = []
        for j in range(ids.shape[1]):
            u, c = np.unique(ids[:, j], return_counts=True)
            tables.append({int(a): int(b) for a, b in zip(u, c, strict=True)})
        return cls(int(ids.shape[0]), tuple(tables))

    def surprisal(self, ids: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
        """[B, L+1] surprisal of each id; ``leave_one_out`` for samples that were counted."""
        out = np.empty(ids.shape, dtype=np.float64)
        for j, table in enumerate(self.counts):
            out[:, j] = [table.get(int(t), 0) for t in ids[:, j]]
        n = self.n
        if leave_one_out:
            out -= 1.0
            n -= 1
        return -np.log((np.maximum(out, 0.0) + 1.0) / (n + 1.0))

    def to_json(self) -> dict[str, object]:
        return {"n": self.n, "counts": [sorted([k, v] for k, v in t.items()) for t in self.counts]}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> TokenTable:
        counts = doc["counts"]
        assert isinstance(counts, list)
        return cls(int(doc["n"]), tuple({int(k): int(v) for k, v in t} for t in counts))  # type: ignore[call-overload]


@dataclass(frozen=True)
class FeatureLayout:
    """Names and grouping of the compact feature vector (stored with the baseline)."""

    names: tuple[str, ...]
    layer_of: tuple[int, ...]  # watched layer number, or GLOBAL_LAYER
    reading_of: tuple[str, ...]  # "entropy", ..., "probe:<name>", or a global feature name

    @property
    def size(self) -> int:
        return len(self.names)


def feature_layout(layers: Sequence[int], probe_labels: dict[str, tuple[str, ...]]) -> FeatureLayout:
    """The layout :func:`feature_matrix` produces for these layers and probes."""
    names: list[str] = []
    layer_of: list[int] = []
    reading_of: list[str] = []
    for layer in layers:
        for r in READINGS + ("top1_surprisal",):
            names.append(f"L{layer}.{r}")
            layer_of.append(int(layer))
            reading_of.append(r)
        for p in sorted(probe_labels):
            for label in probe_labels[p]:
                names.append(f"L{layer}.probe:{p}={label}")
                layer_of.append(int(layer))
                reading_of.append(f"probe:{p}")
    for g in GLOBAL_FEATURES:
        names.append(g)
        layer_of.append(GLOBAL_LAYER)
        reading_of.append(g)
    return FeatureLayout(tuple(names), tuple(layer_of), tuple(reading_of))


def feature_matrix(a: Readings, tokens: TokenTable, leave_one_out: bool = False) -> np.ndarray:
    """The compact per-sample feature vectors [B, F] in :func:`feature_layout` order.

    ``tokens``: the baseline's token table; ``leave_one_out`` for the samples it was counted on.
    """
    surprisal = tokens.surprisal(a.token_ids(), leave_one_out)
    per_layer = [
        a.entropy,
        np.log1p(np.maximum(a.kl_to_final, 0.0)),
        np.log(np.clip(a.confidence, _EPS, 1.0)),
        np.log1p(np.maximum(a.final_top1_rank, 0).astype(np.float64)),
        surprisal[:, :-1],
    ]
    blocks = [np.stack(per_layer, axis=2)]  # [B, L, 5]
    for p in sorted(a.probes):
        blocks.append(np.log(np.clip(a.probes[p], _EPS, 1.0)))  # [B, L, C]
    body = np.concatenate(blocks, axis=2).reshape(a.n, -1)
    glob = np.stack(
        [
            a.depth.astype(np.float64),
            a.final_entropy,
            np.log(np.clip(a.final_confidence, _EPS, 1.0)),
            surprisal[:, -1],
        ],
        axis=1,
    )
    return np.concatenate([body, glob], axis=1)
