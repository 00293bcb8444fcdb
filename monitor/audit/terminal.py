"""Plain-text rendering for the terminal: the search table and one sample's narrative.

Robust to missing optional keys: the sidecar's narrative shape may grow; what is absent is shown
as blank, never an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from monitor.audit.reader import Entry, flag_kinds, is_flagged


def visible(text: str) -> str:
    """``text`` safe for a reviewer's terminal: every control character but the newline (escape
    sequences, carriage returns, bells) and every invisible format character (bidirectional
    overrides) is shown escaped (``\\x1b``, ``\\u202e``), so a hostile request id or token
    cannot move the cursor, rewrite what was printed or reorder a line."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == "\n" or ch.isprintable() or (ch == " "):
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def show_token(token: Any, width: int = 14) -> str:
    """A token made visible: quoted, control characters escaped, cut to ``width``."""
    text = repr(str(token))[1:-1].replace("'", "\\'")
    text = f"'{text}'"
    return text if len(text) <= width else text[: width - 1] + "…"


def fmt_num(value: Any, spec: str = ".2f") -> str:
    """A number formatted, or blank when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return format(value, spec)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """A fixed-width text table; columns in ``right`` are right-aligned."""
    rows = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right_set = set(right)

    def fmt(row: Sequence[str]) -> str:
        cells = [c.rjust(widths[i]) if i in right_set else c.ljust(widths[i]) for i, c in enumerate(row)]
        return "  ".join(cells).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in rows)
    return "\n".join(lines)


def _summary(rec: dict[str, Any]) -> str:
    kind = rec.get("kind")
    if kind == "sample":
        kinds = flag_kinds(rec)
        text = ",".join(kinds)
        return text + (" (redelivered)" if rec.get("redelivered") else "")
    for key in ("alert", "baseline", "bundle", "recovery", "checkpoint", "reason", "detail"):
        value = rec.get(key)
        if isinstance(value, dict):
            inner = value.get("reason") or value.get("id") or value.get("detail") or ""
            return f"{key}: {inner}"[:60]
        if isinstance(value, str):
            return f"{key}: {value}"[:60]
    return ""


def search_table(entries: Iterable[Entry]) -> str:
    """One row per record: time, writer/seq, kind, ids, model, score, flags."""
    rows = []
    for e in entries:
        r = e.record
        score: dict[str, Any] = r["score"] if isinstance(r.get("score"), dict) else {}
        rows.append([
            r.get("ts", "")[:23].replace("T", " "),
            f"{r.get('writer', '')}#{r.get('seq', '')}",
            str(r.get("kind", "")),
            str(r.get("sample_id", "") or ""),
            str(r.get("request_id", "") or ""),
            str(r.get("model", "") or r.get("model_fingerprint", "") or "")[:20],
            fmt_num(score.get("value")),
            fmt_num(score.get("p_value"), ".3g"),
            "yes" if r.get("kind") == "sample" and is_flagged(r) else "",
            _summary(r),
        ])
    return table(["time (UTC)", "writer#seq", "kind", "sample", "request", "model", "score", "p", "flagged", "flags / detail"],
                 rows, right=(6, 7))


def _top(entry: Any) -> list[tuple[str | None, float | None]]:
    """A layer's (or the output's) top-k as (token, p); the token is None in a narrative recorded
    without tokens (``top_p``: probabilities only)."""
    out: list[tuple[str | None, float | None]] = []
    if not isinstance(entry, dict):
        return out
    if isinstance(entry.get("top"), list):
        for item in entry["top"]:
            if isinstance(item, (list, tuple)) and item:
                p = item[1] if len(item) > 1 and isinstance(item[1], (int, float)) else None
                out.append((str(item[0]), p))
            elif isinstance(item, str):
                out.append((item, None))
    elif isinstance(entry.get("top_p"), list):
        out = [(None, p if isinstance(p, (int, float)) and not isinstance(p, bool) else None) for p in entry["top_p"]]
    return out


def _top_cell(token: str | None, p: float | None) -> str:
    return fmt_num(p) if token is None else f"{show_token(token)} {fmt_num(p)}".strip()


def without_tokens(nar: dict[str, Any]) -> bool:
    """Whether a narrative was recorded without token strings (``narratives.include_tokens`` off)."""
    layers: list[Any] = nar["layers"] if isinstance(nar.get("layers"), list) else []
    return nar.get("tokens") is False or any(isinstance(x, dict) and "top_p" in x and "top" not in x for x in layers)


def _probe_cell(reading: Any) -> str:
    """A probe at one layer: 'label p'; '-' where it has no reliable reading (the bundle's quality
    bar); 'none p' where it abstains (no label fits)."""
    if not isinstance(reading, dict):
        return ""
    if reading.get("reliable") is False:
        return "-"
    if reading.get("abstain"):
        return f"none {fmt_num(reading.get('p'))}".strip()
    label = reading.get("label")
    p = reading.get("p")
    probs = reading.get("probs")
    if label is None and isinstance(probs, dict) and probs:
        label, p = max(probs.items(), key=lambda kv: kv[1] if isinstance(kv[1], (int, float)) else -1)
    return f"{label} {fmt_num(p)}".strip() if label is not None else ""


def narrative_text(entry: Entry, top_k: int = 3) -> str:
    """One sample's header, flags and per-layer narrative as terminal text."""
    r = entry.record
    nar: dict[str, Any] = r["narrative"] if isinstance(r.get("narrative"), dict) else {}
    score: dict[str, Any] = r["score"] if isinstance(r.get("score"), dict) else {}
    out = [
        f"sample {r.get('sample_id', '?')}   request {r.get('request_id', '-')}   model {r.get('model', '-')}"
        + (f" (fingerprint {str(r.get('model_fingerprint'))[:16]})" if r.get("model_fingerprint") else ""),
        f"time {r.get('ts')}   writer {r.get('writer')} seq {r.get('seq')}   {entry.segment} line {entry.line}"
        + ("   REDELIVERED" if r.get("redelivered") else ""),
        f"bundle {r.get('bundle_id', '-')}   baseline {r.get('baseline_id', '-')}",
    ]
    verdict = "FLAGGED" if is_flagged(r) else "normal"
    out.append(f"score {fmt_num(score.get('value')) or '-'}   p-value {fmt_num(score.get('p_value'), '.3g') or '-'}   "
               f"{verdict}   prediction depth {nar.get('prediction_depth', '-')}   changes of mind "
               f"{', '.join(str(x) for x in nar.get('changes_of_mind', []) or []) or '-'}")
    flags: list[Any] = r["flags"] if isinstance(r.get("flags"), list) else []
    for f in flags:
        if isinstance(f, dict):
            where = ",".join(str(x) for x in f.get("layers", []) or [])
            out.append(f"  flag {f.get('kind', '?')}" + (f" at layers {where}" if where else "")
                       + (f" ({f.get('reading')})" if f.get("reading") else "")
                       + (f": {f.get('detail')}" if f.get("detail") else ""))
    layers: list[Any] = nar["layers"] if isinstance(nar.get("layers"), list) else []
    probes: list[str] = []
    for layer in layers:
        if isinstance(layer, dict) and isinstance(layer.get("probes"), dict):
            for name in layer["probes"]:
                if name not in probes:
                    probes.append(name)
    depth = nar.get("prediction_depth")
    changes = set(nar.get("changes_of_mind", []) or [])
    headers = ["layer"] + [f"top-{i + 1}" for i in range(top_k)] + ["entropy", "KL", "rank"] + probes
    rows = []
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        num = layer.get("layer", "?")
        mark = ("*" if num == depth else "") + ("~" if num in changes else "")
        tops = _top(layer)
        cells = [f"{num}{mark}"] + [_top_cell(*tops[i]) if i < len(tops) else "" for i in range(top_k)]
        cells += [fmt_num(layer.get("entropy")), fmt_num(layer.get("kl_to_final")), fmt_num(layer.get("final_top1_rank"), "d")]
        layer_probes: dict[str, Any] = layer["probes"] if isinstance(layer.get("probes"), dict) else {}
        cells += [_probe_cell(layer_probes.get(name)) for name in probes]
        rows.append(cells)
    final: dict[str, Any] = nar["final"] if isinstance(nar.get("final"), dict) else {}
    ftops = _top(final)
    if ftops:
        rows.append(["final"] + [_top_cell(t, p) for t, p in ftops[:top_k]]
                    + [""] * (top_k - min(top_k, len(ftops))) + ["", "", ""] + [""] * len(probes))
    summary = nar.get("summary")
    if isinstance(summary, dict) and isinstance(summary.get("sentence"), str):
        out += ["", f"summary: {summary['sentence']}"]
    if rows:
        out.append("")
        out.append(table(headers, rows, right=range(1 + top_k, 4 + top_k)))
        out.append("(* prediction depth, ~ change of mind; rank = rank of the final top-1 under the layer's lens"
                   + ("; probe '-': no reliable reading at that layer, 'none': no label fits)" if probes else ")"))
        if without_tokens(nar):
            out.append("(recorded without tokens: top-k probabilities only; narratives.include_tokens was off)")
    else:
        out.append("(no per-layer narrative in this record)")
    return "\n".join(out)
