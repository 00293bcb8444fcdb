"""Wire format: roundtrip, one precise reason per malformed class, fuzzing."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.errors import WireFormatError, WireTooLarge
from monitor.wire import DECODE_REASONS, MAGIC, Sample, decode, encode


def _header(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {
        "schema": 1, "sample_id": "s-1", "request_id": "r-1", "model": "tiny",
        "model_fingerprint": "sha256:abc", "layers": [0, 1, 2], "n_states": 3, "positions": "last",
        "created_at": 1700000000.5, "position_index": [4], "metadata": {"route": "/v1"},
        "final_topk": {"ids": [[5, 6]], "logprobs": [[-0.1, -2.5]]}, "tap": {"instance": "i", "sampled": 1},
    }
    h.update(over)
    return h


def _hidden(shape: tuple[int, int, int] = (3, 1, 4)) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float16).reshape(shape) / 7


def _raw(header: dict[str, Any], payload: bytes) -> bytes:
    """Build a message by hand (bypassing encode's own checks)."""
    h = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(h)) + h + payload


def _valid_raw(**over: Any) -> bytes:
    hidden = _hidden()
    return _raw(_header(shape=list(hidden.shape), dtype="float16", **over), hidden.tobytes())


def _reason(data: Any, **kw: Any) -> str:
    with pytest.raises(WireFormatError) as err:
        decode(data, **kw)
    return err.value.reason


def test_roundtrip_preserves_every_field() -> None:
    """encode then decode gives back the tensor bit for bit and every header field."""
    hidden = _hidden((3, 2, 4))
    data = encode(_header(positions="all", position_index=[3, 4],
                          final_topk={"ids": [[1], [2]], "logprobs": [[-0.5], [-1.0]]}), hidden)
    s = decode(data, expected_fingerprint="sha256:abc", expected_hidden_size=4)
    assert isinstance(s, Sample)
    assert np.array_equal(s.hidden, hidden) and s.hidden.dtype == np.float16 and s.hidden_size == 4
    assert (s.sample_id, s.request_id, s.model, s.model_fingerprint) == ("s-1", "r-1", "tiny", "sha256:abc")
    assert s.layers == (0, 1, 2) and s.n_states == 3 and s.positions == "all"
    assert s.position_index == (3, 4) and s.created_at == 1700000000.5
    assert s.metadata == {"route": "/v1"} and s.tap == {"instance": "i", "sampled": 1}
    assert s.final_topk is not None and s.final_topk.ids.tolist() == [[1], [2]]
    assert s.final_topk.logprobs.dtype == np.float32


def test_payload_is_raw_little_endian() -> None:
    """The payload is the tensor's little-endian bytes right after the JSON header (no pickle)."""
    hidden = _hidden()
    data = encode(_header(), hidden)
    (hlen,) = struct.unpack_from("<I", data, 4)
    assert data[:4] == b"LWS1"
    assert data[8 + hlen :] == hidden.astype("<f2").tobytes()
    assert json.loads(data[8 : 8 + hlen])["shape"] == [3, 1, 4]


def test_float32_roundtrips() -> None:
    """float32 payloads are accepted and keep their dtype."""
    hidden = _hidden().astype(np.float32)
    assert decode(encode(_header(), hidden)).hidden.dtype == np.float32


@pytest.mark.parametrize("data", [
    "not bytes", b"", b"LWS", b"XXXX\x00\x00\x00\x00", MAGIC + struct.pack("<I", 10_000_000) + b"{}",
    MAGIC + struct.pack("<I", 50) + b"{}",
    MAGIC + struct.pack("<I", 5) + b"{nope", MAGIC + struct.pack("<I", 2) + b"[]",
])
def test_undecodable(data: Any) -> None:
    """Wrong type, missing magic, a bad header length or non-object JSON: undecodable."""
    assert _reason(data) == "undecodable"


def _header_only(raw: bytes) -> bytes:
    return MAGIC + struct.pack("<I", len(raw)) + raw


@pytest.mark.parametrize(("raw", "reason"), [
    (b"[" * 50_000, "too_deep"),  # issue 17: RecursionError escaped decode()
    (b'{"a":' * 9 + b"1" + b"}" * 9, "too_deep"),  # parses, but deeper than any real header
    (b"\xff\xfe{}", "not_utf8"),
    (b'{"schema":1,"x":"\\ud800"}', "not_utf8"),  # a lone surrogate escaped in JSON
    (b'{"schema":1,"created_at":NaN}', "non_finite"),
    (b'{"schema":1,"x":[Infinity]}', "non_finite"),
    (b'{"schema":1,"x":-1e999}', "non_finite"),
    (b'{"schema":1,"x":' + b"9" * 5000 + b"}", "undecodable"),  # past Python's int digit limit
])
def test_hostile_headers_get_their_own_reason(raw: bytes, reason: str) -> None:
    """Deep nesting, non-UTF-8 strings, NaN/Infinity and oversized numbers end as WireFormatError, never another exception."""
    assert _reason(_header_only(raw)) == reason


@pytest.mark.parametrize("metadata", [{"temp": float("nan")}, {"nested": {"x": float("inf")}}])
def test_non_finite_metadata_is_refused(metadata: dict[str, Any]) -> None:
    """NaN or Infinity in the metadata is refused at decode (issue 17: it failed later, in the audit writer)."""
    h = _header(shape=[3, 1, 4], dtype="float16", metadata=metadata)
    raw = json.dumps(h).encode()  # json.dumps writes NaN/Infinity by default, as a careless producer would
    assert _reason(MAGIC + struct.pack("<I", len(raw)) + raw + _hidden().tobytes()) == "non_finite"


@pytest.mark.parametrize(("field", "value"), [
    ("sample_id", ""), ("request_id", ""), ("sample_id", "x" * 257), ("request_id", "r\x1b[2J"),
    ("sample_id", "a\nb"), ("sample_id", "\u202egnp.exe"),
])
def test_bad_ids(field: str, value: str) -> None:
    """Empty, huge or control-character sample and request ids are refused as bad_id."""
    assert _reason(_valid_raw(**{field: value})) == "bad_id"


@pytest.mark.parametrize("metadata", [{"k": {"nested": 1}}, {"k": [1, 2]}, {"k" * 65: 1}, {"k": "v" * 257}])
def test_metadata_stays_bounded(metadata: dict[str, Any]) -> None:
    """Metadata holds scalar values under bounded keys, as the tap's sanitize_metadata leaves it."""
    assert _reason(_valid_raw(metadata=metadata)) == "bad_field"


def test_schema_version() -> None:
    """An unknown schema version is refused as schema_version."""
    assert _reason(_valid_raw(schema=99)) == "schema_version"


@pytest.mark.parametrize("name", ["sample_id", "request_id", "model", "model_fingerprint", "layers",
                                  "n_states", "positions", "created_at"])
def test_missing_field(name: str) -> None:
    """Each required header field, when absent, is reported as missing_field."""
    hidden = _hidden()
    h = _header(shape=list(hidden.shape), dtype="float16")
    del h[name]
    assert _reason(_raw(h, hidden.tobytes())) == "missing_field"


@pytest.mark.parametrize("over", [
    {"layers": "0,1,2"}, {"n_states": True}, {"sample_id": 7}, {"layers": [0, 2, 1]}, {"layers": [0, 1, 5]},
    {"layers": [0, 1, True]}, {"metadata": [1]}, {"metadata": {str(i): i for i in range(40)}},
    {"final_topk": {"ids": [[1]]}}, {"final_topk": {"ids": [["x"]], "logprobs": [[0.0]]}},
    {"final_topk": {"ids": [[2**70]], "logprobs": [[0.0]]}}, {"final_topk": {"ids": [[1], [2]], "logprobs": [[0.0]]}},
    {"position_index": "4"}, {"position_index": ["a"]}, {"position_index": [1, 2, 3]}, {"tap": [1]},
    {"created_at": "yesterday"}, {"created_at": 10**400},
])
def test_bad_field(over: dict[str, Any]) -> None:
    """A field of the wrong type or an impossible value is reported as bad_field."""
    assert _reason(_valid_raw(**over)) == "bad_field"


@pytest.mark.parametrize("case", ["short_payload", "long_payload", "layers_vs_shape", "zero_dim", "two_dims",
                                  "hidden_size"])
def test_shape_mismatch(case: str) -> None:
    """Payload length, layer count or hidden size that disagree with the shape: shape_mismatch."""
    hidden = _hidden()
    h = _header(shape=[3, 1, 4], dtype="float16")
    payload = hidden.tobytes()
    kw: dict[str, Any] = {}
    if case == "short_payload":
        payload = payload[:-2]
    elif case == "long_payload":
        payload += b"\x00\x00"
    elif case == "layers_vs_shape":
        h["layers"] = [0, 2]
    elif case == "zero_dim":
        h["shape"] = [3, 0, 4]
    elif case == "two_dims":
        h["shape"] = [3, 4]
    else:
        kw["expected_hidden_size"] = 576
    assert _reason(_raw(h, payload), **kw) == "shape_mismatch"


@pytest.mark.parametrize(("positions", "p", "ok"), [("last+mean", 2, True), ("last+mean", 1, False),
                                                    ("last", 2, False), ("mean", 1, True), ("all", 5, True)])
def test_positions_fix_the_vectors_per_layer(positions: str, p: int, ok: bool) -> None:
    """'last' and 'mean' ship one vector per layer, 'last+mean' two; any other count is a
    shape_mismatch (the sidecar reads index 0 of 'last+mean' as the mean). 'all' varies."""
    hidden = _hidden((3, p, 4))
    data = _raw(_header(shape=[3, p, 4], dtype="float16", positions=positions), hidden.tobytes())
    if ok:
        assert decode(data).hidden.shape == (3, p, 4)
    else:
        assert _reason(data) == "shape_mismatch"


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float64"])
def test_dtype(dtype: str) -> None:
    """An unsupported payload dtype is reported as dtype."""
    hidden = _hidden()
    assert _reason(_raw(_header(shape=[3, 1, 4], dtype=dtype), hidden.tobytes())) == "dtype"


def test_encode_refuses_unsupported_dtype() -> None:
    """encode() refuses integer tensors with reason dtype."""
    with pytest.raises(WireFormatError) as err:
        encode(_header(), np.zeros((3, 1, 4), dtype=np.int32))
    assert err.value.reason == "dtype"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    """NaN or Inf in the hidden states is reported as non_finite."""
    hidden = _hidden()
    hidden[1, 0, 2] = bad
    assert _reason(encode(_header(), hidden)) == "non_finite"


def test_oversized() -> None:
    """A message over the decoder's limit, or an encode over its limit, is oversized."""
    data = encode(_header(), _hidden((3, 1, 512)))
    assert _reason(data, max_bytes=len(data) - 1) == "oversized"
    with pytest.raises(WireTooLarge) as err:
        encode(_header(), _hidden((3, 1, 512)), max_bytes=1024)
    assert err.value.reason == "oversized"
    assert _reason(_raw(_header(shape=[3, 1, 4], dtype="float16", metadata={"x": "y" * 70_000}),
                        _hidden().tobytes())) == "undecodable"  # header beyond its own 64 KiB limit


def test_fingerprint() -> None:
    """A sample from another model than the lens bundle's is reported as fingerprint."""
    assert _reason(encode(_header(), _hidden()), expected_fingerprint="sha256:other") == "fingerprint"


def test_every_reason_is_covered() -> None:
    """The reasons exercised above are exactly the documented dead-letter reasons."""
    assert set(DECODE_REASONS) == {"undecodable", "not_utf8", "too_deep", "schema_version", "missing_field",
                                   "bad_field", "bad_id", "shape_mismatch", "dtype", "non_finite", "oversized",
                                   "fingerprint", "unknown_layer", "bad_windows"}


def _decode_or_wire_error(data: bytes) -> None:
    try:
        decode(data, expected_fingerprint="sha256:abc", expected_hidden_size=4)
    except WireFormatError as exc:
        assert exc.reason in DECODE_REASONS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_only_raise_wire_errors(data: bytes) -> None:
    """Any byte string either decodes or raises WireFormatError with a known reason."""
    _decode_or_wire_error(data)
    _decode_or_wire_error(MAGIC + struct.pack("<I", len(data)) + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10_000))
def test_fuzz_mutated_valid_messages_only_raise_wire_errors(flips: list[tuple[int, int]], cut: int) -> None:
    """A valid message with bytes overwritten and/or truncated only ever raises WireFormatError."""
    data = bytearray(encode(_header(), _hidden()))
    for pos, val in flips:
        data[pos % len(data)] = val
    _decode_or_wire_error(bytes(data))
    _decode_or_wire_error(bytes(data[: cut % (len(data) + 1)]))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["schema", "sample_id", "request_id", "model", "model_fingerprint", "layers", "n_states",
                        "shape", "dtype", "positions", "created_at", "position_index", "metadata", "final_topk",
                        "tap", "windows", "prompt_tokens"]), _json)
def test_fuzz_header_values_only_raise_wire_errors(name: str, value: Any) -> None:
    """Any JSON value in any header field decodes or raises WireFormatError, nothing else."""
    hidden = _hidden()
    h = _header(shape=[3, 1, 4], dtype="float16")
    h[name] = value
    _decode_or_wire_error(_raw(h, hidden.tobytes()))


# --------------------------------------------------------------------------- prompt windows (issue 19)
def _windowed(bounds: list[list[int]], n: int = 40, **over: Any) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    hidden = _hidden()
    windows = (np.arange(3 * len(bounds) * 4, dtype=np.float16).reshape(3, len(bounds), 4) / 3)
    return _header(windows=bounds, prompt_tokens=n, **over), hidden, windows


def test_windows_roundtrip_after_the_hidden_states() -> None:
    """Window means and their bounds come back bit for bit, beside untouched hidden states."""
    hdr, hidden, windows = _windowed([[1, 10], [10, 20], [20, 40]])
    s = decode(encode(hdr, hidden, windows=windows))
    assert np.array_equal(s.hidden, hidden) and np.array_equal(s.windows, windows)
    assert s.window_bounds is not None and s.window_bounds.tolist() == [[1, 10], [10, 20], [20, 40]]
    assert s.prompt_tokens == 40


def test_a_sample_without_windows_decodes_with_none() -> None:
    """Samples of taps from before windows existed decode, with no windows."""
    s = decode(encode(_header(), _hidden()))
    assert s.windows is None and s.window_bounds is None and s.prompt_tokens is None


def test_zero_windows_are_an_empty_array() -> None:
    """A one-token prompt's sample says W = 0 and decodes to an empty [L, 0, d] array."""
    hdr, hidden, windows = _windowed([], n=1)
    s = decode(encode(hdr, hidden, windows=windows))
    assert s.windows is not None and s.windows.shape == (3, 0, 4) and s.window_bounds is not None
    assert s.window_bounds.shape == (0, 2)


@pytest.mark.parametrize("bounds,n", [
    ([[5, 3]], 40),  # end before start
    ([[1, 10], [8, 20]], 40),  # overlapping
    ([[10, 20], [1, 10]], 40),  # unsorted
    ([[1, 50]], 40),  # past the prompt
    ([[-1, 4]], 40),  # before the prompt
    ([[1, 2, 3]], 40),  # not a pair
    ([[1, 2.5]], 40),  # not integers
    ([[1, 2]], -3),  # negative prompt length
    ([[0, 1]] * 1025, 40),  # too many windows
    ([[1, 2**70]], 40),  # past int64
])
def test_hostile_window_bounds_are_bad_windows(bounds: list[Any], n: int) -> None:
    """Window bounds that are out of range, overlapping, unsorted or too many: bad_windows."""
    hidden = _hidden()
    payload = hidden.tobytes() + np.zeros((3, len(bounds), 4), np.float16).tobytes()
    h = _header(shape=[3, 1, 4], dtype="float16", windows=bounds, prompt_tokens=n)
    assert _reason(_raw(h, payload)) == "bad_windows"


def test_windows_without_prompt_tokens_are_bad_windows() -> None:
    """Bounds need the prompt length they index."""
    hidden = _hidden()
    h = _header(shape=[3, 1, 4], dtype="float16", windows=[[1, 4]])
    assert _reason(_raw(h, hidden.tobytes() + np.zeros((3, 1, 4), np.float16).tobytes())) == "bad_windows"


def test_window_payload_of_the_wrong_length_is_a_shape_mismatch() -> None:
    """Declared windows vs the payload's bytes: one window too few or too many is shape_mismatch."""
    hidden = _hidden()
    h = _header(shape=[3, 1, 4], dtype="float16", windows=[[1, 4], [4, 8]], prompt_tokens=8)
    for w in (1, 3):
        assert _reason(_raw(h, hidden.tobytes() + np.zeros((3, w, 4), np.float16).tobytes())) == "shape_mismatch"


def test_non_finite_window_means_are_refused() -> None:
    """NaN in a window mean is non_finite, like in the hidden states."""
    hdr, hidden, windows = _windowed([[1, 10]])
    windows[1, 0, 2] = np.nan
    assert _reason(encode(hdr, hidden, windows=windows)) == "non_finite"


def test_encode_refuses_windows_that_do_not_fit() -> None:
    """The producer side: window means of another shape or dtype than the states, or bounds of
    another count, are refused before anything is sent."""
    hdr, hidden, windows = _windowed([[1, 10], [10, 20]])
    for bad in (windows[:2], windows.astype(np.float32), windows[:, :1]):
        with pytest.raises(WireFormatError):
            encode(hdr, hidden, windows=bad)
    with pytest.raises(WireFormatError):
        encode(hdr, hidden)  # bounds in the header, no means
