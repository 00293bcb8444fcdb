"""layerwatch: production monitoring sidecar for served transformer models.

``monitor.attach(model, ...)`` is the entry point inside an inference server (see
:mod:`monitor.tap`). Everything else (lenses, narratives, drift, audit, sidecar) runs in the
sidecar process and is imported lazily so the tap never pulls in onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["attach", "Tap", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from monitor.tap import Tap, attach


def __getattr__(name: str) -> Any:
    if name in ("attach", "Tap"):
        from monitor import tap

        return getattr(tap, name)
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")
