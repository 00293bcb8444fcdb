"""The README stays true: generated references are current and the test command is what CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_and_metrics_references_match_the_code() -> None:
    """README's configuration and metrics tables equal what monitor.docsgen generates now."""
    from monitor.docsgen import README, render

    text = README.read_text()
    assert render(text) == text, "run `python -m monitor.docsgen --write`"


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run calls `make test`, the test command the README's quick start gives."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_every_metric_defined_in_code_is_documented() -> None:
    """Each metric name in monitor/metrics.py appears in the README's metrics reference."""
    import re

    names = re.findall(r'"(layerwatch_[a-z0-9_]+)"', (ROOT / "monitor" / "metrics.py").read_text())
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in names if n not in readme]
    assert not missing
