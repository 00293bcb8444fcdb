"""store_text and redaction; HMAC key configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from monitor.audit import AuditConfig, AuditWriter
from monitor.audit.config import AuditKeySettings
from monitor.audit.privacy import redact
from monitor.errors import ConfigError

PROMPT = "Mail jane.roe@example.org, call +44 20 7946 0958, see https://ex.com/x?id=9 from 10.1.2.3; I am 41."


@pytest.mark.parametrize(("text", "want"), [
    ("write to jane.roe@example.org today", "write to <EMAIL> today"),
    ("open https://ex.com/a?b=1 now", "open <URL> now"),
    ("host 192.168.0.12 and fe80::1ff:fe23:4567:890a", "host <IP> and <IP>"),
    ("call +1 (555) 123-4567", "call <DIGITS>"),
    ("card 4111 1111 1111 1111", "card <DIGITS>"),
    ("id 123e4567-e89b-12d3-a456-426614174000", "id <UUID>"),
    ("token sk-live-4f9a8b7c6d5e4f3a2b1c", "token <SECRET>"),
    ("I paid 3.50 for 2 items", "I paid <NUM> for <NUM> items"),
    ("the capital of France is", "the capital of France is"),
])
def test_redaction_replaces_identifiers(text: str, want: str) -> None:
    """Each documented identifier class is replaced by its tag; ordinary text is kept."""
    assert redact(text) == want


def _record(tmp_path: Path, store_text: str, **kw: object) -> dict:
    config = AuditConfig(directory=tmp_path, writer_id="w", store_text=store_text, **kw)  # type: ignore[arg-type]
    with AuditWriter(config) as w:
        return w.append("sample", {"sample_id": "s", "text": PROMPT}).data


def test_default_stores_only_a_digest(tmp_path: Path) -> None:
    """store_text=none keeps a SHA-256 digest and the length, never the text."""
    rec = _record(tmp_path, "none")
    assert rec["text_digest"].startswith("sha256:") and rec["text_chars"] == len(PROMPT)
    assert "text" not in rec and "text_redacted" not in rec


def test_digest_is_keyed_when_the_trail_is_signed(tmp_path: Path) -> None:
    """With an HMAC key the digest is keyed, so short prompts cannot be guessed from it."""
    rec = _record(tmp_path, "none", hmac_key=b"s" * 16)
    assert rec["text_digest"].startswith("hmac-sha256:")


def test_redacted_mode_stores_the_redacted_text(tmp_path: Path) -> None:
    """store_text=redacted keeps the redacted text and no identifier."""
    rec = _record(tmp_path, "redacted")
    assert rec["text_redacted"] == "Mail <EMAIL>, call <DIGITS>, see <URL> from <IP>; I am <NUM>."


def test_full_mode_stores_the_text(tmp_path: Path) -> None:
    """store_text=full keeps the verbatim text next to its digest."""
    assert _record(tmp_path, "full")["text"] == PROMPT


def test_short_inline_key_is_refused(tmp_path: Path) -> None:
    """An HMAC key under 16 bytes fails validation naming the field."""
    with pytest.raises(ValidationError, match="hmac_key"):
        AuditConfig(directory=tmp_path, writer_id="w", hmac_key=b"short")


def test_key_file_is_read_at_start_up(tmp_path: Path) -> None:
    """hmac_key_file (a mounted secret) is read, trailing newline ignored, and records are signed."""
    (tmp_path / "key").write_bytes(b"k" * 24 + b"\n")
    rec = _record(tmp_path, "none", hmac_key_file=tmp_path / "key")
    assert rec["hmac"].count(":") == 1


def test_unreadable_key_file_names_the_field(tmp_path: Path) -> None:
    """A missing key file raises ConfigError naming hmac_key_file."""
    config = AuditConfig(directory=tmp_path, writer_id="w", hmac_key_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="hmac_key_file"):
        AuditWriter(config)


def test_cli_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """LAYERWATCH_AUDIT_HMAC_KEY and the sidecar's LAYERWATCH_AUDIT__HMAC_KEY_FILE give the review tools' keys."""
    (tmp_path / "key").write_bytes(b"f" * 20)
    monkeypatch.setenv("LAYERWATCH_AUDIT_HMAC_KEY", "e" * 20)
    monkeypatch.setenv("LAYERWATCH_AUDIT__HMAC_KEY_FILE", str(tmp_path / "key"))
    assert AuditKeySettings().keys() == [b"e" * 20, b"f" * 20]


def test_bad_writer_id_is_refused(tmp_path: Path) -> None:
    """A writer id that is not a safe folder name fails validation."""
    with pytest.raises(ValidationError, match="writer_id"):
        AuditConfig(directory=tmp_path, writer_id="../etc")
