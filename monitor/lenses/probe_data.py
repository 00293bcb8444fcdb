"""Labelled probe data: reading the JSONL files and refusing bad sets before any training starts.

A probe set is a pair of labelled JSONL files, training and held-out (``{"text": ..., "label":
...}`` per line). :func:`read_labelled_jsonl` refuses, naming the file and the line, a line that
is empty, not JSON, not an object with a non-empty string ``text`` and a string ``label``, or not
UTF-8. :func:`check_probe_set` refuses, naming the file, the line and the label, a held-out label
that the training file does not have (an unknown label), a training label that the held-out file
lacks (label sets that differ), and a label with fewer examples than the quality bar needs
(:data:`~monitor.lenses.trust.MIN_TRAIN_PER_LABEL`, :data:`~monitor.lenses.trust.MIN_HELDOUT_PER_LABEL`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from monitor.lenses.trust import MIN_HELDOUT_PER_LABEL, MIN_TRAIN_PER_LABEL


class ProbeDataError(ValueError):
    """A labelled probe file cannot be trained on; the message names the file, line and label."""


@dataclass
class LabelledTexts:
    """Texts with string labels, where they came from, and (for files) each text's line number."""

    texts: list[str]
    labels: list[str]
    provenance: str = ""
    lines: list[int] = field(default_factory=list)

    def line_of(self, i: int) -> int:
        """The file line of text ``i`` (its 1-based position when no line numbers were kept)."""
        return self.lines[i] if i < len(self.lines) else i + 1

    def first_line(self, label: str) -> int:
        """The line of the first text labelled ``label``."""
        return self.line_of(self.labels.index(label))


def read_labelled_jsonl(path: str | os.PathLike[str]) -> LabelledTexts:
    """Read ``{"text": ..., "label": ...}`` lines; a bad line raises :class:`ProbeDataError`
    naming the file and the line."""
    texts, labels, lines = [], [], []
    raw = Path(path).read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()  # the newline that ends the last line
    for n, b in enumerate(raw, 1):
        try:
            line = b.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProbeDataError(f"{path}:{n}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        if not line.strip():
            raise ProbeDataError(f"{path}:{n}: empty line; every line must hold one {{\"text\": ..., \"label\": ...}}")
        try:
            doc = json.loads(line)
            text, label = doc["text"], doc["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ProbeDataError(f"{path}:{n}: expected {{\"text\": ..., \"label\": ...}} ({exc})") from exc
        if not isinstance(text, str) or not text.strip():
            raise ProbeDataError(f"{path}:{n}: 'text' must be a non-empty string, got {text!r:.60}")
        if isinstance(label, bool) or not isinstance(label, str | int) or not str(label).strip():
            raise ProbeDataError(f"{path}:{n}: 'label' must be a non-empty string, got {label!r:.60}")
        texts.append(text)
        labels.append(str(label))
        lines.append(n)
    if not texts:
        raise ProbeDataError(f"{path}: no labelled texts")
    return LabelledTexts(texts, labels, provenance=str(path), lines=lines)


def check_probe_set(name: str, train: LabelledTexts, heldout: LabelledTexts) -> None:
    """Refuse a probe set that cannot pass the quality bar or be measured, before any training:
    :class:`ProbeDataError` naming the file, the line and the label."""
    tr, he = train.provenance or f"{name} training texts", heldout.provenance or f"{name} held-out texts"
    have = Counter(train.labels)
    for i, label in enumerate(heldout.labels):
        if label not in have:
            raise ProbeDataError(f"probe {name!r}: {he}:{heldout.line_of(i)}: unknown label {label!r}; the training "
                                 f"file {tr} has labels {sorted(have)}")
    held = Counter(heldout.labels)
    for label in have:
        if label not in held:
            raise ProbeDataError(f"probe {name!r}: label {label!r} ({tr}:{train.first_line(label)}) has no held-out "
                                 f"text in {he}: the label sets of the two files differ")
    if len(have) < 2:
        raise ProbeDataError(f"probe {name!r}: {tr} has one label ({next(iter(have))!r}); a probe needs at least two")
    for texts, counts, least, path in ((train, have, MIN_TRAIN_PER_LABEL, tr), (heldout, held, MIN_HELDOUT_PER_LABEL, he)):
        for label, count in sorted(counts.items()):
            if count < least:
                raise ProbeDataError(
                    f"probe {name!r}: {path}:{texts.first_line(label)}: label {label!r} has {count} texts, fewer "
                    f"than the {least} a probe needs there to be measured against the quality bar; add texts")


def write_probe_jsonl(texts: LabelledTexts, path: Path) -> None:
    """Write labelled texts as JSONL (the format :func:`read_labelled_jsonl` reads)."""
    with path.open("w", encoding="utf-8") as fh:
        for t, lab in zip(texts.texts, texts.labels, strict=True):
            fh.write(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n")
