"""Every English sentence layerwatch writes about a sample, a layer or a window, in one place.

The code that decides (the scorer, the window tests, the narratives) produces data: flags with
their facts, findings with their statistics, layer readings. This module renders them; nothing
else builds sentences. It imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# reading -> (title, unit) as printed in sentences
READING_TITLES = {
    "entropy": ("entropy", "nats"),
    "kl_to_final": ("KL to final", "nats"),
    "confidence": ("lens confidence", ""),
    "final_top1_rank": ("rank of the final top-1", ""),
    "prediction_depth": ("prediction depth", ""),
    "final_entropy": ("final entropy", "nats"),
    "final_confidence": ("final confidence", ""),
    "top1_surprisal": ("surprisal of the lens top-1 token", "nats"),
    "final_top1_surprisal": ("surprisal of the final top-1 token", "nats"),
}


def fmt(v: float, unit: str) -> str:
    """A value with 3 significant digits (whole numbers from 1000 on) and its unit."""
    s = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{s} {unit}".rstrip()


def layer_span(layers: Sequence[int]) -> str:
    """'layer 7' or 'layers 10-18'."""
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


# --- flags on one sample (monitor.drift.score.Flag) ---------------------------------------------
def flag_sentence(kind: str, layers: Sequence[int], reading: str, facts: Mapping[str, Any]) -> str:
    """Why a sample was flagged, from the flag's data."""
    f = facts
    if kind == "watched_concept":
        return (f"watched concept {f['concept']}: the {f['probe']} probe reads {f['label']!r} at "
                f"{f['mean']:.2f} on average over the layers (normal median {f['normal']:.2f}; "
                f"p={f['p']:.3g}, most at layers {', '.join(map(str, layers))})")
    if kind == "local_segment":  # offsets only: never the text (audited whatever include_tokens says)
        of = f" of {f['prompt_tokens']}" if f.get("prompt_tokens") else ""
        strength = f.get("strength") or {}
        most = ", ".join(f"{k} ({float(strength[k]):.1f}x normal)" if k in strength else str(k) for k in layers)
        return (f"tokens {f['start']}-{f['end']}{of} of the prompt read unlike normal text, most at layers "
                f"{most} (local score p={f['p']:.3g})")
    if kind == "top1_surprisal_high":  # names no token: flags are audited whatever include_tokens says
        return (f"the lens top-1 at {layer_span(layers)} is a token normal traffic rarely has there "
                f"(surprisal {f['value']:.2f} nats)")
    if kind.startswith("probe_"):
        return (f"{f['probe']} probe reads {f['label']!r} ({f['value']:.2f}) at {layer_span(layers)}, beyond the "
                f"baseline's 99th percentile there (normal traffic reads it in {100 * f['share']:.1f}% of samples)")
    if kind == "unusual_pattern":
        return ("no single reading is beyond its normal range; the combination of readings at "
                f"layers {', '.join(str(x) for x in layers)} is unusual ({100 * f['share']:.0f}% of the score)")
    title, unit = READING_TITLES[reading]
    if "low" in f:  # a global reading outside its 98% range
        return (f"{title} {fmt(f['value'], unit)} (normal median {fmt(f['normal'], unit)}, 98% range "
                f"{fmt(f['low'], unit)}-{fmt(f['high'], unit)})")
    direction = kind.rsplit("_", 1)[1]
    pct = "99th" if direction == "high" else "1st"
    return (f"{title} {fmt(f['value'], unit)} at {layer_span(layers)}, {direction}er than the baseline's {pct} "
            f"percentile there (normal median {fmt(f['normal'], unit)})")


# --- window findings (monitor.drift.window) -----------------------------------------------------
def window_sentence(test: str, layers: Sequence[int], facts: Mapping[str, Any]) -> str:
    """One window finding: what moved between the baseline and the window."""
    f = facts
    if test == "anomaly_rate":
        return f"anomalous samples {100 * f['alpha']:.0f}% -> {100 * f['rate']:.0f}% of the window"
    if test == "prediction_depth":
        return f"{READING_TITLES[test][0]} median {f['before']:.0f} -> {f['after']:.0f}"
    if test.startswith("probe:"):
        return (f"{layer_span(layers)}: {test.split(':', 1)[1]} probe '{f['label']}' share "
                f"{100 * f['before']:.0f}% -> {100 * f['after']:.0f}%")
    title, unit = READING_TITLES[test]
    return f"{layer_span(layers)}: {title} median {fmt(f['before'], unit)} -> {fmt(f['after'], unit)}"


# --- narratives (monitor.narratives) -------------------------------------------------------------
def probe_phrase(name: str, reading: Mapping[str, Any]) -> str | None:
    """One probe at one layer: 'topic=code 0.91'; 'topic: none of these (0.41)' when it abstains;
    None when it has no reliable reading there (the caller says so once for all such probes).
    A reading without ``reliable`` (a record written before the quality bar) prints as it was."""
    if reading.get("reliable") is False:
        return None
    if reading.get("abstain"):
        return f"{name}: none of these ({reading['p']:.2f})"
    return f"{name}={reading['label']} {reading['p']:.2f}"


def layer_sentence(layer: int, token: str | None, p: float, probes: Mapping[str, Mapping[str, Any]],
                   rank: int | None = None, quiet: Sequence[str] = ()) -> str:
    """One layer of a narrative: 'L14: leaning ' Paris' (0.41), topic=geography 0.88'; without a
    token (narratives that name none): 'L14: top-1 at 0.41, the output's token at rank 3, ...'.
    A probe without a reliable reading at this layer is named as such, unless it is in ``quiet``
    (probes with no reliable layer at all, which the summary names once)."""
    if token is not None:
        parts = [f"L{layer}: leaning {token!r} ({p:.2f})"]
    else:
        agree = "" if rank is None else (" is the output's token" if rank == 0 else f", the output's token at rank {rank}")
        parts = [f"L{layer}: top-1 at {p:.2f}{agree}"]
    unreliable = []
    for name, r in probes.items():
        phrase = probe_phrase(name, r)
        if phrase is not None:
            parts.append(phrase)
        elif name not in quiet:
            unreliable.append(name)
    if unreliable:
        parts.append(f"no reliable reading of {', '.join(unreliable)} at this layer")
    return ", ".join(parts)


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def summary_sentence(summary: Mapping[str, Any]) -> str:
    """The narrative's summary, read first: what the prediction converged to and from which layer
    (its token only when the narrative names tokens), where the model changed its mind, which
    concepts are stable from which layer (reliable layers only), which probes abstain, and which
    have no reliable reading."""
    pred = summary.get("prediction", {})
    changes = list(summary.get("changes_of_mind", []))
    if pred.get("token") is not None:
        first = f"The prediction converges to {pred['token']!r} ({pred['p']:.2f}) from layer {pred['from_layer']} on"
    else:
        first = f"The final prediction ({pred['p']:.2f}) is the lens' top-1 from layer {pred['from_layer']} on"
    first += (f", after changes of mind at {'layer' if len(changes) == 1 else 'layers'} {_and([str(x) for x in changes])}."
              if changes else ", with no change of mind before it.")
    rest = []
    stable = [f"{c['probe']}={c['label']} from layer {c['from_layer']}" for c in summary.get("concepts", [])]
    if stable:
        rest.append("Stable readings: " + _and(stable) + ".")
    if summary.get("abstained"):
        rest.append(f"No label fits for {_and(list(summary['abstained']))} (none of these).")
    drift = [n for n in summary.get("unreliable", []) if n in set(summary.get("drift_features", []))]
    other = [n for n in summary.get("unreliable", []) if n not in drift]
    if other:
        rest.append(f"No reliable reading at the watched layers: {_and(other)}.")
    if drift:
        rest.append(f"Drift features only (no layer passes the probe quality bar): {_and(drift)}.")
    return " ".join([first, *rest])


def narrative_summary(top: Sequence[Any], depth: int, changes: Sequence[int]) -> str:
    """The last line of a rendered narrative: the output (its token when ``top[0]`` is not None),
    its prediction depth, changes of mind."""
    output = f"{top[0]!r} ({top[1]:.2f})" if top[0] is not None else f"top-1 at {top[1]:.2f}"
    return (f"output: {output}; prediction depth {depth}; "
            f"changes of mind at {list(changes) or 'none'}")
