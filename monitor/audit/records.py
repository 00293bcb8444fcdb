"""Audit record format: kinds, the line format, hashing and HMAC signing.

One record is one line, a JSON object, ASCII only, followed by ``\n``::

    {<body fields, keys sorted, no spaces>,"hash":"<64 hex>","hmac":"<key id>:<64 hex>"}\n

The *body* is the canonical JSON (keys sorted, compact, ASCII, no NaN/Infinity) of every field
but ``hash`` and ``hmac``; the line is the body with ``hash`` (and ``hmac`` when the trail has a
key) appended as its last fields. So:

    hash = SHA-256( the line up to ``,"hash":`` followed by ``}`` )      (exactly the body bytes)
    hmac = <key id> ":" HMAC-SHA256(key, hash)

which anyone can recompute from the bytes without re-serialising anything; any changed byte of
the body changes the hash. Envelope fields in every body::

    v          schema version (int)                 seq        sequence number, 1, 2, 3, ...
    ts         UTC time, RFC 3339 with microseconds  writer     the writer (sidecar replica) id
    kind       one of :class:`RecordKind`            prev_hash  ``hash`` of the previous record

The first record of a trail has ``prev_hash`` = :data:`GENESIS_HASH`.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Any

from monitor.errors import AuditError

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RecordKind(StrEnum):
    """Every kind of record the trail holds."""

    SAMPLE = "sample"
    DRIFT_ALERT_RAISED = "drift_alert_raised"
    DRIFT_ALERT_CLEARED = "drift_alert_cleared"
    BASELINE_PROMOTED = "baseline_promoted"
    BASELINE_ROLLED_BACK = "baseline_rolled_back"
    BASELINE_CHANGED = "baseline_changed"  # a running sidecar switched to the store's active baseline
    BASELINE_REFUSED = "baseline_refused"  # ... or refused it (content id, compatibility)
    WATCH_REFUSED = "watch_refused"  # a learned baseline the watched concepts do not fit
    BUNDLE_LOADED = "bundle_loaded"
    BUNDLE_CHANGED = "bundle_changed"
    CONFIG = "config"
    SIDECAR_START = "sidecar_start"
    SIDECAR_STOP = "sidecar_stop"
    RECOVERY = "recovery"
    CHECKPOINT = "checkpoint"


#: Kinds only the writer itself emits (callers get an error if they try).
WRITER_KINDS = frozenset({RecordKind.RECOVERY, RecordKind.CHECKPOINT})
#: Kinds a caller (the sidecar) may append.
CALLER_KINDS = frozenset(k.value for k in RecordKind if k not in WRITER_KINDS)

#: Envelope fields set by the writer; a caller may not pass them.
ENVELOPE_FIELDS = ("v", "seq", "ts", "writer", "kind", "prev_hash", "hash", "hmac")
RESERVED_FIELDS = frozenset(ENVELOPE_FIELDS) | {"event"}
_UNHASHED = ("hash", "hmac")


class RecordFormatError(ValueError):
    """A line is not a well-formed canonical audit record. ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def format_ts(epoch_s: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2025-01-31T12:00:00.123456Z`` (sorts as text)."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(obj: Any) -> str:
    """The one serialisation of ``obj`` that is hashed and written (sorted keys, ASCII, no NaN;
    numpy values become plain numbers and lists). Raises ValueError/TypeError when not JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_json_default)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays (the sidecar's readings) become plain Python numbers and lists.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def body_json(record: Mapping[str, Any]) -> str:
    """The body of a record: canonical JSON of every field but ``hash`` and ``hmac``."""
    return canonical_json({k: v for k, v in record.items() if k not in _UNHASHED})


def digest(body: str) -> str:
    """SHA-256 (hex) of a body."""
    return hashlib.sha256(body.encode("ascii")).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash a record's content should carry: SHA-256 of its body."""
    return digest(body_json(record))


def seal(body: str, hash: str, hmac: str | None = None) -> str:
    """The line (without newline) for ``body``: its hash, and signature, appended as last fields."""
    tail = f',"hash":"{hash}"' + (f',"hmac":"{hmac}"' if hmac else "")
    return body[:-1] + tail + "}"


def encode_record(record: Mapping[str, Any]) -> bytes:
    """A record as its line, hash recomputed, ``hmac`` kept as given (for tools and tests)."""
    body = body_json(record)
    return (seal(body, digest(body), record.get("hmac")) + "\n").encode("ascii")


_SEAL = re.compile(r',"hash":"([0-9a-f]{64})"(?:,"hmac":"([0-9a-f]{1,64}:[0-9a-f]{64})")?\}\Z')


def split_sealed(text: str) -> tuple[str, str, str | None]:
    """(body, hash, hmac) of a line; RecordFormatError when it does not end with its hash."""
    m = _SEAL.search(text)
    if m is None:
        raise RecordFormatError("the line does not end with its hash (and signature) fields")
    return text[: m.start()] + "}", m.group(1), m.group(2)


def key_id(key: bytes) -> str:
    """A short public identifier of an HMAC key (itself an HMAC, so it reveals nothing more)."""
    return _hmac.new(key, b"layerwatch-audit-key-id", hashlib.sha256).hexdigest()[:12]


class KeyRing:
    """HMAC keys by key id: one to sign with, any number to verify (keys can be rotated)."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._keys: dict[str, bytes] = {}
        for key in keys:
            self.add(key)

    def add(self, key: bytes) -> str:
        """Add ``key``; returns its key id."""
        kid = key_id(key)
        self._keys[kid] = key
        return kid

    def __bool__(self) -> bool:
        return bool(self._keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def sign(self, digest: str, kid: str | None = None) -> str:
        """``<kid>:<hex>`` signature of ``digest`` with key ``kid`` (the first key by default)."""
        if not self._keys:
            raise ValueError("no HMAC key")
        kid = kid or next(iter(self._keys))
        mac = _hmac.new(self._keys[kid], digest.encode("ascii"), hashlib.sha256).hexdigest()
        return f"{kid}:{mac}"

    def check(self, digest: str, signature: str) -> str | None:
        """None when ``signature`` is valid for ``digest``, else the reason it is not."""
        kid, _, mac = signature.partition(":")
        key = self._keys.get(kid)
        if key is None:
            return f"signed with unknown key id {kid!r} (known: {', '.join(self._keys) or 'none'})"
        want = _hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()
        if not _hmac.compare_digest(want, mac):
            return f"HMAC does not match (key id {kid})"
        return None


def parse_record(line: bytes) -> dict[str, Any]:
    """Parse one line (without its newline) into a record, checking form but not hash or chain.

    Raises :class:`RecordFormatError` when the line is not ASCII JSON ending in its hash fields,
    or misses an envelope field.
    """
    return parse_and_hash(line)[0]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_and_hash(line: bytes) -> tuple[dict[str, Any], str]:
    """:func:`parse_record` plus the SHA-256 of the line's body (to compare with ``hash``)."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as exc:
        raise RecordFormatError("not ASCII (records are written with every non-ASCII character escaped)") from exc
    body, hash_, sig = split_sealed(text)
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        raise RecordFormatError(f"not JSON ({exc.args[0] if exc.args else exc})") from exc
    if not isinstance(obj, dict):
        raise RecordFormatError("not a JSON object")
    # hash and signature are what the line ends with, whatever else the body says
    obj["hash"] = hash_
    if sig is None:
        obj.pop("hmac", None)
    else:
        obj["hmac"] = sig
    if type(obj.get("v")) is not int:
        raise RecordFormatError("missing schema version 'v'")
    if obj["v"] != SCHEMA_VERSION:
        raise RecordFormatError(f"unknown schema version {obj['v']} (this layerwatch reads {SCHEMA_VERSION})")
    seq = obj.get("seq")
    if type(seq) is not int or seq < 1:
        raise RecordFormatError("missing or invalid 'seq'")
    for name in ("ts", "writer", "kind"):
        if not isinstance(obj.get(name), str):
            raise RecordFormatError(f"missing or invalid {name!r}")
    prev = obj.get("prev_hash")
    if not isinstance(prev, str) or not _HEX64.match(prev):
        raise RecordFormatError("missing or invalid 'prev_hash'")
    return obj, digest(body)


@dataclass(frozen=True)
class AuditRecord:
    """A record as written: envelope shortcuts, the exact ``line`` and (parsed on first use) ``data``."""

    seq: int
    hash: str
    kind: str
    ts: str
    segment: str
    line: bytes

    @cached_property
    def data(self) -> dict[str, Any]:
        """The record as a dict, parsed from its line."""
        parsed: dict[str, Any] = json.loads(self.line)
        return parsed

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``data.get(key, default)``."""
        return self.data.get(key, default)


def sample_fields(
    *,
    sample_id: str,
    request_id: str | None = None,
    model: str | None = None,
    model_fingerprint: str | None = None,
    bundle_id: str | None = None,
    baseline_id: str | None = None,
    narrative: Mapping[str, Any] | None = None,
    score: Mapping[str, Any] | None = None,
    flags: Iterable[Mapping[str, Any]] = (),
    redelivered: bool = False,
    text: str | None = None,
) -> dict[str, Any]:
    """The fields of a ``sample`` record, named as the review tools expect them.

    ``text`` (the prompt) is stored according to the writer's ``store_text`` policy: by default
    only its digest. ``redelivered`` marks the one allowed duplicate (see the sidecar's ledger);
    review tools keep the first record of a sample id.
    """
    fields: dict[str, Any] = {"sample_id": sample_id}
    optional = {
        "request_id": request_id, "model": model, "model_fingerprint": model_fingerprint,
        "bundle_id": bundle_id, "baseline_id": baseline_id, "narrative": narrative, "score": score,
        "text": text,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    fields["flags"] = [dict(f) for f in flags]
    if redelivered:
        fields["redelivered"] = True
    return fields


def check_kind(kind: str) -> str:
    """The kind of a record a caller may append; AuditError names the kinds otherwise."""
    value = str(kind)
    if value not in CALLER_KINDS:
        if value in (RecordKind.CHECKPOINT, RecordKind.RECOVERY):
            raise AuditError(f"{value} records are written by the audit writer itself")
        raise AuditError(f"unknown audit record kind {value!r}; use one of {', '.join(sorted(CALLER_KINDS))}")
    return value


def check_fields(kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A caller's fields for a record of ``kind``; AuditError names the field that cannot be used."""
    clash = RESERVED_FIELDS.intersection(fields)
    if clash:
        raise AuditError(f"audit record fields {sorted(clash)} are set by the writer; rename them or nest the "
                         "payload (e.g. {\"alert\": event.to_dict()})")
    bad = [k for k in fields if not isinstance(k, str)]
    if bad:
        raise AuditError(f"audit record field names must be strings, got {bad!r}")
    if kind == RecordKind.SAMPLE and not (isinstance(fields.get("sample_id"), str) and fields["sample_id"]):
        raise AuditError("a sample record needs a non-empty string sample_id (use sample_fields(...))")
    return dict(fields)
