"""The tamper-evident audit trail and the tools to review it.

Writing (the sidecar)::

    from monitor.audit import AuditConfig, AuditWriter, sample_fields
    writer = AuditWriter(AuditConfig(directory="/var/lib/layerwatch/audit", writer_id="replica-a"))
    records = writer.append_many([("sample", sample_fields(sample_id=..., narrative=..., score=..., flags=...))])
    writer.sync()          # durable: now acknowledge the stream entries of these records
    writer.close()

Reviewing: :func:`verify_trail`, :func:`search`, :func:`render_report`, or the CLI
``layerwatch audit verify|search|show|report|prune``. The record format is in
:mod:`monitor.audit.records`, the break kinds in :mod:`monitor.audit.verify`, the
on-disk layout in :mod:`monitor.audit.segments`; docs/audit.md walks through all of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve lazily, so the review tools (verify, search, report) import neither structlog
# nor redis unless they are used.
_EXPORTS = {
    "AuditConfig": "config", "FileHeadStore": "heads", "Head": "heads", "HeadStore": "heads",
    "RedisHeadStore": "heads", "Entry": "reader", "Query": "reader", "iter_entries": "reader", "search": "reader",
    "GENESIS_HASH": "records", "SCHEMA_VERSION": "records", "AuditRecord": "records", "KeyRing": "records",
    "RecordKind": "records", "sample_fields": "records", "render_report": "report", "Break": "verify",
    "TrailReport": "verify", "verify_trail": "verify", "AuditWriter": "writer", "PruneResult": "retention",
}
__all__ = [
    "GENESIS_HASH", "SCHEMA_VERSION", "AuditConfig", "AuditRecord", "AuditWriter", "Break", "Entry",
    "FileHeadStore", "Head", "HeadStore", "KeyRing", "PruneResult", "Query", "RecordKind", "RedisHeadStore",
    "TrailReport", "iter_entries", "render_report", "sample_fields", "search", "verify_trail",
]

if TYPE_CHECKING:
    from monitor.audit.config import AuditConfig
    from monitor.audit.heads import FileHeadStore, Head, HeadStore, RedisHeadStore
    from monitor.audit.reader import Entry, Query, iter_entries, search
    from monitor.audit.records import (
        GENESIS_HASH,
        SCHEMA_VERSION,
        AuditRecord,
        KeyRing,
        RecordKind,
        sample_fields,
    )
    from monitor.audit.report import render_report
    from monitor.audit.retention import PruneResult
    from monitor.audit.verify import Break, TrailReport, verify_trail
    from monitor.audit.writer import AuditWriter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"monitor.audit.{module}"), name)
    globals()[name] = value
    return value
