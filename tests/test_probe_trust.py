"""Honest narratives (issue 16, items 3 and 4): a probe reading is printed only where its bundle's
quality bar lets it, abstains when no label fits, a summary is read first; the bar is recorded in
the manifest at build and a setting can only make it stricter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import monitor
from monitor.adapters import find_parts
from monitor.audit.reader import Query, search
from monitor.audit.report import render_report
from monitor.audit.terminal import narrative_text
from monitor.errors import ConfigError
from monitor.lenses.model import ProbeSet, Translators
from monitor.lenses.runtime import LensBank
from monitor.lenses.trust import CONTROL_MARGIN, DRIFT_FEATURE, MIN_CONFIDENCE, probe_bars, stricter
from monitor.lenses.writer import write_bundle
from monitor.narratives import narratives_for_batch
from monitor.pipeline.stages import read
from monitor.sidecar.config import load_settings
from monitor.sidecar.service import Sidecar
from tests.conftest import make_tiny

# Held-out numbers as a bundle build records them (3 states: 0, 1, 2). 'lang' passes the bar at
# state 1 only: state 0 is below the bag-of-tokens baseline, state 2 within the margin of its
# control task. 'topic' passes nowhere: it memorises tokens (accuracy ~ control) at every state.
LANG = {"heldout_accuracy": [0.6, 0.95, 0.97], "control_accuracy": [0.55, 0.5, 0.9], "bag_of_tokens_accuracy": 0.9,
        "position": "last token"}
TOPIC = {"heldout_accuracy": [0.5, 0.6, 0.62], "control_accuracy": [0.48, 0.55, 0.6], "bag_of_tokens_accuracy": 0.8,
         "position": "last token"}
SCALE = 10.0


def synthetic_probes(d: int, s: int = 3) -> tuple[ProbeSet, ProbeSet]:
    """'lang' reads 'en' along hidden unit 0 and 'de' along unit 1 at every state; a state along
    unit 2 fits neither (equal logits: p 0.5, below the abstention threshold). 'topic' is random."""
    w = torch.zeros(s, d, 2)
    w[:, 0, 0] = w[:, 1, 1] = SCALE
    gen = torch.Generator().manual_seed(0)
    return (ProbeSet("lang", ("en", "de"), tuple(range(s)), w, torch.zeros(s, 2), dict(LANG)),
            ProbeSet("topic", ("code", "legal", "manual"), tuple(range(s)), torch.randn(s, d, 3, generator=gen),
                     torch.zeros(s, 3), dict(TOPIC)))


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return make_tiny("llama", seed=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny: torch.nn.Module) -> Path:
    parts = find_parts(tiny)
    out = tmp_path_factory.mktemp("trust") / "bundle"
    tr = Translators.identity(tuple(range(parts.n_states)), parts.hidden_size)
    write_bundle(out, tiny, tr, synthetic_probes(parts.hidden_size, parts.n_states), model_name="tiny-llama", k=4)
    return out


def narratives_of(bank: LensBank, hidden: np.ndarray, include_tokens: bool = False) -> list[Any]:
    readings = read(bank, hidden, hidden)
    ids = [(f"s{i}", f"r{i}", "m") for i in range(hidden.shape[0])]
    return narratives_for_batch(readings, readings.views(), ids, include_tokens=include_tokens)


def states(*units: int, d: int = 32, s: int = 3) -> np.ndarray:
    """One sample per unit: the state 3 * e_unit at every layer."""
    h = np.zeros((len(units), s, d), np.float32)
    for i, u in enumerate(units):
        h[i, :, u] = 3.0
    return h


# ------------------------------------------------------------------------------ the bar
def test_bundle_records_the_quality_bar_per_probe_and_position(bundle: Path) -> None:
    """write_bundle fixes the bar in the manifest: the rule, the margin, the abstention threshold,
    the reliable layers per position (none for the prompt mean, which no probe was trained on) and
    the role: a probe with no reliable layer is shipped as a drift feature only."""
    import json

    doc = json.loads((bundle / "manifest.json").read_text())
    lang, topic = (p["quality_bar"] for p in doc["probes"])
    assert lang["margin"] == CONTROL_MARGIN and lang["min_confidence"] == MIN_CONFIDENCE and "control" in lang["rule"]
    assert lang["positions"]["last"]["reliable_layers"] == [1] and lang["role"] == "explanation"
    assert lang["positions"]["mean"]["reliable_layers"] == [] and "last-token" in lang["positions"]["mean"]["reason"]
    assert topic["positions"]["last"]["reliable_layers"] == [] and topic["role"] == DRIFT_FEATURE


def test_bundle_built_before_the_bar_gets_it_from_its_recorded_numbers() -> None:
    """A manifest without quality_bar gets the bar computed at load from its held-out numbers, and
    says so; a probe without those numbers has no reliable layer."""
    manifest = {"lens": {"layers": [0, 1, 2]},
                "probes": [{"name": "lang", "labels": ["en", "de"], **LANG}, {"name": "bare", "labels": ["a", "b"]}]}
    bars = probe_bars(manifest)
    assert bars["lang"].reliable_layers == {1} and "computed at load" in bars["lang"].source
    assert bars["bare"].reliable_layers == frozenset() and "no held-out numbers" in bars["bare"].source
    assert bars["lang@mean"].reliable_layers == frozenset()


def test_a_setting_can_only_make_the_bar_stricter(bundle: Path) -> None:
    """A larger margin drops layers whose selectivity is below it, a higher threshold abstains
    more; a value below the bundle's own is refused naming the setting."""
    bars = LensBank.load(bundle).probe_bars
    assert stricter(bars, min_margin=0.3)["lang"].reliable_layers == {1}
    assert stricter(bars, min_margin=0.5)["lang"].reliable_layers == frozenset()
    assert stricter(bars, min_confidence=0.9)["lang"].min_confidence == 0.9
    with pytest.raises(ConfigError, match=r"narratives\.min_probe_margin: 0\.05 is below the bundle's 0\.1"):
        stricter(bars, min_margin=0.05)
    with pytest.raises(ConfigError, match=r"narratives\.min_probe_confidence"):
        stricter(bars, min_confidence=0.2)


# ------------------------------------------------------------------------------ narratives
def test_a_probe_is_printed_only_at_layers_that_pass_the_bar(bundle: Path) -> None:
    """At the reliable layer the reading is printed; at the others the data says reliable: false
    (no label, no probabilities) and the sentence says there is no reliable reading there. A probe
    with no reliable layer (and every prompt-mean reading) is never printed as an explanation."""
    nar = narratives_of(LensBank.load(bundle), states(0))[0].to_dict()
    by_layer = {x["layer"]: x for x in nar["layers"]}
    assert by_layer[1]["probes"]["lang"] == {"reliable": True, "label": "en", "p": 1.0,
                                             "probs": {"en": 1.0, "de": 0.0}}
    assert "lang=en 1.00" in by_layer[1]["sentence"]
    for layer in (0, 2):
        assert by_layer[layer]["probes"]["lang"] == {"reliable": False}
        assert "no reliable reading of lang at this layer" in by_layer[layer]["sentence"]
    for x in nar["layers"]:
        for name in ("topic", "topic@mean", "lang@mean"):
            assert x["probes"][name] == {"reliable": False} and name not in x["sentence"]
    assert nar["summary"]["unreliable"] == nar["summary"]["drift_features"] == ["topic", "lang@mean", "topic@mean"]
    assert "Drift features only (no layer passes the probe quality bar): topic, lang@mean and topic@mean." in \
        nar["summary"]["sentence"]


def test_a_prompt_that_fits_no_label_abstains(bundle: Path) -> None:
    """A state along a direction the probe has no label for spreads its probability (0.5 each):
    the reliable layer reads 'none of these' instead of a label, and the summary says so."""
    nar = narratives_of(LensBank.load(bundle), states(2))[0]
    lang = nar.layers[1]["probes"]["lang"]
    assert lang["label"] is None and lang["abstain"] is True and lang["p"] == 0.5
    assert "lang: none of these (0.50)" in nar.layers[1]["sentence"]
    assert nar.summary["abstained"] == ["lang"] and nar.summary["concepts"] == []
    assert "No label fits for lang (none of these)." in nar.summary["sentence"]


def test_summary_says_what_converged_from_where_and_which_concepts_are_stable(bundle: Path) -> None:
    """The summary (data and sentence, the first line of the rendered narrative) names the layer
    the prediction converged from, the changes of mind and each reliable concept with the layer it
    holds from; the token only when the narrative names tokens."""
    bank = LensBank.load(bundle)
    plain, named = (narratives_of(bank, states(0), include_tokens=t)[0] for t in (False, True))
    s = plain.summary
    assert s["prediction"]["from_layer"] == plain.prediction_depth and "token" not in s["prediction"]
    assert s["changes_of_mind"] == plain.changes_of_mind
    assert s["concepts"] == [{"probe": "lang", "label": "en", "from_layer": 1, "p": 1.0}]
    assert s["sentence"].startswith("The final prediction (") and "lang=en from layer 1" in s["sentence"]
    assert plain.render().splitlines()[0] == s["sentence"] and plain.to_dict()["summary"] == s
    token = named.summary["prediction"]["token"]
    assert token == f"<{int(named.readings.final_top1)}>"
    assert named.summary["sentence"].startswith(f"The prediction converges to {token!r}")


# ------------------------------------------------------------------------------ the sidecar
def test_sidecar_records_and_serves_honest_narratives_with_their_summary(
        tmp_path: Path, tiny: torch.nn.Module, bundle: Path, redis_url: str, stream_name: str) -> None:
    """Real tap -> Redis -> sidecar: the audit record and the served narrative hold the summary
    and no probe label at a layer that fails the bar; `audit show` and the HTML report print the
    summary above the per-layer table and mark unreliable probe cells."""
    settings = load_settings(transport=redis_url, stream=stream_name, group="g", http_port=0, batch_wait_ms=10,
                             warm_up=False, consumer=stream_name.split(":")[-1], audit={"directory": tmp_path / "audit"},
                             baseline={"learn_samples": 400})
    sc = Sidecar(settings, bank=LensBank.load(bundle))
    sc.transport.ensure_group("g")
    tap = monitor.attach(tiny, sample_rate=1.0, transport=redis_url, stream=stream_name, positions="last+mean")
    with tap.request("req-1") as h, torch.no_grad():
        tiny(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert tap.flush(30)
    tap.close()
    tap.detach()
    for _ in range(50):  # each step reads what Redis has; the sample is there after the flush
        if sc.narrative(h.sample_ids[0]) is not None:
            break
        sc.step()
    served = sc.narrative(h.sample_ids[0])
    sc.stop(5)
    sc.processor.shutdown()
    assert served is not None
    entries = list(search([tmp_path / "audit"], Query(kinds=["sample"])))
    assert len(entries) == 1
    for nar in (served["narrative"], entries[0].record["narrative"]):
        assert nar["summary"]["sentence"].startswith("The final prediction")
        for layer in nar["layers"]:
            if layer["layer"] != 1:
                assert nar_probe_free(layer), layer
    assert served["text"].splitlines()[0] == served["narrative"]["summary"]["sentence"]
    shown = narrative_text(entries[0])
    assert shown.index("summary: The final prediction") < shown.index("entropy")
    assert "no reliable reading at that layer" in shown
    html = render_report(entries)
    assert html.index('class="summary"') < html.index('class="traj"') and "no reliable reading at this layer" in html


def nar_probe_free(layer: dict[str, Any]) -> bool:
    """No probe label or probability at this layer (every probe reads reliable: false)."""
    return all(r == {"reliable": False} for r in layer["probes"].values())


def test_a_looser_setting_fails_start_up_naming_it(bundle: Path) -> None:
    """narratives.min_probe_margin below the bundle's margin stops the sidecar at start-up with a
    message naming the setting; out of range is refused by the settings themselves."""
    settings = load_settings(transport="memory://trust-cfg", group="g", http_port=0, warm_up=False,
                             narratives={"min_probe_margin": 0.01})
    with pytest.raises(ConfigError, match=r"narratives\.min_probe_margin"):
        Sidecar(settings, bank=LensBank.load(bundle))
    with pytest.raises(Exception, match=r"min_probe_confidence"):
        load_settings(transport="memory://trust-cfg", narratives={"min_probe_confidence": 1.5})


def test_a_stricter_setting_reaches_the_narratives(bundle: Path) -> None:
    """With narratives.min_probe_margin above lang's selectivity at its one reliable layer, the
    sidecar prints lang nowhere."""
    from monitor.sidecar.bootstrap import apply_probe_bar

    bank = LensBank.load(bundle)
    apply_probe_bar(bank, load_settings(transport="memory://x", narratives={"min_probe_margin": 0.5}))
    nar = narratives_of(bank, states(0))[0]
    assert all(x["probes"]["lang"] == {"reliable": False} for x in nar.layers)
    apply_probe_bar(bank, load_settings(transport="memory://x"))  # back to the bundle's own bar
    assert narratives_of(bank, states(0))[0].layers[1]["probes"]["lang"]["label"] == "en"



def test_lens_show_prints_where_each_probe_is_printed(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`layerwatch lens show` names each probe's role, its reliable layers per position and its
    abstention threshold."""
    from monitor.cli import main

    assert main(["lens", "show", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "probe lang: " in out and "explanation, printed at layers [1] (last token; prompt mean: none)" in out
    assert "drift feature, printed at layers none" in out and "abstains below 0.6" in out
