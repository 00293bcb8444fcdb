"""The recent narratives served by ``/narratives/{sample_id}`` (a bounded, thread-safe LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class RecentNarratives:
    """The last ``capacity`` narratives by sample id. Written by the consumer loop, read by HTTP."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, sample_id: str, item: dict[str, Any]) -> None:
        """Remember one narrative (the oldest is forgotten past the capacity)."""
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[sample_id] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, sample_id: str) -> dict[str, Any] | None:
        """One narrative, or None when unknown or forgotten."""
        with self._lock:
            return self._items.get(sample_id)

    def ids(self, last: int = 100) -> list[str]:
        """The ids of the ``last`` most recent narratives, oldest first."""
        with self._lock:
            return list(self._items)[-last:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
