"""The HTML report: content, robustness, and rendering in real headless Chromium."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from monitor.audit import AuditConfig, AuditWriter, KeyRing, render_report, verify_trail
from monitor.audit.reader import Entry, Query, search
from monitor.audit.records import sample_fields
from monitor.audit.testing import example_sample

KEY = b"report-key-0123456789"
KEYS = KeyRing([KEY])


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signed trail: a flagged 30-layer sample, a normal one, a minimal one and a hostile-token one."""
    directory = tmp_path_factory.mktemp("report")
    with AuditWriter(AuditConfig(directory=directory, writer_id="w", hmac_key=KEY, store_text="redacted")) as w:
        w.append("sample", example_sample(0, n_layers=30, text="Ask bob@example.com about order 12345"))
        w.append("sample", example_sample(1, n_layers=6))
        w.append("sample", sample_fields(sample_id="bare", narrative={"layers": [{"layer": 0}]}))
        hostile = example_sample(2, n_layers=3)
        hostile["sample_id"] = "hostile"
        hostile["narrative"]["layers"][0]["top"][0][0] = "<script>alert(1)</script>"
        w.append("sample", hostile)
        local = example_sample(3, n_layers=6)
        local["sample_id"] = "local"
        local["flags"] = [{"kind": "local_segment", "layers": [2, 4], "reading": "windows",
                           "detail": "tokens 30-46 of the prompt read unlike normal text, most at layers 2, 4",
                           "segment": [30, 46], "prompt_tokens": 120,
                           "layer_strength": {"1": 1.1, "2": 6.5, "4": 5.0}}]
        w.append("sample", local)
    return w.trail_dir


def entries(trail: Path, *ids: str) -> list[Entry]:
    return list(search([trail], Query(sample_ids=list(ids), kinds=["sample"])))


def page_for(trail: Path, *ids: str, keys: KeyRing | None = KEYS) -> str:
    return render_report(entries(trail, *ids), reports={trail: verify_trail(trail, keys=keys)}, keys=keys)


def test_report_shows_score_flags_and_why(trail: Path) -> None:
    """A flagged sample's section has its score, p-value, flag kind, layers and detail."""
    html = page_for(trail, "s-00000")
    assert "3.10" in html and "0.004" in html
    assert "entropy_shift" in html and "at layers 2, 3" in html and "99th percentile" in html


def test_report_has_a_row_per_layer_and_the_output(trail: Path) -> None:
    """The trajectory table has the output row plus one row per layer, highest layer first, with probe cells."""
    html = page_for(trail, "s-00000")
    assert html.count('<td class="lay"') == 31 and html.count("geography <small>") + html.count("code <small>") == 30
    assert html.index(">output</td>") < html.index(" L29</td>") < html.index(" L0</td>")


def test_report_shows_the_chain_proof(trail: Path) -> None:
    """The chain proof names the location, the recomputed hash, the verified HMAC and the trail verdict."""
    html = page_for(trail, "s-00000")
    assert "segment-000000000001.jsonl</code> line 2" in html
    assert "recomputed now: matches" in html and "HMAC verified" in html and "intact</span>: " in html


def test_report_flags_a_record_that_no_longer_matches_its_hash(trail: Path) -> None:
    """A record edited after writing shows MISMATCH in its proof."""
    entry = entries(trail, "s-00001")[0]
    raw = entry.raw.replace(b'"req-00001"', b'"req-00666"')
    tampered = Entry(json.loads(raw), entry.trail, entry.segment, entry.line, entry.offset, raw)
    assert "(MISMATCH)" in render_report([tampered])


def test_report_survives_missing_optional_keys(trail: Path) -> None:
    """A sample with almost no narrative renders with blanks instead of failing."""
    html = page_for(trail, "bare")
    assert "No flags on this sample" in html and "L0</td>" in html


def test_report_escapes_tokens(trail: Path) -> None:
    """Token text is escaped, never markup."""
    html = page_for(trail, "hostile")
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_report_shows_the_redacted_prompt(trail: Path) -> None:
    """With store_text=redacted the report shows the redacted prompt, never the original."""
    html = page_for(trail, "s-00000")
    assert "Ask &lt;EMAIL&gt; about order &lt;NUM&gt;" in html and "bob@example.com" not in html


# --- real browser ------------------------------------------------------------------------------------



def _png_pixels(png: bytes) -> tuple[int, int, bytes]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(png):
        length, ctype = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif ctype == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_report_shows_where_a_local_segment_sits_without_text(trail: Path) -> None:
    """Issue 19: a local_segment flag is drawn as its token offsets on a bar of the prompt
    (25% in, 13% wide for tokens 30-46 of 120) with its strength per layer; no prompt text."""
    html = page_for(trail, "local")
    assert "Where in the prompt" in html and "tokens 30&ndash;46 of 120" in html
    assert 'style="left:25.0%;width:13.3%"' in html
    assert 'title="layer 2: 6.5"' in html and 'title="layer 4: 5"' in html


def test_report_renders_in_chromium_without_console_errors(trail: Path, tmp_path: Path, browser: Any) -> None:
    """The report of several samples loads in headless Chromium with no console or page errors,
    no blocked or failed resource, and a non-blank full-page screenshot."""
    target = tmp_path / "report.html"
    target.write_text(page_for(trail, "s-00000", "s-00001", "bare", "hostile", "local"), encoding="utf-8")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(target.as_uri(), wait_until="load")
    sections = page.locator("section.card[id^=sample-]").count()
    trajectory_rows = page.locator("#sample-0 table.traj tr").count()
    scripts = page.locator("script").count()
    png = page.screenshot(full_page=True)
    page.close()
    (tmp_path / "report.png").write_bytes(png)
    assert problems == []
    assert (sections, trajectory_rows, scripts) == (5, 32, 0)  # header + output + 30 layers
    width, height, raw = _png_pixels(png)
    assert width == 1280 and height > 900 and len(set(raw[: 4_000_000])) > 50
