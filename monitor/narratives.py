"""Layer narratives: the per-layer readings of one sample turned into something a person reads.

A narrative holds the structured readings, one sentence per layer ("L14: leaning ' Paris'
(0.41), topic=geography 0.88"), and derived facts:

* **prediction depth**: the first layer from which the lens top-1 stays equal to the model's
  final top-1 through the last watched layer (the last layer when only the output agrees);
* **changes of mind**: layers whose top-1 differs from the previous watched layer's top-1.

Concept probes are printed only where they can be trusted (:mod:`monitor.lenses.trust`): at a
layer where the probe fails its bundle's quality bar the layer holds ``{"reliable": false}`` and
the sentence says there is no reliable reading there; a probe with no reliable layer (a drift
feature only) is named once, in the summary; at a reliable layer a top probability below the
bar's threshold abstains (``"label": null, "abstain": true``: "none of these").

The **summary** (``summary``: data and its sentence, :func:`monitor.explain.summary_sentence`) is
read first: the layer the prediction converged from (its token only with ``include_tokens``), the
changes of mind, each probe's stable reading and the layer it holds from, the probes that abstain
and those with no reliable reading.

``Narrative.to_dict()`` is the JSON shape stored in audit records and served by the sidecar's
``/narratives/{sample_id}`` endpoint. Token strings and ids are in it only when asked for
(``include_tokens``; the sidecar's ``narratives.include_tokens``, off by default), because the top
tokens of a layer can spell the prompt out. Without them each layer keeps its numeric readings:
``top_p`` (the top-k probabilities, highest first), entropy, KL to final, the rank of the final
top-1, probe readings and a sentence that names no token; ``"tokens": false`` says so. With them,
``top`` holds ``[token, p]`` pairs instead of ``top_p``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.explain import layer_sentence, narrative_summary, summary_sentence
from monitor.lenses.readings import BankOutput, LayerReading, SampleReadings
from monitor.lenses.trust import DRIFT_FEATURE, ProbeBar

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


def _probe_summary(probes: dict[str, list[float]], labels: dict[str, tuple[str, ...]],
                   bars: Mapping[str, ProbeBar], layer: int) -> dict[str, Any]:
    """Per probe at one layer: ``{"reliable": false}`` where its bundle's quality bar does not let
    it be printed (:mod:`monitor.lenses.trust`; a probe without a bar never is); else the winning
    label, its probability and every label's probability, or ``label: null, abstain: true`` when
    the top probability is below the bar's ``min_confidence`` ("none of these")."""
    out: dict[str, Any] = {}
    for name, probs in probes.items():
        bar = bars.get(name)
        if bar is None or not bar.reliable(layer):
            out[name] = {"reliable": False}
            continue
        names = labels.get(name) or tuple(str(i) for i in range(len(probs)))
        best = max(range(len(probs)), key=probs.__getitem__)
        abstain = probs[best] < bar.min_confidence
        out[name] = {"reliable": True, "label": None if abstain else names[best], "p": probs[best],
                     "probs": dict(zip(names, probs, strict=False))}
        if abstain:
            out[name]["abstain"] = True
    return out


def _quiet(readings: SampleReadings) -> list[str]:
    """Probes with no reliable layer in this narrative (named once, in the summary)."""
    bars = readings.probe_bars
    watched = {r.layer for r in readings.layers}
    names = list(readings.layers[0].probes) if readings.layers else []
    return [n for n in names if n not in bars or not (bars[n].reliable_layers & watched)]


def sentence(reading: LayerReading, decode: TokenDecoder | None, probes: dict[str, Any],
             quiet: Sequence[str] = ()) -> str:
    """One human sentence for one layer (:func:`monitor.explain.layer_sentence`); ``decode`` None:
    a sentence that names no token."""
    token = decode(reading.topk_ids[0]) if decode is not None else None
    return layer_sentence(reading.layer, token, reading.topk_probs[0], probes, rank=reading.final_top1_rank,
                          quiet=quiet)


def summarise(layers: Sequence[dict[str, Any]], final_p: float, token: str | None, depth: int,
              changes: Sequence[int], quiet: Sequence[str], drift_features: Sequence[str]) -> dict[str, Any]:
    """The narrative's summary as data (and its sentence, :func:`monitor.explain.summary_sentence`):
    the prediction's layer of convergence (its token only when given), the changes of mind, each
    probe's stable reading (the label its reliable layers hold through the last of them, from the
    first layer of that run), the probes whose last reliable layer abstains, and those with no
    reliable layer."""
    concepts, abstained = [], []
    names = list(layers[0]["probes"]) if layers else []
    for name in names:
        if name in quiet:
            continue
        run = [(x["layer"], x["probes"][name]) for x in layers if x["probes"][name].get("reliable")]
        last = run[-1][1]
        if last.get("abstain"):
            abstained.append(name)
            continue
        start = run[-1][0]
        for layer, r in reversed(run):
            if r.get("label") != last["label"]:
                break
            start = layer
        concepts.append({"probe": name, "label": last["label"], "from_layer": start, "p": last["p"]})
    summary: dict[str, Any] = {"prediction": {"from_layer": depth, "p": final_p}, "changes_of_mind": list(changes),
                               "concepts": concepts, "abstained": abstained, "unreliable": list(quiet),
                               "drift_features": [n for n in quiet if n in drift_features]}
    if token is not None:
        summary["prediction"]["token"] = token
    summary["sentence"] = summary_sentence(summary)
    return summary


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
    include_tokens: bool = False
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def sentences(self) -> list[str]:
        return [layer["sentence"] for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "layers": self.layers,
            "final": self.final,
            "prediction_depth": self.prediction_depth,
            "changes_of_mind": self.changes_of_mind,
            "tokens": self.include_tokens,
        }

    def render(self) -> str:
        """The narrative as plain text: the summary first, then one line per layer (CLI, demo,
        ``/narratives``)."""
        lines = [self.summary["sentence"]] if self.summary.get("sentence") else []
        lines += self.sentences
        if self.final.get("top"):
            top = self.final["top"][0]
        else:
            top = [None, self.final["top_p"][0] if self.final.get("top_p") else 0.0]
        lines.append(narrative_summary(top, self.prediction_depth, self.changes_of_mind))
        return "\n".join(lines)


def _round4(x: Any) -> Any:
    """Round to 4 decimals (vectorised; float64 first so that the JSON shows 0.1235, not the
    float32 neighbour 0.12349999...)."""
    return np.round(np.asarray(x, dtype=np.float64), 4).tolist()


def build_narrative(
    readings: SampleReadings,
    *,
    sample_id: str = "",
    request_id: str = "",
    model: str = "",
    decode: TokenDecoder = default_decoder,
    top_n: int = 5,
    metadata: dict[str, Any] | None = None,
    rounded: dict[str, Any] | None = None,
    include_tokens: bool = False,
) -> Narrative:
    """Build the narrative of one sample from its lens readings; token strings (``decode``) only
    with ``include_tokens``.

    ``rounded``: this sample's values already rounded (see :func:`narratives_for_batch`, which
    rounds a whole batch in a few numpy calls); computed here when not given."""
    rs = readings.layers
    if rounded is None:
        rounded = {
            "top": _round4([r.topk_probs[:top_n] for r in rs]), "entropy": _round4([r.entropy for r in rs]),
            "kl": _round4([r.kl_to_final for r in rs]),
            "probes": {k: _round4([r.probes[k] for r in rs]) for k in (rs[0].probes if rs else {})},
            "final_top": _round4(readings.final_topk_probs[:top_n]), "final_entropy": _round4(readings.final_entropy),
        }

    def top(ids: Any, probs: list[float]) -> dict[str, Any]:
        if include_tokens:
            return {"top": [[decode(t), p] for t, p in zip(ids[:top_n], probs, strict=False)]}
        return {"top_p": list(probs)}

    layers = []
    quiet = _quiet(readings)
    for i, r in enumerate(rs):
        probes = _probe_summary({k: v[i] for k, v in rounded["probes"].items()}, readings.probe_labels,
                                readings.probe_bars, r.layer)
        layers.append({
            "layer": r.layer,
            **top(r.topk_ids, rounded["top"][i]),
            "entropy": rounded["entropy"][i],
            "kl_to_final": rounded["kl"][i],
            "final_top1_rank": r.final_top1_rank,
            "probes": probes,
            "sentence": sentence(r, decode if include_tokens else None, probes, quiet),
        })
    final = {**top(readings.final_topk_ids, rounded["final_top"]), "entropy": rounded["final_entropy"]}
    depth, changes = prediction_depth(readings), changes_of_mind(readings)
    drift = [n for n, b in readings.probe_bars.items() if b.role == DRIFT_FEATURE]
    final_p = rounded["final_top"][0] if len(rounded["final_top"]) else 0.0
    token = decode(readings.final_top1) if include_tokens and readings.final_topk_ids else None
    return Narrative(
        sample_id=sample_id, request_id=request_id, model=model, readings=readings, layers=layers,
        final=final, prediction_depth=depth, changes_of_mind=changes,
        metadata=dict(metadata or {}), include_tokens=include_tokens,
        summary=summarise(layers, final_p, token, depth, changes, quiet, drift),
    )


def narratives_for_batch(
    out: BankOutput,
    readings: Sequence[SampleReadings],
    ids: Sequence[tuple[str, str, str]],
    *,
    decode: TokenDecoder = default_decoder,
    top_n: int = 5,
    metadata: Sequence[dict[str, Any] | None] | None = None,
    include_tokens: bool = False,
) -> list[Narrative]:
    """Narratives of a whole lens-bank batch (the sidecar's path): the rounding of every value is
    done once for the batch with numpy. ``readings`` is ``split_batch(out, ...)``; ``ids`` holds
    (sample_id, request_id, model) per sample; token strings only with ``include_tokens``."""
    top, ent, kl = _round4(out.topk_probs[:, :, :top_n]), _round4(out.entropy), _round4(out.kl_to_final)
    probes = {k: _round4(v) for k, v in out.probes.items()}
    f_top, f_ent = _round4(out.final_topk_probs[:, :top_n]), _round4(out.final_entropy)
    meta = list(metadata) if metadata is not None else [None] * len(ids)
    return [
        build_narrative(r, sample_id=s, request_id=q, model=m, decode=decode, top_n=top_n, metadata=md,
                        include_tokens=include_tokens, rounded={"top": top[b], "entropy": ent[b], "kl": kl[b],
                                 "probes": {k: v[b] for k, v in probes.items()},
                                 "final_top": f_top[b], "final_entropy": f_ent[b]})
        for b, (r, (s, q, m), md) in enumerate(zip(readings, ids, meta, strict=True))
    ]


def build_narratives(
    batch: Sequence[SampleReadings], ids: Sequence[tuple[str, str, str]], decode: TokenDecoder = default_decoder,
    *, include_tokens: bool = False,
) -> list[Narrative]:
    """Narratives for a batch; ``ids`` holds (sample_id, request_id, model) per sample."""
    return [build_narrative(r, sample_id=s, request_id=q, model=m, decode=decode, include_tokens=include_tokens)
            for r, (s, q, m) in zip(batch, ids, strict=True)]
