"""The one pipeline stage: samples -> readings -> narratives -> scores.

Used by the live sidecar (:mod:`monitor.sidecar`) and by the offline tools (``layerwatch
baseline build`` / ``layerwatch score``, the evaluation benchmarks) alike, so both compute the
same readings, the same prediction depth and the same features:

* :func:`~monitor.pipeline.stages.read`: hidden states -> :class:`~monitor.lenses.readings.Readings`
  (lens bank on the last token; concept probes also on the prompt mean with ``last+mean``);
* :func:`~monitor.pipeline.stages.explain`: readings -> narratives;
* :class:`~monitor.pipeline.scoring.ScoringStage`: readings -> scores against a baseline, or
  learning one from the first samples and promoting it;
* :mod:`~monitor.pipeline.offline`: texts -> the tap -> the wire format -> :func:`read`.
"""

from __future__ import annotations

from monitor.pipeline.stages import LensReader, explain, read, read_samples

__all__ = ["LensReader", "explain", "read", "read_samples"]
