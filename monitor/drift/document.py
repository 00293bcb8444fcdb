"""The stored form of a baseline: typed pydantic models, (de)serialised in one place.

:class:`BaselineDocument` is the JSON document kept in Redis and in files (schema versions 1 to
3); :func:`to_document` and :func:`from_document` translate between it and the in-memory
:class:`~monitor.drift.baseline.Baseline`. Arrays too large for plain lists (precision matrix,
factor loadings, concept calibration) are base64 blobs (:mod:`monitor.drift.codec`), never pickle.

Identity: a baseline's id is a hash of its content (the document minus ``id`` and
``created_at``), so optional fields (``clip``, ``concepts``, the estimator's matrices) are
written only when set: documents of older versions keep their ids.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from monitor.drift.codec import decode_array, encode_array
from monitor.drift.concepts import ConceptReference
from monitor.drift.features import FeatureLayout, TokenTable
from monitor.drift.local import LocalModel
from monitor.drift.stats import Mahalanobis
from monitor.errors import BaselineError

if TYPE_CHECKING:  # pragma: no cover
    from monitor.drift.baseline import Baseline

Blob = dict[str, Any]  # {"dtype", "shape", "b64"}: see monitor.drift.codec


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FeaturesDocument(_Model):
    """The feature layout and the detector's fitted estimator."""

    names: list[str]
    layer_of: list[int]
    reading_of: list[str]
    mean: list[float]
    scale: list[float]
    active: list[bool]
    shrinkage: float
    components: int = 0
    clip: float | None = None  # absent in baselines written before clipping existed
    precision: Blob | None = None  # Ledoit-Wolf (Fa x Fa)
    loadings: Blob | None = None  # factor model (Fa x k) ...
    psi: Blob | None = None  # ... and its residual variances (Fa)


class WindowBinDocument(_Model):
    """Reference bins of one window test at one layer."""

    edges: list[float]
    counts: list[int]


class BaselineDocument(_Model):
    """A stored baseline, as written to Redis and files."""

    id: str
    created_at: str
    schema_version: int
    model: str
    model_fingerprint: str
    bundle_id: str
    source: str = ""
    layers: list[int]
    probe_labels: dict[str, list[str]]
    n_samples: int
    n_fit: int
    n_calibration: int
    features: FeaturesDocument
    calibration_scores: list[float]
    quantile_levels: list[float]
    quantiles: dict[str, Any]  # nested lists: [L, Q], [Q] or [L, C, Q]
    window_bins: dict[str, list[WindowBinDocument]]
    prediction_depth_histogram: dict[str, int]
    probe_counts: dict[str, list[list[int]]]
    token_table: dict[str, Any]
    concepts: dict[str, Any] | None = None  # absent before watched concepts existed
    local: dict[str, Any] | None = None  # the local anomaly score (version 4; absent without windows)
    extra: dict[str, Any] = {}

    def content(self) -> dict[str, Any]:
        """Everything but ``id`` and ``created_at``: what the id hashes. Optional fields only when set."""
        doc = self.model_dump(mode="json", exclude={"id", "created_at", "features", "concepts", "local"})
        doc["features"] = self.features.model_dump(mode="json", exclude_none=True)
        if self.concepts is not None:
            doc["concepts"] = self.concepts
        if self.local is not None:
            doc["local"] = self.local
        return doc


def content_id(content: dict[str, Any]) -> str:
    """``bl-`` and 16 hex digits of the sha256 of the canonical content JSON."""
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return "bl-" + digest[:16]


def to_document(bl: Baseline) -> BaselineDocument:
    """The stored form of a baseline."""
    det = bl.detector
    factor = det.loadings is not None and det.psi is not None
    features = FeaturesDocument(
        names=list(bl.layout.names), layer_of=list(bl.layout.layer_of), reading_of=list(bl.layout.reading_of),
        mean=det.mean.tolist(), scale=det.scale.tolist(), active=[bool(x) for x in det.active],
        shrinkage=det.shrinkage, components=det.components, clip=det.clip,
        precision=None if factor else encode_array(det.precision, "float32"),
        loadings=encode_array(det.loadings, "float32") if factor else None,  # type: ignore[arg-type]
        psi=encode_array(det.psi, "float32") if factor else None,  # type: ignore[arg-type]
    )
    return BaselineDocument(
        id=bl.id, created_at=bl.created_at, schema_version=bl.schema_version, model=bl.model,
        model_fingerprint=bl.model_fingerprint, bundle_id=bl.bundle_id, source=bl.source, layers=list(bl.layers),
        probe_labels={k: list(v) for k, v in sorted(bl.probe_labels.items())},
        n_samples=bl.n_samples, n_fit=bl.n_fit, n_calibration=bl.n_calibration, features=features,
        calibration_scores=bl.calibration_scores.tolist(), quantile_levels=list(bl.quantile_levels),
        quantiles={k: np.asarray(v).tolist() for k, v in sorted(bl.quantiles.items())},
        window_bins={k: [WindowBinDocument(edges=list(r.edges), counts=list(r.counts)) for r in refs]
                     for k, refs in sorted(bl.window_bins.items())},
        prediction_depth_histogram={str(k): v for k, v in sorted(bl.depth_histogram.items())},
        probe_counts={k: v.astype(int).tolist() for k, v in sorted(bl.probe_counts.items())},
        token_table=bl.tokens.to_json(), concepts=None if bl.concepts is None else bl.concepts.to_json(),
        local=None if bl.local is None else bl.local.to_json(), extra=bl.extra,
    )


def parse_document(raw: dict[str, Any], readable_versions: tuple[int, ...]) -> BaselineDocument:
    """Validate a stored document; BaselineError names what is wrong (version, field)."""
    version = raw.get("schema_version", -1)
    if not isinstance(version, int) or version not in readable_versions:
        raise BaselineError(
            f"baseline schema version {version} is not supported (this layerwatch reads "
            f"{', '.join(map(str, readable_versions))}); rebuild the baseline or upgrade layerwatch")
    try:
        return BaselineDocument.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BaselineError(f"baseline document is malformed ({where}: {err['msg']})") from exc


def detector_of(f: FeaturesDocument) -> Mahalanobis:
    """The fitted estimator a features document holds."""
    mean = np.asarray(f.mean, dtype=np.float64)
    scale = np.asarray(f.scale, dtype=np.float64)
    active = np.asarray(f.active, dtype=bool)
    if f.loadings is not None and f.psi is not None:
        return Mahalanobis.from_factors(mean, scale, active, decode_array(f.loadings).astype(np.float64),
                                        decode_array(f.psi).astype(np.float64), f.shrinkage, f.clip)
    if f.precision is None:  # Ledoit-Wolf, and factor-model baselines written before factors were stored
        raise BaselineError("baseline document is malformed (features: no precision and no loadings)")
    return Mahalanobis(mean, scale, active, decode_array(f.precision).astype(np.float64), f.shrinkage,
                       f.components, f.clip)


def from_document(doc: BaselineDocument) -> dict[str, Any]:
    """The in-memory fields of :class:`~monitor.drift.baseline.Baseline` for a parsed document."""
    from monitor.drift.baseline import WindowReference

    f = doc.features
    try:
        return {
            "id": doc.id, "created_at": doc.created_at, "model": doc.model,
            "model_fingerprint": doc.model_fingerprint, "bundle_id": doc.bundle_id, "source": doc.source,
            "layers": tuple(doc.layers), "probe_labels": {k: tuple(v) for k, v in doc.probe_labels.items()},
            "n_samples": doc.n_samples, "n_fit": doc.n_fit, "n_calibration": doc.n_calibration,
            "layout": FeatureLayout(tuple(f.names), tuple(f.layer_of), tuple(f.reading_of)),
            "detector": detector_of(f),
            "calibration_scores": np.asarray(doc.calibration_scores, dtype=np.float64),
            "quantiles": {k: np.asarray(v, dtype=np.float64) for k, v in doc.quantiles.items()},
            "window_bins": {k: tuple(WindowReference(tuple(r.edges), tuple(r.counts)) for r in refs)
                            for k, refs in doc.window_bins.items()},
            "depth_histogram": {int(k): v for k, v in doc.prediction_depth_histogram.items()},
            "probe_counts": {k: np.asarray(v, dtype=np.int64) for k, v in doc.probe_counts.items()},
            "tokens": TokenTable.from_json(doc.token_table),
            "concepts": ConceptReference.from_json(doc.concepts) if doc.concepts is not None else None,
            "local": LocalModel.from_json(doc.local) if doc.local is not None else None,
            "quantile_levels": tuple(doc.quantile_levels),
            "schema_version": doc.schema_version,
            "extra": dict(doc.extra),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise BaselineError(f"baseline document is malformed ({type(exc).__name__}: {exc})") from exc
