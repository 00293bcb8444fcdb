"""Held-out quality of the lenses, per layer: the report that lands in the bundle manifest.

For every watched state and every lens (logit lens, tuned lens) on held-out text that no lens was
trained on: mean ``KL(final || lens)`` in nats, top-1 agreement with the model's final output, and
cross-entropy against the actual next token. Everything in float32 with the model's own read-out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monitor.lenses.model import Translators
from monitor.lenses.readout import ReadoutSpec


@torch.no_grad()
def evaluate_lenses(
    readout: ReadoutSpec,
    lenses: dict[str, Translators],
    states: np.ndarray,
    tokens: np.ndarray,
    *,
    block: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Per-layer KL to final, top-1 agreement and next-token cross-entropy of each lens.

    ``states``: [n, S, d] (state S-1 is the final one), ``tokens``: [n, 2] (token id, next id;
    a negative next id is skipped for cross-entropy)."""
    n, s_count, _ = states.shape
    layers = list(range(s_count))
    sums = {k: {"kl": np.zeros(s_count), "agree": np.zeros(s_count), "ce": np.zeros(s_count)} for k in lenses}
    ce_count = 0
    for i in range(0, n, block):
        h = torch.from_numpy(np.asarray(states[i : i + block], dtype=np.float32))  # [b, S, d]
        nxt = torch.from_numpy(np.asarray(tokens[i : i + block, 1]))
        ok = nxt >= 0
        ce_count += int(ok.sum())
        final = readout.logits(h[:, -1]).log_softmax(-1)  # [b, V]
        p_final = final.exp()
        f_top = final.argmax(-1)
        for name, tr in lenses.items():
            if tr.layers != tuple(layers):
                raise ValueError(f"lens {name!r} covers layers {tr.layers}, the states are 0..{s_count - 1}")
            logq = readout.logits(tr.apply(h)).log_softmax(-1)  # [b, S, V]
            kl = (p_final[:, None] * (final[:, None] - logq)).sum(-1)  # [b, S]
            agree = (logq.argmax(-1) == f_top[:, None]).double()
            ce = -logq.gather(-1, nxt.clamp_min(0)[:, None, None].expand(-1, s_count, 1)).squeeze(-1)
            sums[name]["kl"] += kl.double().sum(0).numpy()
            sums[name]["agree"] += agree.sum(0).numpy()
            sums[name]["ce"] += (ce.double() * ok[:, None]).sum(0).numpy()
        if progress is not None:
            progress(h.shape[0])
    report: dict[str, Any] = {"layers": layers, "positions": n, "final_layer": s_count - 1}
    last = s_count - 1
    for name, acc in sums.items():
        mean_kl = acc["kl"] / n
        mean_agree = acc["agree"] / n
        mean_ce = acc["ce"] / max(ce_count, 1)
        report[name] = {
            "kl_to_final_nats": [round(float(x), 4) for x in mean_kl],
            "top1_agreement": [round(float(x), 4) for x in mean_agree],
            "cross_entropy_nats": [round(float(x), 4) for x in mean_ce],
            "mean_kl_before_last": round(float(mean_kl[:last].mean()), 4),
            "mean_top1_agreement_before_last": round(float(mean_agree[:last].mean()), 4),
        }
    if "logit" in sums and "tuned" in sums:
        t, lo = np.array(report["tuned"]["kl_to_final_nats"]), np.array(report["logit"]["kl_to_final_nats"])
        report["tuned_below_logit_every_layer_before_last"] = bool((t[:last] < lo[:last]).all())
    return report


def format_quality_table(report: dict[str, Any]) -> str:
    """A text table of a quality report (one row per layer)."""
    names = [k for k in ("logit", "tuned") if k in report]
    head = f"{'layer':>5}"
    for n in names:
        head += f" {'KL ' + n:>10} {'top1 ' + n:>11} {'CE ' + n:>9}"
    lines = [head]
    for i, layer in enumerate(report["layers"]):
        row = f"{layer:>5}"
        for n in names:
            r = report[n]
            row += f" {r['kl_to_final_nats'][i]:>10.3f} {r['top1_agreement'][i]:>11.3f} {r['cross_entropy_nats'][i]:>9.3f}"
        lines.append(row)
    last = report["final_layer"]
    summary = ", ".join(
        f"{n}: mean KL 0-{last - 1} = {report[n]['mean_kl_before_last']:.3f} nats, mean top-1 agreement "
        f"{report[n]['mean_top1_agreement_before_last']:.3f}" for n in names
    )
    lines.append(f"held-out positions: {report['positions']}; {summary}")
    if "tuned_below_logit_every_layer_before_last" in report:
        lines.append(f"tuned lens below the logit lens at every layer before the last: "
                     f"{report['tuned_below_logit_every_layer_before_last']}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write a quality report as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
