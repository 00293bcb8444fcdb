"""``layerwatch audit``: verify, search, show, report and prune from the command line."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from monitor.audit import AuditConfig, AuditWriter
from monitor.audit import cli as audit_cli
from monitor.audit.reader import parse_time
from monitor.audit.segments import list_segments
from monitor.audit.testing import FakeClock, crash, example_sample
from monitor.errors import LayerwatchError

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``layerwatch audit ...`` with the audit subcommands only; returns (code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="layerwatch")
    audit_cli.register(parser.add_subparsers())
    args = parser.parse_args(["audit", *argv])
    try:
        code = args.handler(args)
    except LayerwatchError as exc:
        print(f"layerwatch: error: {exc}")
        code = 1
    out, err = capsys.readouterr()
    return int(code or 0), out, err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two writers' trails, a minute apart per sample; writer b re-delivers sample 3 of writer a."""
    directory = tmp_path_factory.mktemp("trails")
    for name, offset in (("a", 0.0), ("b", 30.0)):
        clock = FakeClock(T0 + offset)
        config = AuditConfig(directory=directory, writer_id=name, max_segment_bytes=4000, fsync="every_n",
                             fsync_every_n=100)
        with AuditWriter(config, clock=clock) as w:
            for i in range(10):
                n = i if name == "a" else 100 + i
                w.append("sample", example_sample(n, model="smollm2" if name == "a" else "gpt2"))
                clock.advance(60)
            if name == "b":
                w.append("sample", example_sample(3, redelivered=True))
            w.append("drift_alert_raised", {"model": "smollm2", "alert": {"reason": "entropy drift at layers 2-3"}})
    return directory


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the two trails."""
    shutil.copytree(pristine, tmp_path / "trails")
    return tmp_path / "trails"


def test_verify_exits_0_on_intact_trails(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify over a root of two trails prints OK for each and exits 0."""
    code, out, _ = run(["verify", str(root)], capsys)
    assert code == 0 and out.count("OK  ") == 2


def test_verify_exits_1_and_locates_the_break(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify exits 1 and prints the kind and exact location of the first break."""
    seg = list_segments(root / "b")[1]
    seg.write_bytes(seg.read_bytes().replace(b'"p_value":0.41', b'"p_value":0.42', 1))
    code, out, _ = run(["verify", str(root)], capsys)
    assert code == 1
    assert f"first break: hash_mismatch at {seg.name} line " in out


def test_verify_exits_3_on_a_torn_write_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A crash's partial last record gives exit code 3."""
    w = AuditWriter(AuditConfig(directory=tmp_path, writer_id="a"))
    w.append("sample", example_sample(1))
    crash(w, torn=b'{"fla')
    code, out, _ = run(["verify", str(tmp_path / "a")], capsys)
    assert code == 3 and "torn_write" in out


def test_verify_json_has_one_object_per_trail(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify --json prints one JSON object per trail."""
    _, out, _ = run(["verify", "--json", str(root)], capsys)
    reports = [json.loads(x) for x in out.splitlines()]
    assert sorted(r["writer"] for r in reports) == ["a", "b"] and {r["status"] for r in reports} == {"intact"}


def test_search_flagged_merges_writers_in_time_order(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """search --flagged --json returns only flagged samples from both writers, oldest first."""
    _, out, _ = run(["search", str(root), "--flagged", "--json"], capsys)
    recs = [json.loads(x) for x in out.splitlines()]
    assert {r["sample_id"] for r in recs} == {"s-00000", "s-00005", "s-00100", "s-00105"}
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)


def test_search_time_range(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--since/--until keep only records inside the range."""
    since = "2025-06-15T15:08:00Z"
    until = "2025-06-15T15:10:00Z"
    _, out, _ = run(["search", str(root), "--kind", "sample", "--since", since, "--until", until, "--json"], capsys)
    ids = [json.loads(x)["sample_id"] for x in out.splitlines()]
    assert ids == ["s-00101", "s-00002", "s-00102", "s-00003"]


def test_search_by_request_id(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--request-id finds that request's sample."""
    _, out, _ = run(["search", str(root), "--request-id", "req-00104", "--json"], capsys)
    assert [json.loads(x)["sample_id"] for x in out.splitlines()] == ["s-00104"]


def test_search_by_model_and_flag_kind(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--model and --flag-kind combine."""
    _, out, _ = run(["search", str(root), "--model", "gpt2", "--flag-kind", "entropy_shift", "--json"], capsys)
    assert [json.loads(x)["sample_id"] for x in out.splitlines()] == ["s-00100", "s-00105"]


def test_search_keeps_the_first_of_a_redelivered_sample(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A re-delivered duplicate is left out (keeping the first record) unless --all is given."""
    _, out, err = run(["search", str(root), "--sample-id", "s-00003", "--json"], capsys)
    recs = [json.loads(x) for x in out.splitlines()]
    assert len(recs) == 1 and "redelivered" not in recs[0] and "1 re-delivered duplicate" in err
    _, out, _ = run(["search", str(root), "--sample-id", "s-00003", "--json", "--all"], capsys)
    assert len(out.splitlines()) == 2


def test_search_table_lists_events_too(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table shows samples and events (not checkpoints or the re-delivered duplicate), with a count."""
    code, out, _ = run(["search", str(root)], capsys)
    assert code == 0 and "drift_alert_raised" in out and "checkpoint" not in out and "22 record(s) from 2 trail(s)" in out


def test_show_prints_the_layer_table(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show prints header, flags and one row per layer with top tokens and probe readings."""
    code, out, _ = run(["show", str(root), "--request-id", "req-00005"], capsys)
    assert code == 0
    assert "sample s-00005" in out and "FLAGGED" in out and "flag entropy_shift at layers 2,3" in out
    assert "' Paris'" in out and "geography" in out
    assert sum(1 for line in out.splitlines() if line.split(" ", 1)[0].rstrip("*~").isdigit()) == 6


def test_show_unknown_sample_is_an_error(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show for an id that is not there exits 1 with a message."""
    code, out, _ = run(["show", str(root), "--sample-id", "nope"], capsys)
    assert code == 1 and "no sample record matches nope" in out


def test_report_writes_an_html_page(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """report -o writes one HTML page holding every selected sample."""
    target = tmp_path / "r.html"
    code, out, _ = run(["report", str(root), "--flagged", "-o", str(target)], capsys)
    page = target.read_text()
    assert code == 0 and "4 sample(s)" in out
    assert all(f"s-00{n}" in page for n in ("000", "005", "100", "105"))


def test_prune_keeps_the_trail_verifiable(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """prune --keep-segments removes old segments and the trail still verifies."""
    before = len(list_segments(root / "a"))
    code, out, _ = run(["prune", str(root / "a"), "--keep-segments", "2"], capsys)
    assert code == 0 and f"removed {before - 2} segment(s)" in out
    assert run(["verify", str(root / "a")], capsys)[0] == 0


def test_prune_dry_run_changes_nothing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """prune --dry-run lists what would go and leaves the files."""
    before = list_segments(root / "a")
    code, out, _ = run(["prune", str(root / "a"), "--keep-segments", "2", "--dry-run"], capsys)
    assert code == 0 and f"would remove {len(before) - 2} segment(s)" in out
    assert list_segments(root / "a") == before


def test_prune_of_a_trail_being_written_is_refused(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """prune while a writer holds the trail fails with the lock holder named."""
    with AuditWriter(AuditConfig(directory=root, writer_id="a")):
        code, out, _ = run(["prune", str(root / "a"), "--keep-segments", "2"], capsys)
    assert code == 1 and "already being written" in out


def test_times_accept_iso_and_durations_ago() -> None:
    """parse_time reads ISO 8601 (naive = UTC) and durations ago."""
    from datetime import UTC, datetime

    now = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_time("2025-01-31T10:00", now) == "2025-01-31T10:00:00.000000Z"
    assert parse_time("2h", now) == "2025-01-31T10:00:00.000000Z"
    assert parse_time("1d", now) == "2025-01-30T12:00:00.000000Z"


def test_layerwatch_main_dispatches_to_audit(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`layerwatch audit verify` works through the real entry point."""
    from monitor.cli import main

    assert main(["audit", "verify", str(root / "a")]) == 0
    assert "OK  " in capsys.readouterr().out


def test_search_and_show_escape_control_characters_in_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A request id or token carrying terminal escape sequences, a carriage return or a
    bidirectional override reaches the reviewer's terminal escaped, never raw."""
    hostile = "req-\x1b[2J\x1b]0;owned\x07\r\u202eevil"
    fields = example_sample(1, flagged=True)
    fields["request_id"] = hostile
    fields["narrative"]["layers"][0]["top"][0][0] = "\x1b[31mred"
    with AuditWriter(AuditConfig(directory=tmp_path, writer_id="w"), clock=FakeClock(T0)) as w:
        w.append("sample", fields)
    for argv in (["search", str(tmp_path)], ["show", str(tmp_path), "--sample-id", "s-00001"]):
        code, out, _ = run(argv, capsys)
        assert code == 0
        assert not any(c in out for c in ("\x1b", "\x07", "\r", "\u202e")), argv
        assert "\\x1b" in out and ("\\u202e" in out or argv[0] == "show")


def test_visible_keeps_printable_text_and_newlines() -> None:
    """Ordinary text, non-ASCII letters and newlines are left as they are."""
    from monitor.audit.terminal import visible

    assert visible("naïve 東京\nnext\tline") == "naïve 東京\nnext\\x09line"
    assert visible("plain") == "plain"
