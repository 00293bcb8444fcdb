"""numpy arrays in JSON documents (baselines): dtype, shape and base64 of the little-endian
bytes. Never pickle: baselines come from Redis and files that anyone with access could write."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def encode_array(a: np.ndarray, dtype: str = "float64") -> dict[str, Any]:
    """An array as a JSON-able dict (``{"dtype", "shape", "b64"}``)."""
    arr = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(arr.shape), "b64": base64.b64encode(arr.tobytes()).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    """The inverse of :func:`encode_array`."""
    dtype = np.dtype(str(d["dtype"])).newbyteorder("<")
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=dtype).reshape(d["shape"]).astype(np.dtype(str(d["dtype"])))
