"""The ``layerwatch`` command line.

Each component owns its subcommands in its own ``cli`` module exposing
``register(subparsers)``; this module only assembles them. Handlers import their heavy
dependencies lazily so ``layerwatch --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that register subcommands, in help order. A module that is not there yet (or whose
# optional dependencies are missing) is skipped with no error, so a tap-only install still runs.
_COMMAND_MODULES = (
    "monitor.demo",
    "monitor.sidecar.cli",
    "monitor.lenses.cli",
    "monitor.pipeline.cli",
    "monitor.audit.cli",
    "monitor.corpora.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwatch",
        description="Monitor a served transformer layer by layer: lenses, drift, metrics, audit.",
    )
    from monitor import __version__

    parser.add_argument("--version", action="version", version=f"layerwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from monitor.errors import LayerwatchError

    try:
        rc = handler(args)
    except LayerwatchError as exc:
        print(f"layerwatch: error: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
