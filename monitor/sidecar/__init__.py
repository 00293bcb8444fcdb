"""The sidecar: consume samples, explain every layer, score them, audit and publish metrics.

Programmatic entry point: :class:`monitor.sidecar.service.Sidecar`; CLI: ``layerwatch sidecar``.
"""

from __future__ import annotations

from monitor.sidecar.config import SidecarSettings, load_settings
from monitor.sidecar.service import Sidecar

__all__ = ["Sidecar", "SidecarSettings", "load_settings"]
