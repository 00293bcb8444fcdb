"""What of a prompt's text goes into the audit trail (``store_text``).

* ``none`` (default): only a digest, ``text_digest``: ``sha256:<hex>``, or with an HMAC key
  ``hmac-sha256:<key id>:<hex>`` (a keyed digest, so short prompts cannot be found by guessing),
  and the length ``text_chars``. A reviewer who has the prompt can check it matches.
* ``redacted``: the digest plus ``text_redacted``, the text with these replaced, in this order:
  URLs ``<URL>``, e-mail addresses ``<EMAIL>``, IPv4/IPv6 addresses ``<IP>``, UUIDs ``<UUID>``,
  long secrets (20+ characters mixing letters and digits: API keys, tokens) ``<SECRET>``,
  long digit runs such as phone, card and account numbers (7+ digits, separators allowed)
  ``<DIGITS>``, and every remaining number ``<NUM>``. Names and free-text personal data are
  *not* found by this; keep ``none`` where prompts may contain them.
* ``full``: the digest plus the verbatim ``text``.

Layer narratives hold the lens' top predicted tokens, not the prompt, in every mode.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any, Literal

from monitor.audit.records import KeyRing

StoreText = Literal["none", "redacted", "full"]

_PATTERNS: tuple[tuple[str, str], ...] = (
    ("URL", r"\b(?:[a-zA-Z][a-zA-Z0-9+.-]*://|www\.)[^\s<>\"']+"),
    ("EMAIL", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    ("IP", r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
    ("UUID", r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"),
    ("SECRET", r"(?<![\w-])(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{20,}"),
    ("DIGITS", r"(?<![\w+])\+?\d(?:[ ().-]{0,2}\d){6,}(?!\w)"),
    ("NUM", r"\d+(?:[.,]\d+)*"),
)
# IPv6 has too many spellings for one regex: find candidates, let ipaddress decide.
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?(?![\w:])")
_COMBINED = re.compile("|".join(f"(?P<{name}{i}>{pattern})" for i, (name, pattern) in enumerate(_PATTERNS)))


def redact(text: str) -> str:
    """``text`` with identifiers replaced by ``<URL>``, ``<EMAIL>``, ``<IP>``, ... (see module doc)."""

    def ipv6(match: re.Match[str]) -> str:
        try:
            ipaddress.IPv6Address(match.group(0))
        except ValueError:
            return match.group(0)
        return "<IP>"

    def replace(match: re.Match[str]) -> str:
        name = (match.lastgroup or "NUM").rstrip("0123456789")
        return f"<{name}>"

    return _COMBINED.sub(replace, _IPV6_CANDIDATE.sub(ipv6, text))


def text_digest(text: str, keys: KeyRing | None = None) -> str:
    """Digest of the text: keyed (``hmac-sha256:<kid>:<hex>``) when a key is set, else SHA-256."""
    data = text.encode("utf-8", "surrogatepass")
    if keys:
        return "hmac-sha256:" + keys.sign(hashlib.sha256(data).hexdigest())
    return "sha256:" + hashlib.sha256(data).hexdigest()


def text_fields(text: str, mode: StoreText, keys: KeyRing | None = None) -> dict[str, Any]:
    """The record fields that stand for ``text`` under policy ``mode``."""
    fields: dict[str, Any] = {"text_digest": text_digest(text, keys), "text_chars": len(text)}
    if mode == "redacted":
        fields["text_redacted"] = redact(text)
    elif mode == "full":
        fields["text"] = text
    return fields
