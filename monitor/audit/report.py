"""A self-contained HTML report of one or several audited samples.

Per sample: who/what/when, the anomaly score and every flag with the reason it was raised, a
layers x top-tokens picture (the lens' top-k tokens at every layer, coloured by probability,
output at the top and embeddings at the bottom, as in tuned-lens prediction trajectories),
probe readings per layer, the per-layer sentences, and the record's chain proof (location,
hashes recomputed now, signature, the trail's verification at report time, and the exact bytes
the hash covers). One HTML file, no scripts, no external resources (a CSP forbids them), so it
can be attached to an incident ticket as is. Missing optional narrative keys render as blanks.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from monitor.audit.charts import contributions_chart, segment_chart
from monitor.audit.reader import Entry, is_flagged
from monitor.audit.records import KeyRing, RecordFormatError, digest, record_hash, split_sealed
from monitor.audit.verify import TrailReport

_SCALE = ((255, 255, 255), (222, 235, 247), (158, 202, 225), (66, 146, 198), (8, 69, 148), (8, 38, 90))
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))

_CSS = """
:root { --fg:#1b1f24; --muted:#5b6470; --line:#d7dde4; --bad:#b42318; --ok:#067647; --warn:#b54708; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0;
       background: #f6f8fa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 0 0 8px; } h3 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: var(--muted); margin: 0 0 16px; }
section.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 20px; margin: 0 0 20px; }
table { border-collapse: collapse; }
table.list td, table.list th { border-bottom: 1px solid var(--line); padding: 4px 10px 4px 0; text-align: left; }
.badge { display: inline-block; border-radius: 10px; padding: 1px 9px; font-size: 12px; font-weight: 600; vertical-align: middle; }
.badge.flagged { background: #fee4e2; color: var(--bad); } .badge.normal { background: #dcfae6; color: var(--ok); }
.badge.dup { background: #fef0c7; color: var(--warn); }
dl.meta { display: grid; grid-template-columns: max-content 1fr max-content 1fr; gap: 2px 14px; margin: 8px 0; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; overflow-wrap: anywhere; }
.why { display: grid; grid-template-columns: 260px 1fr; gap: 18px; }
.score { font-size: 28px; font-weight: 650; } .muted { color: var(--muted); }
.cols { display: flex; align-items: flex-end; gap: 2px; height: 84px; max-width: 720px; padding-bottom: 16px; }
.cols .col { flex: 1 1 0; height: 100%; display: flex; flex-direction: column; justify-content: flex-end; position: relative; }
.cols .col span { display: block; background: #4292c6; border-radius: 2px 2px 0 0; min-height: 1px; }
.cols .col span.neg { background: #f79009; }
.cols .col small { position: absolute; bottom: -16px; left: 0; font-size: 10px; color: var(--muted); }
ul.flags { margin: 0; padding-left: 18px; } ul.flags li { margin: 2px 0; }
.prompt-bar { position: relative; height: 12px; background: #eaecf0; border-radius: 3px; margin: 4px 0 8px; }
.prompt-bar span { position: absolute; top: 0; bottom: 0; background: var(--bad); border-radius: 3px; }
table.traj { font: 12px/1.2 ui-monospace, SFMono-Regular, Menlo, monospace; }
table.traj th { font-weight: 600; color: var(--muted); padding: 3px 6px; text-align: center; }
table.traj td { padding: 0; border: 1px solid #fff; }
table.traj td.tok { width: 104px; max-width: 104px; height: 22px; text-align: center; white-space: nowrap; overflow: hidden;
                    text-overflow: ellipsis; padding: 2px 4px; }
table.traj td.tok small { opacity: .8; margin-left: 3px; }
table.traj td.tok.hit { outline: 2px solid #d92d20; outline-offset: -2px; }
table.traj td.lay { text-align: right; padding: 0 8px 0 4px; color: var(--muted); white-space: nowrap; }
table.traj tr.final td.lay { color: var(--fg); font-weight: 700; }
table.traj tr.flagged td.lay { color: var(--bad); font-weight: 700; }
table.traj td.num { text-align: right; padding: 0 6px; color: var(--muted); white-space: nowrap; }
table.traj td.num { min-width: 64px; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: var(--muted); margin: 6px 0; }
.legend .grad { width: 180px; height: 10px; border: 1px solid var(--line); }
table.traj td.probe { padding: 2px 8px; text-align: center; white-space: nowrap; font-family: system-ui, sans-serif; }
ul.sentences { font-size: 12.5px; margin: 0; padding-left: 0; list-style: none; columns: 2; column-gap: 28px; }
table.proof td { padding: 3px 12px 3px 0; vertical-align: top; }
table.proof td:first-child { color: var(--muted); white-space: nowrap; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f2f4f7; padding: 10px; border-radius: 6px; max-height: 320px; overflow: auto; }
.ok { color: var(--ok); font-weight: 600; } .bad { color: var(--bad); font-weight: 600; } .warn { color: var(--warn); font-weight: 600; }
a { color: #175cd3; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, spec: str = ".2f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return format(value, spec)


def _visible(token: str) -> str:
    """Whitespace made visible, as tokenizers' tokens often start with a space."""
    return (token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "\u240d")
            or "\u2205")


def _scale(p: float) -> tuple[tuple[int, int, int], str]:
    p = min(max(p, 0.0), 1.0) * (len(_SCALE) - 1)
    i = min(int(p), len(_SCALE) - 2)
    t = p - i
    a, b = _SCALE[i], _SCALE[i + 1]
    rgb = (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))
    text = "#fff" if p > (len(_SCALE) - 1) * 0.45 else "#1b1f24"
    return rgb, text


def _mix(color: tuple[int, int, int], p: float) -> str:
    p = min(max(p, 0.0), 1.0) * 0.85
    r, g, b = (round(255 + (c - 255) * p) for c in color)
    return f"rgb({r},{g},{b})"


def _meter(width: str) -> str:
    return f"background:linear-gradient(90deg,#e4e7ec {width}%,transparent {width}%)"


def _top(entry: Any) -> list[tuple[str | None, float | None]]:
    """A layer's (or the output's) top-k as (token, p); the token is None in a narrative recorded
    without tokens (``top_p``: probabilities only)."""
    out: list[tuple[str | None, float | None]] = []
    entry = _dict(entry)

    def prob(p: Any) -> float | None:
        return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else None

    if isinstance(entry.get("top"), list):
        for x in entry["top"]:
            if isinstance(x, (list, tuple)) and x:
                out.append((str(x[0]), prob(x[1]) if len(x) > 1 else None))
            elif isinstance(x, str):
                out.append((x, None))
    elif isinstance(entry.get("top_p"), list):
        out = [(None, prob(p)) for p in entry["top_p"]]
    return out


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _trajectory(nar: dict[str, Any], flagged_layers: set[int]) -> str:
    layers = [x for x in _list(nar.get("layers")) if isinstance(x, dict)]
    final_top = _top(nar.get("final"))
    if not layers and not final_top:
        return '<p class="muted">No per-layer narrative in this record.</p>'
    k = max([len(_top(x)) for x in layers] + [len(final_top), 1])
    k = min(k, 10)
    final_tok = final_top[0][0] if final_top else None
    depth = nar.get("prediction_depth")
    changes = set(_list(nar.get("changes_of_mind")))
    max_entropy = max([x["entropy"] for x in layers if isinstance(x.get("entropy"), (int, float))] + [1e-9])
    max_kl = max([x["kl_to_final"] for x in layers if isinstance(x.get("kl_to_final"), (int, float))] + [1e-9])

    def cells(tops: list[tuple[str | None, float | None]], where: str, final_rank: Any = None) -> str:
        out = []
        for i in range(k):
            if i >= len(tops):
                out.append('<td class="tok"></td>')
                continue
            tok, p = tops[i]
            rgb, fg = _scale(p if p is not None else 0.0)
            if tok is None:  # recorded without tokens: the rank of the final top-1 places the outline
                hit = " hit" if final_rank == i else ""
                title = f"{where}: rank {i + 1} (token not recorded)" + (f" p={p:.4f}" if p is not None else "")
                text = f"{p:.2f}" if p is not None else ""
                out.append(f'<td class="tok{hit}" style="background:rgb{rgb};color:{fg}" title="{_e(title)}">{text}</td>')
                continue
            hit = " hit" if final_tok is not None and tok == final_tok else ""
            title = f"{where}: rank {i + 1} {tok!r}" + (f" p={p:.4f}" if p is not None else "")
            prob = f"<small>{p:.2f}</small>" if p is not None else ""
            out.append(f'<td class="tok{hit}" style="background:rgb{rgb};color:{fg}" title="{_e(title)}">'
                       f"{_e(_visible(tok))}{prob}</td>")
        return "".join(out)

    probes = _probe_names(layers)
    colors = _ProbeColors()
    head = "".join(f"<th>top-{i + 1}</th>" for i in range(k))
    probe_head = "".join(f'<th title="concept probe">{_e(n)}</th>' for n in probes)
    rows = [f'<tr><th>layer</th>{head}<th>entropy</th><th>KL to final</th><th title="rank of the final top-1 token '
            f'under this layer\'s lens (0 = it is the top-1)">rank</th>{probe_head}</tr>']
    if final_top:
        rows.append(f'<tr class="final"><td class="lay">output</td>{cells(final_top, "model output", 0)}'
                    '<td class="num"></td><td class="num"></td><td class="num"></td>'
                    + '<td class="probe"></td>' * len(probes) + "</tr>")
    for layer in sorted(layers, key=lambda x: x.get("layer", 0) if isinstance(x.get("layer"), int) else 0, reverse=True):
        num = layer.get("layer")
        marks = []
        if num == depth:
            marks.append('<span title="prediction depth: from here on the top-1 stays the final output">&#9670;</span>')
        if num in changes:
            marks.append('<span title="the narrative changes its mind here">&#8635;</span>')
        cls = ' class="flagged"' if num in flagged_layers else ""
        ent, kl = layer.get("entropy"), layer.get("kl_to_final")
        ent_w = f"{100 * ent / max_entropy:.0f}" if isinstance(ent, (int, float)) else "0"
        kl_w = f"{100 * kl / max_kl:.0f}" if isinstance(kl, (int, float)) else "0"
        sentence = layer.get("sentence")
        lay_title = f' title="{_e(sentence)}"' if sentence else ""
        rows.append(
            f'<tr{cls}><td class="lay"{lay_title}>{" ".join(marks)} L{_e(num)}</td>'
            f'{cells(_top(layer), f"layer {num}", layer.get("final_top1_rank"))}'
            f'<td class="num" style="{_meter(ent_w)}" title="entropy (nats)">{_num(ent)}</td>'
            f'<td class="num" style="{_meter(kl_w)}" title="KL(final || lens) (nats)">{_num(kl)}</td>'
            f'<td class="num">{_num(layer.get("final_top1_rank"), "d")}</td>'
            + "".join(_probe_cell(_dict(layer.get("probes")).get(n), n, colors) for n in probes) + "</tr>")
    legend = ('<div class="legend">probability <span>0</span><span class="grad" style="background:linear-gradient(90deg,'
              + ",".join(f"rgb{c}" for c in _SCALE) + ')"></span><span>1</span>'
              '<span>&nbsp; red outline: the model\'s final top-1 &nbsp; &#9670; prediction depth &nbsp; &#8635; change of '
              'mind &nbsp; red layer: flagged</span></div>')
    if final_tok is None and (nar.get("tokens") is False or any("top_p" in x for x in layers)):
        legend += ('<p class="muted notokens">Recorded without tokens (narratives.include_tokens was off): '
                   "each layer's top-k probabilities, highest first; the outline marks the rank of the "
                   "model's final top-1.</p>")
    return f'<table class="traj">{"".join(rows)}</table>{legend}'


def _probe_names(layers: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for layer in layers:
        for name in _dict(layer.get("probes")):
            if name not in names:
                names.append(name)
    return names


class _ProbeColors:
    """A stable colour per (probe, label), in order of first appearance."""

    def __init__(self) -> None:
        self._colors: dict[tuple[str, str], tuple[int, int, int]] = {}

    def __call__(self, probe: str, label: str) -> tuple[int, int, int]:
        key = (probe, label)
        if key not in self._colors:
            used = sum(1 for c in self._colors if c[0] == probe)
            self._colors[key] = _PALETTE[used % len(_PALETTE)]
        return self._colors[key]


def _probe_cell(reading: Any, name: str, colors: _ProbeColors) -> str:
    """A probe at one layer: its label, coloured; 'no reliable reading' (greyed) where the bundle's
    quality bar does not let it be printed; 'none of these' where it abstains."""
    reading = _dict(reading)
    if reading.get("reliable") is False:
        return (f'<td class="probe muted" title="{_e(name)}: no reliable reading at this layer '
                '(the probe does not pass the bundle\'s quality bar here)">&ndash;</td>')
    if reading.get("abstain"):
        return (f'<td class="probe" title="{_e(name)}: no label fits (top probability below the abstention '
                f'threshold)">none <small>{_num(reading.get("p"))}</small></td>')
    label, p = reading.get("label"), reading.get("p")
    probs = _dict(reading.get("probs"))
    if label is None and probs:
        label, p = max(probs.items(), key=lambda kv: kv[1] if isinstance(kv[1], (int, float)) else -1)
    if label is None:
        return '<td class="probe"></td>'
    pf = float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else 0.5
    title = ", ".join(f"{k}={v:.3f}" for k, v in probs.items() if isinstance(v, (int, float))) or str(label)
    return (f'<td class="probe" style="background:{_mix(colors(name, str(label)), pf)}" title="{_e(name)}: {_e(title)}">'
            f"{_e(label)} <small>{_num(p)}</small></td>")


def _score(rec: dict[str, Any]) -> str:
    score = _dict(rec.get("score"))
    flagged = is_flagged(rec)
    parts = [f'<div><div class="score">{_e(_num(score.get("value")) or "–")}</div>'
             f'<div class="muted">anomaly score &middot; p-value {_e(_num(score.get("p_value"), ".3g") or "–")}</div>'
             f'<div style="margin-top:6px"><span class="badge {"flagged" if flagged else "normal"}">'
             f'{"flagged" if flagged else "not flagged"}</span></div></div>']
    right = []
    flags = [f for f in _list(rec.get("flags")) if isinstance(f, dict)]
    if flags:
        items = []
        for f in flags:
            layers = ", ".join(str(x) for x in _list(f.get("layers")))
            items.append(f"<li><b>{_e(f.get('kind', 'flag'))}</b>"
                         + (f" at layers {_e(layers)}" if layers else "")
                         + (f" &middot; {_e(f.get('reading'))}" if f.get("reading") else "")
                         + (f" &mdash; {_e(f.get('detail'))}" if f.get("detail") else "") + "</li>")
        right.append(f'<h3 style="margin-top:0">Why it was flagged</h3><ul class="flags">{"".join(items)}</ul>')
    for f in flags:
        seg = _list(f.get("segment"))
        if len(seg) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in seg):
            right.append(segment_chart(seg[0], seg[1], f.get("prompt_tokens"), _dict(f.get("layer_strength"))))
    contrib = {k: v for k, v in _dict(score.get("contributions")).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if contrib:
        right.append(contributions_chart(contrib))
    if not right:
        right.append('<p class="muted">No flags on this sample.</p>')
    return f'<div class="why">{parts[0]}<div>{"".join(right)}</div></div>'


def _proof(entry: Entry, report: TrailReport | None, keys: KeyRing | None) -> str:
    rec = entry.record
    try:
        body = split_sealed(entry.raw.decode("ascii"))[0] if entry.raw else None
    except (UnicodeDecodeError, RecordFormatError):
        body = None
    recomputed = digest(body) if body is not None else record_hash(rec)
    hash_ok = recomputed == rec.get("hash")
    rows = [
        ("trail", f"<code>{_e(entry.trail)}</code> (writer {_e(rec.get('writer'))})"),
        ("location", f"<code>{_e(entry.segment)}</code> line {entry.line}, byte {entry.offset}"),
        ("seq / time", f"{_e(rec.get('seq'))} &middot; {_e(rec.get('ts'))}"),
        ("prev_hash", f"<code>{_e(rec.get('prev_hash'))}</code>"),
        ("hash", f"<code>{_e(rec.get('hash'))}</code> "
                 + ('<span class="ok">recomputed now: matches</span>' if hash_ok
                    else f'<span class="bad">recomputed now: {_e(recomputed)} (MISMATCH)</span>')),
    ]
    sig = rec.get("hmac")
    if sig is None:
        rows.append(("signature", '<span class="muted">unsigned (trail written without an HMAC key)</span>'))
    elif keys:
        problem = keys.check(str(rec.get("hash")), str(sig))
        rows.append(("signature", f"<code>{_e(sig)}</code> " + (f'<span class="bad">{_e(problem)}</span>' if problem
                                                                 else '<span class="ok">HMAC verified</span>')))
    else:
        rows.append(("signature", f'<code>{_e(sig)}</code> <span class="warn">not verified (no key given)</span>'))
    if report is not None:
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) else 0
        brk = report.first_break
        if brk is None:
            verdict = (f'<span class="ok">intact</span>: {report.records} records, seq {report.first_seq}..{report.last_seq}'
                       f", head {_e(report.head)}, signatures {_e(report.signatures)}")
        elif brk.kind == "torn_write":
            verdict = f'<span class="warn">intact up to a torn write</span> ({_e(brk.describe())})'
        else:
            before = brk.seq is None or int(brk.seq) <= int(seq or 0)
            verdict = (f'<span class="bad">BROKEN</span>: {_e(brk.describe())}'
                       + (" &mdash; <b>at or before this record: its place in the chain is not proven</b>" if before
                          else " &mdash; after this record"))
        rows.append(("trail verification", verdict))
    else:
        rows.append(("trail verification", '<span class="warn">not run</span>'))
    table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    shown = body if body is not None else "(the line's bytes were not available)"
    return (f'<table class="proof">{table}</table>'
            "<details><summary>The exact bytes the hash covers</summary>"
            "<p class=\"muted\">hash = SHA-256 of these bytes: the record's line up to <code>,\"hash\":</code>, "
            "closed with <code>}</code> (its fields in canonical JSON: keys sorted, no spaces, ASCII); "
            "hmac = HMAC-SHA256(key, hash); the next record's prev_hash must equal this hash.</p>"
            f"<pre>{_e(shown)}</pre></details>")


def _summary(nar: dict[str, Any]) -> str:
    """The narrative's summary, read first (absent in records written before it)."""
    sentence = _dict(nar.get("summary")).get("sentence")
    return f'<h3>Summary</h3><p class="summary">{_e(sentence)}</p>' if isinstance(sentence, str) and sentence else ""


def _sentences(nar: dict[str, Any]) -> str:
    layers = sorted((x for x in _list(nar.get("layers")) if isinstance(x, dict) and x.get("sentence")),
                    key=lambda x: x.get("layer", 0) if isinstance(x.get("layer"), int) else 0)
    items = [f"<li>{_e(x.get('sentence'))}</li>" for x in layers]
    return f'<ul class="sentences">{"".join(items)}</ul>' if items else '<p class="muted">No sentences.</p>'


def _sample(idx: int, entry: Entry, report: TrailReport | None, keys: KeyRing | None) -> str:
    rec = entry.record
    nar = _dict(rec.get("narrative"))
    flagged_layers = {x for f in _list(rec.get("flags")) if isinstance(f, dict)
                      for x in _list(f.get("layers")) if isinstance(x, int)}
    badges = (f'<span class="badge {"flagged" if is_flagged(rec) else "normal"}">'
              f'{"flagged" if is_flagged(rec) else "normal"}</span>')
    if rec.get("redelivered"):
        badges += ' <span class="badge dup">redelivered</span>'
    meta = [("request", rec.get("request_id")), ("time", rec.get("ts")), ("model", rec.get("model")),
            ("fingerprint", rec.get("model_fingerprint")), ("lens bundle", rec.get("bundle_id")),
            ("baseline", rec.get("baseline_id")), ("prediction depth", nar.get("prediction_depth")),
            ("changes of mind", ", ".join(str(x) for x in _list(nar.get("changes_of_mind"))) or None),
            ("prompt digest", rec.get("text_digest")), ("prompt (redacted)", rec.get("text_redacted")),
            ("prompt", rec.get("text"))]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in meta if v not in (None, ""))
    return (f'<section class="card" id="sample-{idx}"><h2>Sample <code>{_e(rec.get("sample_id"))}</code> {badges}</h2>'
            f'<dl class="meta">{dl}</dl>{_score(rec)}'
            f"{_summary(nar)}"
            f"<h3>Prediction trajectory: each layer's top tokens and probe readings</h3>{_trajectory(nar, flagged_layers)}"
            f"<h3>Layer by layer</h3>{_sentences(nar)}"
            f"<h3>Chain proof</h3>{_proof(entry, report, keys)}</section>")


def render_report(
    entries: Sequence[Entry],
    *,
    reports: Mapping[Path, TrailReport] | None = None,
    keys: KeyRing | None = None,
    title: str = "layerwatch audit report",
    generated_at: datetime | None = None,
) -> str:
    """The HTML page for ``entries`` (sample records). ``reports``: verification results by
    trail folder, shown in each chain proof."""
    reports = reports or {}
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    index_rows = "".join(
        f'<tr><td><a href="#sample-{i}">{_e(e.record.get("sample_id"))}</a></td><td>{_e(e.record.get("request_id"))}</td>'
        f'<td>{_e(e.record.get("ts"))}</td><td>{_e(e.record.get("model"))}</td>'
        f'<td>{_e(_num(_dict(e.record.get("score")).get("value")))}</td>'
        f'<td>{"flagged" if is_flagged(e.record) else ""}</td>'
        f'<td>{_e(", ".join(str(_dict(f).get("kind")) for f in _list(e.record.get("flags"))))}</td></tr>'
        for i, e in enumerate(entries))
    trails = sorted({str(e.trail) for e in entries})
    index = (f'<section class="card"><h2>{len(entries)} sample(s)</h2><table class="list"><tr><th>sample</th><th>request</th>'
             f"<th>time</th><th>model</th><th>score</th><th></th><th>flags</th></tr>{index_rows}</table></section>")
    body = "".join(_sample(i, e, reports.get(e.trail), keys) for i, e in enumerate(entries))
    if not entries:
        body = '<section class="card"><p class="muted">No samples matched.</p></section>'
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{_CSS}</style></head><body><main>'
        f'<h1>{_e(title)}</h1><p class="sub">generated {when} from {len(trails)} trail(s): '
        f'{_e(", ".join(trails))}</p>{index}{body}</main></body></html>\n'
    )
