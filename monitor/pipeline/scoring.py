"""The scoring stage: readings -> scores against a baseline, or learning one first.

With a baseline, every sample gets a score, a conformal p-value and flags, and sliding windows
are tested (:class:`monitor.drift.detector.DriftDetector`). Without one, the first
``learn_samples`` samples are collected, a baseline is built from them and promoted, and the
samples of that batch past the target are scored by it. Promotion is reported to the caller
(``on_promoted``): storing it, auditing it and exporting it are not this stage's business.

Following the shared store (:meth:`ScoringStage.follow`): a daemon thread polls the store's active
pointer; a newly promoted (or rolled back to) baseline is loaded there, its content id recomputed
and its compatibility checked, and it replaces the detector at the start of the next
:meth:`~ScoringStage.score` call, i.e. between two batches, never inside one. The caller hears of
each switch, and of each baseline refused, through ``on_event(kind, fields)`` on the scoring
thread, before the batch is scored: ``baseline_changed`` (old and new id, who and why when the
store's change note says) or ``baseline_refused`` (id and reason).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.drift.baseline import Baseline, BaselineLearner, fit_calibration_split
from monitor.drift.concepts import concept_name, min_calibration, parse_concept
from monitor.drift.detector import DetectorUpdate, DriftDetector
from monitor.drift.features import as_arrays
from monitor.drift.local import local_layers
from monitor.drift.prompt_windows import WindowStates
from monitor.errors import BaselineError, ConfigError
from monitor.lenses.readings import Readings

if TYPE_CHECKING:  # pragma: no cover
    from monitor.drift.store import BaselineStore

log = logging.getLogger("layerwatch.pipeline")
BaselineEvent = Callable[[str, dict[str, Any]], None]  # (record kind, fields)


@dataclass(frozen=True)
class ScoringConfig:
    """How samples are scored (the sidecar's ``baseline`` settings)."""

    alpha: float = 0.01
    window: int = 200
    learn_samples: int = 500
    watch: tuple[str, ...] = ()
    local_score: bool = False  # fold the local (prompt-window) score in; off by default (README)


@dataclass
class Scored:
    """What the stage made of one batch: one result per sample (``score`` None while learning),
    the detector's update (None when every sample went to learning) and a promoted baseline."""

    results: list[dict[str, Any]] = field(default_factory=list)
    update: DetectorUpdate | None = None
    promoted: Baseline | None = None
    refused_watch: str | None = None  # why the watch list was dropped for a learned baseline


class ScoringStage:
    """Learn-then-score state machine of one consumer loop (not thread-safe: one loop calls
    :meth:`score`; the :meth:`follow` thread only hands it detectors, under a lock)."""

    def __init__(self, config: ScoringConfig, *, model: str, fingerprint: str, bundle_id: str,
                 probe_labels: dict[str, tuple[str, ...]], baseline: Baseline | None = None) -> None:
        self.config = config
        self._fingerprint, self._bundle_id = fingerprint, bundle_id
        self._check_watch(probe_labels, learning=baseline is None)
        self.detector: DriftDetector | None = None
        self.learner: BaselineLearner | None = None
        self._pending: list[tuple[str, dict[str, Any], DriftDetector | None]] = []  # from the follower thread
        self._pending_lock = threading.Lock()
        self._on_event: BaselineEvent | None = None
        self._follow_stop = threading.Event()
        self._follower: threading.Thread | None = None
        if baseline is not None:
            self.detector = self._detector(baseline, config.watch)
        else:
            self.learner = BaselineLearner(config.learn_samples, model=model, model_fingerprint=fingerprint,
                                           bundle_id=bundle_id)

    @property
    def baseline(self) -> Baseline | None:
        """The baseline in use (None while learning)."""
        return self.detector.baseline if self.detector is not None else None

    def state(self) -> dict[str, Any]:
        """For /readyz: the baseline in use and its alert, or the learning progress."""
        if self.detector is not None:
            return {"state": "loaded", "id": self.detector.baseline.id, "alert": self.detector.alert}
        assert self.learner is not None
        return {"state": "learning", "collected": self.learner.collected, "target": self.learner.target}

    def window_layers(self, sample_layers: tuple[int, ...]) -> tuple[int, ...] | None:
        """The states whose prompt windows :meth:`score` wants: the baseline's local model's, or
        while learning the default choice over the samples' states; None: none are read."""
        if not self.config.local_score:
            return None
        if self.detector is not None:
            return self.detector.scorer.local_layers
        return local_layers(sample_layers)

    def score(self, readings: Readings, windows: WindowStates | None = None) -> Scored:
        """Score (or learn from) one batch (after switching to a newly promoted baseline, if any).

        ``windows``: the samples' prompt windows of :meth:`window_layers` (the local score)."""
        self.apply_pending()
        arrays = as_arrays(readings)
        out = Scored()
        if self.learner is not None:
            taken = self.learner.add(arrays, windows)
            out.results = [{"score": None, "flags": [], "learning": True} for _ in range(taken)]
            if not self.learner.done:
                return out
            out.promoted, out.refused_watch = self._promote()
            if taken == arrays.n:
                return out
            arrays = arrays.subset(slice(taken, None))  # past the target: scored by the new baseline
            windows = None if windows is None else windows.subset(slice(taken, None))
        assert self.detector is not None
        local = self.detector.scorer.local_layers
        out.update = self.detector.process(arrays, windows if windows is not None and windows.layers == local else None)
        out.results += [{"score": s.to_dict(), "flags": [f.to_dict() for f in s.flags]} for s in out.update.scores]
        return out

    # --- following the store's active pointer ------------------------------------------------------
    def follow(self, store: BaselineStore, interval_s: float, on_event: BaselineEvent | None = None) -> None:
        """Poll ``store``'s active pointer every ``interval_s`` on a daemon thread and switch to
        the baseline it names between batches (see the module doc)."""
        if self._follower is not None:
            raise RuntimeError("this scoring stage already follows a store")
        self._on_event = on_event
        self._follower = threading.Thread(target=self._follow, args=(store, interval_s), daemon=True,
                                          name="layerwatch-baseline-follower")
        self._follower.start()

    def stop_following(self, timeout: float = 5.0) -> None:
        """Stop the follower thread (idempotent)."""
        self._follow_stop.set()
        if self._follower is not None and self._follower is not threading.current_thread():
            self._follower.join(timeout)

    def _follow(self, store: BaselineStore, interval_s: float) -> None:
        seen = self.baseline.id if self.baseline is not None else None
        failing = False
        while not self._follow_stop.wait(interval_s):
            try:
                active = store.active_id()
                note = store.last_change() if active not in (None, seen) else None
            except BaselineError as exc:
                if not failing:
                    log.warning("baseline store not readable, keeping the baseline in use: %s", exc)
                failing = True
                continue
            failing = False
            if active is None or active == seen:
                continue
            seen = active
            who = {k: note.get(k) for k in ("action", "by", "reason", "at")} if note and note.get("id") == active else {}
            try:
                detector = self._detector(store.load(active), self.config.watch)
            except BaselineError as exc:
                log.error("the active baseline %s is refused, keeping the one in use: %s", active, exc)
                self._post("baseline_refused", {"baseline_id": active, "reason": str(exc), **who}, None)
                continue
            self._post("baseline_changed", {"baseline_id": active, **who}, detector)

    def _post(self, kind: str, fields: dict[str, Any], detector: DriftDetector | None) -> None:
        with self._pending_lock:
            self._pending.append((kind, fields, detector))

    def apply_pending(self) -> None:
        """Between batches, on the scoring thread: switch detectors and tell the caller."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for kind, fields, detector in pending:
            if detector is not None:
                old = self.baseline.id if self.baseline is not None else None
                if old == detector.baseline.id:
                    continue
                self.detector, self.learner = detector, None
                fields = {"old_baseline_id": old, **fields}
                log.warning("switched to baseline %s (was %s)", detector.baseline.id, old or "learning")
            if self._on_event is not None:
                self._on_event(kind, fields)

    def _promote(self) -> tuple[Baseline, str | None]:
        assert self.learner is not None
        baseline = self.learner.build()
        refused = None
        try:
            self.detector = self._detector(baseline, self.config.watch)
        except BaselineError as exc:
            # Whether the watch list fits depends on what the taps sent (a '<probe>@mean' concept
            # needs positions "last+mean"), which start-up cannot know: score without it rather
            # than failing every batch from now on.
            if not self.config.watch:
                raise
            log.error("baseline.watch %s does not fit the learned baseline %s, scoring without watched "
                      "concepts: %s", list(self.config.watch), baseline.id, exc)
            refused = str(exc)
            self.detector = self._detector(baseline, ())
        self.learner = None
        return baseline, refused

    def _detector(self, baseline: Baseline, watch: Sequence[str]) -> DriftDetector:
        if self.config.local_score and baseline.local is None:
            log.warning("baseline %s holds no local anomaly model (built before prompt windows existed, or from "
                        "samples without them): segments inside prompts are not scored; rebuild it from samples "
                        "with windows to score them", baseline.id)
        c = self.config
        return DriftDetector(baseline, alpha=c.alpha, window=c.window, step=max(1, c.window // 4),
                             watch=watch, bundle_id=self._bundle_id, model_fingerprint=self._fingerprint,
                             local=c.local_score)

    def _check_watch(self, probe_labels: dict[str, tuple[str, ...]], learning: bool) -> None:
        """Watched concepts must be labels of the bundle's probes, and a learned baseline must
        calibrate enough samples to flag anything with them: refused at start-up, not later."""
        c = self.config
        if not c.watch:
            return
        known = {concept_name(p, lab) for p, labs in probe_labels.items() for lab in labs}
        for w in c.watch:
            if concept_name(*parse_concept(w)) not in known:
                raise ConfigError(f"baseline.watch: {w!r} is not a probe label of bundle {self._bundle_id} "
                                  f"(have {sorted(known)[:12]}{' ...' if len(known) > 12 else ''})")
        if learning:
            n_cal = fit_calibration_split(c.learn_samples)[1].size
            need = min_calibration(len(c.watch), c.alpha)
            if n_cal < need:
                raise ConfigError(
                    f"baseline.learn_samples: a learned baseline of {c.learn_samples} samples calibrates "
                    f"{n_cal}; watching {len(c.watch)} concept(s) at alpha={c.alpha} needs {need} (set "
                    f"learn_samples to at least {int(np.ceil(need / 0.3))}, or watch fewer concepts)")


def watchable_labels(bank: Any) -> dict[str, tuple[str, ...]]:
    """Every probe reading a bank can give: its probes and, with a context head, ``<probe>@mean``."""
    return {**dict(bank.probe_labels), **dict(getattr(bank, "context_probe_labels", {}) or {})}

