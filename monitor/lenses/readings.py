"""The readings: what each watched layer of each sample "says", in one columnar type.

This is the contract between the lens bank (producer), narratives, the drift detector and the
audit trail (consumers). :class:`Readings` holds a batch as numpy columns ([B, L, ...]) straight
out of the lens bank; :meth:`Readings.views` gives the per-sample views (:class:`SampleReadings`,
plain Python values) that narratives read, and :meth:`Readings.from_views` turns views back into
columns. The drift statistics read the same type: the derived columns they use (lens confidence,
top-1 ids, prediction depth) are properties, and :meth:`Readings.widened` gives the float64 copy
their sums are computed in. Nothing else holds readings.

Prediction depth has one definition, :func:`prediction_depth`: the first watched layer from which
the lens top-1 equals the model's final top-1 through the last watched layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.errors import BaselineError

if TYPE_CHECKING:
    from monitor.lenses.trust import ProbeBar

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
    # name -> when a reading may be printed (monitor.lenses.trust); a probe without one is never printed
    probe_bars: dict[str, ProbeBar] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.entropy.shape[0])

    n = batch_size

    # --- derived columns --------------------------------------------------------------------
    @property
    def top1(self) -> np.ndarray:
        """Lens top-1 token id per layer ([B, L])."""
        return self.topk_ids[:, :, 0]

    @property
    def confidence(self) -> np.ndarray:
        """Lens top-1 probability per layer ([B, L])."""
        return self.topk_probs[:, :, 0]

    @property
    def final_top1(self) -> np.ndarray:
        """The model's own top-1 token id ([B])."""
        return self.final_topk_ids[:, 0]

    @property
    def final_confidence(self) -> np.ndarray:
        """The model's own top-1 probability ([B])."""
        return self.final_topk_probs[:, 0]

    @cached_property
    def depth(self) -> np.ndarray:
        """Prediction depth of each sample ([B] layer numbers; :func:`prediction_depth`)."""
        return prediction_depth(self.top1, self.final_top1, self.layers)

    def reading(self, name: str) -> np.ndarray:
        """One column by name (``entropy``, ``confidence``, ``final_entropy``, ...)."""
        return np.asarray(getattr(self, name))

    def token_ids(self) -> np.ndarray:
        """Lens top-1 ids per layer plus the final top-1 as a last column ([B, L+1])."""
        return np.concatenate([np.asarray(self.top1, dtype=np.int64),
                               np.asarray(self.final_top1, dtype=np.int64)[:, None]], axis=1)

    # --- new readings from these --------------------------------------------------------------
    def with_probes(self, probes: dict[str, np.ndarray], labels: dict[str, tuple[str, ...]],
                    bars: dict[str, ProbeBar] | None = None) -> Readings:
        """These readings plus more probe readings (e.g. the probes on the prompt mean) and their bars."""
        return replace(self, probes={**self.probes, **probes}, probe_labels={**self.probe_labels, **labels},
                       probe_bars={**self.probe_bars, **(bars or {})})

    def widened(self) -> Readings:
        """The same readings with float columns in float64 (what the drift statistics sum in);
        ids as int64. Free when they already are."""
        f64: dict[str, Any] = {name: np.asarray(getattr(self, name), dtype=np.float64)
               for name in ("topk_probs", "entropy", "kl_to_final", "final_topk_probs", "final_entropy")}
        i64: dict[str, Any] = {name: np.asarray(getattr(self, name), dtype=np.int64)
               for name in ("topk_ids", "final_top1_rank", "final_topk_ids")}
        if all(f64[k] is getattr(self, k) for k in f64) and all(i64[k] is getattr(self, k) for k in i64) and all(
                v.dtype == np.float64 for v in self.probes.values()):
            return self
        labels = dict(self.probe_labels)
        probes = {k: np.asarray(v, dtype=np.float64) for k, v in self.probes.items()}
        for k, v in probes.items():
            labels.setdefault(k, tuple(str(i) for i in range(v.shape[-1])))
        return replace(self, layers=tuple(int(x) for x in self.layers), probes=probes, probe_labels=labels,
                       **f64, **i64)

    def subset(self, idx: np.ndarray | Sequence[int] | slice) -> Readings:
        """The samples selected by ``idx``."""
        columns: dict[str, Any] = {name: getattr(self, name)[idx] for name in _ROW_COLUMNS}
        return replace(self, **columns,
                       probes={k: v[idx] for k, v in self.probes.items()}, probe_labels=dict(self.probe_labels))

    @staticmethod
    def concat(parts: Sequence[Readings]) -> Readings:
        """Stack batches watching the same layers and probes (top-k cut to the smallest k)."""
        if not parts:
            raise BaselineError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.layers != first.layers or set(p.probes) != set(first.probes):
                raise BaselineError("batches watch different layers or probes")
        k = min(p.topk_ids.shape[-1] for p in parts)
        fk = min(p.final_topk_ids.shape[-1] for p in parts)
        cut = {"topk_ids": k, "topk_probs": k, "final_topk_ids": fk, "final_topk_probs": fk}

        def cat(name: str) -> np.ndarray:
            cols = [getattr(p, name) for p in parts]
            if name in cut:
                cols = [c[..., :cut[name]] for c in cols]
            return np.concatenate(cols, axis=0)

        columns: dict[str, Any] = {name: cat(name) for name in _ROW_COLUMNS}
        return replace(first, **columns,
                       probes={k: np.concatenate([p.probes[k] for p in parts], axis=0) for k in first.probes},
                       probe_labels=dict(first.probe_labels))

    @staticmethod
    def from_columns(
        layers: Sequence[int], *, entropy: np.ndarray, kl_to_final: np.ndarray, confidence: np.ndarray,
        final_top1_rank: np.ndarray, final_entropy: np.ndarray, final_confidence: np.ndarray,
        top1: np.ndarray | None = None, final_top1: np.ndarray | None = None,
        probes: dict[str, np.ndarray] | None = None, probe_labels: dict[str, tuple[str, ...]] | None = None,
    ) -> Readings:
        """Readings from the columns the statistics use (top-1 only; ids default to 0)."""
        b = np.asarray(entropy).shape[0]
        t1 = np.zeros(np.asarray(entropy).shape, dtype=np.int64) if top1 is None else np.asarray(top1)
        ft1 = np.zeros(b, dtype=np.int64) if final_top1 is None else np.asarray(final_top1)
        return Readings(
            layers=tuple(int(x) for x in layers), topk_ids=t1[:, :, None], topk_probs=np.asarray(confidence)[:, :, None],
            entropy=np.asarray(entropy), kl_to_final=np.asarray(kl_to_final),
            final_top1_rank=np.asarray(final_top1_rank), final_topk_ids=ft1[:, None],
            final_topk_probs=np.asarray(final_confidence)[:, None], final_entropy=np.asarray(final_entropy),
            probes=dict(probes or {}), probe_labels=dict(probe_labels or {}),
        )

    @staticmethod
    def from_views(samples: Sequence[SampleReadings]) -> Readings:
        """Columns from per-sample views (the inverse of :meth:`views`; all watch the same layers)."""
        if not samples:
            raise BaselineError("no samples given")
        layers = tuple(r.layer for r in samples[0].layers)
        for s in samples:
            if tuple(r.layer for r in s.layers) != layers:
                raise BaselineError("samples watch different layers; one baseline covers one lens bundle")
        k = min(len(r.topk_ids) for s in samples for r in s.layers) if layers else 1
        fk = min(len(s.final_topk_ids) for s in samples)

        def grid(attr: str, dtype: type) -> np.ndarray:
            return np.array([[getattr(r, attr) for r in s.layers] for s in samples], dtype=dtype).reshape(len(samples), len(layers))

        probe_names = sorted(samples[0].layers[0].probes) if layers else []
        probes = {p: np.array([[r.probes[p] for r in s.layers] for s in samples], dtype=np.float64) for p in probe_names}
        labels = {p: tuple(samples[0].probe_labels.get(p, ())) for p in probe_names}
        for p, v in probes.items():
            if len(labels[p]) != v.shape[-1]:
                labels[p] = tuple(str(i) for i in range(v.shape[-1]))
        return Readings(
            layers=layers,
            topk_ids=np.array([[r.topk_ids[:k] for r in s.layers] for s in samples], dtype=np.int64).reshape(len(samples), len(layers), k),
            topk_probs=np.array([[r.topk_probs[:k] for r in s.layers] for s in samples], dtype=np.float64).reshape(len(samples), len(layers), k),
            entropy=grid("entropy", np.float64), kl_to_final=grid("kl_to_final", np.float64),
            final_top1_rank=grid("final_top1_rank", np.int64),
            final_topk_ids=np.array([s.final_topk_ids[:fk] for s in samples], dtype=np.int64),
            final_topk_probs=np.array([s.final_topk_probs[:fk] for s in samples], dtype=np.float64),
            final_entropy=np.array([s.final_entropy for s in samples], dtype=np.float64),
            probes=probes, probe_labels=labels, probe_bars=dict(samples[0].probe_bars),
        )

    def validate(self) -> None:
        """Refuse NaN/Inf readings with a message naming the reading."""
        for name in ("entropy", "kl_to_final", "confidence", "final_top1_rank", "final_entropy", "final_confidence"):
            if not np.all(np.isfinite(self.reading(name))):
                raise BaselineError(f"reading {name!r} contains NaN or Inf; the lens bank output is broken")
        for p, v in self.probes.items():
            if not np.all(np.isfinite(v)):
                raise BaselineError(f"probe {p!r} contains NaN or Inf")

    def views(self) -> list[SampleReadings]:
        """One per-sample view per sample (plain Python values)."""
        return split_batch(self, self.probe_labels)


_ROW_COLUMNS = ("topk_ids", "topk_probs", "entropy", "kl_to_final", "final_top1_rank",
                "final_topk_ids", "final_topk_probs", "final_entropy")


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
    probe_bars: dict[str, ProbeBar] = field(default_factory=dict)

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
                probe_bars=out.probe_bars,
            )
        )
    return result
