"""The probes' quality bar (issue 16, item 3): fixed in the manifest when a bundle is built,
computed at load for bundles built before it, and only made stricter by the sidecar's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.errors import ConfigError
from monitor.lenses.runtime import LensBank
from monitor.lenses.trust import CONTROL_MARGIN, DRIFT_FEATURE, MIN_CONFIDENCE, probe_bars, stricter
from monitor.sidecar.config import load_settings
from monitor.sidecar.service import Sidecar
from tests.conftest import make_tiny
from tests.test_honest_narratives import LANG, narratives_of, states, synthetic_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_bundle(tmp_path_factory.mktemp("bar") / "bundle", make_tiny("llama", seed=0))


# ------------------------------------------------------------------------------ the bar
def test_bundle_records_the_quality_bar_per_probe_and_position(bundle: Path) -> None:
    """write_bundle fixes the bar in the manifest: the rule, the margin, the abstention threshold,
    the reliable layers per position (none for the prompt mean, which no probe was trained on) and
    the role: a probe with no reliable layer is shipped as a drift feature only."""
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


def test_the_pytorch_reference_bank_applies_the_same_bar(bundle: Path) -> None:
    """TorchLensBank over the same probes prints them where the ONNX bank of their bundle does."""
    from monitor.adapters import find_parts
    from monitor.lenses.model import TorchLensBank, Translators
    from monitor.lenses.readout import readout_spec
    from tests.test_honest_narratives import synthetic_probes

    parts = find_parts(make_tiny("llama", seed=0))
    ref = TorchLensBank(readout_spec(parts), Translators.identity(tuple(range(parts.n_states)), parts.hidden_size),
                        synthetic_probes(parts.hidden_size, parts.n_states), k=4)
    assert ref.probe_bars == LensBank.load(bundle).probe_bars
