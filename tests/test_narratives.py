"""Narratives and per-batch bookkeeping: the sidecar's vectorised paths equal the plain ones."""

from __future__ import annotations

import numpy as np

from monitor.lenses.readings import BankOutput, split_batch
from monitor.lenses.trust import ProbeBar
from monitor.narratives import build_narrative, narratives_for_batch


def random_output(b: int = 6, layers: tuple[int, ...] = (0, 3, 7, 9), k: int = 5, seed: int = 0) -> BankOutput:
    rng = np.random.default_rng(seed)
    n = len(layers)
    ids = rng.integers(0, 50, (b, n, k))
    ids[:, -1] = ids[:, -1, :1]  # duplicates are fine; the last layer agrees with the output
    probs = np.sort(rng.dirichlet(np.ones(20), (b, n))[:, :, :k], axis=-1)[:, :, ::-1].astype(np.float32)
    return BankOutput(
        layers=layers, topk_ids=ids, topk_probs=np.ascontiguousarray(probs),
        entropy=rng.gamma(2.0, 1.0, (b, n)).astype(np.float32),
        kl_to_final=rng.gamma(1.0, 1.0, (b, n)).astype(np.float32),
        final_top1_rank=rng.integers(0, 4, (b, n)), final_topk_ids=ids[:, -1].copy(),
        final_topk_probs=np.ascontiguousarray(probs[:, -1]), final_entropy=rng.gamma(2.0, 1.0, b).astype(np.float32),
        probes={"topic": rng.dirichlet(np.ones(3), (b, n)).astype(np.float32),
                "language": rng.dirichlet(np.ones(4), (b, n)).astype(np.float32)},
        # both probes pass the quality bar at every layer and never abstain: their labels are printed
        probe_bars={"topic": ProbeBar(frozenset(layers), min_confidence=0.0),
                    "language": ProbeBar(frozenset(layers), min_confidence=0.0)},
    )


def test_batch_narratives_equal_narratives_built_one_sample_at_a_time() -> None:
    """narratives_for_batch (numpy rounding for the batch) gives exactly build_narrative's result."""
    out = random_output()
    labels = {"topic": ("code", "legal", "prose"), "language": ("en", "de", "fr", "pl")}
    readings = split_batch(out, labels)
    ids = [(f"s{i}", f"r{i}", "m") for i in range(out.batch_size)]
    batch = narratives_for_batch(out, readings, ids, metadata=[{"i": i} for i in range(out.batch_size)])
    for i, (r, nar) in enumerate(zip(readings, batch, strict=True)):
        one = build_narrative(r, sample_id=f"s{i}", request_id=f"r{i}", model="m", metadata={"i": i})
        assert nar.to_dict() == one.to_dict()
        assert nar.render() == one.render() and nar.metadata == {"i": i}
    first = batch[0].layers[0]
    assert first["entropy"] == round(float(out.entropy[0, 0]), 4)  # 4 decimals, not a float32 neighbour
    assert first["probes"]["topic"]["label"] == labels["topic"][int(out.probes["topic"][0, 0].argmax())]


def test_split_batch_gives_python_values_equal_to_the_arrays() -> None:
    """split_batch hands out plain Python ints/floats equal to the batch arrays."""
    out = random_output(seed=1)
    r = split_batch(out, {})[2].layers[1]
    assert r.topk_ids == tuple(int(x) for x in out.topk_ids[2, 1]) and type(r.topk_ids[0]) is int
    assert r.entropy == float(out.entropy[2, 1]) and type(r.entropy) is float
    assert r.probes["topic"] == tuple(float(x) for x in out.probes["topic"][2, 1])


def test_one_prediction_depth_for_narratives_readings_and_drift_features() -> None:
    """The narrative's prediction depth, the readings' depth column and the drift features' depth
    are the same number: the first layer from which the lens top-1 *id* equals the final top-1
    through the last layer, even where a lens tie puts the final top-1 at rank 0 earlier."""
    from monitor.drift.features import as_arrays

    out = random_output(b=8, seed=3)
    ids = out.topk_ids.copy()
    ids[0, 1:, 0] = out.final_topk_ids[0, 0]  # sample 0 agrees from layer index 1 on
    rank = np.ones_like(out.final_top1_rank)
    rank[0, :] = 0  # ... but ties put the final top-1 at rank 0 from layer index 0 on
    out = BankOutput(**{**out.__dict__, "topk_ids": ids, "final_top1_rank": rank})
    views = out.views()
    depth_narr = [build_narrative(v).prediction_depth for v in views]
    assert out.depth.tolist() == depth_narr
    assert as_arrays(out).depth.tolist() == depth_narr
    assert as_arrays(views).depth.tolist() == depth_narr
    assert depth_narr[0] == out.layers[1]
