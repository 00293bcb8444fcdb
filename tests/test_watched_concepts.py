"""Watched concepts: a named probe label with its own conformal p-value, combined with the
anomaly score so alpha stays the false-positive rate (monitor.drift.concepts)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitor.drift import AnomalyScorer, Baseline, Readings, build_baseline
from monitor.drift.concepts import ConceptReference, combine_p_values, min_calibration, parse_concept
from monitor.drift.detector import DriftDetector
from monitor.drift.document import content_id as _content_id
from monitor.drift.testing import synth
from monitor.errors import BaselineError, ConfigError

META = {"model": "m", "model_fingerprint": "fp", "bundle_id": "b"}


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    return build_baseline(synth(1500, seed=0), **META)


def leaning(a: Readings, toward: float, label: int = 2) -> Readings:
    """``a`` with its topic probe leaning toward ``label`` by ``toward`` nats at every layer and
    nothing else changed: a shift in what the text is about that no other reading shows."""
    logp = np.log(a.probes["topic"])
    logp[:, :, label] += toward
    p = np.exp(logp)
    return dataclasses.replace(a, probes={"topic": p / p.sum(axis=2, keepdims=True)})


def test_concept_name_must_be_probe_equals_label() -> None:
    """'<probe>=<label>' parses; anything else is refused with the offending text quoted."""
    assert parse_concept("topic@mean=legal") == ("topic@mean", "legal")
    for bad in ("topic", "=legal", "topic=", ""):
        with pytest.raises(ValueError, match="probe>=<label"):
            parse_concept(bad)


def test_bonferroni_combination_keeps_the_false_positive_rate() -> None:
    """min(1, m * min p) of m independent uniform p-values exceeds alpha's rate by no more than
    sampling noise, and is never below the smallest p-value."""
    rng = np.random.default_rng(0)
    ps = [rng.random(200_000) for _ in range(3)]
    comb = combine_p_values(ps)
    assert np.mean(comb < 0.01) <= 0.0105
    assert np.all(comb >= np.min(ps, axis=0)) and np.all(comb <= 1.0)


def test_min_calibration_is_the_least_size_at_which_a_sample_can_be_flagged() -> None:
    """With n calibration samples the least combined p-value is (m+1)/(n+1): below alpha from
    min_calibration on, not one sample before."""
    for m, alpha in ((0, 0.01), (1, 0.01), (2, 0.05), (3, 0.001)):
        n = min_calibration(m, alpha)
        assert (m + 1) / (n + 1) < alpha <= (m + 1) / n


def test_watching_the_shifted_label_catches_a_label_shift_the_one_class_score_misses(baseline: Baseline) -> None:
    """Samples whose topic probe leans toward 'code' at every layer and nothing else: the anomaly
    score alone flags few of them (the lean is a few of its many features); watching topic=code
    flags most, while held-out normal traffic is flagged at no more than alpha either way."""
    normal = synth(3000, seed=7)
    shifted = leaning(synth(1000, seed=8), 1.2)
    plain = AnomalyScorer(baseline, alpha=0.01)
    watched = AnomalyScorer(baseline, alpha=0.01, watch=["topic=code"])
    rate = {name: (float(np.mean(sc.score_arrays(normal)[1] < 0.01)), float(np.mean(sc.score_arrays(shifted)[1] < 0.01)))
            for name, sc in (("plain", plain), ("watched", watched))}
    assert rate["plain"][0] <= 0.02 and rate["watched"][0] <= 0.02  # alpha 0.01 + noise of 3000 samples
    assert rate["watched"][1] >= 0.5
    assert rate["watched"][1] >= rate["plain"][1] + 0.3


def test_a_sample_flagged_by_a_watched_concept_says_so_and_names_it(baseline: Baseline) -> None:
    """Flags of a sample flagged by the watched concept alone are 'watched_concept' flags naming
    the concept, not an 'unusual_pattern' the anomaly score did not find; the sample carries the
    score's and the concept's own p-values."""
    shifted = leaning(synth(400, seed=8), 1.2)
    scores = AnomalyScorer(baseline, alpha=0.01, watch=["topic=code"]).score(shifted)
    by_concept = [s for s in scores if s.anomalous and s.score_p_value is not None and s.score_p_value >= 0.005]
    assert by_concept, "expected samples flagged by the watched concept alone"
    for s in by_concept:
        assert [f.kind for f in s.flags] == ["watched_concept"]
        assert "topic=code" in s.flags[0].detail and s.flags[0].reading == "concept:topic=code"
        assert s.concept_p_values is not None and s.concept_p_values["topic=code"] < 0.005
        d = s.to_dict()
        assert d["concept_p_values"]["topic=code"] == s.concept_p_values["topic=code"]
    unwatched = AnomalyScorer(baseline, alpha=0.01).score(synth(5, seed=9))
    assert all(s.concept_p_values is None and "concept_p_values" not in s.to_dict() for s in unwatched)


def test_without_watch_the_p_values_are_the_anomaly_score_alone(baseline: Baseline) -> None:
    """An empty watch list changes nothing: same p-values as the plain conformal score."""
    a = synth(300, seed=3, shift=1.0)
    p0 = AnomalyScorer(baseline).score_arrays(a)[1]
    p1 = AnomalyScorer(baseline, watch=[]).score_arrays(a)[1]
    assert np.array_equal(p0, p1)


def test_watch_list_errors_name_the_field(baseline: Baseline) -> None:
    """An unknown label, a label listed twice, or more concepts than the calibration split can
    support at alpha are refused before any sample is scored, naming 'baseline.watch'."""
    with pytest.raises(BaselineError, match=r"baseline\.watch: 'topic=legal' is not a probe label"):
        AnomalyScorer(baseline, watch=["topic=legal"])
    with pytest.raises(ValueError, match=r"baseline\.watch: a concept is listed twice"):
        AnomalyScorer(baseline, watch=["topic=code", "topic= code"])
    n_cal = baseline.n_calibration  # 450: at alpha 0.01 three concepts need 400, four 500
    assert n_cal == 450
    AnomalyScorer(baseline, alpha=0.01, watch=["topic=code", "topic=news", "topic=prose"])
    small = build_baseline(synth(400, seed=0), **META)  # 120 calibration samples
    with pytest.raises(BaselineError, match=r"baseline\.watch: watching 1 concept\(s\) at alpha=0.01 needs at least 200"):
        AnomalyScorer(small, alpha=0.01, watch=["topic=code"])
    AnomalyScorer(small, alpha=0.05, watch=["topic=code"])  # 40 needed


def test_concept_reference_survives_the_json_round_trip_and_older_baselines_still_load(baseline: Baseline) -> None:
    """A reloaded baseline gives bit-identical concept p-values; a baseline written before
    watched concepts existed keeps its content id, loads, scores, and refuses a watch list with
    the reason."""
    again = Baseline.loads(baseline.dumps())
    a = leaning(synth(200, seed=4), 1.0)
    w = ["topic=code", "topic=news"]
    assert np.array_equal(AnomalyScorer(again, watch=w).score_arrays(a)[1], AnomalyScorer(baseline, watch=w).score_arrays(a)[1])
    assert set(again.summary()["watchable_concepts"]) == {"topic=prose", "topic=news", "topic=code"}
    content = json.loads(json.dumps(dataclasses.replace(baseline, concepts=None)._content()))
    assert "concepts" not in content
    old = Baseline.from_json({"id": _content_id(content), "created_at": baseline.created_at, **content})
    assert old.concepts is None
    assert np.array_equal(AnomalyScorer(old).score_arrays(a)[1], AnomalyScorer(baseline).score_arrays(a)[1])
    with pytest.raises(BaselineError, match="holds no concept calibration"):
        AnomalyScorer(old, watch=["topic=code"])


def test_a_label_every_sample_reads_alike_gives_finite_scores() -> None:
    """A degenerate probe label (the same probability for every normal sample) gets a unit scale,
    so its concept score and p-values are finite."""
    a = synth(600, seed=1)
    probs = a.probes["topic"].copy()
    probs[:, :, 1] = 0.2
    probs[:, :, 0] = 0.8 - probs[:, :, 2]
    a = dataclasses.replace(a, probes={"topic": probs})
    ref = ConceptReference.fit(a.subset(slice(0, 400)), a.subset(slice(400, 600)))
    s = ref.scores(synth(50, seed=2))
    assert all(np.all(np.isfinite(v)) for v in s.values())
    p = ref.p_values(synth(50, seed=2), ["topic=news"])["topic=news"]
    assert np.all((p > 0) & (p <= 1))


def test_detector_windows_see_the_combined_p_values(baseline: Baseline) -> None:
    """With a watched concept, the window tests count the combined p-values: a stream where 20%
    of samples lean toward the watched label raises a drift alert whose sentence reports the
    share of anomalous samples."""
    det = DriftDetector(baseline, window=200, step=50, watch=["topic=code"])
    rng = np.random.default_rng(0)
    normal, shifted = synth(2000, seed=11), leaning(synth(2000, seed=12), 1.2)
    idx = rng.random(1000) < 0.2
    events = []
    for s in range(0, 1000, 50):
        sl = slice(s, s + 50)
        part_n, part_s = normal.subset(np.arange(s, s + 50)), shifted.subset(np.arange(s, s + 50))
        rows = np.where(idx[sl])[0]
        mixed = part_n.subset(np.setdiff1d(np.arange(50), rows))
        batch = mixed if not len(rows) else Readings.concat([mixed, part_s.subset(rows)])
        events += det.process(batch).events
    assert any(e.kind == "raised" for e in events)
    assert "anomalous samples" in det.alert["sentence"]


# --------------------------------------------------------------------------- sidecar start-up
@pytest.fixture
def bundle(tmp_path: Path) -> Any:
    from monitor.lenses.runtime import LensBank
    from monitor.lenses.writer import write_bundle
    from tests.conftest import make_tiny
    from tests.test_lens_bank import random_lens

    tiny = make_tiny("llama", seed=0)
    tr, probes = random_lens(tiny)
    write_bundle(tmp_path / "bundle", tiny, tr, probes, model_name="tiny-llama", k=4)
    return lambda: LensBank.load(tmp_path / "bundle")


def test_sidecar_refuses_an_unknown_watched_concept_or_a_learning_target_too_small_for_it(
        tmp_path: Path, bundle: Any) -> None:
    """Start-up fails naming 'baseline.watch' for a label the bundle's probes do not have, and
    'baseline.learn_samples' when a learned baseline could never flag with the watch list; a
    valid watch list with enough samples starts (learning mode)."""
    from monitor.sidecar.config import load_settings
    from monitor.sidecar.service import Sidecar

    def settings(name: str, **baseline: Any) -> Any:
        return load_settings(transport=f"memory://watch-{name}", group="g", http_port=0, warm_up=False,
                             audit={"directory": tmp_path / f"audit-{name}"}, baseline=baseline)

    bank = bundle()
    label = f"topic={bank.probe_labels['topic'][0]}"
    with pytest.raises(ConfigError, match=r"baseline\.watch: 'topic=nope' is not a probe label"):
        Sidecar(settings("a", watch=["topic=nope"]), bank=bank)
    with pytest.raises(ConfigError, match=r"baseline\.learn_samples: .* needs 200 \(set learn_samples to at least 667"):
        Sidecar(settings("b", watch=[label], learn_samples=400), bank=bank)
    sc = Sidecar(settings("c", watch=[label, f"topic@mean={bank.probe_labels['topic'][1]}"], learn_samples=1000),
                 bank=bank)
    try:
        assert sc.learner is not None
    finally:
        sc.stop(5)
    with pytest.raises(ConfigError, match="watch"):
        load_settings(transport="memory://x", baseline={"watch": ["legal"]})


def watching_sidecar(tmp_path: Path, bank: Any, url: str) -> tuple[Any, str]:
    """A learning sidecar on a fresh memory stream ``url`` that watches the bundle's first topic
    label on the prompt mean (400 learning samples, alpha 0.05); returns it and the concept."""
    from monitor.sidecar.config import load_settings
    from monitor.sidecar.service import Sidecar
    from monitor.transport.memory import MemoryTransport

    concept = f"topic@mean={bank.probe_labels['topic'][0]}"
    MemoryTransport.reset_all()
    settings = load_settings(transport=url, group="g", http_port=0, batch_max=64, batch_wait_ms=10, warm_up=False,
                             audit={"directory": tmp_path / "audit"},
                             baseline={"learn_samples": 400, "alpha": 0.05, "watch": [concept]})
    return Sidecar(settings, bank=bank), concept


def test_sidecar_scores_with_watched_concepts_and_audits_their_p_values(tmp_path: Path, bundle: Any) -> None:
    """A sidecar that watches a concept learns its baseline from live samples, then scores every
    later sample - also those in the micro-batch that completed learning - with the combined
    p-value, writes the anomaly score's and the concept's own p-values into the sample's audit
    record, and counts the samples the concept flagged in layerwatch_watched_concept_total (a
    series that exists from start-up)."""
    from tests.test_sidecar import audit_records, publish_samples

    sc, concept = watching_sidecar(tmp_path, bundle(), "memory://watch-audit")
    url, settings = "memory://watch-audit", sc.settings
    series = {"model": sc.model_label, "concept": concept}
    assert sc.registry.get_sample_value("layerwatch_watched_concept_total", series) == 0.0
    try:
        ids = publish_samples(url, settings.stream, 430, positions="last+mean")
        while sc.step().processed:
            pass
        assert sc.learner is None and sc.detector is not None
        assert sc.detector.scorer.watch == (concept,)
    finally:
        sc.stop(5)
    scored = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "sample" and r.get("score")]
    assert {r["sample_id"] for r in scored} == set(ids[400:])
    for r in scored:
        s = r["score"]
        assert set(s["concept_p_values"]) == {concept}
        expect = min(1.0, 2 * min(s["score_p_value"], s["concept_p_values"][concept]))
        assert s["p_value"] == pytest.approx(expect)
    by_concept = sum(any(f["kind"] == "watched_concept" for f in r["flags"]) for r in scored)
    assert sc.registry.get_sample_value("layerwatch_watched_concept_total", series) == by_concept


def test_recorder_counts_each_watched_concept_flag_under_its_concept(baseline: Baseline) -> None:
    """Every 'watched_concept' flag increments layerwatch_watched_concept_total for its concept and
    the flags counter for its kind; samples flagged by the anomaly score alone do not."""
    from monitor.metrics import SidecarMetrics
    from monitor.sidecar.recorder import SidecarRecorder

    det = DriftDetector(baseline, watch=["topic=code"])
    m = SidecarMetrics()
    update = det.process(leaning(synth(300, seed=21), 1.2))
    SidecarRecorder(m, "m").detector(update)
    n = sum(any(f.kind == "watched_concept" for f in s.flags) for s in update.scores)
    assert n > 100
    assert m.registry.get_sample_value("layerwatch_watched_concept_total", {"model": "m", "concept": "topic=code"}) == n
    assert m.registry.get_sample_value("layerwatch_flags_total", {"model": "m", "flag": "watched_concept"}) == n


def test_a_broken_probe_reading_is_not_reported_as_a_watched_concept(baseline: Baseline) -> None:
    """NaN probe readings give the concept p = 1 (no watched_concept flag, no false 'the traffic
    you named appeared'); the sample is still flagged, by the anomaly score."""
    a = synth(5, seed=5)
    probs = a.probes["topic"].copy()
    probs[0] = np.nan
    a = dataclasses.replace(a, probes={"topic": probs})
    sc = AnomalyScorer(baseline, watch=["topic=code"])
    assert sc.concept_p_values(a)["topic=code"][0] == 1.0
    s = sc.score(a)[0]
    assert s.anomalous and "watched_concept" not in [f.kind for f in s.flags]


def test_watched_flag_names_the_layers_that_drive_the_concept_score(baseline: Baseline) -> None:
    """Samples whose probe leans toward the watched label at three layers only get
    watched_concept flags naming those layers (the layers ranked by the standardised reading the
    concept score averages)."""
    a = synth(200, seed=6)
    logp = np.log(a.probes["topic"])
    logp[:, [2, 5, 9], 2] += 6.0
    p = np.exp(logp)
    a = dataclasses.replace(a, probes={"topic": p / p.sum(axis=2, keepdims=True)})
    flagged = [f for s in AnomalyScorer(baseline, watch=["topic=code"]).score(a) for f in s.flags
               if f.kind == "watched_concept"]
    assert len(flagged) > 20
    # the lean dominates each sample's standardised readings there (a natural high elsewhere
    # can outrank one of them now and then)
    assert sum(f.layers == (2, 5, 9) for f in flagged) >= 0.9 * len(flagged)


def test_older_schema_versions_load_and_unknown_versions_are_refused(baseline: Baseline) -> None:
    """Baselines written as schema version 1 (before factors and concepts were stored) and 2
    (prediction depth by rank) still load with their id; a version this layerwatch does not know
    is refused with the versions it reads."""
    content = json.loads(json.dumps(dataclasses.replace(baseline, schema_version=1, concepts=None)._content()))
    v1 = Baseline.from_json({"id": _content_id(content), "created_at": baseline.created_at, **content})
    content2 = json.loads(json.dumps(dataclasses.replace(baseline, schema_version=2)._content()))
    v2 = Baseline.from_json({"id": _content_id(content2), "created_at": baseline.created_at, **content2})
    assert v1.schema_version == 1 and v2.schema_version == 2 and baseline.schema_version == 4
    assert v2.id == _content_id(content2)
    content["schema_version"] = 5
    with pytest.raises(BaselineError, match=r"schema version 5 is not supported \(this layerwatch reads 1, 2, 3, 4\)"):
        Baseline.from_json({"id": _content_id(content), "created_at": baseline.created_at, **content})


def test_a_concept_listed_twice_in_another_spelling_is_refused_at_config_load() -> None:
    """'topic=code' and 'topic= code' are the same concept: the settings refuse the list."""
    from monitor.sidecar.config import load_settings

    with pytest.raises(ConfigError, match="listed twice"):
        load_settings(transport="memory://x", baseline={"watch": ["topic=code", "topic= code"]})


def test_a_learned_baseline_the_watch_list_does_not_fit_is_scored_without_it(tmp_path: Path, bundle: Any) -> None:
    """Watching a '<probe>@mean' concept while the taps send positions 'last': the learned
    baseline has no context probes, which start-up could not know. The sidecar records
    'watch_refused' with the reason in the audit trail and scores every later sample without
    the watch, instead of failing each batch."""
    from monitor.transport.memory import MemoryTransport
    from tests.test_sidecar import audit_records, publish_samples

    sc, concept = watching_sidecar(tmp_path, bundle(), "memory://watch-refused")
    url, settings = "memory://watch-refused", sc.settings
    try:
        ids = publish_samples(url, settings.stream, 430, positions="last")
        while sc.step().processed:
            pass
        assert sc.learner is None and sc.detector is not None and sc.detector.scorer.watch == ()
    finally:
        sc.stop(5)
    recs = audit_records(tmp_path / "audit")
    (refused,) = [r for r in recs if r["kind"] == "watch_refused"]
    assert refused["watch"] == [concept] and "not a probe label" in refused["reason"]
    scored = {r["sample_id"] for r in recs if r["kind"] == "sample" and r.get("score")}
    assert scored == set(ids[400:])
    assert not MemoryTransport(url).dead_letters()
