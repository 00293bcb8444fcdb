"""Narrative privacy (issue 17): by default neither audit records nor served narratives carry token
strings or ids (a layer's top tokens can spell the prompt out); ``narratives.include_tokens`` turns
them on; ``audit show`` and the HTML report render records of both kinds."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import monitor
from monitor.audit import cli as audit_cli
from monitor.audit.reader import Entry, Query, search
from monitor.audit.report import render_report
from monitor.explain import flag_sentence
from monitor.lenses.torch_lens import TorchLogitLens
from monitor.sidecar.config import load_settings
from monitor.sidecar.service import Sidecar
from monitor.transport import MemoryTransport
from tests.conftest import make_tiny

PROMPTS = ([5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16])


def run_sidecar(tmp: Path, name: str, **narratives: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Real tap -> memory transport -> real sidecar on a tiny Llama; returns (audited sample
    records, the narratives the sidecar serves for them)."""
    model = make_tiny("llama", seed=0)
    url = f"memory://privacy-{name}"
    MemoryTransport.reset_all()
    settings = load_settings(transport=url, group="g", http_port=0, batch_wait_ms=10, warm_up=False,
                             consumer=name, audit={"directory": tmp / name}, baseline={"learn_samples": 400},
                             **({"narratives": narratives} if narratives else {}))  # default: as shipped
    sc = Sidecar(settings, bank=TorchLogitLens(model))
    tap = monitor.attach(model, sample_rate=1.0, transport=url)
    ids = []
    for i, prompt in enumerate(PROMPTS):
        with tap.request(f"req-{name}-{i}") as h, torch.no_grad():
            model(input_ids=torch.tensor([prompt]))
        ids += h.sample_ids
    tap.flush(5)
    tap.close()
    tap.detach()
    sc.step()
    served = [sc.narrative(s) for s in ids]
    sc.stop(5)
    sc.processor.shutdown()
    records = [e.record for e in search([tmp / name], Query(kinds=["sample"]))]
    assert len(records) == len(PROMPTS) and all(s is not None for s in served)
    return records, served  # type: ignore[return-value]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("privacy")


@pytest.fixture(scope="module")
def off(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A sidecar with default settings."""
    return run_sidecar(root, "off")


@pytest.fixture(scope="module")
def trails(root: Path, off: Any) -> Iterator[dict[str, Any]]:
    """Trails of both kinds: default settings, and narratives.include_tokens on."""
    yield {"root": root, "off": off, "on": run_sidecar(root, "on", include_tokens=True)}


def _token_texts(obj: Any) -> list[str]:
    """Every '<id>' token string (the default decoder's spelling) anywhere in ``obj``."""
    return re.findall(r"<\d+>", json.dumps(obj))


def test_audit_records_carry_no_token_strings_or_ids_by_default(off: Any) -> None:
    """With default settings no sample record holds a token: no 'top' pairs, no '<id>' strings, no
    token in the sentences; the numeric readings stay (top-k probabilities, entropy, KL, rank,
    depth, changes of mind)."""
    records, _ = off
    for rec in records:
        nar = rec["narrative"]
        assert _token_texts(rec) == [] and nar["tokens"] is False
        assert "top" not in nar["final"] and len(nar["final"]["top_p"]) == 5
        for layer in nar["layers"]:
            assert "top" not in layer and "leaning" not in layer["sentence"]
            assert len(layer["top_p"]) == 5 and layer["top_p"] == sorted(layer["top_p"], reverse=True)
            assert {"entropy", "kl_to_final", "final_top1_rank", "probes"} <= set(layer)
        assert isinstance(nar["prediction_depth"], int) and isinstance(nar["changes_of_mind"], list)


def test_served_narratives_carry_no_tokens_by_default(off: Any) -> None:
    """What /narratives/{id} would serve (the recent cache) holds no token either, its text included."""
    _, served = off
    for item in served:
        assert _token_texts(item) == [] and "leaning" not in item["text"]
        assert "output: top-1 at" in item["text"]


def test_include_tokens_puts_the_tokens_in_records_and_served_narratives(trails: dict[str, Any]) -> None:
    """With narratives.include_tokens the same readings come with their [token, p] pairs, and the
    numbers are those of the token-free records."""
    (on, served), (off, _) = trails["on"], trails["off"]
    for rec_on, rec_off, item in zip(on, off, served, strict=True):
        nar = rec_on["narrative"]
        assert nar["tokens"] is True and "top_p" not in nar["layers"][0]
        assert [p for _, p in nar["layers"][0]["top"]] == rec_off["narrative"]["layers"][0]["top_p"]
        assert nar["layers"][1]["entropy"] == rec_off["narrative"]["layers"][1]["entropy"]
        assert nar["prediction_depth"] == rec_off["narrative"]["prediction_depth"]
        assert _token_texts(nar["layers"]) and "leaning '<" in item["text"]


def test_the_surprisal_flag_names_no_token_id() -> None:
    """The 'rare top-1 token' flag (written into every record's flags) says where and how rare,
    never which token ids."""
    text = flag_sentence("top1_surprisal_high", (3, 4, 5), "top1_surprisal", {"tokens": [1717, 4242], "value": 9.5})
    assert "1717" not in text and "4242" not in text and "9.50 nats" in text and "layers 3-5" in text


def test_a_bad_include_tokens_value_fails_at_start_up_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAYERWATCH_NARRATIVES__INCLUDE_TOKENS=maybe is a ConfigError naming the setting and its variable."""
    from monitor.errors import ConfigError

    monkeypatch.setenv("LAYERWATCH_NARRATIVES__INCLUDE_TOKENS", "maybe")
    with pytest.raises(ConfigError, match=r"narratives\.include_tokens.*LAYERWATCH_NARRATIVES__INCLUDE_TOKENS"):
        load_settings()


def _audit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser(prog="layerwatch")
    audit_cli.register(parser.add_subparsers())
    args = parser.parse_args(["audit", *argv])
    assert args.handler(args) == 0
    return capsys.readouterr().out


def _show(root: Path, request_id: str, capsys: pytest.CaptureFixture[str]) -> str:
    return _audit(["show", str(root), "--request-id", request_id, "--top-k", "3"], capsys)


def test_audit_search_lists_records_of_both_kinds(trails: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """`audit search` over trails written with and without tokens lists every sample of both."""
    out = _audit(["search", str(trails["root"] / "off"), str(trails["root"] / "on"), "--kind", "sample"], capsys)
    for name in ("off", "on"):
        assert all(f"req-{name}-{i}" in out for i in range(len(PROMPTS)))
    assert f"{2 * len(PROMPTS)} record(s) from 2 trail(s)" in out


def test_audit_show_renders_records_with_and_without_tokens(trails: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """`audit show` prints a row per layer for both kinds: probabilities only (and a note saying
    so) for a token-free record, quoted tokens with probabilities for the other."""
    root = trails["root"]
    off, on = _show(root / "off", "req-off-0", capsys), _show(root / "on", "req-on-0", capsys)
    rec_off, rec_on = trails["off"][0][0], trails["on"][0][0]
    first_off = rec_off["narrative"]["layers"][0]
    row = next(line for line in off.splitlines() if line.split(" ", 1)[0].rstrip("*~") == "0")
    assert f"{first_off['top_p'][0]:.2f}" in row and "'" not in row
    assert "recorded without tokens" in off and _token_texts(off) == []
    assert "'<" in on and "recorded without tokens" not in on
    for text, rec in ((off, rec_off), (on, rec_on)):
        rows = [line for line in text.splitlines() if line.split(" ", 1)[0].rstrip("*~").isdigit()]
        assert len(rows) == len(rec["narrative"]["layers"])


def _entries(root: Path) -> list[Entry]:
    return list(search([root / "off", root / "on"], Query(kinds=["sample"])))


def test_html_report_renders_records_with_and_without_tokens(trails: dict[str, Any]) -> None:
    """The HTML report's trajectory of a token-free record shows probabilities (no token text),
    outlines the final top-1's rank and says tokens were not recorded; a record with tokens
    shows them."""
    entries = _entries(trails["root"])
    page = render_report(entries)
    off_sections = [s for s in page.split('<section class="card" id="sample-')[1:] if "req-off" in s]
    on_sections = [s for s in page.split('<section class="card" id="sample-')[1:] if "req-on" in s]
    assert len(off_sections) == len(on_sections) == len(PROMPTS)
    for s in off_sections:
        assert "Recorded without tokens" in s and "&lt;" not in s.split("<h3>Chain proof")[0]
        assert "(token not recorded)" in s
    for s in on_sections:
        assert "Recorded without tokens" not in s and "&lt;" in s  # '<id>' tokens, escaped




def test_html_report_of_both_kinds_renders_in_chromium(trails: dict[str, Any], tmp_path: Path, browser: Any) -> None:
    """A report mixing token-free and token records loads in headless Chromium without errors, each
    sample's trajectory has its output row and a row per layer, and a token-free cell shows its
    probability."""
    entries = _entries(trails["root"])
    target = tmp_path / "report.html"
    target.write_text(render_report(entries), encoding="utf-8")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(target.as_uri(), wait_until="load")
    rows = [page.locator(f"#sample-{i} table.traj tr").count() for i in range(len(entries))]
    first_cells = {}
    for i, e in enumerate(entries):
        first_cells[e.record["request_id"]] = page.locator(f"#sample-{i} table.traj tr.final td.tok").first.inner_text()
    page.close()
    assert problems == []
    n_layers = len(entries[0].record["narrative"]["layers"])
    assert rows == [n_layers + 2] * len(entries)  # header + output + layers
    off = trails["off"][0][0]
    assert first_cells["req-off-0"] == f"{off['narrative']['final']['top_p'][0]:.2f}"
    assert first_cells["req-on-0"].startswith("<")
