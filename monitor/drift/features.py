"""From lens readings to the arrays and the compact feature vector the detector works on.

The lens bank hands out :class:`~monitor.lenses.readings.Readings` (columnar, with per-sample
views for narratives); the statistics read them as :class:`ReadingArrays`, the same columns
widened to float64 (plus the prediction depth), so baselines built from either are the same.

The per-sample feature vector, per watched layer: entropy, log(1 + KL to final), log of the lens
confidence (top-1 probability), log(1 + rank of the final top-1 under the lens), the surprisal of
the lens top-1 token under the baseline's token table (:class:`TokenTable`), and the log class
probabilities of every concept probe; then four global features: prediction depth, the final
distribution's entropy, its log top-1 probability and the surprisal of the final top-1 token. Logs because KL, ranks and
probabilities are heavy-tailed, and Mahalanobis distance assumes something closer to Gaussian.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.errors import BaselineError
from monitor.lenses.readings import Readings, SampleReadings, prediction_depth

# Scalar readings per layer, in feature order.
READINGS = ("entropy", "kl_to_final", "confidence", "final_top1_rank")
GLOBAL_FEATURES = ("prediction_depth", "final_entropy", "final_confidence", "final_top1_surprisal")
GLOBAL_LAYER = -1  # layer index used for the global features in contribution tables
_EPS = 1e-6


@dataclass(frozen=True)
class ReadingArrays:
    """Readings of B samples over L watched layers as numpy arrays."""

    layers: tuple[int, ...]
    entropy: np.ndarray  # [B, L]
    kl_to_final: np.ndarray  # [B, L]
    confidence: np.ndarray  # [B, L] lens top-1 probability
    final_top1_rank: np.ndarray  # [B, L]
    depth: np.ndarray  # [B] prediction depth (a layer number)
    final_entropy: np.ndarray  # [B]
    final_confidence: np.ndarray  # [B]
    probes: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [B, L, C]
    probe_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    top1: np.ndarray | None = None  # [B, L] lens top-1 token ids
    final_top1: np.ndarray | None = None  # [B] the model's own top-1 token id

    def token_ids(self) -> np.ndarray:
        """Lens top-1 ids per layer plus the final top-1 as a last column ([B, L+1]); zeros if unknown."""
        top1 = self.top1 if self.top1 is not None else np.zeros(self.entropy.shape, dtype=np.int64)
        fin = self.final_top1 if self.final_top1 is not None else np.zeros(self.n, dtype=np.int64)
        return np.concatenate([np.asarray(top1, dtype=np.int64), np.asarray(fin, dtype=np.int64)[:, None]], axis=1)

    @property
    def n(self) -> int:
        return int(self.entropy.shape[0])

    def reading(self, name: str) -> np.ndarray:
        """One scalar reading by name ([B, L])."""
        return np.asarray(getattr(self, name))

    @classmethod
    def from_bank_output(
        cls,
        out: Readings,
        probe_labels: dict[str, tuple[str, ...]] | None = None,
        depth: np.ndarray | Sequence[int] | None = None,
    ) -> ReadingArrays:
        """The float64 columns of a batch of :class:`~monitor.lenses.readings.Readings` (its
        prediction depth unless ``depth`` is given; its probe labels unless given)."""
        rank = np.asarray(out.final_top1_rank, dtype=np.int64)
        d = out.depth if depth is None else np.asarray(depth, dtype=np.int64)
        labels = dict(out.probe_labels if probe_labels is None else probe_labels)
        probes = {k: np.asarray(v, dtype=np.float64) for k, v in out.probes.items()}
        for k, v in probes.items():
            labels.setdefault(k, tuple(str(i) for i in range(v.shape[-1])))
        return cls(
            layers=tuple(int(x) for x in out.layers),
            entropy=np.asarray(out.entropy, dtype=np.float64),
            kl_to_final=np.asarray(out.kl_to_final, dtype=np.float64),
            confidence=np.asarray(out.topk_probs, dtype=np.float64)[:, :, 0],
            final_top1_rank=rank,
            depth=d,
            final_entropy=np.asarray(out.final_entropy, dtype=np.float64),
            final_confidence=np.asarray(out.final_topk_probs, dtype=np.float64)[:, 0],
            probes=probes,
            probe_labels=labels,
            top1=np.asarray(out.topk_ids, dtype=np.int64)[:, :, 0],
            final_top1=np.asarray(out.final_topk_ids, dtype=np.int64)[:, 0],
        )

    @classmethod
    def from_readings(
        cls, samples: Readings | Sequence[SampleReadings], depth: np.ndarray | Sequence[int] | None = None
    ) -> ReadingArrays:
        """Build from readings, columnar or per-sample views (all watching the same layers and probes)."""
        if isinstance(samples, Readings):
            return cls.from_bank_output(samples, depth=depth)
        if not samples:
            raise BaselineError("no samples given")
        layers = tuple(r.layer for r in samples[0].layers)
        for s in samples:
            if tuple(r.layer for r in s.layers) != layers:
                raise BaselineError("samples watch different layers; one baseline covers one lens bundle")

        def grid(attr: str) -> np.ndarray:
            return np.array([[getattr(r, attr) for r in s.layers] for s in samples], dtype=np.float64)

        rank = grid("final_top1_rank").astype(np.int64)
        probe_names = sorted(samples[0].layers[0].probes) if samples[0].layers else []
        probes = {
            p: np.array([[r.probes[p] for r in s.layers] for s in samples], dtype=np.float64)
            for p in probe_names
        }
        labels = {p: tuple(samples[0].probe_labels.get(p, ())) for p in probe_names}
        for p, v in probes.items():
            if len(labels[p]) != v.shape[-1]:
                labels[p] = tuple(str(i) for i in range(v.shape[-1]))
        top1 = np.array([[r.top1 for r in s.layers] for s in samples], dtype=np.int64)
        final_top1 = np.array([s.final_top1 for s in samples], dtype=np.int64)
        d = prediction_depth(top1, final_top1, layers) if depth is None else np.asarray(depth, dtype=np.int64)
        return cls(
            layers=layers,
            entropy=grid("entropy"),
            kl_to_final=grid("kl_to_final"),
            confidence=np.array([[r.topk_probs[0] for r in s.layers] for s in samples], dtype=np.float64),
            final_top1_rank=rank,
            depth=d,
            final_entropy=np.array([s.final_entropy for s in samples], dtype=np.float64),
            final_confidence=np.array([s.final_topk_probs[0] for s in samples], dtype=np.float64),
            probes=probes,
            probe_labels=labels,
            top1=top1,
            final_top1=final_top1,
        )

    def subset(self, idx: np.ndarray | Sequence[int] | slice) -> ReadingArrays:
        """The samples selected by ``idx``."""
        return ReadingArrays(
            layers=self.layers,
            entropy=self.entropy[idx],
            kl_to_final=self.kl_to_final[idx],
            confidence=self.confidence[idx],
            final_top1_rank=self.final_top1_rank[idx],
            depth=self.depth[idx],
            final_entropy=self.final_entropy[idx],
            final_confidence=self.final_confidence[idx],
            probes={k: v[idx] for k, v in self.probes.items()},
            probe_labels=dict(self.probe_labels),
            top1=None if self.top1 is None else self.top1[idx],
            final_top1=None if self.final_top1 is None else self.final_top1[idx],
        )

    @staticmethod
    def concat(parts: Sequence[ReadingArrays]) -> ReadingArrays:
        """Stack batches watching the same layers and probes."""
        if not parts:
            raise BaselineError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.layers != first.layers or set(p.probes) != set(first.probes):
                raise BaselineError("batches watch different layers or probes")

        def cat(attr: str) -> np.ndarray:
            return np.concatenate([getattr(p, attr) for p in parts], axis=0)

        return ReadingArrays(
            layers=first.layers,
            entropy=cat("entropy"),
            kl_to_final=cat("kl_to_final"),
            confidence=cat("confidence"),
            final_top1_rank=cat("final_top1_rank"),
            depth=cat("depth"),
            final_entropy=cat("final_entropy"),
            final_confidence=cat("final_confidence"),
            probes={k: np.concatenate([p.probes[k] for p in parts], axis=0) for k in first.probes},
            probe_labels=dict(first.probe_labels),
            top1=np.concatenate([p.token_ids()[:, :-1] for p in parts], axis=0),
            final_top1=np.concatenate([p.token_ids()[:, -1] for p in parts], axis=0),
        )

    def validate(self) -> None:
        """Refuse NaN/Inf readings with a message naming the reading."""
        for name in READINGS + ("final_entropy", "final_confidence"):
            if not np.all(np.isfinite(self.reading(name))):
                raise BaselineError(f"reading {name!r} contains NaN or Inf; the lens bank output is broken")
        for p, v in self.probes.items():
            if not np.all(np.isfinite(v)):
                raise BaselineError(f"probe {p!r} contains NaN or Inf")


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
        """Tables from token ids [n, L+1] (see :meth:`ReadingArrays.token_ids`)."""
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


def feature_matrix(a: ReadingArrays, tokens: TokenTable, leave_one_out: bool = False) -> np.ndarray:
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
