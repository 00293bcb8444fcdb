"""The drift detector the sidecar calls: per-sample scores, window tests, alert state, stats.

Threading: one :class:`DriftDetector` per consumer loop; :meth:`DriftDetector.process` is called
on that loop's thread with each micro-batch and does no I/O. It fills a plain
:class:`DriftStats` object and returns a :class:`DetectorUpdate`; the sidecar's recorder
(:mod:`monitor.sidecar.recorder`) turns updates into metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.drift.baseline import Baseline
from monitor.drift.features import as_arrays
from monitor.drift.prompt_windows import WindowStates
from monitor.drift.score import AnomalyScorer, SampleScore
from monitor.drift.window import AlertEvent, SlidingWindowMonitor, WindowResult
from monitor.lenses.readings import Readings, SampleReadings


@dataclass
class DriftStats:
    """Running totals for metrics and ``/readyz``."""

    scored: int = 0
    anomalies: int = 0
    flags: Counter[str] = field(default_factory=Counter)
    windows_tested: int = 0
    windows_significant: int = 0
    alerts_raised: int = 0
    alert_active: bool = False
    alert_sentence: str = ""


@dataclass(frozen=True)
class DetectorUpdate:
    """What one call to :meth:`DriftDetector.process` found."""

    scores: list[SampleScore]
    windows: list[WindowResult]
    events: list[AlertEvent]


class DriftDetector:
    """Scores each sample and tests sliding windows against one baseline.

    ``bundle_id``/``model_fingerprint``: what the sidecar serves; a baseline built for anything
    else is refused here with :class:`~monitor.errors.BaselineError`. ``watch``: watched
    concepts (``"<probe>=<label>"``, see :mod:`monitor.drift.concepts`).
    """

    def __init__(self, baseline: Baseline, *, alpha: float = 0.01, window: int = 200, step: int = 50,
                 fdr: float = 0.001, raise_after: int = 2, clear_after: int = 3,
                 bundle_id: str | None = None, model_fingerprint: str | None = None,
                 watch: Sequence[str] = (), local: bool = False) -> None:
        baseline.check_compatible(bundle_id=bundle_id, model_fingerprint=model_fingerprint)
        self.baseline = baseline
        self.scorer = AnomalyScorer(baseline, alpha=alpha, watch=watch, local=local)
        self.windows = SlidingWindowMonitor(baseline, window=window, step=step, fdr=fdr, alpha=alpha,
                                            raise_after=raise_after, clear_after=clear_after)
        self.stats = DriftStats()

    @property
    def alert(self) -> dict[str, Any]:
        """The alert state as JSON-able data."""
        st = self.windows.alert
        return {"active": st.active, "since": st.since, "sentence": st.sentence, "raised_total": st.raised_total}

    def process(
        self,
        readings: Readings | Sequence[SampleReadings],
        prompt_windows: WindowStates | None = None,
    ) -> DetectorUpdate:
        """Score a batch (columns or per-sample views; ``prompt_windows``: their prompt windows
        for the local score), feed it to the sliding windows, update the stats."""
        a = as_arrays(readings)
        scores = self.scorer.score(a, prompt_windows)
        pv = np.array([s.p_value for s in scores])
        windows, events = self.windows.add(a, pv)
        st = self.stats
        st.scored += len(scores)
        st.anomalies += sum(s.anomalous for s in scores)
        for s in scores:
            st.flags.update(f.kind for f in s.flags)
        st.windows_tested += len(windows)
        st.windows_significant += sum(w.significant for w in windows)
        st.alerts_raised = self.windows.alert.raised_total
        st.alert_active = self.windows.alert.active
        st.alert_sentence = self.windows.alert.sentence
        return DetectorUpdate(scores, windows, events)
