"""Baselines: building, identity, compatibility, robustness, learning mode and the store."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from monitor.drift import (
    AnomalyScorer,
    Baseline,
    BaselineLearner,
    BaselineStore,
    DriftDetector,
    Readings,
    build_baseline,
    feature_matrix,
)
from monitor.drift.baseline import fit_calibration_split
from monitor.drift.document import content_id as _content_id
from monitor.drift.features import TokenTable, as_arrays
from monitor.drift.testing import synth
from monitor.errors import BaselineError
from monitor.lenses.readings import BankOutput, split_batch

META = {"model": "tiny", "model_fingerprint": "sha256:aaa", "bundle_id": "bundle-1"}


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    """A baseline from 800 synthetic normal samples."""
    return build_baseline(synth(800), created_at="2026-01-01T00:00:00+00:00", **META)


def test_too_few_samples_is_refused_with_the_number_needed() -> None:
    """Building from 57 samples says how many are needed and how many more to collect."""
    with pytest.raises(BaselineError, match=r"at least 400 samples, got 57: collect 343 more"):
        build_baseline(synth(57), **META)


def test_fit_and_calibration_splits_partition_the_samples_the_same_way_on_every_build() -> None:
    """The calibration split is disjoint from the fit split (the p-values need scores of samples
    the detector never saw), together they cover every sample, its share is the fraction asked,
    and a rebuild with the same seed splits alike (another seed differently)."""
    fit, cal = fit_calibration_split(1000, 0.3, seed=0)
    assert len(cal) == 300 and len(fit) == 700
    assert not set(fit) & set(cal) and set(fit) | set(cal) == set(range(1000))
    assert np.all(np.diff(fit) > 0) and np.all(np.diff(cal) > 0)
    again, other = fit_calibration_split(1000, 0.3, seed=0), fit_calibration_split(1000, 0.3, seed=1)
    assert np.array_equal(again[1], cal) and not np.array_equal(other[1], cal)
    bl = build_baseline(synth(500), **META)
    assert (bl.n_fit, bl.n_calibration) == (350, 150)


def test_id_is_a_hash_of_the_content() -> None:
    """The same samples give the same id whatever the creation time; other samples another id."""
    a = build_baseline(synth(500), created_at="2026-01-01T00:00:00+00:00", **META)
    b = build_baseline(synth(500), created_at="2027-05-05T00:00:00+00:00", **META)
    c = build_baseline(synth(500, seed=9), **META)
    assert a.id == b.id != c.id and a.id.startswith("bl-")


def test_json_round_trip_scores_identically(baseline: Baseline) -> None:
    """A baseline reloaded from JSON gives exactly the same scores."""
    again = Baseline.loads(baseline.dumps())
    x = synth(50, seed=5)
    assert np.array_equal(AnomalyScorer(baseline).score_arrays(x)[0], AnomalyScorer(again).score_arrays(x)[0])


def test_factor_model_baseline_stores_its_factors_not_the_full_precision_matrix() -> None:
    """A factor-model baseline stores W and psi (F x (k + 1) numbers) instead of the F x F
    precision, so it is several times smaller than the same baseline with Ledoit-Wolf, and a
    save/load round trip gives the same distances."""
    a = synth(800, n_layers=40)
    factor = build_baseline(a, components=4, **META)
    lw = build_baseline(a, components=0, **META)
    doc = factor.to_json()["features"]
    assert "loadings" in doc and "psi" in doc and "precision" not in doc
    assert "precision" in lw.to_json()["features"]
    assert len(factor.dumps()) * 3 < len(lw.dumps())
    again = Baseline.loads(factor.dumps())
    x = feature_matrix(a, factor.tokens)
    np.testing.assert_allclose(again.detector.distance2(x), factor.detector.distance2(x), rtol=1e-9)


def test_factor_baseline_written_with_a_precision_matrix_still_loads_and_scores_alike(baseline: Baseline) -> None:
    """Baselines written before factors were stored hold the factor model's precision matrix;
    they load through that path and score as the factored form does."""
    old_det = dataclasses.replace(baseline.detector, loadings=None, psi=None)
    content = json.loads(json.dumps(dataclasses.replace(baseline, detector=old_det)._content()))
    assert "precision" in content["features"] and "loadings" not in content["features"]
    old = Baseline.from_json({"id": _content_id(content), "created_at": baseline.created_at, **content})
    assert old.detector.loadings is None and old.detector.components == baseline.detector.components
    a = synth(50, seed=9)
    np.testing.assert_allclose(AnomalyScorer(old).score_arrays(a)[0], AnomalyScorer(baseline).score_arrays(a)[0],
                               rtol=1e-5)


def test_edited_baseline_is_refused(baseline: Baseline) -> None:
    """A stored baseline whose content no longer matches its id is refused."""
    doc = json.loads(baseline.dumps())
    doc["calibration_scores"][0] = 0.0
    with pytest.raises(BaselineError, match="does not match its id"):
        Baseline.from_json(doc)


def test_baseline_for_another_bundle_is_refused(baseline: Baseline) -> None:
    """The detector refuses a baseline built with another lens bundle."""
    with pytest.raises(BaselineError, match="lens bundle bundle-1.*bundle-2"):
        DriftDetector(baseline, bundle_id="bundle-2", model_fingerprint="sha256:aaa")


def test_baseline_for_another_model_is_refused(baseline: Baseline) -> None:
    """The detector refuses a baseline built for another model."""
    with pytest.raises(BaselineError, match="built for model sha256:aaa"):
        DriftDetector(baseline, bundle_id="bundle-1", model_fingerprint="sha256:bbb")


def test_readings_with_other_layers_are_refused(baseline: Baseline) -> None:
    """Scoring readings over other layers than the baseline's is refused."""
    with pytest.raises(BaselineError, match="cover layers"):
        AnomalyScorer(baseline).score(synth(5, n_layers=6, shift_layers=(2,)))


def test_constant_features_do_not_produce_nan() -> None:
    """Readings constant over the whole baseline score finitely, even when a sample moves them."""
    a = synth(500)
    const = Readings.from_columns(
        a.layers, entropy=np.full_like(a.entropy, 2.0), kl_to_final=a.kl_to_final,
        confidence=np.full_like(a.confidence, 1.0), final_top1_rank=np.zeros_like(a.final_top1_rank),
        final_entropy=np.full(a.n, 2.0), final_confidence=np.full(a.n, 1.0),
        probes={"topic": np.tile([1.0, 0.0, 0.0], (a.n, len(a.layers), 1))}, probe_labels=a.probe_labels)
    bl = build_baseline(const, **META)
    moved = const.subset(slice(0, 3))
    moved.entropy[0] = 9.0
    scores = AnomalyScorer(bl).score(moved)
    assert all(np.isfinite(s.score) and np.isfinite(s.p_value) for s in scores)
    assert not any(np.isnan(v) for s in scores for v in s.layer_contributions.values())


def test_bank_output_and_sample_readings_give_the_same_features() -> None:
    """The batch and per-sample forms of lens readings produce identical feature vectors."""
    rng = np.random.default_rng(0)
    b, n_layers, k = 4, 5, 3
    probs = rng.dirichlet(np.ones(k), size=(b, n_layers)).astype(np.float32)
    probs.sort(axis=2)
    out = BankOutput(
        layers=tuple(range(n_layers)), topk_ids=rng.integers(0, 100, (b, n_layers, k)),
        topk_probs=probs[:, :, ::-1].copy(), entropy=rng.random((b, n_layers)).astype(np.float32),
        kl_to_final=rng.random((b, n_layers)).astype(np.float32),
        final_top1_rank=rng.integers(0, 3, (b, n_layers)), final_topk_ids=rng.integers(0, 100, (b, k)),
        final_topk_probs=np.full((b, k), 0.3, np.float32), final_entropy=rng.random(b).astype(np.float32),
        probes={"lang": rng.dirichlet(np.ones(2), size=(b, n_layers)).astype(np.float32)},
    )
    labels = {"lang": ("en", "de")}
    a1 = as_arrays(out)
    tokens = TokenTable.count(a1.token_ids())
    x1 = feature_matrix(a1, tokens)
    x2 = feature_matrix(as_arrays(split_batch(out, labels)), tokens)
    assert np.allclose(x1, x2)


def test_learner_collects_up_to_target_then_builds() -> None:
    """Learning mode keeps exactly the first N samples and builds a baseline from them."""
    learner = BaselineLearner(450, **META)
    assert learner.add(synth(300)) == 300 and not learner.done
    assert learner.add(synth(300, seed=1)) == 150 and learner.done
    assert learner.collected == 450 and learner.progress == 1.0
    assert learner.build().n_samples == 450


def test_learner_refuses_to_build_early() -> None:
    """Building before enough samples arrived says how many are missing."""
    learner = BaselineLearner(500, **META)
    learner.add(synth(100))
    with pytest.raises(BaselineError, match="got 100: collect 300 more"):
        learner.build()


def test_learner_refuses_samples_read_with_other_probes() -> None:
    """Samples whose probe readings differ from those already collected (a tap with another
    'positions' setting: last+mean adds '<probe>@mean') are refused, naming both sets, and the
    learner keeps what it had."""
    from dataclasses import replace

    learner = BaselineLearner(450, **META)
    learner.add(synth(100))
    a = synth(50, seed=3)
    other = replace(a, probes={**a.probes, "topic@mean": a.probes["topic"]},
                    probe_labels={**a.probe_labels, "topic@mean": a.probe_labels["topic"]})
    with pytest.raises(BaselineError, match=r"probes \['topic', 'topic@mean'\] do not match.*positions"):
        learner.add(other)
    assert learner.collected == 100 and learner.add(synth(350, seed=4)) == 350 and learner.build().n_samples == 450


def test_file_store_promote_and_rollback(tmp_path: Path) -> None:
    """Without Redis the store keeps files, an active pointer and a history to roll back."""
    store = BaselineStore("tiny", directory=tmp_path)
    a, b = (build_baseline(synth(500, seed=s), **META) for s in (1, 2))
    store.save(a)
    store.save(b)
    assert store.active() is None
    store.promote(a.id)
    store.promote(b.id)
    assert store.active_id() == b.id and store.history() == [b.id, a.id]
    assert store.rollback() == a.id and store.active_id() == a.id
    with pytest.raises(BaselineError, match="no earlier baseline"):
        store.rollback()
    assert set(store.ids()) == {a.id, b.id}


def test_promoting_an_unknown_baseline_is_refused(tmp_path: Path) -> None:
    """Only stored baselines can be promoted."""
    with pytest.raises(BaselineError, match="not stored"):
        BaselineStore("tiny", directory=tmp_path).promote("bl-0000")


@pytest.mark.redis
def test_redis_store_is_shared_and_rolls_back(redis_url: str, tmp_path: Path) -> None:
    """Two stores on one Redis see the same active baseline; rollback restores the previous one."""
    import redis

    model = f"lwtest-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    try:
        writer = BaselineStore(model, redis=client, directory=tmp_path)
        reader = BaselineStore(model, redis_url=redis_url)
        meta = dict(META, model=model)
        a, b = (build_baseline(synth(500, seed=s), **meta) for s in (1, 2))
        writer.save(a)
        writer.save(b)
        writer.promote(a.id)
        writer.promote(b.id)
        assert client.exists(f"layerwatch:baseline:{model}:{b.id}")
        assert reader.active_id() == b.id
        assert writer.rollback() == a.id
        loaded = reader.active()
        assert loaded is not None and loaded.id == a.id
        assert json.loads((tmp_path / "active.json").read_text())["active"] == a.id
    finally:
        keys = list(client.scan_iter(match=f"layerwatch:baseline:{model}:*"))
        if keys:
            client.delete(*keys)


def test_clip_is_stored_and_a_baseline_without_it_scores_unclipped() -> None:
    """The winsorising clip survives JSON; a document written before clipping existed (no "clip")
    keeps its id and scores with the unclipped detector."""
    clipped = build_baseline(synth(500), created_at="2026-01-01T00:00:00+00:00", **META)
    assert clipped.detector.clip == 4.0 and Baseline.loads(clipped.dumps()).detector.clip == 4.0
    old = build_baseline(synth(500), created_at="2026-01-01T00:00:00+00:00", clip=None, **META)
    doc = json.loads(old.dumps())
    assert "clip" not in doc["features"]
    again = Baseline.from_json(doc)  # the content id still matches
    assert again.id == old.id and again.detector.clip is None and again.id != clipped.id
    x = synth(40, seed=6)
    assert np.array_equal(AnomalyScorer(old).score_arrays(x)[0], AnomalyScorer(again).score_arrays(x)[0])


def test_a_schema_2_document_written_before_the_typed_models_loads_unchanged() -> None:
    """A baseline file written by layerwatch before its documents were typed models (schema 2,
    16-factor detector, clipped) loads with its id and writes back the same document."""
    import gzip
    import json
    from pathlib import Path

    raw = gzip.decompress((Path(__file__).with_name("data") / "baseline_v2_factor16.json.gz").read_bytes()).decode()
    bl = Baseline.loads(raw)
    assert bl.id == "bl-69b85544fd8545b1" and bl.schema_version == 2
    assert json.loads(bl.dumps()) == json.loads(raw)
