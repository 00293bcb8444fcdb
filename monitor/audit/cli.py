"""``layerwatch audit``: verify, search, show, report, prune.

Paths name a trail folder (``<directory>/<writer_id>``) or a root holding several; the review
commands merge every trail they find. Keys: ``--hmac-key-file`` (repeatable, for rotated keys) or
the ``LAYERWATCH_AUDIT_HMAC_KEY`` / ``LAYERWATCH_AUDIT_HMAC_KEY_FILE`` environment variables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.audit.reader import Entry

_VERIFY_EPILOG = """exit status: 0 every trail intact; 1 a trail is broken (the first break of each is
printed with its kind and location); 3 only torn writes (a crash's partial last record, which
the writer quarantines at its next start-up)."""


def register(subparsers: Any) -> None:
    """Add ``audit`` and its subcommands."""
    audit = subparsers.add_parser("audit", help="verify, search and review the audit trail",
                                  description="Verify, search and review the tamper-evident audit trail.")
    sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    audit.set_defaults(handler=lambda args: (audit.print_help(), 2)[1])

    def keys_and_head(p: argparse.ArgumentParser) -> None:
        p.add_argument("--hmac-key-file", action="append", default=[], type=Path, metavar="FILE",
                       help="HMAC key file (repeat for rotated keys); default: $LAYERWATCH_AUDIT_HMAC_KEY[_FILE]")
        p.add_argument("--head", metavar="SPEC", default=None,
                       help="where the heads are: redis://host:6379/0, file:DIR, or none "
                            "(default: HEAD.json inside each trail)")
        p.add_argument("--head-prefix", default="layerwatch:audit:head:", help="Redis key prefix of the heads")

    p = sub.add_parser("verify", help="check the hash chains, signatures and heads; exit 1 on a break",
                       epilog=_VERIFY_EPILOG)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    keys_and_head(p)
    p.add_argument("--require-head", action="store_true", help="a trail whose head cannot be checked is broken")
    p.add_argument("--json", action="store_true", help="one JSON object per trail")
    p.set_defaults(handler=_verify)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--since", help="ISO 8601 time, or a duration ago (15m, 2h, 7d)")
        p.add_argument("--until", help="ISO 8601 time, or a duration ago")
        p.add_argument("--flagged", action="store_true", help="flagged samples only")
        p.add_argument("--request-id", action="append", default=[], metavar="ID")
        p.add_argument("--sample-id", action="append", default=[], metavar="ID")
        p.add_argument("--model", action="append", default=[], help="model name or fingerprint (prefix)")
        p.add_argument("--flag-kind", action="append", default=[], metavar="KIND")

    p = sub.add_parser("search", help="find records (time range, flagged, ids, model, flag kind)")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    filters(p)
    p.add_argument("--kind", action="append", default=[], help="record kind (default: all but checkpoints)")
    p.add_argument("--all", action="store_true", help="keep re-delivered duplicates of a sample id")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true", help="JSON lines (the records as written)")
    p.set_defaults(handler=_search)

    p = sub.add_parser("show", help="one sample's layer narrative as a table")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--sample-id", action="append", default=[], metavar="ID")
    p.add_argument("--request-id", action="append", default=[], metavar="ID")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="the record as JSON")
    p.set_defaults(handler=_show)

    p = sub.add_parser("report", help="a self-contained HTML report of one or several samples")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    filters(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many samples (default 50)")
    p.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    keys_and_head(p)
    p.set_defaults(handler=_report)

    p = sub.add_parser("prune", help="remove old segments, keeping the rest verifiable")
    p.add_argument("trail", type=Path, help="one trail folder (<directory>/<writer_id>)")
    p.add_argument("--before", help="remove segments whose records are all older (ISO time or 30d)")
    p.add_argument("--keep-segments", type=int, help="keep at most this many segments")
    p.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")
    keys_and_head(p)
    p.set_defaults(handler=_prune)


# --- helpers ---------------------------------------------------------------------------------------

def _key_list(args: argparse.Namespace) -> list[bytes]:
    from monitor.audit.config import AuditKeySettings, read_key_file

    keys = [read_key_file(p, field="--hmac-key-file") for p in args.hmac_key_file]
    return keys + AuditKeySettings().keys()


def _keys(args: argparse.Namespace) -> Any:
    from monitor.audit.records import KeyRing

    keys = _key_list(args)
    return KeyRing(keys) if keys else None


def _head_store(args: argparse.Namespace) -> Any:
    from monitor.audit.heads import FileHeadStore, RedisHeadStore
    from monitor.audit.verify import AUTO

    spec = args.head
    if spec is None:
        return AUTO
    if spec == "none":
        return None
    if spec.startswith("file:"):
        return FileHeadStore(Path(spec[5:]), per_writer=True)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        # with the sidecar's Redis credentials and TLS files (LAYERWATCH_REDIS__*), like `baseline --redis`
        from monitor.backends.redis import connect
        from monitor.config import redis_settings_from_environment

        client = connect(spec, settings=redis_settings_from_environment())
        return RedisHeadStore(spec, key_prefix=args.head_prefix, client=client)
    from monitor.errors import ConfigError
    from monitor.urls import redact_url

    raise ConfigError(f"--head {redact_url(spec)!r}: use redis://..., file:DIR or none")


def _query(args: argparse.Namespace, kinds: list[str] | None = None) -> Any:
    from monitor.audit.reader import Query, parse_time

    return Query(
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        flagged=args.flagged, request_ids=args.request_id, sample_ids=args.sample_id, models=args.model,
        flag_kinds=args.flag_kind, kinds=kinds if kinds is not None else [],
    )


def _warn_stats(stats: Any) -> None:
    if stats.unreadable_lines:
        print(f"note: {stats.unreadable_lines} unreadable line(s) skipped; run `layerwatch audit verify`", file=sys.stderr)
    if stats.duplicates_skipped:
        print(f"note: {stats.duplicates_skipped} re-delivered duplicate(s) skipped (--all shows them)", file=sys.stderr)


# --- handlers --------------------------------------------------------------------------------------

def _verify(args: argparse.Namespace) -> int:
    from monitor.audit.segments import discover_trails
    from monitor.audit.terminal import visible
    from monitor.audit.verify import verify_trail

    keys = _keys(args)
    store = _head_store(args)
    worst = 0
    try:
        for trail in discover_trails(args.paths):
            report = verify_trail(trail, keys=keys, head_store=store, require_head=args.require_head)
            code = report.exit_code
            worst = 1 if 1 in (worst, code) else max(worst, code)
            if args.json:
                print(json.dumps(report.to_dict()))
                continue
            label = {"intact": "OK", "torn": "TORN WRITE", "broken": "BROKEN"}[report.status]
            span = f"seq {report.first_seq}..{report.last_seq}" if report.first_seq is not None else "no records"
            print(visible(f"{label}  {trail}  writer {report.writer or '?'}: {report.segments} segment(s), {report.records} "
                  f"record(s) ({span}); head {report.head}; signatures {report.signatures}"))
            if report.first_break is not None:
                print(visible(f"  first break: {report.first_break.describe()}"))
            for note in report.notes:
                print(visible(f"  note: {note}"))
            for warning in report.warnings:
                print(visible(f"  warning: {warning}"))
    finally:
        if store is not None and hasattr(store, "close"):
            store.close()
    return worst


def _search(args: argparse.Namespace) -> int:
    from monitor.audit.reader import ReadStats, search
    from monitor.audit.terminal import search_table, visible

    stats = ReadStats()
    query = _query(args, args.kind)
    query.include_duplicates = args.all
    results = search(args.paths, query, stats)
    count = 0
    if args.json:
        for entry in results:
            if args.limit is not None and count >= args.limit:
                break
            print(json.dumps(entry.record, sort_keys=True))
            count += 1
    else:
        entries: list[Entry] = []
        for entry in results:
            if args.limit is not None and len(entries) >= args.limit:
                break
            entries.append(entry)
        count = len(entries)
        print(visible(search_table(entries)))
        print(f"{count} record(s) from {len(stats.trails)} trail(s)")
    _warn_stats(stats)
    return 0


def _show(args: argparse.Namespace) -> int:
    from monitor.audit.reader import Query, ReadStats, search
    from monitor.audit.terminal import narrative_text, visible
    from monitor.errors import AuditError

    if not args.sample_id and not args.request_id:
        raise AuditError("say which sample: --sample-id ID or --request-id ID")
    stats = ReadStats()
    query = Query(sample_ids=args.sample_id, request_ids=args.request_id, kinds=["sample"])
    entries = list(search(args.paths, query, stats))
    if not entries:
        raise AuditError("no sample record matches " + " ".join(args.sample_id + args.request_id))
    for i, entry in enumerate(entries):
        if args.json:
            print(json.dumps(entry.record, indent=2, sort_keys=True))
        else:
            if i:
                print()
            print(visible(narrative_text(entry, top_k=args.top_k)))
    _warn_stats(stats)
    return 0


def _report(args: argparse.Namespace) -> int:
    from monitor.audit.reader import ReadStats, search
    from monitor.audit.report import render_report
    from monitor.audit.terminal import visible
    from monitor.audit.verify import verify_trail
    from monitor.errors import AuditError

    stats = ReadStats()
    entries: list[Entry] = []
    for entry in search(args.paths, _query(args, ["sample"]), stats):
        if len(entries) >= args.limit:
            print(f"note: stopped at --limit {args.limit} samples", file=sys.stderr)
            break
        entries.append(entry)
    if not entries:
        raise AuditError("no sample record matches; try `layerwatch audit search` with the same filters")
    keys = _keys(args)
    store = _head_store(args)
    try:
        reports = {t: verify_trail(t, keys=keys, head_store=store) for t in sorted({e.trail for e in entries})}
    finally:
        if store is not None and hasattr(store, "close"):
            store.close()
    args.output.write_text(render_report(entries, reports=reports, keys=keys), encoding="utf-8")
    broken = [r for r in reports.values() if r.status == "broken"]
    print(f"wrote {args.output} ({len(entries)} sample(s))")
    for r in broken:
        print(visible(f"warning: {r.trail} is BROKEN: {r.first_break.describe() if r.first_break else ''}"), file=sys.stderr)
    _warn_stats(stats)
    return 1 if broken else 0


def _prune(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from pydantic import SecretBytes

    from monitor.audit.config import AuditConfig
    from monitor.audit.reader import parse_time
    from monitor.audit.records import KeyRing, format_ts
    from monitor.audit.segments import list_segments
    from monitor.audit.verify import first_record, verify_trail
    from monitor.audit.writer import AuditWriter
    from monitor.errors import AuditError, AuditIntegrityError

    if args.before is None and args.keep_segments is None:
        raise AuditError("say what to prune: --before TIME and/or --keep-segments N")
    if args.keep_segments is not None and args.keep_segments < 1:
        raise AuditError("--keep-segments must be at least 1")
    trail: Path = args.trail
    segments = list_segments(trail)
    if not segments:
        raise AuditError(f"{trail}: no segments")
    key_list = _key_list(args)
    keys = KeyRing(key_list) if key_list else None
    store = _head_store(args)
    report = verify_trail(trail, keys=keys, head_store=store)
    if store is not None and hasattr(store, "close"):
        store.close()
    if report.status == "broken" and report.first_break is not None:
        raise AuditIntegrityError(f"refusing to prune a broken trail: {report.first_break.describe()}")
    writer_id = first_record(segments[0])["writer"]
    if trail.name != writer_id:
        raise AuditError(f"{trail} holds writer {writer_id!r}; prune it from a folder named after it")
    if report.signatures.startswith("NOT checked"):
        raise AuditError(f"{trail} is signed; pass its key (--hmac-key-file) so the prune record is signed too")
    cutoff = datetime.fromisoformat(parse_time(args.before).replace("Z", "+00:00")) if args.before else None
    # The prune runs as a short-lived writer, which starts a segment of its own: --keep-segments
    # counts the segments there are now.
    keep = args.keep_segments + 1 if args.keep_segments is not None else None
    if args.dry_run:
        cut = format_ts(cutoff.timestamp()) if cutoff else None
        now = format_ts(datetime.now(UTC).timestamp())
        doomed = []
        for i, seg in enumerate(segments):
            nxt_ts = first_record(segments[i + 1])["ts"] if i + 1 < len(segments) else now
            if not ((keep is not None and len(segments) + 1 - i > keep) or (cut is not None and nxt_ts < cut)):
                break
            doomed.append(seg.name)
        print(f"would remove {len(doomed)} segment(s): {', '.join(doomed) or '-'}")
        return 0
    signing = _signing_key(key_list, segments[-1])
    spec = args.head or _declared_head(trail)
    config = AuditConfig(directory=trail.parent, writer_id=writer_id, head_store=spec, head_key_prefix=args.head_prefix,
                         hmac_key=SecretBytes(signing) if signing else None)
    with AuditWriter(config) as writer:
        result = writer.prune(before=cutoff, keep_segments=keep)
    print(f"removed {len(result.removed)} segment(s)" + (f" through seq {result.through_seq}" if result.removed else ""))
    return 0


def _signing_key(keys: list[bytes], newest: Path) -> bytes | None:
    """The given key the trail signs with now (its newest segment's checkpoint says which)."""
    from monitor.audit.records import key_id
    from monitor.audit.verify import first_record

    if not keys:
        return None
    try:
        kid = first_record(newest).get("checkpoint", {}).get("key_id")
    except Exception:  # noqa: BLE001 - a damaged newest segment: the writer reports it on open
        kid = None
    return next((k for k in keys if key_id(k) == kid), keys[0])


def _declared_head(trail: Path) -> str:
    from monitor.audit.heads import HEAD_FILE
    from monitor.errors import AuditError

    if (trail / HEAD_FILE).exists():
        return "file"
    raise AuditError(f"{trail} has no {HEAD_FILE}: pass --head (redis://..., file:DIR or none) naming where its head is kept")
