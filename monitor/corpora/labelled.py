"""Labelled sets for the concept probes: language and topic."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from monitor.corpora.cache import _DiskCached
from monitor.corpora.documents import (
    _c_snippets,
    _fortunes,
    _handbook_documents,
    _licence_paragraphs,
    _man_documents,
    _python_snippets,
)
from monitor.corpora.english import _english_units, english_prose
from monitor.corpora.sources import DEFAULT_SEED, LANGUAGES, TOPICS
from monitor.corpora.text import (
    _check_split,
    _hash,
    guess_language,
    looks_like_prose,
    seeded_order,
    short_texts,
    split_of,
)

# --------------------------------------------------------------------------------------------
# Labelled sets
# --------------------------------------------------------------------------------------------


def _language_texts(lang: str) -> list[str]:
    docs = [*_handbook_documents(lang), *_man_documents(lang)]
    return [t for doc in docs for para in doc for t in short_texts(para) if looks_like_prose(t)]


@_DiskCached
def _language_pool(lang: str) -> tuple[str, ...]:
    texts = dict.fromkeys(_language_texts(lang))
    if lang != "en":  # drop what a translation left in English, verbatim
        english = set(_language_texts("en")) | {t for u in _english_units() for t in u[2]}
        texts = dict.fromkeys(t for t in texts if t not in english)
    return tuple(t for t in texts if guess_language(t) == lang)


@_DiskCached
def _topic_pool(topic: str) -> tuple[str, ...]:
    if topic == "code":
        texts: Iterable[str] = [*_python_snippets(), *_c_snippets()]
        return tuple(dict.fromkeys(texts))
    if topic == "docs":
        return tuple(dict.fromkeys(t for u in _english_units() for t in u[2]))
    if topic == "legal":
        paras: Iterable[str] = _licence_paragraphs()
    elif topic == "manual":
        paras = [p for doc in _man_documents("en") for p in doc]
    elif topic == "quotes":
        paras = _fortunes()
    else:  # pragma: no cover - guarded by labelled()
        raise ValueError(topic)
    texts = [t for p in paras for t in short_texts(p) if looks_like_prose(t) and guess_language(t) == "en"]
    return tuple(dict.fromkeys(texts))


_LABELLED: dict[str, tuple[tuple[str, ...], Callable[[str], tuple[str, ...]]]] = {
    "language": (LANGUAGES, _language_pool),
    "topic": (TOPICS, _topic_pool),
}


@functools.cache
def _english_short_split() -> dict[str, str]:
    """Split of every English short text, inherited from its passage (first passage wins)."""
    out: dict[str, str] = {}
    for _, split, shorts in _english_units():
        for t in shorts:
            out.setdefault(t, split)
    return out


def _split_for(text: str) -> str:
    """A text's split: its passage's when it is English prose, else the hash of the text."""
    return _english_short_split().get(text) or split_of(text)


def _labelled_split(name: str, label: str, split: str) -> list[str]:
    if name == "topic" and label == "docs":
        return english_prose(split, unit="short")
    return [t for t in _LABELLED[name][1](label) if _split_for(t) == split]


def labelled(
    name: str,
    split: str = "train",
    per_label: int | None = None,
    balanced: bool = True,
    seed: int = DEFAULT_SEED,
) -> list[tuple[str, str]]:
    """A labelled probe set: ``(text, label)`` pairs, short texts (1-3 sentences, <= 300 chars).

    ``name`` is ``"language"`` (labels :data:`LANGUAGES`) or ``"topic"`` (labels :data:`TOPICS`).
    With ``balanced`` every label is cut to the size of the smallest one in this split;
    ``per_label`` caps each label further. Pairs are interleaved in a seeded order.
    """
    if name not in _LABELLED:
        raise ValueError(f"unknown labelled set {name!r}; choose one of {', '.join(_LABELLED)}")
    _check_split(split)
    return list(_labelled(name, split, per_label, balanced, seed))


@functools.cache
def _labelled(
    name: str, split: str, per_label: int | None, balanced: bool, seed: int
) -> tuple[tuple[str, str], ...]:
    labels = _LABELLED[name][0]
    per = {label: seeded_order(_labelled_split(name, label, split), seed) for label in labels}
    cap = min(len(v) for v in per.values()) if balanced else None
    if per_label is not None:
        cap = per_label if cap is None else min(cap, per_label)
    pairs = [(t, label) for label in labels for t in per[label][:cap]]
    return tuple(sorted(pairs, key=lambda p: _hash(f"{p[1]}\x00{p[0]}", f"order-{seed}")))
