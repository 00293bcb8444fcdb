"""Wire format of one sample: a versioned JSON header plus raw little-endian tensor bytes.

Layout (all integers little-endian)::

    b"LWS1" | uint32 header_length | header (UTF-8 JSON object) | payload (raw tensor bytes)

The payload is the captured hidden states, shape ``[L, P, d]`` (watched layers x captured
positions x hidden size) in the header's ``dtype`` (``float16`` by default). Header fields:
``schema``, ``sample_id``, ``request_id``, ``model``, ``model_fingerprint``, ``layers`` (the
state indices of the L rows, sorted, within ``0..n_states-1``), ``n_states`` (N+1), ``shape``,
``dtype``, ``positions`` (the tap's mode: last, all, mean, generated, or last+mean: P = 2, index
0 the prompt mean, 1 the last token), ``position_index`` (the P captured positions, as indices
into the request's own tokens with padding excluded; empty for ``mean`` and ``last+mean``),
``created_at`` (capture time, Unix seconds), ``metadata`` (bounded user fields), ``final_topk``
(the model's own top-k ids and log-probabilities per captured position, or null) and ``tap``
(the sending tap's cumulative counters). Never pickle: decoding reads JSON and
``numpy.frombuffer`` only. :func:`decode` validates everything the sidecar relies on and raises
:class:`~monitor.errors.WireFormatError` whose ``reason`` is a short, bounded label used for
the dead-letter stream and its counter.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.errors import WireFormatError, WireTooLarge

MAGIC = b"LWS1"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = frozenset({1})
DTYPES: dict[str, np.dtype[Any] | None] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "bfloat16": None}
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
MAX_METADATA_ITEMS = 32
MAX_METADATA_VALUE_CHARS = 256

# Dead-letter reasons produced by decode() (the sidecar adds "fingerprint" itself when it
# compares with the lens bundle, which decode() also does when given an expected fingerprint).
DECODE_REASONS = (
    "undecodable", "schema_version", "missing_field", "bad_field", "shape_mismatch", "dtype",
    "non_finite", "oversized", "fingerprint",
)

# vectors per layer of the positions modes that fix it (the sidecar reads index 0 of
# "last+mean" as the prompt mean and index -1 as the last token)
FIXED_POSITIONS = {"last": 1, "mean": 1, "last+mean": 2}

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "sample_id": str,
    "request_id": str,
    "model": str,
    "model_fingerprint": str,
    "layers": list,
    "n_states": int,
    "shape": list,
    "dtype": str,
    "positions": str,
    "created_at": (int, float),
}


@dataclass(frozen=True)
class FinalTopK:
    """The model's own top-k at each captured position (from the LM head inside the tap)."""

    ids: np.ndarray  # int64 [P, k]
    logprobs: np.ndarray  # float32 [P, k]


@dataclass(frozen=True)
class Sample:
    """One decoded sample: the captured states of one request plus its identity."""

    sample_id: str
    request_id: str
    model: str
    model_fingerprint: str
    layers: tuple[int, ...]
    n_states: int
    positions: str
    hidden: np.ndarray  # [L, P, d], read-only view of the payload
    created_at: float
    position_index: tuple[int, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    final_topk: FinalTopK | None = None
    tap: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    @property
    def hidden_size(self) -> int:
        return int(self.hidden.shape[2])


def encode(header: dict[str, Any], hidden: np.ndarray, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Serialise a header and a ``[L, P, d]`` array. ``shape``/``dtype`` are filled in here."""
    if hidden.ndim != 3:
        raise WireFormatError("shape_mismatch", f"hidden must be [L, P, d], got shape {hidden.shape}")
    dtype_name = {np.dtype("float16"): "float16", np.dtype("float32"): "float32"}.get(hidden.dtype)
    if dtype_name is None:
        raise WireFormatError("dtype", f"unsupported dtype {hidden.dtype}; use float16 or float32")
    hdr = dict(header)
    hdr.setdefault("schema", SCHEMA_VERSION)
    hdr["shape"] = [int(x) for x in hidden.shape]
    hdr["dtype"] = dtype_name
    raw_header = json.dumps(hdr, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw_header) > MAX_HEADER_BYTES:
        raise WireTooLarge(f"header is {len(raw_header)} bytes, limit {MAX_HEADER_BYTES}")
    payload = np.ascontiguousarray(hidden, dtype=hidden.dtype.newbyteorder("<")).tobytes()
    total = 8 + len(raw_header) + len(payload)
    if total > max_bytes:
        raise WireTooLarge(f"sample is {total} bytes, limit {max_bytes}")
    return b"".join((MAGIC, struct.pack("<I", len(raw_header)), raw_header, payload))


def _field(hdr: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in hdr:
        raise WireFormatError("missing_field", f"header has no {name!r}")
    value = hdr[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WireFormatError("bad_field", f"header field {name!r} has type {type(value).__name__}")
    return value


def _int_list(hdr: dict[str, Any], name: str) -> list[int]:
    value = hdr[name]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise WireFormatError("bad_field", f"header field {name!r} must be a list of integers")
    return list(value)


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_fingerprint: str | None = None,
    expected_hidden_size: int | None = None,
) -> Sample:
    """Parse and validate one sample. Raises :class:`WireFormatError` with a precise message."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError("undecodable", f"expected bytes, got {type(data).__name__}")
    buf = bytes(data)
    if len(buf) > max_bytes:
        raise WireTooLarge(f"sample is {len(buf)} bytes, limit {max_bytes}")
    if len(buf) < 8 or buf[:4] != MAGIC:
        raise WireFormatError("undecodable", "missing LWS1 magic (not a layerwatch sample)")
    (hlen,) = struct.unpack_from("<I", buf, 4)
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(buf):
        raise WireFormatError("undecodable", f"header length {hlen} exceeds the message or the limit")
    try:
        hdr = json.loads(buf[8 : 8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError("undecodable", f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(hdr, dict):
        raise WireFormatError("undecodable", "header is not a JSON object")
    schema = hdr.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema not in SUPPORTED_SCHEMAS:
        raise WireFormatError(
            "schema_version", f"schema version {schema!r} unsupported (supported: {sorted(SUPPORTED_SCHEMAS)})"
        )
    for name, kind in _REQUIRED.items():
        _field(hdr, name, kind)
    layers = _int_list(hdr, "layers")
    shape = _int_list(hdr, "shape")
    n_states = hdr["n_states"]
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise WireFormatError("shape_mismatch", f"shape {shape} is not a positive [L, P, d]")
    if len(layers) != shape[0]:
        raise WireFormatError("shape_mismatch", f"{len(layers)} layer indices but shape[0] = {shape[0]}")
    if layers != sorted(set(layers)) or (layers and (layers[0] < 0 or layers[-1] >= n_states)):
        raise WireFormatError("bad_field", f"layers must be sorted, unique and within 0..{n_states - 1}")
    fixed = FIXED_POSITIONS.get(hdr["positions"])
    if fixed is not None and shape[1] != fixed:
        raise WireFormatError("shape_mismatch", f"positions {hdr['positions']!r} ship {fixed} vector(s) per layer, "
                                                f"shape has P = {shape[1]}")
    dt = DTYPES.get(hdr["dtype"])
    if dt is None:
        raise WireFormatError("dtype", f"dtype {hdr['dtype']!r} unsupported (float16, float32)")
    expected_len = math.prod(shape) * dt.itemsize
    payload = memoryview(buf)[8 + hlen :]
    if len(payload) != expected_len:
        raise WireFormatError(
            "shape_mismatch", f"payload is {len(payload)} bytes, shape {shape} x {hdr['dtype']} needs {expected_len}"
        )
    if expected_hidden_size is not None and shape[2] != expected_hidden_size:
        raise WireFormatError("shape_mismatch", f"hidden size {shape[2]}, the lens bank expects {expected_hidden_size}")
    if expected_fingerprint is not None and hdr["model_fingerprint"] != expected_fingerprint:
        raise WireFormatError(
            "fingerprint",
            f"sample from model {hdr['model_fingerprint']}, the lens bundle is for {expected_fingerprint}",
        )
    hidden = np.frombuffer(payload, dtype=dt).reshape(shape)
    if not np.isfinite(hidden).all():
        raise WireFormatError("non_finite", "hidden states contain NaN or Inf")
    metadata = hdr.get("metadata") or {}
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_ITEMS:
        raise WireFormatError("bad_field", "metadata must be an object with at most 32 items")
    final = _final_topk(hdr.get("final_topk"), shape[1])
    pos_index = hdr.get("position_index") or []
    if not isinstance(pos_index, list) or len(pos_index) > shape[1]:
        raise WireFormatError("bad_field", "position_index must be a list of at most P integers")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in pos_index):
        raise WireFormatError("bad_field", "position_index must be a list of integers")
    try:
        created_at = float(hdr["created_at"])
    except OverflowError:
        created_at = math.inf
    if not math.isfinite(created_at):
        raise WireFormatError("bad_field", "created_at must be a finite number")
    tap = hdr.get("tap") or {}
    if not isinstance(tap, dict):
        raise WireFormatError("bad_field", "tap must be an object")
    return Sample(
        sample_id=hdr["sample_id"], request_id=hdr["request_id"], model=hdr["model"],
        model_fingerprint=hdr["model_fingerprint"], layers=tuple(layers), n_states=n_states,
        positions=hdr["positions"], hidden=hidden, created_at=created_at,
        position_index=tuple(int(x) for x in pos_index), metadata=metadata, final_topk=final,
        tap=tap, schema=schema,
    )


def _final_topk(raw: Any, n_positions: int) -> FinalTopK | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "ids" not in raw or "logprobs" not in raw:
        raise WireFormatError("bad_field", "final_topk must be {ids, logprobs}")
    try:
        ids = np.asarray(raw["ids"], dtype=np.int64)
        lp = np.asarray(raw["logprobs"], dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireFormatError("bad_field", f"final_topk is not numeric: {exc}") from exc
    if ids.ndim != 2 or ids.shape != lp.shape or ids.shape[0] > n_positions:
        raise WireFormatError("bad_field", f"final_topk shapes {ids.shape}/{lp.shape} do not fit {n_positions} positions")
    return FinalTopK(ids=ids, logprobs=lp)


def sanitize_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Bound user metadata (the tap calls this): str keys, scalar values, truncated strings."""
    if not metadata:
        return {}
    out: dict[str, Any] = {}
    for k, v in list(metadata.items())[:MAX_METADATA_ITEMS]:
        key = str(k)[:64]
        if isinstance(v, (bool, int)) or (isinstance(v, float) and math.isfinite(v)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)[:MAX_METADATA_VALUE_CHARS]
    return out
