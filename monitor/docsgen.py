"""Generate the README's configuration and metrics references from the code, so they cannot drift.

``python -m monitor.docsgen --write`` rewrites the blocks between the ``<!-- BEGIN x -->`` /
``<!-- END x -->`` markers of README.md; ``--check`` exits 1 when they are stale (a test runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

README = Path(__file__).resolve().parent.parent / "README.md"


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


BLOCKS = {"config": config_reference, "metrics": metrics_reference}


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    old = README.read_text()
    new = render(old)
    if args.write:
        README.write_text(new)
        return 0
    if old != new:
        print("README.md references are stale: run `python -m monitor.docsgen --write`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
