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
(the sending tap's cumulative counters).

Prompt windows (issue 19, optional: samples of older taps have none): ``windows``, the ``[W, 2]``
``[start, end)`` token offsets of the windows whose means the tap captured
(:mod:`monitor.windows`), and ``prompt_tokens``, the prompt's length they index. The window means
follow the hidden states in the payload, ``[L, W, d]`` in the same dtype (``W = 0``: a prompt of
one token or none has no windows, the header says ``windows: []``). Never pickle: decoding reads JSON and
``numpy.frombuffer`` only. :func:`decode` validates everything the sidecar relies on and raises
:class:`~monitor.errors.WireFormatError` whose ``reason`` is a short, bounded label used for
the dead-letter stream and its counter (:data:`DECODE_REASONS`; a hostile producer can send
anything, so nothing else may escape: a nested header is refused by depth, NaN and Infinity
anywhere in the header by the JSON parser itself, ids by length and character class).
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
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256
MAX_ID_CHARS = 256  # sample_id, request_id: they become ledger keys and audit fields
MAX_NAME_CHARS = 128  # model, model_fingerprint, dtype, positions
MAX_HEADER_DEPTH = 6  # the deepest legitimate value is final_topk's [P][k] lists (depth 3)
MAX_WINDOWS = 1024  # prompt windows per sample (the tap's setting allows at most 256)
MAX_PROMPT_TOKENS = 1 << 24

# Dead-letter reasons produced by decode(), one label each (documented in the README):
DECODE_REASONS = (
    "undecodable",  # no LWS1 magic, a header length past the message, not JSON, not an object
    "not_utf8",  # the header (or a string in it) is not valid UTF-8
    "too_deep",  # the header's JSON nests deeper than MAX_HEADER_DEPTH
    "schema_version",  # a schema this sidecar does not read
    "missing_field",  # a required header field is absent
    "bad_field",  # a field of the wrong type or out of range
    "bad_id",  # sample_id or request_id empty, longer than MAX_ID_CHARS, or with control characters
    "shape_mismatch",  # declared shape vs layers, positions or the payload's length
    "dtype",  # a dtype other than float16/float32
    "non_finite",  # NaN or Infinity in the header (metadata included) or in the hidden states
    "oversized",  # the message is larger than the configured limit
    "fingerprint",  # captured from another model than the lens bundle's
    "unknown_layer",  # the sample lacks a layer the lens bank reads
    "bad_windows",  # window bounds not sorted, overlapping, outside the prompt, or too many of them
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
    # prompt windows (None: the tap captured none, e.g. an older tap): means [L, W, d] of the
    # token ranges [W, 2] [start, end) of a prompt of ``prompt_tokens`` tokens
    windows: np.ndarray | None = None
    window_bounds: np.ndarray | None = None
    prompt_tokens: int | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.hidden.shape[2])


def encode(header: dict[str, Any], hidden: np.ndarray, *, windows: np.ndarray | None = None,
           max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Serialise a header and a ``[L, P, d]`` array. ``shape``/``dtype`` are filled in here.

    ``windows``: the ``[L, W, d]`` prompt-window means (same dtype), appended to the payload; the
    header must then carry their ``windows`` bounds and ``prompt_tokens``.
    """
    if hidden.ndim != 3:
        raise WireFormatError("shape_mismatch", f"hidden must be [L, P, d], got shape {hidden.shape}")
    dtype_name = {np.dtype("float16"): "float16", np.dtype("float32"): "float32"}.get(hidden.dtype)
    if dtype_name is None:
        raise WireFormatError("dtype", f"unsupported dtype {hidden.dtype}; use float16 or float32")
    hdr = dict(header)
    hdr.setdefault("schema", SCHEMA_VERSION)
    hdr["shape"] = [int(x) for x in hidden.shape]
    hdr["dtype"] = dtype_name
    parts = [np.ascontiguousarray(hidden, dtype=hidden.dtype.newbyteorder("<")).tobytes()]
    if windows is not None:
        bounds = hdr.get("windows")
        if (windows.ndim != 3 or windows.dtype != hidden.dtype or windows.shape[0] != hidden.shape[0]
                or windows.shape[2] != hidden.shape[2] or not isinstance(bounds, list)
                or len(bounds) != windows.shape[1] or "prompt_tokens" not in hdr):
            raise WireFormatError("shape_mismatch", f"windows {windows.shape} {windows.dtype} do not fit hidden "
                                                    f"{hidden.shape} {hidden.dtype} and the header's bounds")
        parts.append(np.ascontiguousarray(windows, dtype=windows.dtype.newbyteorder("<")).tobytes())
    elif "windows" in hdr:
        raise WireFormatError("shape_mismatch", "the header names windows but none were given")
    raw_header = json.dumps(hdr, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw_header) > MAX_HEADER_BYTES:
        raise WireTooLarge(f"header is {len(raw_header)} bytes, limit {MAX_HEADER_BYTES}")
    total = 8 + len(raw_header) + sum(len(p) for p in parts)
    if total > max_bytes:
        raise WireTooLarge(f"sample is {total} bytes, limit {max_bytes}")
    return b"".join((MAGIC, struct.pack("<I", len(raw_header)), raw_header, *parts))


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
    hdr = _parse_header(buf[8 : 8 + hlen])
    schema = hdr.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema not in SUPPORTED_SCHEMAS:
        raise WireFormatError(
            "schema_version", f"schema version {schema!r} unsupported (supported: {sorted(SUPPORTED_SCHEMAS)})"
        )
    for name, kind in _REQUIRED.items():
        _field(hdr, name, kind)
    for name in ("sample_id", "request_id"):
        _check_id(name, hdr[name])
    for name in ("model", "model_fingerprint", "dtype", "positions"):
        if not 0 < len(hdr[name]) <= MAX_NAME_CHARS or not hdr[name].isprintable():
            raise WireFormatError("bad_field", f"header field {name!r} must be 1..{MAX_NAME_CHARS} printable characters")
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
    bounds, prompt_tokens = _windows(hdr)
    hidden_len = math.prod(shape) * dt.itemsize
    expected_len = hidden_len + (0 if bounds is None else shape[0] * len(bounds) * shape[2] * dt.itemsize)
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
    hidden = np.frombuffer(payload[:hidden_len], dtype=dt).reshape(shape)
    if not _all_finite(hidden):
        raise WireFormatError("non_finite", "hidden states contain NaN or Inf")
    windows = None
    if bounds is not None:
        windows = np.frombuffer(payload[hidden_len:], dtype=dt).reshape(shape[0], len(bounds), shape[2])
        if not _all_finite(windows):
            raise WireFormatError("non_finite", "window means contain NaN or Inf")
    metadata = _metadata(hdr.get("metadata"))
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
        tap=tap, schema=schema, windows=windows, window_bounds=bounds, prompt_tokens=prompt_tokens,
    )


_EXPONENT = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000)}


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in a float16/float32 array: an all-ones exponent, tested on the bits (numpy's
    float16 isfinite converts every element and took ~10 ms for a sample's 1.1 M window values)."""
    kind, mask = _EXPONENT[a.dtype.itemsize]
    return not bool(np.any((a.view(kind) & kind(mask)) == kind(mask)))


def _windows(hdr: dict[str, Any]) -> tuple[np.ndarray | None, int | None]:
    """The header's window bounds ``[W, 2]`` and prompt length, validated (None, None: no windows).

    A hostile producer may send anything: at most MAX_WINDOWS pairs of integers ``0 <= start <
    end <= prompt_tokens``, sorted and disjoint."""
    raw = hdr.get("windows")
    if raw is None:
        return None, None
    n = hdr.get("prompt_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_PROMPT_TOKENS:
        raise WireFormatError("bad_windows", f"prompt_tokens must be an integer in 0..{MAX_PROMPT_TOKENS} with windows")
    if not isinstance(raw, list) or len(raw) > MAX_WINDOWS:
        raise WireFormatError("bad_windows", f"windows must be a list of at most {MAX_WINDOWS} [start, end] pairs")
    if not all(isinstance(w, list) and len(w) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in w)
               for w in raw):
        raise WireFormatError("bad_windows", "windows must be [start, end] pairs of integers")
    try:
        b = np.asarray(raw, dtype=np.int64).reshape(-1, 2)
    except OverflowError as exc:
        raise WireFormatError("bad_windows", "window bounds out of range") from exc
    if len(b) and (b[0, 0] < 0 or b[-1, 1] > n or np.any(b[:, 1] <= b[:, 0]) or np.any(b[1:, 0] < b[:-1, 1])):
        raise WireFormatError("bad_windows", f"windows must be sorted, disjoint, non-empty ranges within "
                                             f"0..{n} (the prompt's tokens)")
    b.setflags(write=False)
    return b, n


def _reject_constant(name: str) -> float:
    raise WireFormatError("non_finite", f"header holds {name}; JSON numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise WireFormatError("non_finite", f"header number {text[:40]} is not finite")
    return value


def _parse_header(raw: bytes) -> dict[str, Any]:
    """The header object: UTF-8 JSON with finite numbers only, nested at most MAX_HEADER_DEPTH."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError("not_utf8", f"header is not UTF-8: {exc}") from exc
    try:
        hdr = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError as exc:  # the C scanner recurses once per level
        raise WireFormatError("too_deep", f"header nests deeper than {MAX_HEADER_DEPTH} levels") from exc
    except json.JSONDecodeError as exc:
        raise WireFormatError("undecodable", f"header is not JSON: {exc}") from exc
    except ValueError as exc:  # an integer past Python's digit limit
        raise WireFormatError("undecodable", f"header is not usable JSON: {str(exc)[:200]}") from exc
    if not isinstance(hdr, dict):
        raise WireFormatError("undecodable", "header is not a JSON object")
    _check_tree(hdr)
    return hdr


def _check_tree(root: Any) -> None:
    """Depth and string checks over the parsed header, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_utf8(value)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_HEADER_DEPTH:
            raise WireFormatError("too_deep", f"header nests deeper than {MAX_HEADER_DEPTH} levels")
        if isinstance(value, dict):
            for key in value:
                _check_utf8(key)
            stack.extend((v, depth + 1) for v in value.values())
        else:
            stack.extend((v, depth + 1) for v in value)


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate written as a JSON escape (\ud800)
        raise WireFormatError("not_utf8", "header holds a string that is not valid UTF-8") from exc


def _check_id(name: str, value: str) -> None:
    if not value:
        raise WireFormatError("bad_id", f"{name} is empty")
    if len(value) > MAX_ID_CHARS:
        raise WireFormatError("bad_id", f"{name} has {len(value)} characters, limit {MAX_ID_CHARS}")
    if not value.isprintable():
        raise WireFormatError("bad_id", f"{name} holds control or non-printable characters")


def _metadata(raw: Any) -> dict[str, Any]:
    """User metadata as the tap's :func:`sanitize_metadata` leaves it: bounded keys, scalar values."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_METADATA_ITEMS:
        raise WireFormatError("bad_field", f"metadata must be an object with at most {MAX_METADATA_ITEMS} items")
    for key, value in raw.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise WireFormatError("bad_field", f"metadata keys are at most {MAX_METADATA_KEY_CHARS} characters")
        if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_CHARS:
            raise WireFormatError("bad_field", f"metadata values are at most {MAX_METADATA_VALUE_CHARS} characters")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise WireFormatError("bad_field", f"metadata value of {key[:64]!r} is not a scalar")
    return raw


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
