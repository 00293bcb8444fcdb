"""The sidecar: consume samples, explain every layer, score them, audit and publish metrics.

Programmatic entry point: :class:`monitor.sidecar.service.Sidecar`, built from the settings by
the composition root :func:`monitor.sidecar.bootstrap.build_parts`; CLI: ``layerwatch sidecar``.
"""

from __future__ import annotations

from monitor.sidecar.bootstrap import SidecarParts, build_parts
from monitor.sidecar.config import SidecarSettings, load_settings
from monitor.sidecar.service import Sidecar

__all__ = ["Sidecar", "SidecarParts", "SidecarSettings", "build_parts", "load_settings"]
