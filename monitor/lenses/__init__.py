"""The lens bank: per-layer sub-models (logit lens, tuned lens, concept probes) of a served model.

Training and export are offline and in PyTorch (:mod:`.tuned`, :mod:`.probes`, :mod:`.export`,
:mod:`.writer`); the sidecar runs the exported ONNX graph with ONNX Runtime (:mod:`.runtime`,
no torch). Typed readings are in :mod:`.readings`. Attributes are imported lazily so that
``import monitor.lenses.readings`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LensBank", "ensure_reference_bundle", "reference_bank", "verify_bundle"]


def __getattr__(name: str) -> Any:
    if name == "LensBank":
        from monitor.lenses.runtime import LensBank

        return LensBank
    if name == "verify_bundle":
        from monitor.lenses.bundle import verify_bundle

        return verify_bundle
    if name in ("ensure_reference_bundle", "reference_bank"):
        from monitor.lenses import build

        return getattr(build, name)
    raise AttributeError(f"module 'monitor.lenses' has no attribute {name!r}")
