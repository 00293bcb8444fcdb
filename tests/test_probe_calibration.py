"""Probes per position, calibrated: temperature fit, ECE and confident-wrong rate, the bar per
position, and the exported graph and runtime applying the temperature and the prompt-mean probes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.adapters import find_parts
from monitor.lenses.model import ProbeSet, TorchLensBank
from monitor.lenses.probe_states import PromptStateCache, prompt_states, token_ids
from monitor.lenses.probes import LabelledTexts, calibration_errors, fit_temperature, train_probe_set
from monitor.lenses.runtime import LensBank
from monitor.lenses.trust import probe_bars, quality_bar, stricter
from monitor.lenses.writer import load_weights, write_bundle
from tests.conftest import make_tiny
from tests.test_lens_bank import random_lens, states_of
from tests.test_lens_training import WORDS, WordTokenizer


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels() -> None:
    """Labels drawn from softmax(z / 3) make the fitted temperature of logits z close to 3, per layer."""
    gen = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(2, 20000, 3, generator=gen)
    y = torch.multinomial(torch.softmax(z[0] / 3.0, -1), 1, generator=gen).squeeze(1)
    t = fit_temperature(z, y)
    assert abs(t[0] - 3.0) < 0.2 and abs(t[1] - 3.0) > 0.5  # layer 1's logits are unrelated noise


def test_calibration_errors_on_a_hand_computed_case() -> None:
    """Readings at 0.95 that are right half the time have ECE 0.45 and a confident-wrong rate of 0.5."""
    probs = np.array([[[0.95, 0.05]] * 4])
    y = np.array([0, 1, 0, 1])
    ece, cw = calibration_errors(probs, y)
    assert ece[0] == pytest.approx(0.45) and cw[0] == pytest.approx(0.5)


def _kind_texts(n: int, rng: np.random.Generator) -> LabelledTexts:
    lab = rng.choice(["greek", "number"], n)
    pool = {"greek": WORDS[:24], "number": WORDS[24:]}
    return LabelledTexts([" ".join(rng.choice(pool[la], int(rng.integers(3, 9)))) for la in lab], list(lab), "synthetic")


def test_each_position_gets_its_own_probe_temperature_and_numbers(tmp_path: Path) -> None:
    """train_probe_set fits a last-token and a prompt-mean probe, each with a temperature and per-layer
    held-out accuracy, control accuracy, ECE and confident-wrong rate, and the quality bar is
    computed for both positions from those numbers; the states come from the cache on a rerun."""
    model, tok = make_tiny("llama"), WordTokenizer()
    parts = find_parts(model)
    rng = np.random.default_rng(0)
    train, cal, held = _kind_texts(200, rng), _kind_texts(60, rng), _kind_texts(60, rng)
    cache = PromptStateCache(tmp_path, "tiny", 16)
    probe = train_probe_set("kind", train, held, model, parts, tok, calibration=cal, cache=cache, max_tokens=16,
                            max_iter=30)
    assert probe.mean is not None and probe.temperature is not None and probe.mean.temperature is not None
    assert not torch.equal(probe.weight, probe.mean.weight)
    m, mm = probe.metrics, probe.metrics["positions"]["mean"]
    for k in ("heldout_accuracy", "control_accuracy", "ece", "confident_wrong", "temperature"):
        assert len(m[k]) == len(mm[k]) == parts.n_states
    assert (probe.temperature > 0).all() and m["n_calibration"] == 60
    # the mean of a prompt's word embeddings tells which pool its words come from
    assert mm["heldout_accuracy"][0] > 0.9
    bar = quality_bar(m, probe.layers)
    expect = [i for i in probe.layers if mm["heldout_accuracy"][i] >= m["bag_of_tokens_accuracy"]
              and mm["heldout_accuracy"][i] - mm["control_accuracy"][i] >= 0.1 - 1e-9]
    assert bar["positions"]["mean"]["reliable_layers"] == expect and "reason" not in bar["positions"]["mean"]
    unique = len(set(train.texts + cal.texts + held.texts))
    assert len(cache) == unique and len(PromptStateCache(tmp_path, "tiny", 16)) == unique  # on disk, reread


def test_cached_states_equal_a_fresh_forward_pass_in_float16(tmp_path: Path) -> None:
    """The cache returns what prompt_states computes (cast to float16), for both positions, in the
    order asked, and the prompt mean is the mean over the real tokens only."""
    model, tok = make_tiny("llama"), WordTokenizer()
    parts = find_parts(model)
    texts = ["alpha beta", "gamma delta epsilon zeta eta", "theta"]
    cache = PromptStateCache(tmp_path, "tiny", 8)
    cache.fill(model, parts, tok, texts, batch_size=2)
    got = cache.states(tok, texts[::-1])
    last, mean = prompt_states(model, parts, token_ids(tok, texts[::-1], 8), batch_size=1)
    np.testing.assert_allclose(got.last.astype(np.float32), last, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(got.mean.astype(np.float32), mean, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(mean[0], last[0], atol=1e-6)  # "theta", one token: the mean is that token's state


def _calibrated_bundle(tmp_path: Path) -> tuple[Path, torch.nn.Module, tuple[ProbeSet, ...]]:
    model = make_tiny("llama")
    tr, probes = random_lens(model)
    gen = torch.Generator().manual_seed(5)
    s = len(tr.layers)
    with_t = []
    for p in probes:
        mean = ProbeSet(p.name, p.labels, p.layers, torch.randn(p.weight.shape, generator=gen),
                        torch.randn(p.bias.shape, generator=gen), {}, 0.5 + torch.rand(s, generator=gen))
        with_t.append(ProbeSet(p.name, p.labels, p.layers, p.weight, p.bias, {}, 0.3 + 3 * torch.rand(s, generator=gen),
                               mean))
    out = tmp_path / "bundle"
    write_bundle(out, model, tr, tuple(with_t), model_name="tiny-llama", k=4)
    return out, model, tuple(with_t)


def test_graph_and_runtime_apply_the_temperature_and_the_mean_probes(tmp_path: Path) -> None:
    """The ONNX graph's probe outputs equal softmax((h W + b) / T) of the PyTorch reference, and
    read_context reads the prompt-mean probes (with their own temperature), not the last-token ones."""
    path, model, probes = _calibrated_bundle(tmp_path)
    h = states_of(model, batch=3)
    bank = LensBank.load(path)
    ref = TorchLensBank(bank_readout(model), load_weights(path, bank.manifest)[0], probes, k=4)
    out, want = bank.read_arrays(h), ref.read_arrays(h)
    ctx, want_ctx = bank.read_context(h), ref.read_context(h)
    for p in probes:
        np.testing.assert_allclose(out.probes[p.name], want.probes[p.name], atol=1e-5)
        raw = torch.softmax(torch.einsum("bsd,sdc->bsc", torch.from_numpy(h), p.weight) + p.bias, -1).numpy()
        assert np.abs(out.probes[p.name] - raw).max() > 1e-2  # the temperature changes the probabilities
        np.testing.assert_allclose(ctx[p.name + "@mean"], want_ctx[p.name + "@mean"], atol=1e-5)
        assert np.abs(ctx[p.name + "@mean"] - out.probes[p.name]).max() > 1e-2


def test_reloaded_weights_keep_temperatures_and_mean_probes(tmp_path: Path) -> None:
    """load_weights gives back the raw weights, the temperatures and the prompt-mean probes it saved."""
    path, _, probes = _calibrated_bundle(tmp_path)
    bank = LensBank.load(path)
    _, back = load_weights(path, bank.manifest)
    for a, b in zip(probes, back, strict=True):
        assert b.temperature is not None and b.mean is not None and b.mean.temperature is not None
        assert a.temperature is not None and a.mean is not None and a.mean.temperature is not None
        torch.testing.assert_close(a.temperature, b.temperature)
        torch.testing.assert_close(a.mean.weight, b.mean.weight)
        torch.testing.assert_close(a.mean.temperature, b.mean.temperature)


def bank_readout(model: torch.nn.Module):  # noqa: ANN201
    from monitor.lenses.readout import readout_spec

    return readout_spec(find_parts(model))


MEAN_NUMBERS = {"heldout_accuracy": [0.5, 0.97, 0.99], "control_accuracy": [0.45, 0.5, 0.85]}
LAST_NUMBERS = {"heldout_accuracy": [0.5, 0.6, 0.95], "control_accuracy": [0.45, 0.5, 0.5],
                "bag_of_tokens_accuracy": 0.9, "positions": {"mean": MEAN_NUMBERS}}


def test_the_prompt_mean_has_its_own_bar_and_a_stricter_margin_applies_to_it() -> None:
    """With numbers for the prompt mean, '@mean' is printed where its own accuracy passes the bar
    (layers 1 and 2, while the last token passes at layer 2 only), and a stricter margin of 0.3 drops
    layer 2 there (selectivity 0.14)."""
    manifest = {"lens": {"layers": [0, 1, 2]}, "probes": [{"name": "lang", "labels": ["en", "de"], **LAST_NUMBERS}]}
    manifest["probes"][0]["quality_bar"] = quality_bar(LAST_NUMBERS, [0, 1, 2])
    bars = probe_bars(manifest)
    assert bars["lang"].reliable_layers == {2} and bars["lang@mean"].reliable_layers == {1, 2}
    assert bars["lang@mean"].accuracy == {0: 0.5, 1: 0.97, 2: 0.99}
    tight = stricter(bars, min_margin=0.3)
    assert tight["lang@mean"].reliable_layers == {1} and tight["lang"].reliable_layers == {2}
