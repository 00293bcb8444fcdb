"""Raw source readers, one per source kind (HTML books, dictionaries, man pages, fortunes, licences, source code); each returns documents = lists of paragraphs, cached."""

from __future__ import annotations

import functools
import glob
import gzip
import re
import sysconfig
import textwrap
from collections.abc import Callable
from pathlib import Path

from monitor.corpora.markup import html_paragraphs, normalise, roff_paragraphs
from monitor.corpora.sources import (
    _COPYRIGHT_PACKAGES,
    _DICTD_ROOT,
    _DOC_ROOT,
    _FORTUNE_FILES,
    _FORTUNES_ROOT,
    _HANDBOOK_LANG,
    _HANDBOOK_ROOT,
    _LICENSES_ROOT,
    _MAN_PACKAGE,
    _OTHER_HANDBOOK_LANG,
    _PYDOC_ROOT,
    _REFERENCE_ROOT,
    SHORT_MAX_CHARS,
    SHORT_MIN_CHARS,
    _need_dir,
    _need_file,
    _package_files,
)

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
    root = _need_dir("debian-handbook", f"{_HANDBOOK_ROOT}/{_HANDBOOK_LANG.get(lang) or _OTHER_HANDBOOK_LANG[lang]}")
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
    return _fortune_entries("fortunes-en", _FORTUNE_FILES)


@functools.cache
def _fortune_entries(source: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The entries of fortune files ``names`` (attribution lines dropped)."""
    out: list[str] = []
    for name in names:
        raw = _need_file(source, f"{_FORTUNES_ROOT}/{name}").read_text(encoding="utf-8", errors="replace")
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
