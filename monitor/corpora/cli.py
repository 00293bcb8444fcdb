"""``layerwatch corpus``: list, check and export the packaged text corpora (:mod:`monitor.corpora`).

- ``layerwatch corpus list``: every corpus with its size per split and its sources;
- ``layerwatch corpus sources``: every source with its package, licence and whether it is installed;
- ``layerwatch corpus export NAME --split S --out FILE.jsonl``: one JSON object per line,
  ``{"text": ...}`` (plus ``"label"`` for labelled sets), ready for ``lens fit`` or
  ``baseline build --corpus``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``corpus`` command and its subcommands to the ``layerwatch`` parser."""
    parser = subparsers.add_parser(
        "corpus",
        help="list, check and export the offline text corpora (lens training, probes, drift evaluation)",
        description="Real text corpora read from installed Debian packages, the Python standard "
        "library and PyPI data files; provenance in docs/corpora.md.",
    )
    sub = parser.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND")

    ls = sub.add_parser("list", help="every corpus with its size per split and its sources")
    ls.set_defaults(handler=_list)

    src = sub.add_parser("sources", help="every source: package, licence, installed or not")
    src.set_defaults(handler=_sources)

    ex = sub.add_parser("export", help="write a corpus split as JSON lines")
    ex.add_argument("name", help="corpus name (see 'layerwatch corpus list')")
    ex.add_argument(
        "--split", default=None, help="train | heldout | test (eval for shift-* sets); default: the first"
    )
    ex.add_argument("--out", required=True, help="output file (.jsonl)")
    ex.add_argument("--limit", type=int, default=None, help="write at most this many records")
    ex.set_defaults(handler=_export)

    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])


def _list(args: argparse.Namespace) -> int:
    from monitor.corpora import CORPORA, CorpusUnavailable, corpus

    rows = []
    for spec in CORPORA.values():
        try:
            sizes = " ".join(f"{s}={len(corpus(spec.name, s))}" for s in spec.splits)
        except CorpusUnavailable as exc:
            sizes = f"UNAVAILABLE ({exc})"
        rows.append((spec.name, sizes, ", ".join(spec.sources), spec.description))
    width = max(len(r[0]) for r in rows)
    for name, sizes, sources, description in rows:
        print(f"{name:<{width}}  {sizes}")
        print(f"{'':<{width}}  {description}")
        print(f"{'':<{width}}  sources: {sources}")
    return 0


def _sources(args: argparse.Namespace) -> int:
    from monitor.corpora import SOURCES, check_sources

    status = check_sources()
    missing = 0
    for name, src in SOURCES.items():
        problem = status.get(name)
        missing += problem is not None
        state = "ok" if problem is None else "MISSING"
        print(f"{name:<22} {state:<8} {src.provider}:{src.package}")
        print(f"{'':<22} licence: {src.licence}; used for: {src.used_for}")
        if problem is not None:
            print(f"{'':<22} {problem}")
    return 1 if missing else 0


def _export(args: argparse.Namespace) -> int:
    from monitor.corpora import CORPORA, corpus, write_jsonl

    spec = CORPORA.get(args.name)
    split = args.split or (spec.splits[0] if spec else None)
    try:
        records = corpus(args.name, split)
    except ValueError as exc:
        print(f"layerwatch: error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[: max(0, args.limit)]
    n = write_jsonl(records, args.out)
    print(f"wrote {n} records of {args.name} ({split}) to {args.out}")
    return 0
