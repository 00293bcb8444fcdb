"""Baselines and drift detection on layer narratives (issue 5).

Public API::

    from monitor.drift import (
        Readings, build_baseline, Baseline, BaselineLearner, BaselineStore,
        AnomalyScorer, SampleScore, Flag, DriftDetector, DetectorUpdate,
    )

See :mod:`monitor.drift.baseline` (what a baseline holds), :mod:`monitor.drift.score`
(per-sample score and conformal p-value), :mod:`monitor.drift.window` (window tests, alert
hysteresis). Statistics only: texts -> readings lives in :mod:`monitor.pipeline.offline`, and
the metrics of a detector update are recorded by :mod:`monitor.sidecar.recorder`.
"""

from __future__ import annotations

from monitor.drift.baseline import MIN_SAMPLES, Baseline, BaselineLearner, build_baseline
from monitor.drift.detector import DetectorUpdate, DriftDetector, DriftStats
from monitor.drift.features import as_arrays, feature_layout, feature_matrix
from monitor.drift.score import AnomalyScorer, Flag, SampleScore
from monitor.drift.store import BaselineStore
from monitor.drift.window import AlertEvent, AlertState, SlidingWindowMonitor, WindowResult, WindowTester
from monitor.lenses.readings import Readings, prediction_depth

__all__ = [
    "MIN_SAMPLES", "AlertEvent", "AlertState", "AnomalyScorer", "Baseline", "BaselineLearner",
    "BaselineStore", "DetectorUpdate", "DriftDetector", "DriftStats", "Flag", "Readings",
    "SampleScore", "SlidingWindowMonitor", "WindowResult", "WindowTester", "as_arrays",
    "build_baseline", "feature_layout", "feature_matrix", "prediction_depth",
]
