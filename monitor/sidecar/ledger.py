"""The idempotency ledger moved to :mod:`monitor.backends` (kept importable from here)."""

from __future__ import annotations

from monitor.backends.ledger import Ledger, MemoryLedger

__all__ = ["Ledger", "MemoryLedger"]  # and RedisLedger, imported on first use


def __getattr__(name: str) -> object:
    if name == "RedisLedger":  # redis only when asked for
        from monitor.backends.ledger_redis import RedisLedger

        return RedisLedger
    raise AttributeError(name)
