"""Are the probe readings a narrative prints right? ``python -m benchmarks.narrative_quality --bundle B``.

On the held-out short prompts of :func:`monitor.corpora.prompts.narrative_eval` (300 per label,
from other sources than any training data; docs/corpora.md, "Narrative benchmark held-out set"),
each prompt is run through the reference model once (states cached) and read by the bundle's lens
bank exactly as the sidecar reads it: the ONNX graph for the last token, ``read_context`` for the
prompt mean, the bundle's quality bar and abstention threshold for what is printed.

Per probe, position and layer: accuracy, confident-wrong rate (top probability >= 0.9 and wrong),
expected calibration error (15 bins), whether the bar prints the layer, and the share of readings
printed there (a reliable layer abstains below the bar's ``min_confidence``); beside the
bag-of-tokens baseline (trained on the probe's training prompts, measured on these) and the
control task's held-out accuracy from the manifest. Pooled over the printed layers of states
10-30: the same numbers over every printed reading, with 95% intervals (Wilson for rates, a
percentile bootstrap over prompts for the ECE), coverage (the share of layers 10-30 printed), and
the issue's targets. Prints a table and writes ``bench-results/narrative_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FROM_LAYER, TO_LAYER = 10, 30
TARGETS = {"accuracy": 0.95, "confident_wrong": 0.01, "ece": 0.05, "language_coverage": 2 / 3}
CONFIDENT = 0.9
BATCH = 32


def wilson(k: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a rate k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(centre - half), 4), round(float(centre + half), 4)]


def ece(top: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of top-label probabilities ``top`` against ``correct``."""
    if top.size == 0:
        return 0.0
    idx = np.minimum((top * bins).astype(int), bins - 1)
    gap = np.bincount(idx, weights=top - correct, minlength=bins)
    return float(np.abs(gap).sum() / top.size)


def ece_interval(top: np.ndarray, correct: np.ndarray, groups: np.ndarray, reps: int = 300) -> list[float]:
    """A percentile bootstrap interval of the ECE, resampling prompts (``groups``: the prompt of
    each reading, so a prompt's readings at several layers move together)."""
    rng = np.random.default_rng(0)
    uniq = np.unique(groups)
    if uniq.size == 0:
        return [0.0, 0.0]
    rows = {g: np.flatnonzero(groups == g) for g in uniq}
    vals = []
    for _ in range(reps):
        pick = np.concatenate([rows[g] for g in rng.choice(uniq, uniq.size)])
        vals.append(ece(top[pick], correct[pick]))
    return [round(float(np.percentile(vals, 2.5)), 4), round(float(np.percentile(vals, 97.5)), 4)]


def position_report(probs: np.ndarray, y: np.ndarray, layers: tuple[int, ...], bar: Any, bot: float,
                    control: list[float] | None) -> dict[str, Any]:
    """Per layer and pooled numbers of one probe reading (``probs`` [n, L, C])."""
    top, pred = probs.max(-1), probs.argmax(-1)
    correct = pred == y[:, None]
    per_layer = []
    for i, layer in enumerate(layers):
        printed = bool(bar.reliable(layer))
        shown = top[:, i] >= bar.min_confidence
        per_layer.append({
            "layer": layer, "accuracy": round(float(correct[:, i].mean()), 4),
            "accuracy_ci": wilson(float(correct[:, i].sum()), len(y)),
            "confident_wrong": round(float(((top[:, i] >= CONFIDENT) & ~correct[:, i]).mean()), 4),
            "ece": round(ece(top[:, i], correct[:, i].astype(float)), 4),
            "printed_layer": printed, "answer_rate": round(float(shown.mean()), 4) if printed else 0.0,
            "control_accuracy": None if control is None else control[i],
        })
    window = [i for i, layer in enumerate(layers) if FROM_LAYER <= layer <= TO_LAYER]
    printed_layers = [i for i in window if bar.reliable(layers[i])]
    sel_top, sel_ok, groups = [], [], []
    for i in printed_layers:
        shown = top[:, i] >= bar.min_confidence
        sel_top.append(top[shown, i])
        sel_ok.append(correct[shown, i])
        groups.append(np.flatnonzero(shown))
    t = np.concatenate(sel_top) if sel_top else np.zeros(0)
    ok = np.concatenate(sel_ok).astype(float) if sel_ok else np.zeros(0)
    g = np.concatenate(groups) if groups else np.zeros(0, int)
    n = int(t.size)
    cw = float(((t >= CONFIDENT) & (ok == 0)).sum())
    return {
        "per_layer": per_layer,
        "bag_of_tokens_accuracy": round(bot, 4),
        "printed_layers": [layers[i] for i in printed_layers],
        "coverage": round(len(printed_layers) / max(1, len(window)), 4),
        "pooled": {
            "readings": n, "possible_readings": len(y) * len(printed_layers),
            "accuracy": round(float(ok.mean()), 4) if n else None, "accuracy_ci": wilson(float(ok.sum()), n),
            "confident_wrong": round(cw / n, 4) if n else None, "confident_wrong_ci": wilson(cw, n),
            "ece": round(ece(t, ok), 4) if n else None, "ece_ci": ece_interval(t, ok, g),
        },
        "printed_layers_at_least_bag_of_tokens": all(correct[:, i].mean() >= bot for i in printed_layers),
    }


def targets_met(name: str, rep: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets for one probe reading."""
    p = rep["pooled"]
    met = {
        "accuracy": p["accuracy"] is not None and p["accuracy"] >= TARGETS["accuracy"],
        "confident_wrong": p["confident_wrong"] is not None and p["confident_wrong"] <= TARGETS["confident_wrong"],
        "ece": p["ece"] is not None and p["ece"] <= TARGETS["ece"],
    }
    if name.startswith("language"):
        met["coverage"] = rep["coverage"] >= TARGETS["language_coverage"]
        met["at_least_bag_of_tokens"] = rep["printed_layers_at_least_bag_of_tokens"]
    return met


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="a lens bundle of the reference model")
    ap.add_argument("--per-label", type=int, default=300)
    ap.add_argument("--states", type=Path, default=None,
                    help="state cache directory (default: <layerwatch cache>/narrative-states)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/narrative_quality.json"))
    args = ap.parse_args(argv)

    import torch

    from monitor.adapters import find_parts, model_fingerprint
    from monitor.corpora.prompts import EVAL_SOURCES, narrative_eval
    from monitor.lenses.probe_states import PromptStateCache, token_ids
    from monitor.lenses.probes import bag_of_tokens_accuracy, builtin_probe_texts
    from monitor.lenses.readings import CONTEXT_SUFFIX
    from monitor.lenses.runtime import LensBank
    from monitor.refmodel import default_cache_dir, load_reference_model

    torch.set_grad_enabled(False)
    model, tok = load_reference_model()
    parts = find_parts(model)
    fingerprint = model_fingerprint(model, parts)
    bank = LensBank.load(args.bundle, expected_fingerprint=fingerprint)
    man = bank.manifest
    plan = man.get("training", {}).get("probe_plan", {})
    max_tokens = int(plan.get("max_tokens", 96))
    cache = PromptStateCache(args.states or default_cache_dir() / "narrative-states", fingerprint, max_tokens)
    layer_pos = list(bank.layers)
    report: dict[str, Any] = {"bundle": str(args.bundle), "bundle_id": bank.bundle_id, "layers": layer_pos,
                              "window": [FROM_LAYER, TO_LAYER], "targets": TARGETS, "probes": {},
                              "machine_load_1m": round(os.getloadavg()[0], 2)}
    t0 = time.monotonic()
    for entry in man.get("probes", []):
        name = entry["name"]
        if name not in EVAL_SOURCES:
            continue
        pairs = narrative_eval(name, args.per_label)
        texts = [t for t, _ in pairs]
        labels = tuple(entry["labels"])
        y = np.array([labels.index(lab) for _, lab in pairs])
        cache.fill(model, parts, tok, texts)
        states = cache.states(tok, texts)
        last = np.concatenate([bank.read_arrays(states.last[i : i + BATCH][:, layer_pos].astype(np.float32)).probes[name]
                               for i in range(0, len(texts), BATCH)])
        mean = bank.read_context(states.mean[:, layer_pos].astype(np.float32))[name + CONTEXT_SUFFIX]
        train = builtin_probe_texts(name, "train", int(plan.get("train_per_label", 300)))
        train_ids = token_ids(tok, train.texts, max_tokens)  # the baseline needs no forward pass
        bot = bag_of_tokens_accuracy(train_ids, np.array([labels.index(x) for x in train.labels]), states.ids, y,
                                     len(labels))
        mean_metrics = entry.get("positions", {}).get("mean", {})
        report["probes"][name] = {"labels": list(labels), "prompts": len(texts), "per_label": args.per_label,
                                  "sources": EVAL_SOURCES[name]}
        for reading, probs, control in ((name, last, entry.get("control_accuracy")),
                                        (name + CONTEXT_SUFFIX, mean, mean_metrics.get("control_accuracy"))):
            rep = position_report(probs, y, bank.layers, bank.probe_bars[reading], bot, control)
            rep["targets_met"] = targets_met(reading, rep)
            report["probes"][name][reading] = rep
    report["seconds"] = round(time.monotonic() - t0, 1)
    print(format_report(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


def format_report(report: dict[str, Any]) -> str:
    """The benchmark's table: per reading, pooled numbers then the per-layer ones."""
    out = [f"narrative quality of bundle {report['bundle_id']} on held-out prompts from other sources "
           f"(layers {report['window'][0]}-{report['window'][1]} pooled over printed layers)"]
    for probe in report["probes"].values():
        for reading, rep in probe.items():
            if not isinstance(rep, dict) or "pooled" not in rep:
                continue
            p = rep["pooled"]
            acc = "-" if p["accuracy"] is None else f"{p['accuracy']:.3f} [{p['accuracy_ci'][0]:.3f}, {p['accuracy_ci'][1]:.3f}]"
            cw = "-" if p["confident_wrong"] is None else (
                f"{p['confident_wrong']:.4f} [{p['confident_wrong_ci'][0]:.4f}, {p['confident_wrong_ci'][1]:.4f}]")
            ec = "-" if p["ece"] is None else f"{p['ece']:.3f} [{p['ece_ci'][0]:.3f}, {p['ece_ci'][1]:.3f}]"
            out.append(f"\n{reading}: {probe['prompts']} prompts; coverage {rep['coverage']:.2f} "
                       f"(printed layers {rep['printed_layers']}); pooled: accuracy {acc}, confident-wrong {cw}, "
                       f"ECE {ec}, readings {p['readings']}/{p['possible_readings']}; bag-of-tokens "
                       f"{rep['bag_of_tokens_accuracy']:.3f}; targets {rep['targets_met']}")
            out.append(f"{'layer':>5} {'acc':>6} {'95% CI':>15} {'cw':>6} {'ECE':>6} {'ctrl*':>6} {'printed':>7} {'answered':>8}")
            for r in rep["per_layer"]:
                ctrl = "-" if r["control_accuracy"] is None else f"{r['control_accuracy']:.3f}"
                out.append(f"{r['layer']:>5} {r['accuracy']:>6.3f} {str(r['accuracy_ci']):>15} {r['confident_wrong']:>6.3f} "
                           f"{r['ece']:>6.3f} {ctrl:>6} {('yes' if r['printed_layer'] else 'no'):>7} {r['answer_rate']:>8.2f}")
    out.append("\n* ctrl: the control task's accuracy on the bundle's own held-out prompts (manifest)")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
