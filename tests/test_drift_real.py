"""The drift detector on the real SmolLM2: the claim that it separates shifted traffic from
normal traffic is about real behaviour, so it is checked on the real model (tap -> wire -> lens ->
baseline -> score, positions last+mean, the logit lens: no trained bundle needed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.real_model


def test_other_languages_and_code_rank_above_held_out_prose_at_a_calibrated_rate(reference_model: Any) -> None:
    """A baseline of 400 English prose texts, read with the plain logit lens: held-out English
    prose is flagged at about alpha (conformal calibration; at most 5% at alpha = 1%), and texts
    in other languages and Python source score above it (AUROC > 0.75).

    Measured here: AUROC 0.81 (languages) and 0.91 (code), but only 2.5% / 12.5% flagged at 1%: the
    logit lens alone is a weak detector; the tuned lens and the concept probes of a trained bundle
    take them to AUROC 1.000 / 0.996 and TPR at 1% FPR 1.00 / 0.94 (``python -m benchmarks.drift_eval``)."""
    from monitor import corpora
    from monitor.drift import AnomalyScorer, build_baseline
    from monitor.lenses.torch_lens import TorchLogitLens
    from monitor.pipeline.offline import readings_for_texts

    model, tok = reference_model
    bank = TorchLogitLens(model)
    shifts = corpora.shift_sets(kinds=("language", "code"), limit=40)
    texts = {"baseline": corpora.english_prose("heldout", unit="short")[:400],
             "normal": corpora.english_prose("test", unit="short")[:200], **shifts}
    readings = {k: readings_for_texts(model, tok, bank, v, batch_size=16, max_tokens=48) for k, v in texts.items()}
    baseline = build_baseline(readings["baseline"], model="SmolLM2-135M-Instruct", model_fingerprint="fp",
                              bundle_id=bank.bundle_id)
    scorer = AnomalyScorer(baseline, alpha=0.01)
    d2 = {k: scorer.score_arrays(a)[0] for k, a in readings.items() if k != "baseline"}
    p = {k: scorer.score_arrays(a)[1] for k, a in readings.items() if k != "baseline"}
    got = {k: (float(np.mean(d2[k][:, None] > d2["normal"][None, :])), float(np.mean(p[k] < 0.01))) for k in d2}
    assert got["normal"][1] <= 0.05, got
    for kind in ("language", "code"):
        assert got[kind][0] > 0.75, got
