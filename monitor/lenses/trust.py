"""When a concept probe's reading may be printed: the quality bar per probe, position and layer.

A probe layer is **reliable** when, on the held-out texts of its bundle build,

- its accuracy is at least the bag-of-tokens baseline's (what the words alone give), and
- its accuracy exceeds the control task's (Hewitt & Liang: the same probe fitted to labels that
  are a function of the last token's type) by at least :data:`CONTROL_MARGIN`, so that what it
  reads is the layer, not memorised token identity.

The bar is fixed when the bundle is built and recorded in the manifest, per probe, as
``quality_bar`` (:func:`quality_bar`). Bundles built before the bar get it computed at load from
the numbers they recorded (``source`` says so); a probe without those numbers has no reliable
layer. The probes read two positions: the last token and the prompt mean (``<probe>@mean``), each
with its own probes, trained, calibrated and measured on states of that position (the held-out
numbers of the mean are under ``positions.mean`` of the probe's manifest entry). A bundle built
before the prompt-mean probes applied the last-token probes to the mean and has no numbers for
it: there that position has no reliable layer.

A probe reading with no reliable layer is shipped as a **drift feature** only (``role``; the
probe's own ``role`` is a drift feature when neither position has one): the drift detector may
read it, a narrative never prints it as an explanation.

A reliable layer still abstains ("none of these") when the probe's top probability is below
``min_confidence`` (:data:`MIN_CONFIDENCE` at build): a closed label set has no "other" label, and
a prompt that fits none of them spreads its probability.

The sidecar's ``narratives.min_probe_margin`` / ``narratives.min_probe_confidence`` can only make
the bar stricter (:func:`stricter`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from monitor.errors import ConfigError
from monitor.lenses.readings import CONTEXT_SUFFIX

CONTROL_MARGIN = 0.10  # accuracy points over the control task; selectivity below this is token memory
MIN_CONFIDENCE = 0.60  # top probability below which a reliable layer abstains
# The fewest texts per label that can clear the bar: below these a single held-out text moves the
# accuracy by more than the margin resolves, and the per-layer L2 choice has no validation slice.
MIN_TRAIN_PER_LABEL = 20
MIN_HELDOUT_PER_LABEL = 10
RULE = ("held-out accuracy >= bag-of-tokens accuracy and held-out accuracy >= control-task accuracy + margin; "
        "a reliable layer abstains below min_confidence")
EXPLANATION, DRIFT_FEATURE = "explanation", "drift feature"
LAST, MEAN = "last", "mean"
_NO_NUMBERS = {
    LAST: "no held-out numbers recorded for the last token",
    MEAN: "the probe was trained and measured on last-token states only; no held-out numbers for the prompt mean",
}


@dataclass(frozen=True)
class ProbeBar:
    """The bar of one probe reading (``"language"`` or ``"language@mean"``) as the runtime uses it."""

    reliable_layers: frozenset[int]
    min_confidence: float = MIN_CONFIDENCE
    margin: float = CONTROL_MARGIN
    role: str = EXPLANATION
    source: str = "bundle"
    # the recorded numbers, per layer, kept so that a stricter margin can be applied at start-up
    accuracy: Mapping[int, float] | None = None
    control: Mapping[int, float] | None = None
    baseline: float | None = None

    def reliable(self, layer: int) -> bool:
        """Whether the probe may be printed at ``layer``."""
        return layer in self.reliable_layers


def reliable_layers(layers: Sequence[int], accuracy: Sequence[float], control: Sequence[float],
                    baseline: float, margin: float = CONTROL_MARGIN) -> list[int]:
    """The layers that pass the bar (see the module docstring)."""
    return [int(layer) for layer, a, c in zip(layers, accuracy, control, strict=True)
            if a >= baseline and a - c >= margin - 1e-9]


def _numbers(metrics: Mapping[str, Any], n_layers: int, position: str = LAST,
             ) -> tuple[list[float], list[float], float] | None:
    """(accuracy, control accuracy) per layer and the bag-of-tokens accuracy of one position;
    the prompt mean's are under ``metrics["positions"]["mean"]``."""
    own = metrics if position == LAST else metrics.get("positions", {}).get(position)
    if not isinstance(own, Mapping):
        return None
    acc, ctrl, bot = own.get("heldout_accuracy"), own.get("control_accuracy"), metrics.get("bag_of_tokens_accuracy")
    if not isinstance(acc, list) or not isinstance(ctrl, list) or not isinstance(bot, (int, float)):
        return None
    if len(acc) != n_layers or len(ctrl) != n_layers:
        return None
    return [float(x) for x in acc], [float(x) for x in ctrl], float(bot)


def quality_bar(metrics: Mapping[str, Any], layers: Sequence[int], *, margin: float = CONTROL_MARGIN,
                min_confidence: float = MIN_CONFIDENCE) -> dict[str, Any]:
    """The ``quality_bar`` record of a probe's manifest entry, from its held-out ``metrics``."""
    positions: dict[str, Any] = {}
    for pos in (LAST, MEAN):
        nums = _numbers(metrics, len(layers), pos)
        positions[pos] = {"reliable_layers": reliable_layers(layers, *nums, margin=margin) if nums is not None else []}
        if nums is None:
            positions[pos]["reason"] = _NO_NUMBERS[pos]
    explained = positions[LAST]["reliable_layers"] or positions[MEAN]["reliable_layers"]
    return {"rule": RULE, "margin": margin, "min_confidence": min_confidence, "positions": positions,
            "role": EXPLANATION if explained else DRIFT_FEATURE}


def bar_of(metrics: Mapping[str, Any], layers: Sequence[int]) -> dict[str, Any]:
    """A probe's recorded ``quality_bar``, else the one its ``metrics`` give now."""
    recorded = metrics.get("quality_bar")
    return dict(recorded) if isinstance(recorded, Mapping) else quality_bar(metrics, layers)


def probe_bars(manifest: Mapping[str, Any]) -> dict[str, ProbeBar]:
    """Each probe reading's bar (``name`` and ``name@mean``) from a bundle manifest.

    A probe entry without ``quality_bar`` (a bundle built before it) gets it computed from its
    recorded numbers (``source`` says so); without those numbers it has no reliable layer."""
    layers = [int(x) for x in manifest.get("lens", {}).get("layers", [])]
    out: dict[str, ProbeBar] = {}
    for p in manifest.get("probes", []):
        name = str(p["name"])
        record = p.get("quality_bar")
        computed = not isinstance(record, dict)
        if computed:
            record = quality_bar(p, layers)
        positions = record.get("positions", {})
        for pos, reading in ((LAST, name), (MEAN, name + CONTEXT_SUFFIX)):
            nums = _numbers(p, len(layers), pos)
            source = "bundle"
            if computed:
                source = ("computed at load from the recorded held-out numbers (the bundle predates the bar)"
                          if nums is not None else "no held-out numbers recorded: no reliable layer")
            reliable = frozenset(int(x) for x in positions.get(pos, {}).get("reliable_layers", []))
            out[reading] = ProbeBar(
                reliable, min_confidence=float(record.get("min_confidence", MIN_CONFIDENCE)),
                margin=float(record.get("margin", CONTROL_MARGIN)), role=EXPLANATION if reliable else DRIFT_FEATURE,
                source=source,
                accuracy=dict(zip(layers, nums[0], strict=True)) if nums else None,
                control=dict(zip(layers, nums[1], strict=True)) if nums else None,
                baseline=nums[2] if nums else None,
            )
    return out


def stricter(bars: Mapping[str, ProbeBar], *, min_margin: float | None = None,
             min_confidence: float | None = None) -> dict[str, ProbeBar]:
    """The bars with a larger control margin and/or a higher abstention threshold (the sidecar's
    ``narratives.min_probe_margin`` / ``narratives.min_probe_confidence``). A value below a
    bundle's own is refused (ConfigError naming the setting): a setting can only tighten the bar."""
    out: dict[str, ProbeBar] = {}
    for name, bar in bars.items():
        if min_confidence is not None and min_confidence < bar.min_confidence:
            raise ConfigError(f"narratives.min_probe_confidence: {min_confidence} is below the bundle's "
                              f"{bar.min_confidence} for probe {name!r}; a setting can only make the bar stricter")
        if min_margin is not None and min_margin < bar.margin:
            raise ConfigError(f"narratives.min_probe_margin: {min_margin} is below the bundle's {bar.margin} "
                              f"for probe {name!r}; a setting can only make the bar stricter")
        new = replace(bar, min_confidence=max(bar.min_confidence, min_confidence or 0.0))
        if min_margin is not None and min_margin > bar.margin:
            keep: frozenset[int] = frozenset()
            if bar.accuracy is not None and bar.control is not None and bar.baseline is not None:
                ls = sorted(bar.accuracy)
                keep = frozenset(reliable_layers(ls, [bar.accuracy[x] for x in ls], [bar.control[x] for x in ls],
                                                 bar.baseline, min_margin))
            new = replace(new, margin=min_margin, reliable_layers=bar.reliable_layers & keep)
        out[name] = new
    return out
