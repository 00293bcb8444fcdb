"""Layer narratives: the per-layer readings of one sample turned into something a person reads.

A narrative holds the structured readings, one sentence per layer ("L14: leaning ' Paris'
(0.41), topic=geography 0.88"), and derived facts:

* **prediction depth**: the first layer from which the lens top-1 stays equal to the model's
  final top-1 through the last watched layer (the last layer when only the output agrees);
* **changes of mind**: layers whose top-1 differs from the previous watched layer's top-1.

``Narrative.to_dict()`` is the JSON shape stored in audit records and served by the sidecar's
``/narratives/{sample_id}`` endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.lenses.readings import LayerReading, SampleReadings

TokenDecoder = Callable[[int], str]


def default_decoder(token_id: int) -> str:
    """Used when no tokenizer is at hand: ``<id>``."""
    return f"<{token_id}>"


def tokenizer_decoder(tokenizer: Any) -> TokenDecoder:
    """A cached token-id -> text decoder from a Hugging Face tokenizer."""
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        s = cache.get(token_id)
        if s is None:
            s = cache[token_id] = tokenizer.decode([token_id])
        return s

    return decode


def prediction_depth(readings: SampleReadings) -> int:
    """First watched layer from which the lens top-1 equals the final top-1 through the end."""
    final = readings.final_top1
    depth = readings.layers[-1].layer if readings.layers else 0
    for r in reversed(readings.layers):
        if r.top1 != final:
            break
        depth = r.layer
    return depth


def changes_of_mind(readings: SampleReadings) -> list[int]:
    """Layers whose lens top-1 differs from the previous watched layer's top-1."""
    out = []
    for prev, cur in zip(readings.layers, readings.layers[1:], strict=False):
        if cur.top1 != prev.top1:
            out.append(cur.layer)
    return out


def _probe_summary(reading: LayerReading, labels: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    out = {}
    for name, probs in reading.probes.items():
        names = labels.get(name) or tuple(str(i) for i in range(len(probs)))
        best = max(range(len(probs)), key=probs.__getitem__)
        out[name] = {
            "label": names[best],
            "p": round(probs[best], 4),
            "probs": {n: round(p, 4) for n, p in zip(names, probs, strict=False)},
        }
    return out


def sentence(reading: LayerReading, decode: TokenDecoder, probes: dict[str, Any]) -> str:
    """One human sentence for one layer."""
    parts = [f"L{reading.layer}: leaning {decode(reading.top1)!r} ({reading.confidence:.2f})"]
    parts += [f"{name}={p['label']} {p['p']:.2f}" for name, p in probes.items()]
    return ", ".join(parts)


@dataclass
class Narrative:
    """The layer narrative of one sample."""

    sample_id: str
    request_id: str
    model: str
    readings: SampleReadings
    layers: list[dict[str, Any]]
    final: dict[str, Any]
    prediction_depth: int
    changes_of_mind: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def sentences(self) -> list[str]:
        return [layer["sentence"] for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "final": self.final,
            "prediction_depth": self.prediction_depth,
            "changes_of_mind": self.changes_of_mind,
        }

    def render(self) -> str:
        """The narrative as plain text, one line per layer (CLI and demo)."""
        lines = list(self.sentences)
        top = self.final["top"][0] if self.final.get("top") else ["?", 0.0]
        lines.append(f"output: {top[0]!r} ({top[1]:.2f}); prediction depth {self.prediction_depth}; "
                     f"changes of mind at {self.changes_of_mind or 'none'}")
        return "\n".join(lines)


def build_narrative(
    readings: SampleReadings,
    *,
    sample_id: str = "",
    request_id: str = "",
    model: str = "",
    decode: TokenDecoder = default_decoder,
    top_n: int = 5,
    metadata: dict[str, Any] | None = None,
) -> Narrative:
    """Build the narrative of one sample from its lens readings."""
    layers = []
    for r in readings.layers:
        probes = _probe_summary(r, readings.probe_labels)
        layers.append({
            "layer": r.layer,
            "top": [[decode(t), round(p, 4)] for t, p in zip(r.topk_ids[:top_n], r.topk_probs[:top_n], strict=False)],
            "entropy": round(r.entropy, 4),
            "kl_to_final": round(r.kl_to_final, 4),
            "final_top1_rank": r.final_top1_rank,
            "probes": probes,
            "sentence": sentence(r, decode, probes),
        })
    final = {
        "top": [[decode(t), round(p, 4)] for t, p in
                zip(readings.final_topk_ids[:top_n], readings.final_topk_probs[:top_n], strict=False)],
        "entropy": round(readings.final_entropy, 4),
    }
    return Narrative(
        sample_id=sample_id, request_id=request_id, model=model, readings=readings, layers=layers,
        final=final, prediction_depth=prediction_depth(readings), changes_of_mind=changes_of_mind(readings),
        metadata=dict(metadata or {}),
    )


def build_narratives(
    batch: Sequence[SampleReadings], ids: Sequence[tuple[str, str, str]], decode: TokenDecoder = default_decoder
) -> list[Narrative]:
    """Narratives for a batch; ``ids`` holds (sample_id, request_id, model) per sample."""
    return [build_narrative(r, sample_id=s, request_id=q, model=m, decode=decode)
            for r, (s, q, m) in zip(batch, ids, strict=True)]
