"""Small HTML charts of the audit report: score contributions by layer, and where in the prompt
a local anomaly sits. Plain HTML and CSS (the report's own classes), no script."""

from __future__ import annotations

import html
from typing import Any


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def contributions_chart(contrib: dict[str, float]) -> str:
    """Per-layer contributions to the score as a compact column chart, largest named in words."""

    def order(k: str) -> tuple[int, str]:
        return (int(k), "") if k.lstrip("-").isdigit() else (10**9, k)

    items = sorted(contrib.items(), key=lambda kv: order(kv[0]))
    top = max(abs(v) for _, v in items) or 1.0
    cols = "".join(
        f'<div class="col" title="layer {_e(k)}: {v:.4f}"><span class="{"neg" if v < 0 else ""}" '
        f'style="height:{100 * abs(v) / top:.1f}%"></span><small>{_e(k) if i % 5 == 0 or i == len(items) - 1 else ""}'
        "</small></div>"
        for i, (k, v) in enumerate(items))
    largest = sorted(items, key=lambda kv: -abs(kv[1]))[:3]
    words = ", ".join(f"L{_e(k)} ({v:.3g})" for k, v in largest)
    return (f'<h3>Score contributions by layer</h3><div class="cols">{cols}</div>'
            f'<p class="muted" style="margin:4px 0 0">largest: {words}</p>')


def segment_chart(start: int, end: int, n: Any, strength: dict[str, Any]) -> str:
    """Where in the prompt a local anomaly sits: a bar of the prompt with the segment marked
    (token offsets only, never text) and its strength per layer (~1 for normal text)."""
    known = isinstance(n, int) and not isinstance(n, bool) and n >= max(end, 1)
    bar = ""
    if known:
        left, width = 100 * start / n, max(0.8, 100 * (end - start) / n)
        bar = (f'<div class="prompt-bar" title="tokens {start}-{end} of {n}">'
               f'<span style="left:{left:.1f}%;width:{width:.1f}%"></span></div>')
    where = f"tokens {start}&ndash;{end}" + (f" of {n}" if known else "")
    vals = {k: float(v) for k, v in strength.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    cols = ""
    if vals:
        top = max(vals.values()) or 1.0
        order = sorted(vals, key=lambda k: int(k) if k.lstrip("-").isdigit() else 10**9)
        cols = ('<div class="cols">' + "".join(
            f'<div class="col" title="layer {_e(k)}: {vals[k]:.3g}"><span style="height:{100 * max(vals[k], 0) / top:.1f}%">'
            f'</span><small>{_e(k)}</small></div>' for k in order) + "</div>"
            '<p class="muted" style="margin:4px 0 0">segment strength by layer (about 1 for normal text)</p>')
    return f'<h3>Where in the prompt</h3><p style="margin:0 0 4px">{where}</p>{bar}{cols}'
