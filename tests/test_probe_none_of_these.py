"""A prompt that fits none of a closed label set reads as 'other' or abstains (real SmolLM2).

The language probe is trained on the shipped corpora (9 languages and 'other': handbook text in 13
further languages) at a small size; prompts from program messages in Czech, Swedish, Turkish,
Romanian, ... (gettext catalogs, a source no probe is trained on) must not be printed as one of
the nine languages at the probe's reliable layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.real_model

PER_LABEL = (20, 10, 10)  # training, calibration, held-out prompts per label


def test_a_language_outside_the_closed_set_reads_as_other_or_abstains(reference_model: Any, tmp_path: Path) -> None:
    """Over the layers 10-30 where the prompt-mean language probe is reliable, at most 5% of the
    readings of 60 prompts in languages outside the closed set are printed as one of the nine
    languages (at most 15% at any one layer; the rest read 'other' or abstain below the bar's
    confidence), while 60 prompts in the listed languages from the same catalogs are printed as
    their language in at least 75% of the readings."""
    from monitor.adapters import find_parts, model_fingerprint
    from monitor.corpora.prompts import narrative_eval
    from monitor.lenses.model import TorchLensBank, Translators
    from monitor.lenses.probe_states import PromptStateCache
    from monitor.lenses.probes import builtin_probe_texts, train_probe_set
    from monitor.lenses.readout import readout_spec
    from monitor.refmodel import default_cache_dir

    model, tok = reference_model
    parts = find_parts(model)
    cache = PromptStateCache(default_cache_dir() / "test-probe-states", model_fingerprint(model, parts), 96)
    train, cal, held = (builtin_probe_texts("language", split, n)
                        for split, n in zip(("train", "calibration", "heldout"), PER_LABEL, strict=True))
    probe = train_probe_set("language", train, held, model, parts, tok, calibration=cal, cache=cache)
    bank = TorchLensBank(readout_spec(parts), Translators.identity(probe.layers, parts.hidden_size), (probe,))
    bar = bank.probe_bars["language@mean"]
    layers = [x for x in range(10, 31) if bar.reliable(x)]
    assert layers, "the prompt-mean language probe is reliable at no layer 10-30"

    pairs = narrative_eval("language", per_label=60)
    other = [t for t, lab in pairs if lab == "other"]
    listed = [(t, lab) for t, lab in pairs if lab != "other"][::9][:60]
    cache.fill(model, parts, tok, other + [t for t, _ in listed])
    labels = probe.labels
    rates = []
    for texts, want in ((other, ["other"] * len(other)), ([t for t, _ in listed], [lab for _, lab in listed])):
        probs = bank.read_context(cache.states(tok, texts).mean.astype(np.float32))["language@mean"]
        per_layer = []
        for layer in layers:
            p = probs[:, layer]
            printed = [labels[i] if p[r, i] >= bar.min_confidence else None for r, i in enumerate(p.argmax(-1))]
            if want[0] == "other":  # named: printed as one of the nine languages
                per_layer.append(np.mean([x not in (None, "other") for x in printed]))
            else:
                per_layer.append(np.mean([x == w for x, w in zip(printed, want, strict=True)]))
        rates.append(np.array(per_layer))
    named, right = rates
    # measured with this training size: 2.8% named pooled (worst layer 8 of 60), 85% right pooled
    assert named.mean() <= 0.05 and named.max() <= 0.15, dict(zip(layers, named.round(3), strict=True))
    assert right.mean() >= 0.75, dict(zip(layers, right.round(3), strict=True))
