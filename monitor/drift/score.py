"""Per-sample anomaly score against a baseline, calibrated into a conformal p-value.

The score is the squared Mahalanobis distance of the sample's compact feature vector (see
:mod:`monitor.drift.features`) under the baseline's covariance model. It is reported as
``score = sqrt(d^2 / F)`` (about 1 for a typical normal sample, F = active features), with the
exact decomposition of ``d^2`` into per-layer contributions, and as a conformal p-value against
the baseline's held-out calibration split: ``p < alpha`` means a false-positive rate of at most
``alpha`` on traffic like the baseline's.

Flags (only on anomalous samples, so a flag always means "this is why it was flagged") name the
layers and readings that moved: runs of layers where a reading is beyond the baseline's 1st/99th
percentile at that layer, probes reading a label more strongly than 99% of normal samples there,
an unusual prediction depth or final distribution, or, when no single reading is extreme, the
layers that carry most of the distance ("unusual_pattern").

The local anomaly score (a short foreign segment inside the prompt, :mod:`monitor.drift.local`),
when the baseline holds its model and the sample carries prompt windows, is folded into the
anomaly score: one combined statistic (the larger of the two parts, each on its fit-split tail
scale) whose conformal p-value on the calibration split replaces the whole-text one, so ``alpha``
stays one false-positive rate for both. A sample whose local part is the larger one is flagged
as ``local_segment`` with the segment's token offsets and the layers that carry it (never text).

Watched concepts (``watch=("topic@mean=legal", ...)``, see :mod:`monitor.drift.concepts`) add
one conformal p-value per named probe label; the sample's p-value is then the Bonferroni
combination of the anomaly score's and theirs, so ``p < alpha`` stays a false-positive rate of
at most ``alpha``, and a watched concept that fired is flagged as ``watched_concept``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.drift.baseline import Baseline
from monitor.drift.concepts import combine_p_values, parse_concept
from monitor.drift.features import GLOBAL_LAYER, READINGS, feature_matrix
from monitor.drift.local import LocalFinding, Tail
from monitor.drift.prompt_windows import WindowStates
from monitor.drift.stats import conformal_p_values
from monitor.errors import BaselineError
from monitor.explain import flag_sentence
from monitor.lenses.readings import Readings

LOCAL_FLAG = "local_segment"


@dataclass(frozen=True)
class Flag:
    """Why a sample was flagged, as data: which reading moved, at which layers, and the numbers
    (``facts``: value, normal median, ...). :attr:`detail` renders the sentence
    (:func:`monitor.explain.flag_sentence`)."""

    kind: str  # bounded set: "<reading>_high|low", "probe_<name>_unusual_label", "unusual_pattern"
    layers: tuple[int, ...]
    reading: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def detail(self) -> str:
        """The flag as one English sentence."""
        return flag_sentence(self.kind, self.layers, self.reading, self.facts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "layers": list(self.layers), "reading": self.reading,
                               "detail": self.detail}
        if self.kind == LOCAL_FLAG:  # where the segment sits, for reports: offsets and layers, never text
            out.update(segment=[self.facts["start"], self.facts["end"]],
                       prompt_tokens=self.facts.get("prompt_tokens"),
                       layer_strength={str(k): v for k, v in self.facts["strength"].items()})
        return out


@dataclass(frozen=True)
class SampleScore:
    """The verdict on one sample."""

    score: float  # sqrt(d^2 / active features); ~1 for typical normal samples
    distance2: float  # squared Mahalanobis distance
    p_value: float  # conformal p-value on the baseline's calibration split
    anomalous: bool  # p_value < alpha
    layer_contributions: dict[int, float]  # layer -> share of d^2 (sums to 1; -1 = global features)
    flags: tuple[Flag, ...]
    # watched concepts only: the anomaly score's own p-value and each concept's (before the
    # Bonferroni combination that gives ``p_value``)
    score_p_value: float | None = None
    concept_p_values: dict[str, float] | None = None
    # the local score (None: no local model or no windows): its own conformal p-value (reported;
    # ``p_value`` already folds it in), the most unusual run of windows as token offsets
    # [start, end) and its statistic per layer (~1 normal)
    local_p_value: float | None = None
    segment: tuple[int, int] | None = None
    segment_layers: dict[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "score": self.score,
            "distance2": self.distance2,
            "p_value": self.p_value,
            "anomalous": self.anomalous,
            "layer_contributions": {str(k): v for k, v in self.layer_contributions.items()},
            "flags": [f.to_dict() for f in self.flags],
        }
        if self.concept_p_values is not None or self.local_p_value is not None:
            out["score_p_value"] = self.score_p_value
        if self.concept_p_values is not None:
            out["concept_p_values"] = dict(self.concept_p_values)
        if self.local_p_value is not None:
            out["local_p_value"] = self.local_p_value
            out["segment"] = list(self.segment) if self.segment is not None else None
            out["segment_layers"] = {str(k): v for k, v in (self.segment_layers or {}).items()}
        return out


def layer_runs(layers: Sequence[int], all_layers: Sequence[int], max_gap: int = 1) -> list[list[int]]:
    """Group ``layers`` into runs of neighbours in ``all_layers`` (gaps of ``max_gap`` allowed)."""
    pos = {layer: i for i, layer in enumerate(all_layers)}
    idx = sorted(pos[layer] for layer in layers)
    runs: list[list[int]] = []
    for i in idx:
        if runs and i - pos[runs[-1][-1]] <= max_gap + 1:
            runs[-1].append(all_layers[i])
        else:
            runs.append([all_layers[i]])
    return runs


class AnomalyScorer:
    """Scores samples against one baseline. Stateless apart from the baseline; thread-safe."""

    def __init__(self, baseline: Baseline, alpha: float = 0.01, min_flag_run: int = 2,
                 watch: Sequence[str] = (), local: bool = False) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.baseline = baseline
        # the local score is folded in only when asked (``baseline.local_score``): on held-out
        # SmolLM2 data it does not yet find inserted segments (README), and folding it in costs the
        # whole-text score part of alpha
        self._local = baseline.local if local else None
        self.alpha = alpha
        self.min_flag_run = min_flag_run
        self.watch = tuple("=".join(parse_concept(w)) for w in watch)
        if len(set(self.watch)) != len(self.watch):
            raise ValueError(f"baseline.watch: a concept is listed twice ({list(watch)})")
        if self.watch:
            if baseline.concepts is None:
                raise BaselineError(
                    f"baseline.watch: baseline {baseline.id} holds no concept calibration (built before "
                    "watched concepts existed, or without probes): rebuild it to watch concepts")
            baseline.concepts.check(self.watch, alpha=alpha)
        layout = baseline.layout
        groups = sorted(set(layout.layer_of))
        self._groups = groups
        gi = {g: i for i, g in enumerate(groups)}
        self._group_matrix = np.zeros((layout.size, len(groups)))
        for f, g in enumerate(layout.layer_of):
            self._group_matrix[f, gi[g]] = 1.0
        self._n_active = max(1, baseline.detector.n_active)
        self._lo = {r: baseline.quantile(r, 0.01) for r in READINGS}
        self._hi = {r: baseline.quantile(r, 0.99) for r in READINGS}
        self._med = {r: baseline.quantile(r, 0.5) for r in READINGS}
        self._shares = {p: baseline.probe_shares(p) for p in baseline.probe_labels}
        self._sur_hi = baseline.quantile("top1_surprisal", 0.99)
        self._probe_hi = {p: baseline.quantile(f"probe:{p}", 0.99) for p in baseline.probe_labels}
        self._tails: dict[str, Tail] = {}

    def score_arrays(self, a: Readings, windows: WindowStates | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vector form: squared distances [B], p-values [B], per-layer contributions [B, G].

        Columns of the contributions follow :attr:`contribution_layers` (sorted layer numbers,
        ``-1`` = the global features, first). Non-finite readings give an infinite distance and p-value
        ``1/(n_cal+1)`` rather than NaN. With a local score or watched concepts the p-values are
        the combined ones.
        """
        d2, p, per_layer, concept_p = self._score(a)
        p, _ = self._with_local(d2, p, windows)
        return d2, (combine_p_values([p, *concept_p.values()]) if concept_p else p), per_layer

    @property
    def local_layers(self) -> tuple[int, ...] | None:
        """The states whose prompt windows the local score reads (None: the baseline has no local
        model, e.g. built before windows existed or from samples without them)."""
        return None if self._local is None else self._local.layers

    def rank_scores(self, a: Readings, windows: WindowStates | None = None) -> np.ndarray:
        """A continuous statistic that ranks samples as the combined p-value does, for AUROC and
        TPR at a test-set threshold (the conformal p-value is flat beyond the largest calibration
        score, so it cannot rank the far tail): the largest of each component's ``-log`` tail
        probability against its own calibration scores (exponential beyond the bulk)."""
        d2, _, _, _ = self._score(a)
        score = -self._tail_of("score", self.baseline.calibration_scores).log_sf(d2)
        local = self._local
        if local is not None and windows is not None:
            stat, _ = local.statistics(windows)
            t = -self._tail_of("combined", local.calibration_scores).log_sf(local.combined(d2, stat))
            score = np.where(windows.present(), t, score)
        parts = [score]
        if self.watch:
            assert self.baseline.concepts is not None
            for name, v in self.baseline.concepts.scores(a, self.watch).items():
                parts.append(-self._tail_of(name, self.baseline.concepts.calibration[name]).log_sf(v))
        return np.asarray(np.max(np.stack(parts), axis=0))

    def _tail_of(self, name: str, calibration: np.ndarray) -> Tail:
        got = self._tails.get(name)
        if got is None:
            got = self._tails[name] = Tail.fit(np.asarray(calibration))
        return got

    def _with_local(self, d2: np.ndarray, p: np.ndarray, windows: WindowStates | None
                    ) -> tuple[np.ndarray, list[tuple[LocalFinding, float, bool] | None]]:
        """The anomaly score's p-values with the local score folded in (where a sample has
        windows) and, per sample, (finding, the local score's own p-value, local part larger?)."""
        local = self._local
        if local is None or windows is None:
            return p, [None] * len(p)
        if windows.n != len(p):
            raise ValueError(f"window states of {windows.n} samples for {len(p)} readings")
        stat, found = local.statistics(windows)
        present = windows.present()
        u, v = local.parts(d2, stat)
        combined = np.where(present, local.p_values(d2, stat), p)
        own = local.local_p_values(stat)
        info = [(f, float(own[b]), bool(v[b] > u[b])) if present[b] and f is not None else None
                for b, f in enumerate(found)]
        return combined, info

    def concept_p_values(self, a: Readings) -> dict[str, np.ndarray]:
        """The watched concepts' own conformal p-values [B] (empty without watched concepts)."""
        self.baseline.check_readings(a)
        return self._concept_p(a)

    def _concept_p(self, a: Readings) -> dict[str, np.ndarray]:
        if not self.watch:
            return {}
        assert self.baseline.concepts is not None
        got = self.baseline.concepts.p_values(a, self.watch)
        return {w: got[w] for w in self.watch}

    def _score(self, a: Readings) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        self.baseline.check_readings(a)
        x = feature_matrix(a, self.baseline.tokens)
        bad = ~np.all(np.isfinite(x), axis=1)
        contrib = self.baseline.detector.contributions(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
        per_layer = contrib @ self._group_matrix
        d2 = contrib.sum(axis=1)
        d2 = np.where(bad, np.inf, np.maximum(d2, 0.0))
        p = conformal_p_values(d2, self.baseline.calibration_scores)
        return d2, p, per_layer, self._concept_p(a)

    @property
    def contribution_layers(self) -> list[int]:
        """Layer of each contribution column (``-1`` = global features)."""
        return list(self._groups)

    def score(self, a: Readings, windows: WindowStates | None = None) -> list[SampleScore]:
        """Score every sample of ``a`` (``windows``: their prompt windows of :attr:`local_layers`)."""
        d2, p_whole, per_layer, concept_p = self._score(a)
        p_score, local = self._with_local(d2, p_whole, windows)
        p = combine_p_values([p_score, *concept_p.values()]) if concept_p else p_score
        # a watched concept "fired" when its own p-value is below its share of alpha
        m = 1 + len(concept_p)

        def below(pv: float) -> bool:  # the same comparison as the combined p-value's (Bonferroni)
            return min(1.0, m * pv) < self.alpha

        out: list[SampleScore] = []
        for b in range(a.n):
            total = float(d2[b])
            denom = float(per_layer[b].sum())
            shares = {
                g: (float(per_layer[b, i]) / denom if denom > 0 else 0.0) for i, g in enumerate(self._groups)
            }
            anomalous = bool(p[b] < self.alpha)
            fired = [(w, float(v[b])) for w, v in concept_p.items() if below(float(v[b]))]
            flags: tuple[Flag, ...] = ()
            finding, lp, local_led = local[b] or (None, None, False)
            if anomalous:  # the readings' flags only when the anomaly score itself is below its share
                score_fired = below(float(p_score[b]))
                flags = tuple(self._watched_flags(a, b, fired)
                              + (self._flags(a, b, shares) if score_fired and not local_led else [])
                              + ([local_flag(finding, float(p_score[b]), _prompt_tokens(windows, b))]
                                 if score_fired and local_led
                                 and finding is not None else []))
            out.append(
                SampleScore(
                    score=float(np.sqrt(total / self._n_active)) if np.isfinite(total) else float("inf"),
                    distance2=total,
                    p_value=float(p[b]),
                    anomalous=anomalous,
                    layer_contributions=shares,
                    flags=flags,
                    score_p_value=float(p_score[b]) if concept_p else None,
                    concept_p_values={w: float(v[b]) for w, v in concept_p.items()} if concept_p else None,
                    local_p_value=lp,
                    segment=None if finding is None else (finding.start, finding.end),
                    segment_layers=None if finding is None else dict(finding.layer_strength),
                )
            )
        return out

    # --- flags --------------------------------------------------------------------------------
    def _watched_flags(self, a: Readings, b: int, fired: list[tuple[str, float]]) -> list[Flag]:
        out = []
        for name, pv in fired:
            probe, label = parse_concept(name)
            j = a.probe_labels[probe].index(label)
            probs = a.probes[probe][b, :, j]  # [L]
            normal = self.baseline.quantile(f"probe:{probe}", 0.5)[:, j]
            assert self.baseline.concepts is not None
            z = self.baseline.concepts.layer_scores(a, name)[b]  # what the concept score averages
            top = np.argsort(np.nan_to_num(z, nan=-np.inf))[::-1][:3]
            lays = tuple(sorted(a.layers[i] for i in top))
            out.append(Flag("watched_concept", lays, f"concept:{name}",
                            {"concept": name, "probe": probe, "label": label, "mean": float(np.mean(probs)),
                             "normal": float(np.mean(normal)), "p": pv}))
        return out

    def _flags(self, a: Readings, b: int, shares: dict[int, float]) -> list[Flag]:
        bl = self.baseline
        flags: list[Flag] = []
        layers = a.layers
        for r in READINGS:
            v = a.reading(r)[b]
            for direction, mask in (("high", v > self._hi[r]), ("low", v < self._lo[r])):
                idx = np.nonzero(mask)[0]
                for run in layer_runs([layers[i] for i in idx], layers):
                    if len(run) < self.min_flag_run:
                        continue
                    sel = [layers.index(x) for x in run]
                    flags.append(Flag(f"{r}_{direction}", tuple(run), r,
                                      {"value": float(np.median(v[sel])), "normal": float(np.median(self._med[r][sel]))}))
        ids = a.token_ids()
        sur = bl.tokens.surprisal(ids[b:b + 1])[0]
        idx = np.nonzero(sur[:-1] > self._sur_hi)[0]
        for run in layer_runs([layers[i] for i in idx], layers):
            if len(run) < self.min_flag_run:
                continue
            sel = [layers.index(x) for x in run]
            toks = list(dict.fromkeys(int(t) for t in ids[b, sel]))[:5]
            flags.append(Flag("top1_surprisal_high", tuple(run), "top1_surprisal",
                              {"tokens": toks, "value": float(np.median(sur[sel]))}))
        for p, probs in a.probes.items():
            labels = bl.probe_labels[p]
            arg = probs[b].argmax(axis=1)  # [L]
            rows = np.arange(len(layers))
            # the probe reads a label, with a probability above the baseline's 99th percentile
            # for that label at that layer
            unusual = probs[b][rows, arg] > self._probe_hi[p][rows, arg]
            idx = np.nonzero(unusual)[0]
            for run in layer_runs([layers[i] for i in idx], layers):
                if len(run) < self.min_flag_run:
                    continue
                sel = [layers.index(x) for x in run]
                lab_ids, counts = np.unique(arg[sel], return_counts=True)
                lab = int(lab_ids[np.argmax(counts)])
                flags.append(Flag(f"probe_{p}_unusual_label", tuple(run), f"probe:{p}",
                                  {"probe": p, "label": labels[lab], "value": float(np.mean(probs[b][sel, lab])),
                                   "share": float(np.mean(self._shares[p][sel, lab]))}))
        for g, v in (("prediction_depth", float(a.depth[b])), ("final_entropy", float(a.final_entropy[b])),
                     ("final_confidence", float(a.final_confidence[b])), ("final_top1_surprisal", float(sur[-1]))):
            lo, hi = float(bl.quantile(g, 0.01)), float(bl.quantile(g, 0.99))
            med = float(bl.quantile(g, 0.5))
            if v > hi or v < lo:
                direction = "high" if v > hi else "low"
                lay = (int(a.depth[b]),) if g == "prediction_depth" else (layers[-1],)
                flags.append(Flag(f"{g}_{direction}", lay, g, {"value": v, "normal": med, "low": lo, "high": hi}))
        if not flags:
            top = sorted(((s, g) for g, s in shares.items() if g != GLOBAL_LAYER), reverse=True)[:3]
            lays = tuple(sorted(g for _, g in top))
            total = sum(s for s, _ in top)
            flags.append(Flag("unusual_pattern", lays, "pattern", {"share": total}))
        return flags


def local_flag(finding: LocalFinding, p: float, prompt_tokens: int | None = None, top: int = 3) -> Flag:
    """The ``local_segment`` flag: the run's token offsets (and the prompt's length, so reports
    and metrics can place it) and the layers that carry it most."""
    strongest = sorted(finding.layer_strength, key=lambda k: -finding.layer_strength[k])[:top]
    return Flag(LOCAL_FLAG, tuple(sorted(strongest)), "windows",
                {"start": finding.start, "end": finding.end, "span": finding.span, "p": p,
                 "statistic": finding.statistic, "strength": dict(finding.layer_strength),
                 "prompt_tokens": prompt_tokens})


def _prompt_tokens(windows: WindowStates | None, b: int) -> int | None:
    n = None if windows is None else int(windows.prompt_tokens[b])
    return n if n is not None and n > 0 else None
