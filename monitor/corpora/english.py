"""English prose: passages and short texts of the English sources, split by passage."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

from monitor.corpora.cache import _DiskCached
from monitor.corpora.documents import (
    _dictionary_documents,
    _handbook_documents,
    _python_docs_documents,
    _reference_documents,
)
from monitor.corpora.sources import DEFAULT_SEED, PASSAGE_MAX_CHARS, PASSAGE_MIN_CHARS
from monitor.corpora.text import (
    _check_split,
    looks_like_prose,
    seeded_order,
    sentences,
    short_texts,
    split_of,
)

# --------------------------------------------------------------------------------------------
# English prose
# --------------------------------------------------------------------------------------------


def _passages(paragraphs: Sequence[str]) -> Iterator[str]:
    """Group consecutive prose paragraphs of one document into passages of bounded length."""
    buf: list[str] = []
    size = 0
    for para in paragraphs:
        if not looks_like_prose(para, min_words=8):
            continue
        if len(para) > PASSAGE_MAX_CHARS:  # cut a long paragraph at sentence boundaries
            pieces: list[str] = []
            for s in sentences(para):
                if pieces and len(pieces[-1]) + 1 + len(s) <= PASSAGE_MAX_CHARS:
                    pieces[-1] = f"{pieces[-1]} {s}"
                else:
                    pieces.append(s)
        else:
            pieces = [para]
        for piece in pieces:
            if buf and size + 2 + len(piece) > PASSAGE_MAX_CHARS:
                if size >= PASSAGE_MIN_CHARS:
                    yield "\n\n".join(buf)
                buf, size = [], 0
            buf.append(piece)
            size += len(piece) + (2 if len(buf) > 1 else 0)
            if size >= PASSAGE_MIN_CHARS:
                yield "\n\n".join(buf)
                buf, size = [], 0
    if buf and size >= PASSAGE_MIN_CHARS:
        yield "\n\n".join(buf)


@_DiskCached
def _english_units() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(passage, split, short texts) for every English prose passage, deduplicated."""
    documents = [
        *_handbook_documents("en"),
        *_python_docs_documents(),
        *_reference_documents(),
        *_dictionary_documents(),
    ]
    seen: set[str] = set()
    seen_sentences: set[str] = set()
    units = []
    for doc in documents:
        # A sentence repeated across documents (boilerplate, "Changed in version ...") is kept
        # only where it first occurs, so no sentence can sit in two splits.
        paragraphs = []
        for para in doc:
            kept = [x for x in sentences(para) if x not in seen_sentences]
            seen_sentences.update(kept)
            if kept:
                paragraphs.append(" ".join(kept))
        for passage in _passages(paragraphs):
            if passage in seen:
                continue
            seen.add(passage)
            shorts = tuple(
                t for para in passage.split("\n\n") for t in short_texts(para) if looks_like_prose(t)
            )
            units.append((passage, split_of(passage), shorts))
    return tuple(units)


def english_prose(split: str = "train", unit: str = "passage", seed: int = DEFAULT_SEED) -> list[str]:
    """English prose: Debian handbook, Python docs, Debian Reference, Jargon File, Devil's Dictionary.

    ``unit="passage"``: paragraphs of one document grouped to 700-1500 characters (~160-350
    SmolLM2 tokens), for tuned-lens calibration (pack or cut them into 128-token chunks).
    ``unit="short"``: 1-3 sentence texts of 40-300 characters cut from those passages, for
    drift baselines and normal traffic; they share their passage's split.
    """
    _check_split(split)
    if unit not in ("passage", "short"):
        raise ValueError(f"unknown unit {unit!r}; choose 'passage' or 'short'")
    return list(_english_prose(split, unit, seed))


@functools.cache
def _english_prose(split: str, unit: str, seed: int) -> tuple[str, ...]:
    units = [u for u in _english_units() if u[1] == split]
    if unit == "passage":
        return tuple(seeded_order((u[0] for u in units), seed))
    other = _sentences_outside(split)
    kept = (t for u in units for t in u[2] if t not in other and not any(s in other for s in sentences(t)))
    return tuple(seeded_order(kept, seed))


@functools.cache
def _sentences_outside(split: str) -> frozenset[str]:
    """Every sentence and short text of the English passages of the other splits.

    A sentence repeated in two documents must not put a held-out short text inside a training
    passage.
    """
    pieces = {
        s for u in _english_units() if u[1] != split for para in u[0].split("\n\n") for s in sentences(para)
    }
    pieces.update(t for u in _english_units() if u[1] != split for t in u[2])  # clauses too
    return frozenset(pieces)
