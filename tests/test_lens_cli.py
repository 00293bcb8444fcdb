"""The ``layerwatch lens`` command line on a tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.adapters import model_fingerprint
from monitor.cli import main
from monitor.lenses.writer import export_logit_lens
from tests.conftest import make_tiny


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, str]:
    model = make_tiny("llama")
    export_logit_lens(tmp_path / "b", model, model_name="tiny")
    return tmp_path / "b", model_fingerprint(model)


def test_verify_accepts_a_good_bundle_with_its_fingerprint(bundle, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """`lens verify --fingerprint` exits 0 and says how many files it checked."""
    path, fp = bundle
    assert main(["lens", "verify", str(path), "--fingerprint", fp]) == 0
    assert "2 files verified" in capsys.readouterr().out


def test_verify_refuses_another_models_fingerprint(bundle, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """`lens verify` with a wrong fingerprint exits 1 with the fingerprint error on stderr."""
    path, _ = bundle
    assert main(["lens", "verify", str(path), "--fingerprint", "sha256:" + "0" * 32]) == 1
    assert "served model's fingerprint is sha256:000" in capsys.readouterr().err


def test_verify_refuses_a_tampered_manifest_path(bundle, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """`lens verify` on a manifest pointing outside the bundle exits 1 naming the path."""
    path, _ = bundle
    doc = json.loads((path / "manifest.json").read_text())
    doc["graph"]["file"] = "../../etc/passwd"
    (path / "manifest.json").write_text(json.dumps(doc))
    assert main(["lens", "verify", str(path)]) == 1
    assert "leaves the bundle directory" in capsys.readouterr().err


def test_show_prints_the_manifest_summary(bundle, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """`lens show` prints the bundle id, model identity and lens layers."""
    path, fp = bundle
    assert main(["lens", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert fp in out and '"kind": "logit"' in out


def test_fit_arguments_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A malformed --probe value and a missing model directory are refused with what was expected."""
    assert main(["lens", "fit", "--out", str(tmp_path / "x"), "--probe", "nonsense"]) == 1
    assert "expected NAME=TRAIN.jsonl:HELDOUT.jsonl" in capsys.readouterr().err
    assert main(["lens", "fit", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "missing")]) == 1
    assert "not 'smollm2' and not a local model directory" in capsys.readouterr().err
