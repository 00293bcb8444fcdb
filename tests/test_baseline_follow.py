"""Trust in stored baselines, and promote/rollback reaching running sidecars (issue 17, Why 6).

A baseline loaded by id must be that id (its content hash, recomputed at load): a document planted
under the active pointer is refused. ``layerwatch baseline promote`` / ``rollback`` reach a running
sidecar without a restart, with a ``baseline_changed`` audit record saying who and why.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from monitor.audit.segments import list_segments
from monitor.drift import Baseline, BaselineStore, as_arrays, build_baseline
from monitor.drift.testing import synth
from monitor.errors import BaselineError
from monitor.lenses.torch_lens import TorchLogitLens
from monitor.pipeline.scoring import ScoringConfig, ScoringStage, watchable_labels
from monitor.pipeline.stages import read
from monitor.sidecar.config import load_settings
from monitor.sidecar.service import Sidecar
from tests.conftest import make_tiny
from tests.test_sidecar import publish_samples

META = {"model": "tiny", "model_fingerprint": "sha256:aaa", "bundle_id": "bundle-1"}


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def two_synthetic() -> tuple[Baseline, Baseline]:
    return build_baseline(synth(500, seed=1), **META), build_baseline(synth(500, seed=2), **META)


@pytest.fixture
def model_name(redis_url: str) -> Iterator[str]:
    """A model name unique to the test; its baseline keys are deleted afterwards."""
    name = f"lwtest-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"layerwatch:baseline:{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


# --- a baseline is what its id says ---------------------------------------------------------------

@pytest.mark.redis
def test_a_baseline_planted_under_the_active_pointer_is_not_loaded(
        redis_url: str, model_name: str, two_synthetic: tuple[Baseline, Baseline]) -> None:
    """Another (self-consistent) baseline written under the active id's key is refused with an
    error naming the key and the content's real id."""
    a, b = (dict_model(x, model_name) for x in two_synthetic)
    store = BaselineStore(model_name, redis_url=redis_url)
    store.save(a)
    store.promote(a.id)
    redis.Redis.from_url(redis_url).set(store.key(a.id), b.dumps())  # someone with Redis access
    with pytest.raises(BaselineError, match=f"should hold baseline {a.id}.*{b.id}.*not loaded"):
        store.active()


def test_a_baseline_file_planted_under_an_id_is_not_loaded(tmp_path: Path,
                                                           two_synthetic: tuple[Baseline, Baseline]) -> None:
    """The file store refuses <id>.json whose content hashes to another id."""
    a, b = two_synthetic
    store = BaselineStore("tiny", directory=tmp_path)
    store.save(a)
    store.promote(a.id)
    (tmp_path / f"{a.id}.json").write_text(b.dumps())
    with pytest.raises(BaselineError, match="not loaded"):
        store.load(a.id)


def test_a_planted_baseline_cannot_be_promoted(tmp_path: Path, two_synthetic: tuple[Baseline, Baseline]) -> None:
    """promote() loads what it is about to activate, so sidecars are never pointed at a refused one."""
    a, b = two_synthetic
    store = BaselineStore("tiny", directory=tmp_path)
    store.save(a)
    (tmp_path / f"{a.id}.json").write_text(b.dumps())
    with pytest.raises(BaselineError):
        store.promote(a.id)
    assert store.active_id() is None


def test_promote_and_rollback_leave_a_note_of_who_and_why(tmp_path: Path,
                                                          two_synthetic: tuple[Baseline, Baseline]) -> None:
    """The store's change note names the action, ids, who and why."""
    a, b = two_synthetic
    store = BaselineStore("tiny", directory=tmp_path)
    store.save(a)
    store.save(b)
    store.promote(a.id)
    store.promote(b.id, by="alice", reason="traffic moved to the new prompt template")
    note = store.last_change()
    assert note is not None
    assert (note["action"], note["id"], note["previous"], note["by"]) == ("promote", b.id, a.id, "alice")
    store.rollback(reason="false alarms")
    note = store.last_change()
    assert note is not None and (note["action"], note["id"], note["previous"], note["reason"]) == (
        "rollback", a.id, b.id, "false alarms")
    assert "@" in note["by"]  # user@host by default


def test_the_cli_records_who_and_why_of_a_promote_and_a_rollback(
        tmp_path: Path, two_synthetic: tuple[Baseline, Baseline], capsys: pytest.CaptureFixture[str]) -> None:
    """`layerwatch baseline promote/rollback --by --reason` leave them in the store's change note."""
    from monitor.cli import main

    a, b = two_synthetic
    store = BaselineStore("tiny", directory=tmp_path)
    store.save(a)
    store.save(b)
    store.promote(a.id)
    args = ["--dir", str(tmp_path), "--model-name", "tiny"]
    assert main(["baseline", "promote", b.id, *args, "--by", "carol", "--reason", "quarterly rebuild"]) == 0
    note = store.last_change()
    assert note is not None and (note["id"], note["by"], note["reason"]) == (b.id, "carol", "quarterly rebuild")
    assert main(["baseline", "rollback", *args, "--reason", "too many flags"]) == 0
    note = store.last_change()
    assert note is not None and (note["action"], note["id"], note["reason"]) == ("rollback", a.id, "too many flags")


# --- the scoring stage follows the pointer -----------------------------------------------------

def dict_model(bl: Baseline, model: str) -> Baseline:
    """The same statistics for another model name (a new content id)."""
    doc = bl.to_json()
    doc["model"] = model
    from monitor.drift.document import content_id, parse_document

    doc["id"] = content_id(parse_document(doc, (doc["schema_version"],)).content())
    return Baseline.from_json(doc)


@pytest.fixture(scope="module")
def tiny_bank() -> TorchLogitLens:
    return TorchLogitLens(make_tiny("llama", seed=0))


def bank_baselines(bank: TorchLogitLens, model: str) -> tuple[Baseline, Baseline]:
    """Two baselines the tiny bank's readings fit (random hidden states, two seeds)."""
    out = []
    for seed in (1, 2):
        hidden = np.random.default_rng(seed).normal(size=(420, len(bank.layers), bank.hidden_size)).astype(np.float32)
        arrays = as_arrays(read(bank, hidden))
        out.append(build_baseline(arrays, model=model, model_fingerprint=bank.fingerprint, bundle_id=bank.bundle_id))
    return out[0], out[1]


@pytest.mark.redis
def test_the_scoring_stage_switches_between_batches_when_the_pointer_moves(
        redis_url: str, model_name: str, tiny_bank: TorchLogitLens) -> None:
    """A follower sees a promote and a rollback; the next batch is scored with the new baseline,
    and the caller hears baseline_changed (old, new, who, why) before it."""
    a, b = bank_baselines(tiny_bank, model_name)
    store = BaselineStore(model_name, redis_url=redis_url)
    for x in (a, b):
        store.save(x)
    store.promote(a.id)
    stage = ScoringStage(ScoringConfig(window=50), model=model_name, fingerprint=tiny_bank.fingerprint,
                         bundle_id=tiny_bank.bundle_id, probe_labels=watchable_labels(tiny_bank), baseline=a)
    events: list[tuple[str, dict[str, Any]]] = []
    stage.follow(store, 0.05, lambda kind, fields: events.append((kind, fields)))
    batch = read(tiny_bank, np.random.default_rng(9).normal(
        size=(4, len(tiny_bank.layers), tiny_bank.hidden_size)).astype(np.float32))
    try:
        store.promote(b.id, by="alice", reason="new traffic")
        wait_for(lambda: stage.score(batch) is not None and stage.baseline is not None and stage.baseline.id == b.id,
                 10, "the promoted baseline in use")
        kind, fields = events[-1]
        assert kind == "baseline_changed"
        assert (fields["old_baseline_id"], fields["baseline_id"], fields["by"], fields["reason"]) == (
            a.id, b.id, "alice", "new traffic")
        store.rollback(by="bob")
        wait_for(lambda: stage.score(batch) is not None and stage.baseline is not None and stage.baseline.id == a.id,
                 10, "the rolled-back baseline in use")
        assert events[-1][1]["action"] == "rollback" and events[-1][1]["old_baseline_id"] == b.id
    finally:
        stage.stop_following()


@pytest.mark.redis
def test_a_planted_active_baseline_is_refused_by_a_following_stage(
        redis_url: str, model_name: str, tiny_bank: TorchLogitLens) -> None:
    """A pointer moved to a document that is not what its id says keeps the baseline in use and
    reports baseline_refused."""
    a, b = bank_baselines(tiny_bank, model_name)
    store = BaselineStore(model_name, redis_url=redis_url)
    store.save(a)
    store.promote(a.id)
    stage = ScoringStage(ScoringConfig(window=50), model=model_name, fingerprint=tiny_bank.fingerprint,
                         bundle_id=tiny_bank.bundle_id, probe_labels=watchable_labels(tiny_bank), baseline=a)
    events: list[tuple[str, dict[str, Any]]] = []
    stage.follow(store, 0.05, lambda kind, fields: events.append((kind, fields)))
    batch = read(tiny_bank, np.zeros((2, len(tiny_bank.layers), tiny_bank.hidden_size), np.float32))
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(store.key("bl-planted0000000"), b.dumps())
        client.set(store.active_key, "bl-planted0000000")
        wait_for(lambda: stage.score(batch) is not None and bool(events), 10, "the refusal")
        assert events[0][0] == "baseline_refused" and "not loaded" in events[0][1]["reason"]
        assert stage.baseline is not None and stage.baseline.id == a.id
    finally:
        stage.stop_following()
        client.close()


# --- through a running sidecar -------------------------------------------------------------------

@pytest.mark.redis
@pytest.mark.timeout(180)
def test_promote_reaches_a_running_sidecar_within_10_s_without_a_restart(
        redis_url: str, stream_name: str, tmp_path: Path, tiny_bank: TorchLogitLens) -> None:
    """A sidecar started on baseline A scores with B within 10 s of `promote B` (while samples
    flow), and its trail holds a baseline_changed record (A -> B, who, why) before B's samples."""
    torch.manual_seed(0)
    model = f"tiny-{uuid.uuid4().hex[:8]}"
    a, b = bank_baselines(tiny_bank, model)
    client = redis.Redis.from_url(redis_url)
    store = BaselineStore(model, redis=client)
    try:
        for x in (a, b):
            store.save(x)
        store.promote(a.id)
        settings = load_settings(transport=redis_url, stream=stream_name, group="g", consumer="c1", model_name=model,
                                 batch_wait_ms=10,
                                 audit={"directory": tmp_path / "audit", "head_key_prefix": f"{stream_name}:head:"},
                                 baseline={"window": 50, "poll_interval_s": 0.5})
        sc = Sidecar(settings, bank=tiny_bank).start()
        try:
            assert sc.detector is not None and sc.detector.baseline.id == a.id
            publish_samples(redis_url, stream_name, 3, seed=1)
            wait_for(lambda: sc.processed_total >= 3, 60, "the first samples")
            promoted_at = time.monotonic()
            store.promote(b.id, by="alice", reason="new prompt template")

            def switched() -> bool:
                publish_samples(redis_url, stream_name, 1, seed=int(time.monotonic() * 1000) % 10_000)
                return sc.detector is not None and sc.detector.baseline.id == b.id

            wait_for(switched, 10, "the sidecar scoring with the promoted baseline")
            assert time.monotonic() - promoted_at < 10
        finally:
            sc.stop(10)
        recs = [json.loads(x) for seg in list_segments(tmp_path / "audit" / "c1") for x in seg.read_text().splitlines()]
        changed = [r for r in recs if r["kind"] == "baseline_changed"]
        assert len(changed) == 1
        assert (changed[0]["old_baseline_id"], changed[0]["baseline_id"], changed[0]["by"], changed[0]["reason"]) == (
            a.id, b.id, "alice", "new prompt template")
        after = [r["baseline_id"] for r in recs if r["kind"] == "sample" and r["seq"] > changed[0]["seq"]]
        before = [r["baseline_id"] for r in recs if r["kind"] == "sample" and r["seq"] < changed[0]["seq"]]
        assert set(before) == {a.id} and after and set(after) == {b.id}
    finally:
        keys = list(client.scan_iter(match=f"layerwatch:baseline:{model}:*"))
        if keys:
            client.delete(*keys)
        client.close()
