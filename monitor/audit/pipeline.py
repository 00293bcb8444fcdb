"""The writer's structlog processor pipeline, one small callable per step.

``AuditLogger.audit(kind, **fields)`` runs, in order::

    check_fields -> ApplyStoreText -> AddSequence -> AddTimestamp -> ChainHash -> SignHmac -> render_line

and hands the rendered line to the sink (:class:`SegmentSink`), the last link: it appends the
line to the open segment and only then commits the sequence number and hash to the
:class:`ChainState`. A processor that raises (a field that is not JSON, NaN in a score) therefore
consumes no sequence number and leaves no trace in the file.

The pipeline is built with :func:`structlog.wrap_logger`, never with ``structlog.configure``:
the trail does not depend on, or change, the application's logging configuration.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import structlog

from monitor.audit.privacy import StoreText as StoreTextMode
from monitor.audit.privacy import text_fields
from monitor.audit.records import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    AuditRecord,
    KeyRing,
    RecordKind,
    body_json,
    digest,
    format_ts,
    seal,
)

EventDict = MutableMapping[str, Any]
_KINDS = frozenset(k.value for k in RecordKind)


class ChainState:
    """The chain's tip: last committed seq and hash. Processors read it; the sink commits."""

    def __init__(self, seq: int = 0, hash: str = GENESIS_HASH) -> None:
        self.seq = seq
        self.hash = hash

    def commit(self, seq: int, hash: str) -> None:
        """Advance the tip once a record is in the file."""
        if seq != self.seq + 1:
            raise RuntimeError(f"chain state out of order: {seq} after {self.seq}")
        self.seq, self.hash = seq, hash


# --- processors ------------------------------------------------------------------------------

def check_fields(logger: Any, method: str, event: EventDict) -> EventDict:
    """Turn structlog's ``event`` into ``kind``, which must be a known record kind."""
    kind = event.pop("event")
    if kind not in _KINDS:
        raise ValueError(f"unknown record kind {kind!r}; use one of {', '.join(sorted(_KINDS))}")
    event["kind"] = str(kind)
    return event


class ApplyStoreText:
    """Replace a ``text`` field by its digest, redacted text or itself (see ``privacy``)."""

    def __init__(self, mode: StoreTextMode, keys: KeyRing | None) -> None:
        self.mode = mode
        self.keys = keys

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        text = event.pop("text", None)
        if text is not None:
            if not isinstance(text, str):
                raise ValueError("'text' must be a string")
            event.update(text_fields(text, self.mode, self.keys))
        return event


class AddSequence:
    """``seq`` = the chain tip's seq + 1."""

    def __init__(self, state: ChainState) -> None:
        self.state = state

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        event["seq"] = self.state.seq + 1
        return event


class AddTimestamp:
    """``ts`` from the writer's clock (epoch seconds), RFC 3339 UTC."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        event["ts"] = format_ts(self.clock())
        return event


class ChainHash:
    """``prev_hash`` = the tip's hash; ``hash`` = SHA-256 of the body (the canonical JSON of the
    record so far). The body travels on to the renderer as ``_body``, so it is serialised once.
    A value that is not JSON (NaN, an arbitrary object) raises here, before anything is written."""

    def __init__(self, state: ChainState) -> None:
        self.state = state

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        event["prev_hash"] = self.state.hash
        try:
            body = body_json(event)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{event.get('kind')} record is not JSON-serialisable: {exc}") from exc
        event["hash"] = digest(body)
        event["_body"] = body
        return event


class SignHmac:
    """``hmac`` = ``<key id>:HMAC-SHA256(key, hash)`` (only in the pipeline when a key is set)."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        event["hmac"] = self.keys.sign(event["hash"])
        return event


def render_line(logger: Any, method: str, event: EventDict) -> tuple[tuple[bytes, EventDict], dict[str, Any]]:
    """The line: the body with ``hash`` and ``hmac`` appended; the record travels with it."""
    body = event.pop("_body")
    line = (seal(body, event["hash"], event.get("hmac")) + "\n").encode("ascii")
    return (line, event), {}


# --- the sink --------------------------------------------------------------------------------

class SegmentSink:
    """The pipeline's last link: appends lines to the open segment file (``O_APPEND``) and
    commits the chain state after each complete write. A failed write is cut back off the file,
    so the segment never holds a partial line in the middle."""

    def __init__(self, state: ChainState) -> None:
        self.state = state
        self.fd: int | None = None
        self.path: Path | None = None
        self.size = 0
        self.records = 0

    def open(self, path: Path) -> None:
        """Start appending to ``path`` (created if missing)."""
        self.close()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.path = path
        self.size = os.fstat(self.fd).st_size
        self.records = 0

    def audit(self, line: bytes, record: EventDict) -> AuditRecord:
        """Write one rendered line (the method structlog calls)."""
        if self.fd is None or self.path is None:
            raise OSError("no open segment")
        start = self.size
        try:
            view = memoryview(line)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError:
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass
            raise
        self.size = start + len(line)
        self.records += 1
        self.state.commit(record["seq"], record["hash"])
        return AuditRecord(seq=record["seq"], hash=record["hash"], kind=record["kind"], ts=record["ts"],
                           segment=self.path.name, line=line)

    def fsync(self) -> None:
        """``fdatasync`` the open segment."""
        if self.fd is not None:
            os.fdatasync(self.fd)

    def close(self) -> None:
        """Close the open segment (no fsync)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class AuditLogger(structlog.BoundLoggerBase):
    """A structlog bound logger with one method, ``audit(kind, **fields)``."""

    def audit(self, kind: str, **fields: Any) -> AuditRecord:
        """Run the pipeline for one record and return it as written."""
        rec: AuditRecord = self._proxy_to_logger("audit", kind, **fields)
        return rec


def build_logger(
    sink: SegmentSink,
    state: ChainState,
    *,
    writer_id: str,
    store_text: StoreTextMode,
    keys: KeyRing | None,
    clock: Callable[[], float],
) -> AuditLogger:
    """Assemble the pipeline for one writer."""
    processors: list[Any] = [
        check_fields,
        ApplyStoreText(store_text, keys),
        AddSequence(state),
        AddTimestamp(clock),
        ChainHash(state),
    ]
    if keys:
        processors.append(SignHmac(keys))
    processors.append(render_line)
    logger = structlog.wrap_logger(sink, processors=processors, wrapper_class=AuditLogger,
                                   cache_logger_on_first_use=False)
    bound: AuditLogger = logger.bind(v=SCHEMA_VERSION, writer=writer_id)
    return bound


__all__ = ["AuditLogger", "ChainState", "SegmentSink", "build_logger"]
