"""Configuration of one audit trail writer (a pydantic model the sidecar's settings nest)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretBytes, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitor.errors import ConfigError
from monitor.urls import is_backend_url, parse_url, redact_url

MIN_KEY_BYTES = 16


class TrailSettings(BaseModel):
    """How a trail is written: every setting of :class:`AuditConfig` but the writer's identity.

    The sidecar's ``audit`` section (:class:`monitor.sidecar.config.AuditSettings`) is this model
    with sidecar defaults, so the two cannot drift apart."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    AUTO_HEAD_STORE: ClassVar[bool] = False  # may head_store be "auto" (the sidecar decides)?

    directory: Path = Field(Path("layerwatch-audit"), description="Root of the audit trails; each writer uses its own sub-folder.")
    fsync: Literal["every_record", "every_n", "interval"] = Field(
        default="every_record",
        description="every_record: each append()/append_many() call is durable when it returns; "
        "every_n: fsync after fsync_every_n records; interval: at most fsync_interval_s after a write.")
    fsync_every_n: int = Field(default=64, ge=1, description="Records per fsync with fsync=every_n.")
    fsync_interval_s: float = Field(default=1.0, gt=0, description="Seconds between fsyncs with fsync=interval.")
    max_segment_bytes: int = Field(default=64 * 1024 * 1024, ge=256, description="Rotate a segment once it reaches this size.")
    max_segment_age_s: float | None = Field(default=86400.0, gt=0, description="Rotate a segment once it is this old.")
    hmac_key: SecretBytes | None = Field(
        default=None, description="HMAC-SHA256 key signing every record (>= 16 bytes). Exclusive with hmac_key_file.")
    hmac_key_file: Path | None = Field(
        default=None, description="File holding the HMAC key (a mounted secret); trailing newlines are ignored.")
    store_text: Literal["none", "redacted", "full"] = Field(
        default="none", description="Prompt text in sample records: none (digest only), redacted, or full.")
    head_store: str = Field(
        default="file",
        description="Where the head (last durable seq and hash) is kept outside the segments: 'file' "
        "(HEAD.json in the trail), 'file:DIR' (DIR/<writer_id>.head.json), 'redis://...' / 'rediss://...' "
        "(key head_key_prefix + writer_id), or 'none' (a cut tail then cannot be detected).")
    head_key_prefix: str = Field(default="layerwatch:audit:head:", description="Redis key prefix of the heads.")
    retention_max_segments: int | None = Field(
        default=None, ge=2, description="Prune the oldest segments beyond this many (checked at each rotation).")
    retention_max_age_s: float | None = Field(
        default=None, gt=0, description="Prune segments whose records are all older than this (checked at each rotation).")
    # --- disk faults (issue 17) ---
    recover_interval_s: float = Field(
        default=1.0, gt=0, description="After a failed write or fsync (disk full, I/O error), how often the writer tries "
        "to recover: quarantine what was not durable, re-verify the tail, continue the chain.")
    unhealthy_after_s: float = Field(
        default=120.0, gt=0, description="A writer still failing after this long (or one fsync hung this long) "
        "reports the process not live (/healthz 503), so the orchestrator restarts it; /readyz is 503 from the "
        "first failure.")

    @model_validator(mode="after")
    def _check(self) -> TrailSettings:
        if self.hmac_key is not None and self.hmac_key_file is not None:
            raise ValueError("set either hmac_key or hmac_key_file, not both")
        if self.hmac_key is not None and len(self.hmac_key.get_secret_value()) < MIN_KEY_BYTES:
            raise ValueError(f"hmac_key must be at least {MIN_KEY_BYTES} bytes")
        spec = self.head_store
        if not (spec in ("file", "none") or spec.startswith("file:") or (spec == "auto" and self.AUTO_HEAD_STORE)
                or (is_backend_url(spec) and parse_url(spec).kind == "redis")):
            raise ValueError(f"head_store {redact_url(spec)!r}: use 'file', 'file:DIR', 'redis://...', 'rediss://...' or 'none'")
        return self


class AuditConfig(TrailSettings):
    """How one writer (one sidecar replica) writes its trail, ``directory/writer_id/``."""

    directory: Path = Field(description="Root of the audit trails; each writer uses its own sub-folder.")
    writer_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="This writer's id (one per sidecar replica), also the trail's folder name.")

    @property
    def trail_dir(self) -> Path:
        """The folder holding this writer's segments: ``directory / writer_id``."""
        return self.directory / self.writer_id

    def load_hmac_key(self) -> bytes | None:
        """The HMAC key (read from ``hmac_key_file`` if set), or None."""
        if self.hmac_key is not None:
            return self.hmac_key.get_secret_value()
        if self.hmac_key_file is not None:
            return read_key_file(self.hmac_key_file, field="hmac_key_file")
        return None


def read_key_file(path: Path, *, field: str = "hmac key file") -> bytes:
    """Read an HMAC key from a (mounted secret) file; raises ConfigError naming ``field``."""
    try:
        key = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror or exc}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{field}: the key in {path} is {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key


class AuditKeySettings(BaseSettings):
    """HMAC key(s) for the review CLI, from ``LAYERWATCH_AUDIT_HMAC_KEY`` / ``..._KEY_FILE``, or
    the sidecar's nested spelling ``LAYERWATCH_AUDIT__HMAC_KEY`` / ``..._KEY_FILE``."""

    model_config = SettingsConfigDict(extra="ignore")

    hmac_key: SecretBytes | None = Field(
        default=None, validation_alias=AliasChoices("LAYERWATCH_AUDIT_HMAC_KEY", "LAYERWATCH_AUDIT__HMAC_KEY"))
    hmac_key_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("LAYERWATCH_AUDIT_HMAC_KEY_FILE", "LAYERWATCH_AUDIT__HMAC_KEY_FILE"))

    def keys(self) -> list[bytes]:
        """The keys these settings name (possibly none)."""
        keys: list[bytes] = []
        if self.hmac_key is not None:
            key = self.hmac_key.get_secret_value()
            if len(key) < MIN_KEY_BYTES:
                raise ConfigError(f"LAYERWATCH_AUDIT_HMAC_KEY must be at least {MIN_KEY_BYTES} bytes")
            keys.append(key)
        if self.hmac_key_file is not None:
            keys.append(read_key_file(self.hmac_key_file, field="LAYERWATCH_AUDIT_HMAC_KEY_FILE"))
        return keys
