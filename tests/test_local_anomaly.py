"""The local anomaly score (issue 19) on synthetic prompt windows: calibrated, finds a shifted
segment where it is, keeps the whole-text score's power, and is stored with the baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitor.drift import AnomalyScorer, Baseline, build_baseline
from monitor.drift.document import content_id
from monitor.drift.local import LocalModel, local_layers
from monitor.drift.prompt_windows import ABSENT, WindowStates
from monitor.drift.testing import synth, synth_windows
from monitor.errors import BaselineError
from monitor.pipeline.scoring import ScoringConfig, ScoringStage

META = {"model": "tiny", "model_fingerprint": "sha256:abc", "bundle_id": "b-1"}


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    """2000 synthetic normal samples with windows (600 of them for calibration)."""
    return build_baseline(synth(2000), windows=synth_windows(2000), **META)


def test_combined_p_value_threshold_is_a_false_positive_rate(baseline: Baseline) -> None:
    """On fresh normal samples with windows, p < 0.05 flags about 5% of them (one alpha for both)."""
    _, p, _ = AnomalyScorer(baseline, local=True).score_arrays(synth(4000, seed=11), synth_windows(4000, seed=11))
    assert 0.03 < np.mean(p < 0.05) < 0.075


@pytest.mark.parametrize("where", [0.0, 0.45, 0.9])
def test_a_shifted_segment_is_flagged_with_its_token_offsets(baseline: Baseline, where: float) -> None:
    """A segment of 10% of the prompt moved along an unusual direction is flagged at alpha = 1%
    as local_segment, and the flag's offsets overlap the segment (long prompts: within it)."""
    n = 200
    wins = synth_windows(n, seed=7, segment=(where, 0.1), shift=4.0)
    scores = AnomalyScorer(baseline, alpha=0.01, local=True).score(synth(n, seed=7), wins)
    assert np.mean([s.anomalous for s in scores]) > 0.7
    hits = 0
    for i, s in enumerate(scores):
        t = int(wins.prompt_tokens[i])
        lo = int(where * (t - 1)) + 1
        hi = lo + max(8, int(0.1 * t))
        assert s.segment is not None and s.segment_layers is not None and s.local_p_value is not None
        hits += s.segment[0] < hi and s.segment[1] > lo
        if s.anomalous:
            (flag,) = [f for f in s.flags if f.kind == "local_segment"]
            d = flag.to_dict()
            assert d["segment"] == list(s.segment) and set(d["layer_strength"]) == {str(x) for x in wins.layers}
    assert hits / n > 0.9


def test_normal_samples_name_no_segment_flag(baseline: Baseline) -> None:
    """Unflagged samples carry no flags; the local statistic of normal windows is ~1 per layer."""
    scores = AnomalyScorer(baseline, alpha=0.01, local=True).score(synth(300, seed=13), synth_windows(300, seed=13))
    assert all(not s.flags for s in scores if not s.anomalous)
    strengths = [v for s in scores for v in (s.segment_layers or {}).values()]
    assert 0.3 < float(np.median(strengths)) < 3.0


def test_whole_text_shift_keeps_its_share_of_alpha(baseline: Baseline) -> None:
    """Worst case, a whole-text shift whose windows look normal: with the local score folded in,
    at least as many are flagged as the whole-text score alone flags at 75% of alpha."""
    a = synth(1000, seed=12, shift=1.5)
    scorer = AnomalyScorer(baseline, alpha=0.02, local=True)
    _, p_whole, _ = scorer.score_arrays(a)
    both = np.mean([s.anomalous for s in scorer.score(a, synth_windows(1000, seed=12))])
    assert np.mean(p_whole < 0.02) > 0.3 and both >= np.mean(p_whole < 0.75 * 0.02) - 0.03


def test_samples_without_windows_get_the_whole_text_p_value(baseline: Baseline) -> None:
    """A sample captured without windows (an older tap) is scored by the whole-text score alone."""
    a = synth(50, seed=3)
    w = synth_windows(50, seed=3)
    absent = WindowStates(w.layers, w.means[:0], w.bounds[:0], np.zeros(51, dtype=np.int64),
                          np.full(50, ABSENT, dtype=np.int64))
    scorer = AnomalyScorer(baseline, local=True)
    _, p_none, _ = scorer.score_arrays(a)
    _, p_absent, _ = scorer.score_arrays(a, absent)
    assert np.array_equal(p_none, p_absent)
    assert all(s.local_p_value is None and s.segment is None for s in scorer.score(a, absent))


def test_window_length_and_first_window_are_standardised(baseline: Baseline) -> None:
    """Normal windows' z has about mean 0 and SD 1 whatever the window's length class and
    whether it is the first (offset) window: position effects do not make windows look unusual."""
    model = baseline.local
    assert model is not None
    w = synth_windows(400, seed=21)
    zs: dict[tuple[int, int], list[float]] = {}
    from monitor.drift.local import window_class
    for i in range(w.n):
        per_scale = model.window_stats(*w.sample(i))
        _, sb, z = per_scale[0]
        first, cls = window_class(sb)
        for f, c, v in zip(first, cls, z, strict=True):
            zs.setdefault((int(f), int(c)), []).append(float(v))
    for key, v in zs.items():
        if len(v) >= 200:
            assert abs(np.mean(v)) < 0.35 and 0.6 < np.std(v) < 1.5, (key, np.mean(v), np.std(v))


def test_baseline_with_a_local_model_round_trips(baseline: Baseline) -> None:
    """The stored baseline keeps the local model: same id, same p-values after loading."""
    again = Baseline.loads(baseline.dumps())
    assert again.id == baseline.id and again.local is not None
    a, w = synth(100, seed=4), synth_windows(100, seed=4)
    assert np.array_equal(AnomalyScorer(baseline, local=True).score_arrays(a, w)[1], AnomalyScorer(again, local=True).score_arrays(a, w)[1])


def test_old_baseline_without_a_local_model_loads_and_scores_without_it() -> None:
    """A version-3 baseline (before windows) loads; windows given to its scorer are ignored and
    it says it reads none."""
    bl = build_baseline(synth(600), **META)
    doc = json.loads(bl.dumps())
    doc["schema_version"] = 3
    content = {k: v for k, v in doc.items() if k not in ("id", "created_at")}
    doc["id"] = content_id(content)
    old = Baseline.from_json(doc)
    assert old.local is None and old.schema_version == 3
    scorer = AnomalyScorer(old, local=True)
    assert scorer.local_layers is None
    a = synth(50, seed=2)
    assert np.array_equal(scorer.score_arrays(a)[1], scorer.score_arrays(a, synth_windows(50, seed=2))[1])


def test_a_malformed_local_model_is_refused(baseline: Baseline) -> None:
    """A stored local model missing a field is refused with a BaselineError, not a KeyError."""
    doc = json.loads(baseline.dumps())
    del doc["local"]["basis"]
    content = {k: v for k, v in doc.items() if k not in ("id", "created_at")}
    doc["id"] = content_id(content)
    with pytest.raises(BaselineError):
        Baseline.from_json(doc)


def test_window_states_of_other_layers_are_refused(baseline: Baseline) -> None:
    """Windows of other states than the local model's are an error, not a silent misreading."""
    w = synth_windows(5, layers=(0, 1, 2, 3))
    assert isinstance(baseline.local, LocalModel)
    with pytest.raises(BaselineError):
        baseline.local.statistics(w)


def test_learning_mode_builds_a_baseline_with_a_local_model() -> None:
    """A sidecar learning its baseline from samples with windows learns the local model too."""
    layers = tuple(range(12))
    stage = ScoringStage(ScoringConfig(learn_samples=600, local_score=True), model="tiny", fingerprint="sha256:abc",
                         bundle_id="b-1", probe_labels={})
    want = stage.window_layers(layers)
    assert want == local_layers(layers)
    a = synth(700)
    out = stage.score(a, synth_windows(700, layers=want))
    assert out.promoted is not None and out.promoted.local is not None
    assert len(out.results) == 700 and all(r["score"] is not None for r in out.results[600:])
    assert "local_p_value" in out.results[650]["score"]


def test_too_few_windows_build_a_baseline_without_a_local_model() -> None:
    """Prompts too short for enough windows: the baseline is built without a local model and says
    why, instead of failing."""
    bl = build_baseline(synth(40), windows=synth_windows(40, lengths=(6,)), min_samples=40, **META)
    assert bl.local is None and "not fitted" in bl.extra["local_score"]


def test_local_score_is_off_unless_asked(baseline: Baseline) -> None:
    """By default (baseline.local_score false) windows change no p-value and the scoring stage
    asks the tap's samples for no windows; asked for, the same windows do change them."""
    a, w = synth(200, seed=21), synth_windows(200, seed=21)
    off = AnomalyScorer(baseline)
    assert off.local_layers is None
    assert np.array_equal(off.score_arrays(a, w)[1], off.score_arrays(a)[1])
    assert not np.array_equal(AnomalyScorer(baseline, local=True).score_arrays(a, w)[1], off.score_arrays(a)[1])
    stage = ScoringStage(ScoringConfig(), model="tiny", fingerprint="sha256:abc", bundle_id="b-1", probe_labels={})
    assert stage.window_layers((0, 1, 2, 3)) is None
