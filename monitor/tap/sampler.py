"""Sampling decisions: deterministic by request id, with a per-process rate budget.

The decision hashes the request id with sha256 (never Python's salted ``hash()``), so every
replica, process and restart agrees on which requests are sampled. The budget is a token
bucket of ``max_samples_per_s`` **per process**: with 8 workers the fleet may sample up to 8x
that rate.
"""

from __future__ import annotations

import hashlib
import threading
import time

_SCALE = float(1 << 64)


def hash_unit(request_id: str) -> float:
    """Map a request id to [0, 1) with sha256: stable across processes and machines."""
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


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

    def __init__(self, rate: float, max_per_s: float | None = None) -> None:
        self.rate = rate
        self.budget = TokenBucket(max_per_s) if max_per_s else None

    def after_fork(self) -> None:
        """Reset per-process state in a forked child (the budget is per process)."""
        if self.budget is not None:
            self.budget.after_fork()

    def decide(self, request_id: str, force: bool = False) -> str | None:
        """``force`` samples regardless of rate and budget (an operator asked for this one)."""
        if force:
            return None
        if self.rate <= 0.0:
            return "rate"
        if self.rate < 1.0 and hash_unit(request_id) >= self.rate:
            return "rate"
        if self.budget is not None and not self.budget.try_acquire():
            return "budget"
        return None
