"""Generate every derived file from its one source, so copies cannot drift (``make generate``).

* README.md: the blocks between ``<!-- BEGIN x -->`` / ``<!-- END x -->`` (configuration and
  metrics references) from the pydantic settings and :mod:`monitor.metrics`;
* ``deploy/grafana/dashboards/*.json`` from ``deploy/grafana/generate_dashboards.py``;
* the Helm chart's copies, ``helm/layerwatch/files/dashboards/*.json`` (the same rendering) and
  ``helm/layerwatch/files/rules/*.yml`` (from ``deploy/prometheus/rules/``): helm's ``.Files``
  cannot read outside the chart, so the chart gets generated copies; nobody edits them.

``python -m monitor.docsgen --write`` writes them all; ``--check`` exits 1 naming each stale file
(a test runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEPLOY = ROOT / "deploy"
CHART_FILES = ROOT / "helm" / "layerwatch" / "files"


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return "(computed)"
    d = field.default
    if isinstance(d, BaseModel):
        return "(section)"
    return f"`{d}`" if d is not None else "unset"


def _rows(model: type[BaseModel], env_prefix: str, path: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, env_prefix, f"{path}{name}__")
            continue
        env = f"{env_prefix}{path}{name}".upper()
        key = (path.replace("__", ".") + name)
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | `{env}` | {_default(field)} | {desc} |")
    return rows


def config_reference() -> str:
    from monitor.config import TapSettings
    from monitor.sidecar.config import SidecarSettings

    head = "| setting | environment | default | meaning |\n|---|---|---|---|"
    return "\n".join([
        "**Tap** (inside the inference server; arguments of `monitor.attach` override these):", "", head,
        *_rows(TapSettings, "LAYERWATCH_TAP_"), "",
        "**Sidecar** (`layerwatch sidecar --config FILE.yaml`; the environment overrides the file; "
        "nested keys use `__` in variable names and `.` here):", "", head,
        *_rows(SidecarSettings, "LAYERWATCH_"),
    ])


def metrics_reference() -> str:
    from monitor.metrics import SidecarMetrics, TapMetrics, describe

    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for group in (TapMetrics(), SidecarMetrics()):
        for m in describe(group):
            lines.append(f"| `{m.name}` | {m.kind} | {', '.join(m.labels)} | {m.help} |")
    return "\n".join(lines)


def reasons_reference() -> str:
    from monitor.metrics import TAP_DROP_REASONS
    from monitor.sidecar.recorder import DEAD_LETTER_REASONS

    def listed(names: tuple[str, ...]) -> str:
        return ", ".join(f"`{n}`" for n in names)

    return (f"Tap drop reasons: {listed(TAP_DROP_REASONS)}.\n"
            f"Dead-letter reasons: {listed(DEAD_LETTER_REASONS)}.")


BLOCKS = {"config": config_reference, "reasons": reasons_reference, "metrics": metrics_reference}


def render(text: str) -> str:
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- BEGIN {name} --> ... <!-- END {name} --> block")
        body = fn()

        def fill(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + "\n" + m.group(2)

        text = pattern.sub(fill, text)
    return text


def dashboards_module() -> Any:
    """deploy/grafana/generate_dashboards.py (the dashboards' source), imported once by path."""
    import importlib.util

    path = DEPLOY / "grafana" / "generate_dashboards.py"
    spec = importlib.util.spec_from_file_location("layerwatch_generate_dashboards", path)
    assert spec is not None and spec.loader is not None
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while it executes
        spec.loader.exec_module(mod)
    return mod


def dashboards() -> dict[str, str]:
    """File name -> JSON of every dashboard, rendered by deploy/grafana/generate_dashboards.py."""
    return dict(dashboards_module().render())


def generated_files() -> dict[Path, str]:
    """Every derived file and the text it must hold."""
    out = {README: render(README.read_text())}
    for name, text in dashboards().items():
        out[DEPLOY / "grafana" / "dashboards" / name] = text
        out[CHART_FILES / "dashboards" / name] = text
    for rules in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")):
        out[CHART_FILES / "rules" / rules.name] = rules.read_text()
    return out


def stale_files() -> list[Path]:
    """Derived files whose content differs from what their source generates now."""
    return [p for p, text in generated_files().items() if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.write:
        for path, text in generated_files().items():
            if not path.exists() or path.read_text() != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
        return 0
    stale = stale_files()
    for path in stale:
        print(f"{path.relative_to(ROOT)} is stale: run `make generate`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
