"""Labelled prompts for the concept probes and for the narrative benchmark, with served lengths.

Served prompts are short: a question, an instruction, a pasted sentence, 12-96 tokens. The probes
are trained and measured on texts of those lengths (:func:`probe_prompts`): each text of a
labelled pool (:func:`~monitor.corpora.labelled.labelled`, 1-3 sentences) is cut to a length drawn
from a hash of the text, log-uniform between :data:`MIN_PROMPT_CHARS` and :data:`MAX_PROMPT_CHARS`
(about 12 and 96 tokens of English), at a word boundary; a shorter text is kept whole.

:func:`narrative_eval` is the benchmark's held-out set (``benchmarks.narrative_quality``), fixed
in docs/corpora.md before any probe was measured on it. It comes from *other sources* than the
training data, not only other texts of the same sources (:data:`EVAL_SOURCES`):

- ``language``: messages of the gettext catalogs of installed programs (coreutils, dpkg, the C
  library, apt, ...) in each language; ``en`` is their English originals (``msgid``); ``other``
  (none of these) their translations into 13 languages outside the closed set;
- ``topic``: ``code`` = Perl modules (POD and comments dropped), ``legal`` = the licence text in
  the Debian copyright files of every *other* installed package, ``manual`` = English man pages of
  every other package (coreutils, git, dpkg, ...), ``docs`` = GNU Texinfo manuals (coreutils,
  grep, sed, gzip, ...; the Python manual skipped), ``quotes`` = the fortune files that the
  training set does not read.

A text that is also in a training pool of its label (any split) is dropped, and the same length
cut applies. Every label gets :data:`EVAL_PER_LABEL` prompts.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from pathlib import Path

from monitor.corpora.cache import _DiskCached
from monitor.corpora.documents import (
    _code_snippets,
    _copyright_paragraphs,
    _fortune_entries,
    _handbook_documents,
    _read_text,
)
from monitor.corpora.labelled import _LABELLED, labelled
from monitor.corpora.markup import normalise, roff_paragraphs
from monitor.corpora.sources import (
    _COPYRIGHT_PACKAGES,
    _DOC_ROOT,
    _DPKG_INFO,
    _MAN_PACKAGE,
    _OTHER_HANDBOOK_LANG,
    DEFAULT_SEED,
    LANGUAGES,
    OTHER_LANGUAGE,
    CorpusUnavailable,
    _need_dir,
)
from monitor.corpora.text import _hash, guess_language, looks_like_prose, seeded_order, short_texts, split_of

MIN_PROMPT_CHARS = 48  # ~12 tokens of English
MAX_PROMPT_CHARS = 384  # ~96 tokens of English
EVAL_PER_LABEL = 300

GETTEXT_DOMAINS = ("coreutils", "dpkg", "libc", "glib20", "findutils", "grep", "tar", "apt", "diffutils", "sed",
                   "bash", "gawk", "git", "gnupg2")  # fmt: skip
_LOCALE_DIRS = {"de": ("de",), "fr": ("fr",), "es": ("es",), "it": ("it",), "nl": ("nl",), "pt": ("pt_BR", "pt"),
                "pl": ("pl",), "ru": ("ru",)}  # fmt: skip
EVAL_FORTUNE_FILES = ("goedel", "law", "paradoxum", "pratchett", "songs-poems", "startrek", "tao", "zippy", "magic")
_LOCALE_ROOT = "/usr/share/locale"
_INFO_ROOT = "/usr/share/info"
_PERL_ROOT = "/usr/share/perl"

EVAL_SOURCES: dict[str, dict[str, str]] = {
    "language": {**{lang: f"gettext catalogs {', '.join(GETTEXT_DOMAINS)} ({'msgid' if lang == 'en' else 'msgstr'})"
                    for lang in LANGUAGES},
                 OTHER_LANGUAGE: f"the same catalogs' translations into {', '.join(_OTHER_HANDBOOK_LANG)}"},
    "topic": {
        "code": f"Perl modules under {_PERL_ROOT}/5.* (perl-modules; POD and comments dropped)",
        "legal": f"{_DOC_ROOT}/<package>/copyright of every installed package except {', '.join(_COPYRIGHT_PACKAGES)}",
        "manual": f"English man pages of every installed package except {_MAN_PACKAGE['en']!r}",
        "docs": f"GNU Texinfo manuals {_INFO_ROOT}/*.info*.gz (python3.11 skipped)",
        "quotes": f"fortune files {', '.join(EVAL_FORTUNE_FILES)} (fortunes)",
    },
}


def cut_prompt(text: str, salt: str = "prompt-length") -> str:
    """``text`` cut at a word boundary to a length drawn from its hash (log-uniform between
    :data:`MIN_PROMPT_CHARS` and :data:`MAX_PROMPT_CHARS`); a shorter text is returned whole."""
    u = int.from_bytes(_hash(text, salt)[:4], "big") / 2**32
    want = int(MIN_PROMPT_CHARS * math.exp(u * math.log(MAX_PROMPT_CHARS / MIN_PROMPT_CHARS)))
    if len(text) <= want:
        return text
    cut = text[:want].rsplit(" ", 1)[0]
    return cut if len(cut) >= MIN_PROMPT_CHARS // 2 else text[:want]


def probe_labels(name: str) -> tuple[str, ...]:
    """The labels of a shipped probe: the corpus labels, and for ``language`` also
    :data:`OTHER_LANGUAGE` ("none of these": a language outside the closed set)."""
    return (*_LABELLED[name][0], OTHER_LANGUAGE) if name == "language" else _LABELLED[name][0]


def _interleaved(groups: list[list[str]]) -> list[str]:
    """Round-robin over ``groups`` (so any prefix mixes them evenly)."""
    out: list[str] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _other_language(texts_of: Callable[[str], list[str]], seed: int) -> list[str]:
    """Texts of the languages outside the closed set, each language in a seeded order, interleaved;
    a text the function-word check assigns to one of the closed set's languages is dropped."""
    return _interleaved([seeded_order([t for t in texts_of(lang) if guess_language(t) is None], seed)
                         for lang in _OTHER_HANDBOOK_LANG])


@_DiskCached
def _other_language_pool() -> tuple[str, ...]:
    return tuple(_other_language(lambda lang: [t for doc in _handbook_documents(lang) for p in doc
                                               for t in short_texts(p) if looks_like_prose(t)], DEFAULT_SEED))


def probe_prompts(name: str, split: str, per_label: int, seed: int = DEFAULT_SEED) -> list[tuple[str, str]]:
    """``per_label`` prompts per label of the probe set ``name`` from ``split``, cut to served
    lengths (:func:`cut_prompt`); fewer where a label's pool is smaller. The ``language`` set's
    ``other`` prompts are handbook translations into 13 languages outside the closed set."""
    pairs = labelled(name, split, balanced=False, seed=seed)
    by_label: dict[str, list[str]] = {}
    for text, label in pairs:
        by_label.setdefault(label, []).append(text)
    if name == "language":
        by_label[OTHER_LANGUAGE] = [t for t in _other_language_pool() if split_of(t) == split]
    out = [(cut_prompt(t), label) for label in probe_labels(name) for t in by_label.get(label, [])[:per_label]]
    return sorted(out, key=lambda p: _hash(f"{p[1]}\x00{p[0]}", f"prompts-{seed}"))


# --------------------------------------------------------------------------------------------
# Benchmark sources (none of them is read by a training set)
# --------------------------------------------------------------------------------------------


def mo_messages(path: Path) -> list[tuple[str, str]]:
    """``(msgid, msgstr)`` pairs of a compiled gettext catalog (first plural form; context and the
    header entry dropped). Read directly: the format is five integers and two string tables."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">"
    _, n, o_orig, o_trans = struct.unpack(order + "4I", data[4:20])
    out = []
    for i in range(n):
        ln, off = struct.unpack(order + "2I", data[o_orig + 8 * i : o_orig + 8 * i + 8])
        lt, ot = struct.unpack(order + "2I", data[o_trans + 8 * i : o_trans + 8 * i + 8])
        msgid = data[off : off + ln].decode("utf-8", "replace").split("\x00")[0].split("\x04")[-1]
        msgstr = data[ot : ot + lt].decode("utf-8", "replace").split("\x00")[0]
        if msgid and msgstr:
            out.append((msgid, msgstr))
    return out


def _prose(paragraphs: list[str] | tuple[str, ...], lang: str | None = "en") -> list[str]:
    return [t for p in paragraphs for t in short_texts(normalise(p)) if looks_like_prose(t) and guess_language(t) == lang]


def _catalog_texts(dirs: list[str], lang: str | None) -> list[str]:
    """Prose messages of the catalogs of :data:`GETTEXT_DOMAINS` in locale directories ``dirs``:
    the English originals for ``lang`` "en", else the translations the language check assigns to
    ``lang`` (None: to none of the closed set's languages)."""
    texts: list[str] = []
    for d in dirs:
        for domain in GETTEXT_DOMAINS:
            f = Path(_LOCALE_ROOT, d, "LC_MESSAGES", f"{domain}.mo")
            if f.is_file():
                # a message is one text: cut long help texts at sentences like the training texts
                msgs = [(k if lang == "en" else v).replace("\n", " ") for k, v in mo_messages(f)]
                texts.extend(t for m in msgs for t in short_texts(normalise(m))
                             if looks_like_prose(t) and guess_language(t) == lang)
    return texts


@_DiskCached
def _gettext_pool(lang: str) -> tuple[str, ...]:
    if lang == OTHER_LANGUAGE:
        texts = _other_language(lambda other: _catalog_texts([other], None), DEFAULT_SEED)
    else:
        dirs = [d for ds in _LOCALE_DIRS.values() for d in ds] if lang == "en" else list(_LOCALE_DIRS[lang])
        texts = _catalog_texts(dirs, lang)
    if not texts:
        raise CorpusUnavailable(f"no gettext catalog of {', '.join(GETTEXT_DOMAINS)} for {lang!r} under {_LOCALE_ROOT}")
    return tuple(dict.fromkeys(texts))


def _dpkg_lists() -> list[Path]:
    return sorted(Path(_DPKG_INFO).glob("*.list"))


def _owned(pattern: str, skip: Callable[[str], bool]) -> list[Path]:
    """Files matching ``pattern`` of every installed package whose name ``skip`` does not reject."""
    rx = re.compile(pattern)
    out: set[Path] = set()
    for listing in _dpkg_lists():
        package = listing.name.removesuffix(".list").split(":")[0]
        if skip(package):
            continue
        out.update(Path(x) for x in listing.read_text(errors="replace").splitlines() if rx.fullmatch(x))
    return sorted(p for p in out if p.is_file() and not p.is_symlink())


def _strip_pod(source: str) -> str:
    """Perl source without its POD blocks (``=head1`` .. ``=cut``) and after ``__END__``."""
    source = re.split(r"^__(?:END|DATA)__\s*$", source, maxsplit=1, flags=re.M)[0]
    return re.sub(r"^=[a-zA-Z].*?(?:^=cut\b.*?$|\Z)", "", source, flags=re.M | re.S)


def _topic_eval_texts(topic: str) -> list[str]:
    if topic == "code":
        root = _need_dir("perl-modules", _PERL_ROOT)
        out: list[str] = []
        for f in sorted(root.rglob("*.pm")):
            out.extend(_code_snippets(_strip_pod(f.read_text(errors="replace")), lambda s: s.startswith("#")))
        return out
    if topic == "legal":
        paras = [p for f in _owned(r"/usr/share/doc/[^/]+/copyright", lambda p: p in _COPYRIGHT_PACKAGES)
                 for p in _copyright_paragraphs(f.read_text(errors="replace"))]
        return _prose(paras)
    if topic == "manual":
        pages = _owned(r"/usr/share/man/man[1-8]/[^/]+\.gz", lambda p: p == _MAN_PACKAGE["en"])
        return _prose([p for f in pages for p in roff_paragraphs(_read_text(f))])
    if topic == "docs":
        files = [f for f in sorted(_need_dir("texinfo-manuals", _INFO_ROOT).glob("*.info*.gz"))
                 if not f.name.startswith("python")]
        blocks = [b for f in files for b in re.split(r"\n\s*\n", _read_text(f))]
        # node headers, menus and index entries are not prose
        return _prose([b for b in blocks if "\x1f" not in b and not re.match(r"\s*(File:|\* )", b)])
    if topic == "quotes":
        return _prose(_fortune_entries("fortunes-eval", EVAL_FORTUNE_FILES))
    raise ValueError(topic)  # pragma: no cover - guarded by narrative_eval()


@_DiskCached
def _topic_eval_pool(topic: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_topic_eval_texts(topic)))


def narrative_eval(name: str, per_label: int = EVAL_PER_LABEL, seed: int = DEFAULT_SEED) -> list[tuple[str, str]]:
    """The narrative benchmark's held-out prompts of probe set ``name``: ``per_label`` per label
    from the sources of :data:`EVAL_SOURCES`, none of them in a training pool, cut to served
    lengths; a label with fewer texts raises :class:`CorpusUnavailable` naming it."""
    if name not in _LABELLED:
        raise ValueError(f"unknown labelled set {name!r}; choose one of {', '.join(_LABELLED)}")
    pool = _LABELLED[name][1]
    out: list[tuple[str, str]] = []
    for label in probe_labels(name):
        if label == OTHER_LANGUAGE:
            seen = set(_other_language_pool())
        elif name == "topic" and label == "docs":  # the docs pool is English prose, read per split
            from monitor.corpora.english import english_prose

            seen = {t for s in ("train", "heldout", "test") for t in english_prose(s, unit="short")}
        else:
            seen = set(pool(label))
        texts = _gettext_pool(label) if name == "language" else _topic_eval_pool(label)
        # 'other' mixes its languages evenly: keep its interleaved order
        ordered = list(texts) if label == OTHER_LANGUAGE else seeded_order(texts, seed)
        prompts = [cut_prompt(t) for t in ordered if t not in seen][:per_label]
        if len(prompts) < per_label:
            raise CorpusUnavailable(f"narrative benchmark: label {label!r} of {name!r} has {len(prompts)} texts from "
                                    f"{EVAL_SOURCES[name][label]}, fewer than {per_label}")
        out.extend((t, label) for t in prompts)
    return sorted(out, key=lambda p: _hash(f"{p[1]}\x00{p[0]}", f"eval-{seed}"))
