"""Audit record format: kinds, the canonical JSON form, hashing and HMAC signing.

One record is one line of canonical JSON (keys sorted, no spaces, ASCII only, no NaN/Infinity)
followed by ``\\n``. Every record carries an envelope::

    v          schema version (int)                 seq        sequence number, 1, 2, 3, ...
    ts         UTC time, RFC 3339 with microseconds  writer     the writer (sidecar replica) id
    kind       one of :class:`RecordKind`            prev_hash  ``hash`` of the previous record
    hash       SHA-256 of the canonical JSON of the record without ``hash`` and ``hmac``
    hmac       optional, ``<key id>:<HMAC-SHA256(key, hash)>``

The first record of a trail has ``prev_hash`` = :data:`GENESIS_HASH`. Because the line must be
exactly the canonical form of its own content, any byte change is visible even when it would
parse to the same value (``1E-05`` for ``1e-05``, a duplicated key, a space).
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

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


def canonical_json(obj: Any) -> str:
    """The one serialisation of ``obj`` that is hashed and written (sorted keys, ASCII, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays (the sidecar's readings) become plain Python numbers and lists.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def to_json_value(obj: Any) -> Any:
    """``obj`` as plain JSON types, exactly as a reader will parse it back (tuples become lists,
    int dict keys become strings, numpy values become numbers). Raises ValueError on NaN/Inf."""
    return json.loads(json.dumps(obj, default=_json_default, allow_nan=False))


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``record`` without its ``hash`` and ``hmac``."""
    body = {k: v for k, v in record.items() if k not in _UNHASHED}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


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

    Raises :class:`RecordFormatError` when the line is not ASCII JSON, not in canonical form, or
    misses an envelope field.
    """
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as exc:
        raise RecordFormatError("not ASCII (records are written with every non-ASCII character escaped)") from exc
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise RecordFormatError(f"not JSON ({exc.args[0] if exc.args else exc})") from exc
    if not isinstance(obj, dict):
        raise RecordFormatError("not a JSON object")
    try:
        canonical = canonical_json(obj)
    except ValueError as exc:
        raise RecordFormatError("contains NaN or Infinity") from exc
    if canonical != text:
        raise RecordFormatError("not in canonical form (bytes differ from the canonical JSON of the content)")
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
    for name in ("prev_hash", "hash"):
        value = obj.get(name)
        if not isinstance(value, str) or not _HEX64.match(value):
            raise RecordFormatError(f"missing or invalid {name!r}")
    if "hmac" in obj and not isinstance(obj["hmac"], str):
        raise RecordFormatError("invalid 'hmac'")
    return obj


@dataclass(frozen=True)
class AuditRecord:
    """A record as written: its envelope shortcuts plus the full ``data`` dict."""

    seq: int
    hash: str
    kind: str
    ts: str
    segment: str
    data: dict[str, Any]

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
