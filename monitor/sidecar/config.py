"""Sidecar configuration: ``LAYERWATCH_*`` environment variables and an optional YAML file.

Precedence: explicit arguments > environment > YAML file > defaults. Nested sections use
``__`` in environment names (``LAYERWATCH_AUDIT__DIRECTORY``). Everything is validated at
start-up; an error names the field and its environment variable.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from monitor.audit.config import AuditConfig, TrailSettings
from monitor.config import RedisSettings, StreamSettings, build_settings
from monitor.errors import ConfigError
from monitor.sidecar.access import NarrativeSettings, check_exposure
from monitor.urls import USAGE, is_backend_url, redact_config, redact_url


class AuditSettings(TrailSettings):
    """Where and how this replica writes its audit trail (``directory/<consumer>/``): the writer's
    settings (:class:`monitor.audit.config.TrailSettings`) with the sidecar's head-store default;
    the writer id is the consumer name."""

    AUTO_HEAD_STORE: ClassVar[bool] = True

    directory: Path = Field(Path("layerwatch-audit"), description="Root of the audit trails; each replica writes its own sub-folder.")
    head_store: str = Field("auto", description="Where the trail head is kept outside the segments: auto (Redis when the transport is Redis, else a file), file, file:DIR, redis://..., none.")

    def writer_config(self, writer_id: str, *, auto_head_store: str = "file") -> AuditConfig:
        """The writer's configuration; ``head_store: auto`` becomes ``auto_head_store``."""
        fields = self.model_dump()
        if fields["head_store"] == "auto":
            fields["head_store"] = auto_head_store
        return AuditConfig(writer_id=writer_id, **fields)


class BaselineSettings(BaseModel):
    """Which baseline scores samples, and how one is learned when there is none."""

    id: str | None = Field(None, description="Baseline id to load from Redis (default: the active one for this model).")
    file: Path | None = Field(None, description="Load the baseline from this JSON file instead of Redis.")
    learn_samples: int = Field(500, ge=20, description="Samples collected in learning mode before a baseline is built.")
    alpha: float = Field(0.01, gt=0, lt=1, description="Per-sample false-positive rate: flag when the conformal p-value is below it.")
    window: int = Field(200, ge=10, description="Samples per drift-test window.")
    watch: list[str] = Field([], description="Watched concepts, '<probe>=<label>' (e.g. 'topic@mean=legal'): each gets its own conformal p-value, combined with the anomaly score's (Bonferroni) so alpha stays the false-positive rate; needs (len(watch)+1)/alpha calibration samples in the baseline.")

    local_score: bool = Field(False, description="Fold the local anomaly score (a short foreign segment inside a prompt, read from the tap's prompt windows: set the tap's windows > 0) into the anomaly score, sharing alpha (75% whole-text, 25% local). Off by default: on held-out SmolLM2 data it does not yet find inserted segments (README, known limitations), and it takes a quarter of alpha from the whole-text score.")

    # --- following promote/rollback while running (issue 17) ---
    follow_active: bool = Field(True, description="Follow the shared store's active pointer while running: `layerwatch baseline promote` and `rollback` reach this replica within poll_interval_s, without a restart, with a baseline_changed audit record. Not when id or file pins a baseline.")
    poll_interval_s: float = Field(2.0, gt=0, le=10, description="How often the active baseline pointer is read (follow_active).")

    @model_validator(mode="after")
    def _check_watch(self) -> BaselineSettings:
        from monitor.drift.concepts import parse_concept

        names = ["=".join(parse_concept(w)) for w in self.watch]  # ValueError names the concept
        if len(set(names)) != len(names):
            raise ValueError(f"a concept is listed twice in {self.watch}")
        return self


class SidecarSettings(BaseSettings, StreamSettings):
    """Everything the sidecar needs. Env: ``LAYERWATCH_<FIELD>``, nested with ``__``.

    ``stream`` and ``stream_maxlen`` come from :class:`monitor.config.StreamSettings`, the fields
    the taps share (see its TODO for the tap's side)."""

    model_config = SettingsConfigDict(env_prefix="LAYERWATCH_", env_nested_delimiter="__", extra="forbid")

    transport: str = Field("memory://default", description="Where samples come from: memory://NAME, redis://..., rediss://...")
    group: str = Field("layerwatch", min_length=1, description="Consumer group shared by all replicas.")
    consumer: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", description="This replica's consumer name (default: hostname-pid).")
    model_name: str | None = Field(None, description="Model label in metrics (default: the label in each sample).")
    bundle: Path | None = Field(None, description="Lens bundle directory (manifest.json + ONNX files).")
    tokenizer: Path | None = Field(None, description="Hugging Face tokenizer directory used to print tokens in narratives when narratives.include_tokens is on (default: token ids as <id>).")
    http_host: str = Field("127.0.0.1", min_length=1, description="Bind address of /metrics, /healthz, /readyz (and /narratives when served): loopback by default; 0.0.0.0 for a Prometheus or kubelet probes from outside the pod (these endpoints hold no prompt-derived data).")
    http_port: int = Field(9400, ge=0, le=65535, description="HTTP port (0 = pick a free one).")
    http_threads: int = Field(4, ge=1, le=64, description="HTTP handler threads; complete requests beyond them queue (2 per thread), then get 503.")
    http_timeout_s: float = Field(5.0, gt=0, le=300, description="A request's head must arrive within this after the connection (else 408); also the socket timeout for writing the response.")
    http_max_connections: int = Field(64, ge=1, le=10_000, description="Connections waiting for their request head; a new one beyond this closes the oldest waiting one (idle clients cannot lock scrapes out).")
    narratives: NarrativeSettings = Field(default_factory=lambda: NarrativeSettings())
    batch_max: int = Field(16, ge=1, le=1024, description="Largest micro-batch.")
    batch_wait_ms: int = Field(50, ge=0, description="Longest wait to fill a micro-batch.")
    claim_idle_ms: int = Field(30_000, ge=100, description="Reclaim entries pending longer than this (their replica died).")
    claim_interval_s: float = Field(5.0, gt=0, description="How often to look for stale entries.")
    max_payload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Bigger samples are dead-lettered (oversized) without being read: Redis sends their size only, so one read holds at most batch_max x this many payload bytes.")
    max_deliveries: int = Field(5, ge=1, le=1000, description="An entry delivered more often than this (its replica kept dying or restarting while holding it) is dead-lettered as max_deliveries, counted with Redis's own delivery counter. A failure a message causes dead-letters it at its first delivery; infrastructure failures (Redis, disk) retry in place and never count.")
    dead_letter_maxlen: int = Field(1000, ge=1, description="Dead letters kept in <stream>:dead (the oldest are trimmed).")
    dead_letter_payload_max_bytes: int = Field(64 * 1024, ge=0, description="A dead-lettered payload larger than this is kept as its size and sha256 only: the dead-letter stream holds at most dead_letter_maxlen x this many payload bytes.")
    metric_models: list[str] = Field([], description="Model names, besides model_name (or the bundle's), that the model label of layerwatch_audit_records_total may take; any other name a sample carries is counted as 'other'.")
    ledger_ttl_s: int = Field(24 * 3600, ge=60, description="How long the idempotency ledger remembers a sample id at least (at most twice that); it guards re-deliveries after a replica died between its audit fsync and its ack. Redis memory: about 28 bytes per sample (see the README's bounds).")
    ort_threads: int = Field(1, ge=0, description="Lens-bank CPU threads: N > 1 reads each micro-batch as N concurrent single-threaded parts; 0 = ONNX Runtime's default.")
    warm_up: bool = Field(True, description="Read zero states at every micro-batch size at start-up, so memory is at its steady size before the first sample (a few seconds).")
    expect_gpu: bool = Field(False, description="The lens bank should run on CUDA; exported so an alert fires on CPU fallback.")
    recent_narratives: int = Field(1000, ge=0, le=100_000, description="Narratives kept for /narratives/{sample_id}.")
    shutdown_timeout_s: float = Field(10.0, gt=0, description="SIGTERM deadline: finish the batch, flush the audit, ack, exit.")
    stats_interval_s: float = Field(2.0, gt=0, description="How often lag/pending are read and readiness is re-checked.")
    audit: AuditSettings = Field(default_factory=lambda: AuditSettings())
    baseline: BaselineSettings = Field(default_factory=lambda: BaselineSettings())
    # Redis trust (issue 17): credentials and TLS from files, for every Redis connection this
    # process opens (transport, ledger, baselines, audit heads).
    redis: RedisSettings = Field(default_factory=lambda: RedisSettings(), description="Redis credentials and TLS files.")

    @model_validator(mode="after")
    def _check(self) -> SidecarSettings:
        if not is_backend_url(self.transport):
            raise ValueError(f"transport: unsupported URL {redact_url(self.transport)!r}; {USAGE}")
        self.redis.check_url(self.transport, "transport")
        try:
            check_exposure(self.narratives, self.http_host)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able data without secrets: what ``--check-config`` prints and the
        audit trail's ``config`` record holds (:func:`monitor.urls.redact_config`: every URL
        without credentials; SecretBytes already dump as "**********")."""
        return redact_config(self.model_dump(mode="json"))  # type: ignore[no-any-return]


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> SidecarSettings:
    """Settings from (explicit overrides >) environment > YAML file > defaults. The file is read by
    pydantic-settings' own YAML source; a file that is missing, not YAML or not a mapping is a
    ConfigError naming it."""
    path = config_file or os.environ.get("LAYERWATCH_CONFIG")
    yaml_source = _yaml_source(Path(path)) if path else None

    class _FromFile(SidecarSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,  # type: ignore[override]
                                       file_secret_settings):  # noqa: ANN001, ANN206
            return (init_settings, env_settings) + ((yaml_source,) if yaml_source is not None else ())

    return build_settings(_FromFile, "LAYERWATCH_", **overrides)


def _yaml_source(path: Path) -> YamlConfigSettingsSource:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    try:
        return YamlConfigSettingsSource(SidecarSettings, yaml_file=path)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except (TypeError, ValueError) as exc:  # a list or a scalar at the top
        raise ConfigError(f"config file {path}: top level must be a mapping") from exc
