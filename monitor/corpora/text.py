"""Plain-text helpers: sentences, the prose test, hash splits, short texts, and the language check that filters untranslated paragraphs."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from monitor.corpora.markup import normalise
from monitor.corpora.sources import (
    _SPLIT_BUCKETS,
    _SPLIT_SALT,
    DEFAULT_SEED,
    SHORT_MAX_CHARS,
    SHORT_MIN_CHARS,
    SPLITS,
)

_SENTENCE_END = re.compile(r"(?<=[.!?…。])[\"'”»)\]]*\s+(?=[\"'“«(¿¡]?[A-Z0-9À-ÝА-ЯЁ])")


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentence-ish pieces at ``. ! ?`` followed by a capital."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def looks_like_prose(text: str, min_words: int = 6) -> bool:
    """True when a text has enough words and is mostly letters (not a table, path or option)."""
    words = text.split()
    if len(words) < min_words:
        return False
    letters = sum(map(str.isalpha, text))
    return letters >= 0.65 * (len(text) - text.count(" "))


def _hash(text: str, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}\x00{text}".encode()).digest()


def split_of(unit: str) -> str:
    """The split a unit of text belongs to: a pure function of its normalised content."""
    bucket = int.from_bytes(_hash(normalise(unit), _SPLIT_SALT)[:8], "big") % 100
    return next(name for name, r in _SPLIT_BUCKETS.items() if bucket in r)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def seeded_order(texts: Iterable[str], seed: int = DEFAULT_SEED) -> list[str]:
    """Deduplicate and order texts by a seeded hash: stable, and independent of input order."""
    unique = dict.fromkeys(texts)
    return sorted(unique, key=lambda t: _hash(t, f"order-{seed}"))


def _clauses(sentence: str, max_chars: int) -> list[str]:
    """Pieces of an over-long sentence cut after ``;`` or ``:``, merged up to ``max_chars``."""
    pieces: list[str] = []
    for clause in re.split(r"(?<=[;:])\s+", sentence):
        if pieces and len(pieces[-1]) + 1 + len(clause) <= max_chars:
            pieces[-1] = f"{pieces[-1]} {clause}"
        else:
            pieces.append(clause)
    return pieces


def short_texts(
    paragraph: str, max_chars: int = SHORT_MAX_CHARS, min_chars: int = SHORT_MIN_CHARS
) -> list[str]:
    """Cut a paragraph into non-overlapping texts of 1-3 consecutive sentences.

    The number of sentences per text (1, 2 or 3) is drawn from a hash of its first sentence, so
    the cut is deterministic; texts outside ``[min_chars, max_chars]`` are dropped.
    """
    out: list[str] = []
    sents: list[str] = []
    for s in sentences(paragraph):  # long sentences (licences, man pages) split at ; and :
        sents.extend(_clauses(s, max_chars) if len(s) > max_chars else [s])
    i = 0
    while i < len(sents):
        want = 1 + _hash(sents[i], "short")[0] % 3
        text = sents[i]
        j = i + 1
        while j < len(sents) and j - i < want and len(text) + 1 + len(sents[j]) <= max_chars:
            text = f"{text} {sents[j]}"
            j += 1
        if min_chars <= len(text) <= max_chars:
            out.append(text)
        i = j
    return out


def _cap_at_sentence(text: str, max_chars: int) -> str:
    """The longest prefix of whole sentences within ``max_chars`` (or a word-boundary cut)."""
    text = normalise(text)
    if len(text) <= max_chars:
        return text
    out = ""
    for s in sentences(text):
        if len(out) + len(s) + 1 > max_chars:
            break
        out = f"{out} {s}".strip()
    if not out:
        out = text[:max_chars].rsplit(" ", 1)[0]
    return out


# --------------------------------------------------------------------------------------------
# Language check (filters untranslated paragraphs out of translations)
# --------------------------------------------------------------------------------------------

_FUNCTION_WORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split())
    for lang, words in {
        "en": "the and of to is that with for this are be from which not you it can by on or an as when if was have "
        "do does but all has its their they there only into one may must will more than such also these however",
        "de": "der die das und ist nicht mit ein eine den dem von zu auf für werden wird sich auch oder wenn bei sind kann des im",
        "fr": "le la les et est des une un du dans pour que qui sur pas avec par ce sont au aux être peut ou il se",
        "es": "el la los las y es que del en un una por para con se no como más puede al lo sus este esta",
        "it": "il la di che è un una per non con sono del della le gli nel può anche alla dei questo questa ad",
        "nl": "de het een en van is niet met voor op dat die worden wordt zijn kan bij naar ook als deze te om",
        "pt": "o a os as de que e é um uma para com não do da dos das em no na pode por ao se",
        "pl": "i w z na się nie do jest to że jak o od przez lub dla jako być może po tym oraz są",
    }.items()
}
_WORD = re.compile(r"[^\W\d_]+")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")


def guess_language(text: str) -> str | None:
    """The language whose function words a text uses most (None when there is no clear winner).

    A check on provenance labels, not a language identifier: Cyrillic text counts as ``ru``.
    """
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    cyr = len(_CYRILLIC.findall(text))
    if cyr > 0.5 * len(letters):
        return "ru"
    words = _WORD.findall(text.lower())
    scores = {lang: len(list(filter(fw.__contains__, words))) for lang, fw in _FUNCTION_WORDS.items()}
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    (best, top), (_, second) = ranked[0], ranked[1]
    if top < 2 or top < 2 * second:
        return None
    return best
