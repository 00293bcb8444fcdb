"""Window drift: per-layer two-sample tests over sliding windows, and an alert with hysteresis.

Every ``step`` samples, the last ``window`` samples are compared with the baseline:

* per layer and per scalar reading (entropy, KL to final, lens confidence, final-top-1 rank): a
  G-test on the baseline's decile bins (baseline counts vs window counts, 2 x K);
* prediction depth: the same test on its quantile bins;
* per layer and per concept probe: a G-test on the argmax label counts;
* the anomaly rate: an exact binomial test of how many samples had ``p < alpha`` (under the null
  at most ``alpha`` of them do).

All p-values of one window go through Benjamini-Hochberg at ``fdr`` (under the global null this
also bounds the chance that the window is significant at all by ``fdr``). The alert state machine
raises after ``raise_after`` consecutive significant windows and clears after ``clear_after``
consecutive quiet ones, so one noisy window neither raises nor clears an alert.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.drift.baseline import Baseline, window_values
from monitor.drift.features import READINGS
from monitor.drift.score import layer_runs
from monitor.drift.stats import benjamini_hochberg, bin_counts, binom_sf, g_test, holm
from monitor.explain import window_sentence
from monitor.lenses.readings import Readings


@dataclass(frozen=True)
class Finding:
    """One test of one window: what was compared, at which layer, and its p-value."""

    test: str  # a reading name, "prediction_depth", "probe:<name>" or "anomaly_rate"
    layer: int | None
    statistic: float
    p_value: float
    significant: bool = False


@dataclass(frozen=True)
class WindowResult:
    """The outcome of testing one window."""

    end: int  # number of samples seen when the window closed
    n: int  # samples in the window
    significant: bool
    n_tests: int
    min_p: float
    findings: tuple[Finding, ...]  # significant findings, smallest p first
    sentences: tuple[str, ...]  # human summaries, most significant first

    def to_dict(self) -> dict[str, Any]:
        return {
            "end": self.end, "n": self.n, "significant": self.significant, "n_tests": self.n_tests,
            "min_p": self.min_p, "sentences": list(self.sentences),
            "findings": [f.__dict__ for f in self.findings[:20]],
        }


class WindowTester:
    """Runs all two-sample tests of one window against a baseline."""

    def __init__(self, baseline: Baseline, *, fdr: float = 0.001, alpha: float = 0.01,
                 correction: str = "bh") -> None:
        if correction not in ("bh", "holm"):
            raise ValueError("correction must be 'bh' or 'holm'")
        self.baseline = baseline
        self.fdr = fdr
        self.alpha = alpha
        self.correction = correction
        self._edges = {
            r: [np.asarray(ref.edges) for ref in refs] for r, refs in baseline.window_bins.items()
        }
        self._ref = {r: [np.asarray(ref.counts) for ref in refs] for r, refs in baseline.window_bins.items()}

    def test(self, a: Readings, p_values: np.ndarray | None = None, end: int = 0) -> WindowResult:
        """Test one window of readings (and the samples' conformal p-values, if given)."""
        bl = self.baseline
        findings: list[Finding] = []
        for r in READINGS + ("prediction_depth",):
            vals = window_values(a, r)
            for i in range(vals.shape[1]):
                counts = bin_counts(vals[:, i], self._edges[r][i])
                g, df, p = g_test(self._ref[r][i], counts)
                if df > 0:
                    findings.append(Finding(r, None if r == "prediction_depth" else a.layers[i], g, p))
        for name, probs in a.probes.items():
            arg = probs.argmax(axis=2)
            n_cls = probs.shape[2]
            for i, layer in enumerate(a.layers):
                g, df, p = g_test(bl.probe_counts[name][i], np.bincount(arg[:, i], minlength=n_cls))
                if df > 0:
                    findings.append(Finding(f"probe:{name}", layer, g, p))
        if p_values is not None and len(p_values):
            k = int(np.sum(np.asarray(p_values) < self.alpha))
            findings.append(Finding("anomaly_rate", None, float(k), binom_sf(k, len(p_values), self.alpha)))
        pv = np.array([f.p_value for f in findings])
        rej = benjamini_hochberg(pv, self.fdr) if self.correction == "bh" else holm(pv, self.fdr)
        sig = sorted(
            (Finding(f.test, f.layer, f.statistic, f.p_value, True) for f, r in zip(findings, rej, strict=True) if r),
            key=lambda f: f.p_value,
        )
        sentences = self.describe(sig, a, p_values)
        return WindowResult(
            end=end, n=a.n, significant=bool(sig), n_tests=len(findings),
            min_p=float(pv.min()) if pv.size else 1.0, findings=tuple(sig), sentences=tuple(sentences),
        )

    # --- what moved (sentences rendered by monitor.explain) ----------------------------------------------------------------------
    def describe(self, sig: Sequence[Finding], a: Readings, p_values: np.ndarray | None) -> list[str]:
        """One sentence per (test, run of neighbouring layers), most significant first."""
        bl = self.baseline
        by_test: dict[str, list[Finding]] = {}
        for f in sig:
            by_test.setdefault(f.test, []).append(f)
        out: list[tuple[float, str]] = []
        for test, fs in by_test.items():
            best = min(f.p_value for f in fs)
            if test == "anomaly_rate":
                assert p_values is not None
                rate = float(np.mean(np.asarray(p_values) < self.alpha))
                out.append((best, window_sentence(test, (), {"alpha": self.alpha, "rate": rate})))
                continue
            if test == "prediction_depth":
                depth = {"before": float(bl.quantile("prediction_depth", 0.5)), "after": float(np.median(a.depth))}
                out.append((best, window_sentence(test, (), depth)))
                continue
            layers = [f.layer for f in fs if f.layer is not None]
            for run in layer_runs(layers, a.layers):
                sel = [a.layers.index(x) for x in run]
                run_p = min(f.p_value for f in fs if f.layer in run)
                if test.startswith("probe:"):
                    name = test.split(":", 1)[1]
                    labels = bl.probe_labels[name]
                    base = bl.probe_shares(name)[sel].mean(axis=0)
                    arg = a.probes[name].argmax(axis=2)[:, sel]
                    now = np.stack([np.mean(arg == c, axis=0) for c in range(len(labels))], axis=1).mean(axis=0)
                    c = int(np.argmax(np.abs(now - base)))
                    facts: dict[str, Any] = {"label": labels[c], "before": float(base[c]), "after": float(now[c])}
                else:
                    facts = {"before": float(np.median(bl.quantile(test, 0.5)[sel])),
                             "after": float(np.median(np.median(a.reading(test)[:, sel], axis=0)))}
                out.append((run_p, window_sentence(test, run, facts)))
        return [s for _, s in sorted(out, key=lambda t: t[0])]


@dataclass(frozen=True)
class AlertEvent:
    """A transition of the alert state."""

    kind: str  # "raised" or "cleared"
    at: int  # samples seen
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at": self.at, "sentence": self.sentence}


@dataclass
class AlertState:
    """Hysteresis: raise after ``raise_after`` significant windows in a row, clear after
    ``clear_after`` quiet ones in a row."""

    raise_after: int = 2
    clear_after: int = 3
    active: bool = False
    streak_significant: int = 0
    streak_quiet: int = 0
    sentence: str = ""
    raised_total: int = 0
    since: int | None = None

    def step(self, result: WindowResult) -> AlertEvent | None:
        """Feed one window; returns the transition it caused, if any."""
        if result.significant:
            self.streak_significant += 1
            self.streak_quiet = 0
            if self.active:
                self.sentence = "; ".join(result.sentences[:3])
            elif self.streak_significant >= self.raise_after:
                self.active = True
                self.since = result.end
                self.raised_total += 1
                self.sentence = "; ".join(result.sentences[:3])
                return AlertEvent("raised", result.end, self.sentence)
        else:
            self.streak_quiet += 1
            self.streak_significant = 0
            if self.active and self.streak_quiet >= self.clear_after:
                self.active = False
                self.since = None
                last, self.sentence = self.sentence, ""
                return AlertEvent("cleared", result.end, f"cleared: {last}")
        return None


@dataclass
class _Buffer:
    parts: deque[Readings] = field(default_factory=deque)
    pvals: deque[np.ndarray] = field(default_factory=deque)
    n: int = 0


class SlidingWindowMonitor:
    """Keeps the last ``window`` samples, tests them every ``step`` samples, drives the alert."""

    def __init__(self, baseline: Baseline, *, window: int = 200, step: int = 50, fdr: float = 0.001,
                 alpha: float = 0.01, raise_after: int = 2, clear_after: int = 3,
                 correction: str = "bh") -> None:
        if window < 20 or not 0 < step <= window:
            raise ValueError(f"need window >= 20 and 0 < step <= window (got window={window}, step={step})")
        self.tester = WindowTester(baseline, fdr=fdr, alpha=alpha, correction=correction)
        self.window = window
        self.step = step
        self.alert = AlertState(raise_after=raise_after, clear_after=clear_after)
        self._buf = _Buffer()
        self._seen = 0
        self._next_test = window
        self.last: WindowResult | None = None

    @property
    def seen(self) -> int:
        return self._seen

    def add(self, a: Readings, p_values: np.ndarray) -> tuple[list[WindowResult], list[AlertEvent]]:
        """Add a batch; returns the windows that closed and the alert transitions they caused."""
        results: list[WindowResult] = []
        events: list[AlertEvent] = []
        start = 0
        while start < a.n:
            # feed up to the next test point so windows close at window + k * step exactly
            take = min(self._next_test - self._seen, a.n - start)
            self._push(a.subset(slice(start, start + take)), np.asarray(p_values[start:start + take]))
            start += take
            self._seen += take
            if self._seen == self._next_test:
                self._next_test += self.step
                win, pv = self._window()
                res = self.tester.test(win, pv, end=self._seen)
                self.last = res
                results.append(res)
                ev = self.alert.step(res)
                if ev is not None:
                    events.append(ev)
        return results, events

    def _push(self, part: Readings, pv: np.ndarray) -> None:
        b = self._buf
        b.parts.append(part)
        b.pvals.append(pv)
        b.n += part.n
        while b.n - b.parts[0].n >= self.window:
            b.n -= b.parts.popleft().n
            b.pvals.popleft()

    def _window(self) -> tuple[Readings, np.ndarray]:
        a = Readings.concat(list(self._buf.parts))
        pv = np.concatenate(list(self._buf.pvals))
        return a.subset(slice(a.n - self.window, a.n)), pv[-self.window:]
