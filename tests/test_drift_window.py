"""Window drift tests, multiple-testing control and the alert state machine."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.drift import (
    AlertState,
    Baseline,
    DriftDetector,
    WindowResult,
    WindowTester,
    build_baseline,
)
from monitor.drift.testing import synth
from monitor.lenses.readings import Readings
from monitor.metrics import SidecarMetrics

META = {"model": "tiny", "model_fingerprint": "sha256:aaa", "bundle_id": "bundle-1"}


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    """A baseline from 2000 synthetic normal samples."""
    return build_baseline(synth(2000), **META)


def _window(sig: bool, end: int) -> WindowResult:
    return WindowResult(end, 100, sig, 10, 0.0 if sig else 0.5, (), ("something moved",) if sig else ())


def test_normal_stream_raises_no_alert(baseline: Baseline) -> None:
    """3000 normal samples in windows of 200 raise no alert."""
    det = DriftDetector(baseline, window=200, step=100)
    for s in range(15):
        det.process(synth(200, seed=100 + s))
    assert det.stats.alerts_raised == 0 and det.stats.windows_tested == 29


def test_probe_share_shift_raises_alert_with_sentence(baseline: Baseline) -> None:
    """A stream whose topic probe turns to 'code' at layers 4-7 raises an alert that says so."""
    det = DriftDetector(baseline, window=200, step=100, raise_after=2)
    det.process(synth(400, seed=200, code=6.0))
    assert det.alert["active"]
    assert "layers 4-" in det.alert["sentence"] and "topic probe 'code' share" in det.alert["sentence"]


def test_window_tester_uses_holm_when_asked(baseline: Baseline) -> None:
    """Holm's correction also finds a large entropy shift and names the layers."""
    res = WindowTester(baseline, correction="holm").test(synth(200, seed=300, shift=1.5))
    assert res.significant
    assert any(s.startswith("layers 4-7: entropy median") for s in res.sentences)


def test_single_significant_window_does_not_raise() -> None:
    """One significant window among quiet ones does not raise (hysteresis)."""
    st = AlertState(raise_after=2, clear_after=3)
    events = [st.step(_window(sig, i)) for i, sig in enumerate([False, True, False, True, False])]
    assert events == [None] * 5 and not st.active


def test_alert_raises_after_k_and_clears_after_m() -> None:
    """The alert raises on the 2nd significant window in a row and clears on the 3rd quiet one."""
    st = AlertState(raise_after=2, clear_after=3)
    pattern = [True, True, False, True, False, False, False]
    kinds = [(ev.kind if (ev := st.step(_window(sig, i))) else None) for i, sig in enumerate(pattern)]
    assert kinds == [None, "raised", None, None, None, None, "cleared"]
    assert st.raised_total == 1


def test_windows_close_every_step_samples(baseline: Baseline) -> None:
    """Windows close at window + k * step samples, however the batches are cut."""
    det = DriftDetector(baseline, window=100, step=40)
    ends = []
    for n in (30, 90, 7, 53, 60):
        ends += [w.end for w in det.process(synth(n, seed=n)).windows]
    assert ends == [100, 140, 180, 220]


def test_recorder_records_a_detector_update(baseline: Baseline) -> None:
    """The sidecar's recorder counts anomalies, flags and raised alerts of a detector update."""
    from monitor.sidecar.recorder import SidecarRecorder

    reg = CollectorRegistry()
    m = SidecarMetrics(reg)
    det = DriftDetector(baseline, window=100, step=50)
    upd = det.process(Readings.concat([synth(300, seed=400, code=6.0)]))
    SidecarRecorder(m, "tiny").detector(upd)
    assert reg.get_sample_value("layerwatch_anomalies_total", {"model": "tiny"}) == sum(s.anomalous for s in upd.scores)
    assert reg.get_sample_value("layerwatch_drift_alerts_total", {"model": "tiny"}) == 1
    assert reg.get_sample_value("layerwatch_drift_alert_active", {"model": "tiny"}) == 1
    assert reg.get_sample_value("layerwatch_flags_total", {"model": "tiny", "flag": "probe_topic_unusual_label"}) > 0
    assert np.isfinite(reg.get_sample_value("layerwatch_anomaly_score_sum", {"model": "tiny"}))
