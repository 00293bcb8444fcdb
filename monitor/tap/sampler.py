"""Sampling decisions: deterministic by request id, with a per-process rate budget.

The decision hashes the request id with sha256 (never Python's salted ``hash()``), so every
replica, process and restart agrees on which requests are sampled. With a secret key
(``sampling_key_file``) the hash is an HMAC-SHA256 under that key: replicas that share the key
still agree, and a client who does not know it cannot choose request ids that are never sampled. The budget is a token
bucket of ``max_samples_per_s`` **per process**: with 8 workers the fleet may sample up to 8x
that rate.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from typing import Any

_SCALE = float(1 << 64)


def hash_unit(request_id: str, key: bytes | None = None) -> float:
    """Map a request id to [0, 1) with sha256 (HMAC-SHA256 under ``key``): stable across
    processes and machines."""
    data = request_id.encode("utf-8", "surrogatepass")
    digest = hmac.new(key, data, hashlib.sha256).digest() if key else hashlib.sha256(data).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def read_key(settings: Any) -> bytes | None:
    """The sampling key from ``settings.sampling_key_file`` (a mounted secret), or None."""
    path = getattr(settings, "sampling_key_file", None)
    if path is None:
        return None
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < 16:
        from monitor.errors import ConfigError

        raise ConfigError(f"sampling_key_file: {path} holds {len(key)} bytes; use at least 16 random bytes")
    return key


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self._tokens = self.capacity
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        """A forked child starts with a full bucket and a fresh lock (the parent's may be held)."""
        self._lock = threading.Lock()
        self._tokens = self.capacity
        self._last = time.monotonic()

    def try_acquire(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class Sampler:
    """Decides per request. ``decide`` returns None when sampled, else the skip reason."""

    def __init__(self, rate: float, max_per_s: float | None = None, key: bytes | None = None) -> None:
        self.rate = rate
        self.budget = TokenBucket(max_per_s) if max_per_s else None
        self._key = key

    def after_fork(self) -> None:
        """Reset per-process state in a forked child (the budget is per process)."""
        if self.budget is not None:
            self.budget.after_fork()

    def decide(self, request_id: str, force: bool = False) -> str | None:
        """``force`` samples regardless of rate, and regardless of the budget when there is none
        left (an operator asked for this one); a forced sample still takes a token from it."""
        if force:
            if self.budget is not None:
                self.budget.try_acquire()
            return None
        if self.rate <= 0.0:
            return "rate"
        if self.rate < 1.0 and hash_unit(request_id, self._key) >= self.rate:
            return "rate"
        if self.budget is not None and not self.budget.try_acquire():
            return "budget"
        return None
