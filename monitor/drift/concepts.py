"""Watched concepts: one-sided, calibrated scores for probe labels an operator names.

The per-sample anomaly score (:mod:`monitor.drift.score`) is one-class: it knows what normal
narratives look like, not which departures matter. Some do matter more than others to the
people who run a model ("alert when legal text shows up in the support bot's traffic"), and a
concept probe is exactly the instrument for a named concept. A *watched concept* is a probe
label, written ``"<probe>=<label>"`` (``"topic@mean=legal"``: the topic probe's 'legal' label
read on the prompt mean), that gets a score and a conformal p-value of its own:

* the score is the mean over the watched layers of the label's log-probability, each layer
  standardised by the baseline's fit split (median, half the 16-84% range): high when the probe
  reads the label more strongly than normal traffic does, at many layers;
* the p-value is split-conformal against the same score on the baseline's calibration split, so
  ``p < alpha`` is a false-positive rate of at most ``alpha`` on normal traffic.

The baseline stores the standardisation and the calibration scores of *every* probe label
(:class:`ConceptReference`), so which concepts to watch is a scoring-time choice
(``baseline.watch``) that needs no rebuild. Combining them with the anomaly score keeps the
overall rate at ``alpha`` (Bonferroni, see :func:`combine_p_values`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.drift.codec import decode_array as _dec
from monitor.drift.codec import encode_array as _enc
from monitor.drift.stats import conformal_p_values
from monitor.errors import BaselineError
from monitor.lenses.readings import Readings

_LOG_FLOOR = 1e-6  # probabilities below this read as this (a log of 0 would be -inf)


def concept_name(probe: str, label: str) -> str:
    """``"<probe>=<label>"``."""
    return f"{probe}={label}"


def parse_concept(name: str) -> tuple[str, str]:
    """Split ``"<probe>=<label>"``; a malformed name raises :class:`ValueError` that quotes it."""
    probe, sep, label = str(name).partition("=")
    if not sep or not probe.strip() or not label.strip():
        raise ValueError(f"watched concept {name!r} is not of the form '<probe>=<label>' (e.g. 'topic@mean=legal')")
    return probe.strip(), label.strip()


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _LOG_FLOOR, 1.0))


@dataclass(frozen=True)
class ConceptReference:
    """What scoring a probe label needs: per probe, the per-layer standardisation of each label's
    log-probability ([L, C] centre and scale, from the baseline's fit split), and per concept
    the sorted scores of the calibration split."""

    center: dict[str, np.ndarray]  # probe -> [L, C]
    scale: dict[str, np.ndarray]  # probe -> [L, C] (> 0)
    calibration: dict[str, np.ndarray]  # "<probe>=<label>" -> sorted scores of the calibration split

    @classmethod
    def standardisation(cls, fit: Readings) -> ConceptReference:
        """The per-layer standardisation of every label on ``fit`` (no calibration yet)."""
        center, scale = {}, {}
        for p in sorted(fit.probes):
            ref = _log_probs(fit.probes[p])  # [n, L, C]
            center[p] = np.median(ref, axis=0)
            spread = (np.quantile(ref, 0.84, axis=0) - np.quantile(ref, 0.16, axis=0)) / 2.0
            # a label every sample reads alike (constant feature) gets a unit scale, not 0
            scale[p] = np.where(spread > 1e-9, spread, 1.0)
        return cls(center, scale, {})

    @classmethod
    def fit(cls, fit: Readings, cal: Readings) -> ConceptReference:
        """Standardise on ``fit``, calibrate on ``cal`` (two disjoint splits of normal samples)."""
        ref = cls.standardisation(fit)
        return cls(ref.center, ref.scale, {k: np.sort(v) for k, v in ref.scores(cal).items()})

    @property
    def names(self) -> tuple[str, ...]:
        """Every concept this reference can score."""
        return tuple(sorted(self.calibration))

    def scores(self, a: Readings, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Concept scores [B] of ``a``, for ``names`` (default: every label of every probe)."""
        wanted = None if names is None else {parse_concept(n) for n in names}
        out: dict[str, np.ndarray] = {}
        for p in sorted(self.center):
            if p not in a.probes:
                raise BaselineError(f"readings carry no probe {p!r} (have {sorted(a.probes)})")
            for label in a.probe_labels[p]:
                if wanted is None or (p, label) in wanted:
                    name = concept_name(p, label)
                    out[name] = self.layer_scores(a, name).mean(axis=1)
        return out

    def layer_scores(self, a: Readings, name: str) -> np.ndarray:
        """Per layer [B, L], the standardised log-probability whose mean over the layers is
        the concept's score (which layers drive it)."""
        probe, label = parse_concept(name)
        j = a.probe_labels[probe].index(label)
        return np.asarray((_log_probs(a.probes[probe][:, :, j]) - self.center[probe][:, j]) / self.scale[probe][:, j])

    def p_values(self, a: Readings, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Conformal p-values [B] of the watched ``names``. A non-finite score (a broken probe
        reading) gets p = 1: it says nothing about the concept, and the anomaly score already
        flags such a sample."""
        out = {}
        for name, s in self.scores(a, names).items():
            ok = np.isfinite(s)
            p = conformal_p_values(np.where(ok, s, 0.0), self.calibration[name])
            out[name] = np.where(ok, p, 1.0)
        return out

    def check(self, names: Sequence[str], *, alpha: float | None = None, field: str = "baseline.watch") -> None:
        """Refuse names this reference cannot score, or a watch list so long that no sample could
        ever reach ``alpha`` after the Bonferroni correction (the error names ``field``)."""
        for n in names:
            probe, label = parse_concept(n)
            if concept_name(probe, label) not in self.calibration:
                probes = sorted({k.split("=", 1)[0] for k in self.calibration})
                raise BaselineError(
                    f"{field}: {n!r} is not a probe label of this baseline (probes {probes}; "
                    f"e.g. {self.names[0]!r})" if self.names else f"{field}: {n!r}: this baseline has no probes")
        if alpha is not None and names:
            n_cal = min(len(self.calibration[concept_name(*parse_concept(n))]) for n in names)
            need = min_calibration(len(names), alpha)
            if n_cal < need:
                raise BaselineError(
                    f"{field}: watching {len(names)} concept(s) at alpha={alpha} needs at least {need} "
                    f"calibration samples (the baseline has {n_cal}), or no sample could ever be flagged: "
                    "watch fewer concepts, raise alpha, or build a larger baseline")

    def to_json(self) -> dict[str, Any]:
        return {
            "center": {p: _enc(v) for p, v in sorted(self.center.items())},
            "scale": {p: _enc(v) for p, v in sorted(self.scale.items())},
            "calibration": {k: _enc(v) for k, v in sorted(self.calibration.items())},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ConceptReference:
        return cls(
            center={p: _dec(v) for p, v in doc["center"].items()},
            scale={p: _dec(v) for p, v in doc["scale"].items()},
            calibration={k: _dec(v) for k, v in doc["calibration"].items()},
        )


def min_calibration(n_watched: int, alpha: float) -> int:
    """Calibration samples needed so that a sample can be flagged at all with ``n_watched``
    concepts: the least conformal p-value is ``1/(n_cal+1)``, Bonferroni multiplies it by
    ``n_watched + 1``, and the product must be below ``alpha``."""
    n = max(0, int(np.floor((n_watched + 1) / alpha)) - 1)
    while (n_watched + 1) / (n + 1) >= alpha:
        n += 1
    return n


def combine_p_values(p_values: Sequence[np.ndarray]) -> np.ndarray:
    """Bonferroni: ``min(1, m * min_i p_i)`` over ``m`` valid p-values per sample; valid itself
    (``P(p <= alpha) <= alpha`` under the null) whatever the dependence between them."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in p_values])
    return np.asarray(np.minimum(1.0, len(p_values) * stacked.min(axis=0)))
