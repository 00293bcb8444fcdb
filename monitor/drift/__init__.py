"""Baselines and drift detection on layer narratives (issue 5).

Public API::

    from monitor.drift import (
        ReadingArrays, build_baseline, Baseline, BaselineLearner, BaselineStore,
        AnomalyScorer, SampleScore, Flag, DriftDetector, DetectorUpdate, publish,
    )

See :mod:`monitor.drift.baseline` (what a baseline holds), :mod:`monitor.drift.score`
(per-sample score and conformal p-value), :mod:`monitor.drift.window` (window tests, alert
hysteresis) and :mod:`monitor.drift.offline` (texts -> readings, as the sidecar would).
"""

from __future__ import annotations

from monitor.drift.baseline import MIN_SAMPLES, Baseline, BaselineLearner, build_baseline
from monitor.drift.detector import DetectorUpdate, DriftDetector, DriftStats, as_arrays, publish
from monitor.drift.features import ReadingArrays, feature_layout, feature_matrix, prediction_depth
from monitor.drift.score import AnomalyScorer, Flag, SampleScore
from monitor.drift.store import BaselineStore
from monitor.drift.window import AlertEvent, AlertState, SlidingWindowMonitor, WindowResult, WindowTester

__all__ = [
    "MIN_SAMPLES", "AlertEvent", "AlertState", "AnomalyScorer", "Baseline", "BaselineLearner",
    "BaselineStore", "DetectorUpdate", "DriftDetector", "DriftStats", "Flag", "ReadingArrays",
    "SampleScore", "SlidingWindowMonitor", "WindowResult", "WindowTester", "as_arrays",
    "build_baseline", "feature_layout", "feature_matrix", "prediction_depth", "publish",
]
