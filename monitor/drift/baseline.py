"""Baselines: what normal layer narratives look like, as a versioned, JSON-serialisable object.

A baseline is built from the readings of normal traffic (a window of live samples, or a text
corpus run through the model). The samples are split once, at random with a fixed seed:

* the *fit* split estimates the compact feature vector's mean and covariance (a 16-factor model
  by default, Ledoit-Wolf shrinkage on request; see :meth:`Mahalanobis.fit`);
* the held-out *calibration* split gives the anomaly scores that turn a new sample's score into a
  conformal p-value (``p < alpha`` then means a false-positive rate of at most ``alpha``);
* the fit split also counts the lens top-1 tokens per layer (:class:`TokenTable`) and
  standardises every probe label's log-probability, whose scores on the calibration split
  calibrate watched concepts (:mod:`monitor.drift.concepts`);
* with prompt windows, the splits also fit and calibrate the local score (:mod:`monitor.drift.local`);
* all samples give the descriptive statistics: per-layer quantiles of entropy, KL to final, lens
  confidence and final-top-1 rank, the prediction-depth histogram, probe label shares per layer,
  and the reference bin counts of the window tests.

Identity: ``id`` is a hash of the content (everything but ``id`` and ``created_at``), so the same
samples give the same id. A baseline names the lens bundle and the model fingerprint it was built
for and :meth:`Baseline.check_compatible` refuses any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from monitor.drift.concepts import ConceptReference
from monitor.drift.document import content_id, from_document, parse_document, to_document
from monitor.drift.features import (
    GLOBAL_FEATURES,
    READINGS,
    FeatureLayout,
    Readings,
    TokenTable,
    feature_layout,
    feature_matrix,
)
from monitor.drift.local import LocalModel
from monitor.drift.prompt_windows import WindowStates
from monitor.drift.stats import Mahalanobis, bin_counts
from monitor.errors import BaselineError
from monitor.lenses.readings import CONTEXT_SUFFIX

# 2: factor models store loadings and residual variances, and concept calibration is stored;
# version 1 documents still load. Sidecars that only read version 1 refuse version 2 with that
# reason: upgrade sidecars before building or learning baselines with a newer layerwatch.
# 3: the prediction depth of every reading is the live one (the first layer from which the lens
# top-1 equals the model's final top-1 through the last layer); versions 1 and 2 were built
# offline with "the final top-1 has rank 0 under the lens", which differs on ties. They still
# load and score; their depth quantiles and feature means may differ on tied samples.
# 4: the local anomaly score's model (prompt windows) when the samples had them; 1-3 score without.
SCHEMA_VERSION = 4
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
MIN_SAMPLES = 400  # fit split large enough for a stable covariance, >= 120 calibration scores
QUANTILE_LEVELS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
# Factors of the detector's covariance model (0 = Ledoit-Wolf; see Mahalanobis.fit). Chosen on
# the evaluation benchmark (``python -m benchmarks.drift_eval --components K``): 16 and 32 were
# within 0.002 mean AUROC and 0.02 mean TPR of each other, both well above Ledoit-Wolf.
DEFAULT_COMPONENTS = 16
# Standardised features are winsorised at this many standard deviations (see Mahalanobis.fit):
# on the evaluation benchmark it raised TPR at 1% FPR for code (0.955 -> 0.993), garbled text
# (0.770 -> 0.785) and topic shift (0.346 -> 0.362), injection moved 0.212 -> 0.198 (6 of 400
# texts); ``python -m benchmarks.drift_eval --clip 0`` runs the unclipped detector.
DEFAULT_CLIP = 4.0
WINDOW_BIN_LEVELS = tuple(i / 10 for i in range(1, 10))  # decile bins for the window tests


@dataclass(frozen=True)
class WindowReference:
    """Reference bins of one window test at one layer: interior edges and baseline counts."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class Baseline:
    """Statistics of normal layer narratives for one model and one lens bundle."""

    id: str
    created_at: str
    model: str
    model_fingerprint: str
    bundle_id: str
    source: str
    layers: tuple[int, ...]
    probe_labels: dict[str, tuple[str, ...]]
    n_samples: int
    n_fit: int
    n_calibration: int
    layout: FeatureLayout
    detector: Mahalanobis
    calibration_scores: np.ndarray  # sorted squared distances of the calibration split
    quantiles: dict[str, np.ndarray]  # reading -> [L, Q]; global feature -> [Q]; probe:<name> -> [L, C, Q]
    window_bins: dict[str, tuple[WindowReference, ...]]  # reading -> per layer; "prediction_depth" -> (one,)
    depth_histogram: dict[int, int]
    probe_counts: dict[str, np.ndarray]  # probe -> [L, C] argmax label counts
    tokens: TokenTable  # lens top-1 token counts per layer (fit split)
    # per probe label: standardisation and calibration scores for watched concepts (None in
    # baselines written before watched concepts existed, and in baselines without probes)
    concepts: ConceptReference | None = None
    local: LocalModel | None = None  # the local score (None: samples without windows, older baselines)
    quantile_levels: tuple[float, ...] = QUANTILE_LEVELS
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # --- derived ----------------------------------------------------------------------------
    def probe_shares(self, probe: str) -> np.ndarray:
        """Argmax label shares [L, C] of one probe in the baseline."""
        c = self.probe_counts[probe].astype(np.float64)
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)

    def quantile(self, reading: str, level: float) -> np.ndarray:
        """The baseline's quantile at ``level`` (one of ``quantile_levels``) per layer, or scalar."""
        try:
            i = self.quantile_levels.index(level)
        except ValueError as exc:
            raise BaselineError(f"quantile level {level} is not stored (have {self.quantile_levels})") from exc
        return np.asarray(self.quantiles[reading])[..., i]

    def check_compatible(self, *, bundle_id: str | None = None, model_fingerprint: str | None = None) -> None:
        """Refuse to score with a baseline built for another lens bundle or model."""
        if model_fingerprint is not None and model_fingerprint != self.model_fingerprint:
            raise BaselineError(
                f"baseline {self.id} was built for model {self.model_fingerprint}, but the served "
                f"model is {model_fingerprint}; build a baseline for this model "
                "(`layerwatch baseline build`) or run in learning mode"
            )
        if bundle_id is not None and bundle_id != self.bundle_id:
            raise BaselineError(
                f"baseline {self.id} was built with lens bundle {self.bundle_id}, but the sidecar "
                f"runs bundle {bundle_id}; readings of different lenses are not comparable: build "
                "a baseline with this bundle or run in learning mode"
            )

    def check_readings(self, a: Readings) -> None:
        """Refuse readings whose layers or probes differ from the baseline's."""
        if a.layers != self.layers:
            raise BaselineError(
                f"readings cover layers {list(a.layers)}, baseline {self.id} covers {list(self.layers)}"
            )
        have = {k: tuple(v) for k, v in a.probe_labels.items()}
        if set(have) != set(self.probe_labels) or any(
            a.probes[p].shape[-1] != len(self.probe_labels[p]) for p in self.probe_labels
        ):
            raise BaselineError(
                f"readings carry probes {have}, baseline {self.id} expects {dict(self.probe_labels)}"
            )

    # --- JSON (the stored form: monitor.drift.document) --------------------------------------
    def _content(self) -> dict[str, Any]:
        return to_document(self).content()

    def to_json(self) -> dict[str, Any]:
        """The JSON document stored in Redis and on disk."""
        return {"id": self.id, "created_at": self.created_at, **self._content()}

    def dumps(self) -> str:
        """Compact JSON text."""
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Baseline:
        """Parse a stored baseline; refuses unknown schema versions and tampered content."""
        parsed = parse_document(doc, READABLE_SCHEMA_VERSIONS)
        bl = cls(**from_document(parsed))
        if content_id(parsed.content()) != bl.id:
            raise BaselineError(
                f"baseline {bl.id}: content does not match its id (edited or corrupted); rebuild it"
            )
        return bl

    @classmethod
    def loads(cls, text: str | bytes) -> Baseline:
        """Parse JSON text."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BaselineError(f"baseline is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise BaselineError("baseline JSON must be an object")
        return cls.from_json(doc)

    def summary(self) -> dict[str, Any]:
        """A small human-oriented view (``layerwatch baseline show``)."""
        depth_total = max(1, sum(self.depth_histogram.values()))
        depth_sorted = sorted(self.depth_histogram.items())
        acc = 0
        median_depth = depth_sorted[-1][0] if depth_sorted else None
        for k, v in depth_sorted:
            acc += v
            if acc >= depth_total / 2:
                median_depth = k
                break
        return {
            "id": self.id,
            "created_at": self.created_at,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "bundle_id": self.bundle_id,
            "source": self.source,
            "n_samples": self.n_samples,
            "n_fit": self.n_fit,
            "n_calibration": self.n_calibration,
            "layers": f"{self.layers[0]}..{self.layers[-1]} ({len(self.layers)})",
            "features": f"{self.detector.n_active} active of {self.layout.size}",
            "estimator": self.detector.estimator,
            "shrinkage": round(self.detector.shrinkage, 4),
            "clip": self.detector.clip,
            "median_prediction_depth": median_depth,
            "entropy_median_by_layer": [round(float(x), 3) for x in self.quantile("entropy", 0.5)],
            "kl_to_final_median_by_layer": [round(float(x), 3) for x in self.quantile("kl_to_final", 0.5)],
            "watchable_concepts": list(self.concepts.names) if self.concepts is not None else [],
            "probes": {
                p: {
                    "labels": list(lbls),
                    "top_label_by_layer": [lbls[int(i)] for i in self.probe_shares(p).argmax(axis=1)],
                }
                for p, lbls in self.probe_labels.items()
            },
        }


def _window_reference(values: np.ndarray) -> WindowReference:
    edges = np.unique(np.quantile(values, WINDOW_BIN_LEVELS))
    return WindowReference(tuple(float(e) for e in edges), tuple(int(c) for c in bin_counts(values, edges)))


def window_values(a: Readings, reading: str) -> np.ndarray:
    """The values a window test bins for ``reading`` ([B, L], or [B, 1] for prediction depth)."""
    if reading == "prediction_depth":
        return a.depth.astype(np.float64)[:, None]
    return a.reading(reading).astype(np.float64)


def baseline_positions(bl: Baseline) -> str:
    """The tap positions a baseline's readings need: "last+mean" when it has context probes."""
    return "last+mean" if any(p.endswith(CONTEXT_SUFFIX) for p in bl.probe_labels) else "last"


def fit_calibration_split(n: int, calibration_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The sorted indices of the fit and the calibration split of ``n`` baseline samples.

    The detector is fitted on the first and its conformal p-values are computed against the
    distances of the second, which it never saw. Seeded, so a rebuild splits the same way.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = max(1, int(round(n * calibration_fraction)))
    return np.sort(perm[n_cal:]), np.sort(perm[:n_cal])


def build_baseline(
    a: Readings,
    *,
    model: str,
    model_fingerprint: str,
    bundle_id: str,
    source: str = "",
    calibration_fraction: float = 0.3,
    min_samples: int = MIN_SAMPLES,
    seed: int = 0,
    created_at: str | None = None,
    extra: dict[str, Any] | None = None,
    components: int | None = None,
    clip: float | None = DEFAULT_CLIP,
    windows: WindowStates | None = None,
) -> Baseline:
    """Build a baseline from the readings of ``a.n`` normal samples.

    ``windows``: the samples' prompt windows (:func:`~monitor.drift.local.local_layers`): the local score.

    ``components``: the detector's covariance estimator, :data:`DEFAULT_COMPONENTS` when None
    (a factor model with that many factors; 0 = Ledoit-Wolf, see :meth:`Mahalanobis.fit`).
    ``clip``: winsorise standardised features at that many standard deviations (None: not).

    Raises :class:`BaselineError` with the number still needed when there are too few samples.
    """
    if a.n < min_samples:
        raise BaselineError(
            f"a baseline needs at least {min_samples} samples, got {a.n}: collect "
            f"{min_samples - a.n} more (learning mode keeps going until it has them) or pass a "
            "larger corpus"
        )
    if not 0.05 <= calibration_fraction <= 0.8:
        raise BaselineError(f"calibration_fraction must be in [0.05, 0.8], got {calibration_fraction}")
    a.validate()
    fit_idx, cal_idx = fit_calibration_split(a.n, calibration_fraction, seed)

    layout = feature_layout(a.layers, a.probe_labels)
    fit, cal = a.subset(fit_idx), a.subset(cal_idx)
    if windows is not None and windows.n != a.n:
        raise BaselineError(f"window states of {windows.n} samples for readings of {a.n}")
    tokens = TokenTable.count(fit.token_ids())
    # Leave-one-out surprisal on the fit split: a sample's own count would make it look familiar.
    k = DEFAULT_COMPONENTS if components is None else int(components)
    fit_x = feature_matrix(fit, tokens, leave_one_out=True)
    det = Mahalanobis.fit(fit_x, components=k, clip=clip)
    # Round what is stored (float32) before calibrating, so stored and live scores are computed
    # with exactly the same matrix.
    det = det.rounded()
    cal_d2 = det.distance2(feature_matrix(cal, tokens))
    cal_scores = np.sort(cal_d2)
    local = None
    notes: dict[str, Any] = {}
    if windows is not None and windows.present().any():
        try:
            local = LocalModel.fit(windows, fit_idx, cal_idx, det.distance2(fit_x), cal_d2)
        except BaselineError as exc:  # too few windows (short prompts): the whole-text score alone
            notes["local_score"] = f"not fitted: {exc}"

    levels = np.asarray(QUANTILE_LEVELS)
    quantiles: dict[str, np.ndarray] = {}
    for r in READINGS:
        quantiles[r] = np.quantile(a.reading(r), levels, axis=0).T  # [L, Q]
    cal_surprisal = tokens.surprisal(cal.token_ids())  # out-of-sample, like live samples
    quantiles["top1_surprisal"] = np.quantile(cal_surprisal[:, :-1], levels, axis=0).T
    for g, v in zip(GLOBAL_FEATURES, (a.depth.astype(np.float64), a.final_entropy, a.final_confidence,
                                      cal_surprisal[:, -1]), strict=True):
        quantiles[g] = np.quantile(v, levels)

    for p, probs in a.probes.items():
        quantiles[f"probe:{p}"] = np.moveaxis(np.quantile(probs, levels, axis=0), 0, -1)  # [L, C, Q]

    window_bins: dict[str, tuple[WindowReference, ...]] = {}
    for r in READINGS + ("prediction_depth",):
        vals = window_values(a, r)
        window_bins[r] = tuple(_window_reference(vals[:, i]) for i in range(vals.shape[1]))

    depth_hist: dict[int, int] = {}
    for d, c in zip(*np.unique(a.depth, return_counts=True), strict=True):
        depth_hist[int(d)] = int(c)

    probe_counts: dict[str, np.ndarray] = {}
    for p, probs in a.probes.items():
        arg = probs.argmax(axis=2)  # [B, L]
        n_cls = probs.shape[2]
        probe_counts[p] = np.stack(
            [np.bincount(arg[:, i], minlength=n_cls) for i in range(arg.shape[1])]
        ).astype(np.int64)

    bl = Baseline(
        id="",
        created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        model=model,
        model_fingerprint=model_fingerprint,
        bundle_id=bundle_id,
        source=source,
        layers=a.layers,
        probe_labels={k: tuple(v) for k, v in a.probe_labels.items()},
        n_samples=a.n,
        n_fit=int(fit_idx.size),
        n_calibration=int(cal_idx.size),
        layout=layout,
        detector=det,
        calibration_scores=cal_scores,
        quantiles=quantiles,
        window_bins=window_bins,
        depth_histogram=depth_hist,
        probe_counts=probe_counts,
        tokens=tokens,
        concepts=ConceptReference.fit(fit, cal) if a.probes else None,
        local=local,
        extra={**(extra or {}), **notes},
    )
    # Hash what is stored: round-trip through JSON so the id matches a reloaded baseline.
    content = json.loads(json.dumps(bl._content()))
    return Baseline.from_json({"id": content_id(content), "created_at": bl.created_at, **content})


class BaselineLearner:
    """Learning mode: accumulate the first ``target`` samples of live traffic, then build.

    Memory is bounded by ``target`` samples of readings. The sidecar reports :attr:`collected`
    and :attr:`target` in ``/readyz`` and the ``layerwatch_baseline_learning*`` metrics.
    """

    def __init__(
        self,
        target: int,
        *,
        model: str,
        model_fingerprint: str,
        bundle_id: str,
        source: str = "learned from live traffic",
        **build_kwargs: Any,
    ) -> None:
        min_samples = int(build_kwargs.get("min_samples", MIN_SAMPLES))
        if target < min_samples:
            raise BaselineError(
                f"learning target {target} is below the {min_samples} samples a baseline needs; "
                f"set it to at least {min_samples}"
            )
        self.target = int(target)
        self._meta = {"model": model, "model_fingerprint": model_fingerprint, "bundle_id": bundle_id,
                      "source": source}
        self._kwargs = build_kwargs
        self._parts: list[Readings] = []
        self._windows: list[WindowStates | None] = []
        self._n = 0

    @property
    def collected(self) -> int:
        """Samples collected so far (at most ``target``)."""
        return self._n

    @property
    def done(self) -> bool:
        """True once ``target`` samples are in."""
        return self._n >= self.target

    @property
    def progress(self) -> float:
        """Fraction collected, in [0, 1]."""
        return min(1.0, self._n / self.target)

    def add(self, a: Readings, windows: WindowStates | None = None) -> int:
        """Keep the samples of ``a`` (and their prompt windows) that fit under the target; returns
        how many were taken. Windows held: at most ``target`` samples' of the local layers."""
        room = self.target - self._n
        if room <= 0 or a.n == 0:
            return 0
        if self._parts and (a.layers != self._parts[0].layers or set(a.probes) != set(self._parts[0].probes)):
            first = self._parts[0]
            raise BaselineError(
                f"readings of layers {list(a.layers)} with probes {sorted(a.probes)} do not match the baseline "
                f"being learned (layers {list(first.layers)}, probes {sorted(first.probes)}): taps with "
                "different 'positions' settings feed this sidecar (last+mean adds '<probe>@mean')"
            )
        take = a if a.n <= room else a.subset(slice(0, room))
        take.validate()
        self._parts.append(take)
        self._windows.append(None if windows is None else windows.subset(slice(0, take.n)))
        self._n += take.n
        return take.n

    def build(self) -> Baseline:
        """Build the baseline from what was collected (refused with the number needed if short)."""
        if self._n == 0:
            raise BaselineError(f"no samples collected yet; a baseline needs {self.target}")
        a = Readings.concat(self._parts)
        kwargs = dict(self._kwargs)
        if all(w is not None for w in self._windows) and len({w.layers for w in self._windows if w}) == 1:
            kwargs.setdefault("windows", WindowStates.concat([w for w in self._windows if w is not None]))
        kwargs.setdefault("extra", {"learned_samples": self._n})
        return build_baseline(a, **self._meta, **kwargs)  # type: ignore[arg-type]
