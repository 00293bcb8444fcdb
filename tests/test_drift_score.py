"""Per-sample anomaly scores: calibration, per-layer contributions and flags."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.drift import AnomalyScorer, Baseline, build_baseline
from monitor.drift.testing import synth

META = {"model": "tiny", "model_fingerprint": "sha256:aaa", "bundle_id": "bundle-1"}


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    """A baseline from 2000 synthetic normal samples (600 of them for calibration)."""
    return build_baseline(synth(2000), **META)


def test_p_value_threshold_is_a_false_positive_rate(baseline: Baseline) -> None:
    """On fresh normal samples, p < 0.05 flags about 5% of them."""
    _, p, _ = AnomalyScorer(baseline).score_arrays(synth(4000, seed=11))
    assert 0.03 < np.mean(p < 0.05) < 0.075


def test_shifted_samples_get_small_p_values(baseline: Baseline) -> None:
    """Samples whose entropy moved at a few layers are mostly flagged at alpha = 1%."""
    scores = AnomalyScorer(baseline, alpha=0.01).score(synth(200, seed=12, shift=2.5))
    assert np.mean([s.anomalous for s in scores]) > 0.9


def test_contributions_point_at_the_layers_that_moved(baseline: Baseline) -> None:
    """Most of the distance of a shifted sample sits on the shifted layers 4-7."""
    scores = AnomalyScorer(baseline).score(synth(50, seed=13, shift=3.0))
    share = np.mean([sum(s.layer_contributions[layer] for layer in (4, 5, 6, 7)) for s in scores])
    assert share > 0.6
    assert all(abs(sum(s.layer_contributions.values()) - 1.0) < 1e-9 for s in scores)


def test_flags_name_the_reading_and_layers(baseline: Baseline) -> None:
    """Flagged samples say entropy is high, and the flagged layers are mostly the shifted 4-7."""
    scores = [s for s in AnomalyScorer(baseline).score(synth(50, seed=14, shift=3.0)) if s.anomalous]
    flags = [f for s in scores for f in s.flags if f.kind == "entropy_high"]
    flagged = [layer for f in flags for layer in f.layers]
    assert len(flags) >= 40 and np.mean([layer in (4, 5, 6, 7) for layer in flagged]) > 0.8
    assert "entropy" in flags[0].detail and "layers" in flags[0].detail


def test_probe_flag_names_the_unusual_label(baseline: Baseline) -> None:
    """Samples whose topic probe reads 'code' where normal traffic never does get a probe flag."""
    scores = AnomalyScorer(baseline).score(synth(50, seed=15, code=8.0))
    kinds = [f for s in scores for f in s.flags if f.kind == "probe_topic_unusual_label"]
    assert kinds and "'code'" in kinds[0].detail


def test_normal_samples_carry_no_flags(baseline: Baseline) -> None:
    """Flags only explain anomalous samples; samples above alpha have none."""
    scores = AnomalyScorer(baseline, alpha=0.01).score(synth(300, seed=16))
    assert all(not s.flags for s in scores if not s.anomalous)


def test_non_finite_readings_score_as_anomalous_not_nan(baseline: Baseline) -> None:
    """A NaN reading gives an infinite score and the smallest p-value, never NaN."""
    a = synth(3, seed=17)
    a.entropy[0, 2] = np.nan
    s = AnomalyScorer(baseline).score(a)[0]
    assert s.anomalous and s.p_value == pytest.approx(1 / (baseline.n_calibration + 1))
    assert not np.isnan(s.score)
