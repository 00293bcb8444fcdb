"""Configuration: pydantic settings are the only place the environment is read.

* :class:`TapSettings`: ``LAYERWATCH_TAP_*`` (inside the inference server).
* :class:`RedisSettings`: how both sides authenticate to Redis and verify it (credentials from
  files, TLS files), the ``redis`` section of the tap's and the sidecar's settings.
* Sidecar settings live in :mod:`monitor.sidecar.config` (``LAYERWATCH_*``), built on the
  helpers here.

Errors are raised as :class:`~monitor.errors.ConfigError` with the field named, at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitor.errors import ConfigError
from monitor.urls import redact_url

PositionsMode = Literal["last", "all", "mean", "generated", "last+mean"]

S = TypeVar("S", bound=BaseModel)


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field (with its env-var spelling when given)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        env = f" (env {prefix}{loc.upper().replace('.', '__')})" if prefix and err["loc"] else ""
        lines.append(f"{loc}{env}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)


def build_settings(cls: type[S], prefix: str, **overrides: Any) -> S:
    """Instantiate a settings class, turning validation errors into a ConfigError naming fields."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix)) from None


class StreamSettings(BaseModel):
    """The sample stream, as the taps and the sidecars must both see it (the same values on both
    sides: the tap trims the stream, the sidecar reads it and compares its lag with the bound).

    The tap's and the sidecar's settings both take these fields from here."""

    stream: str = Field("layerwatch:samples", min_length=1, description="Stream (Redis key) of the samples: the taps publish to it, the sidecars read it; the same on both sides.")
    stream_maxlen: int = Field(10_000, ge=100, description="Approximate bound of the stream (the tap trims older entries; the sidecar's lag alert compares lag with it); the same on both sides.")


def _read_secret(path: Path) -> str:
    """A secret file's text without its trailing newline (``kubectl create secret --from-file``
    and editors add one)."""
    return path.read_text(encoding="utf-8").rstrip("\r\n")


class RedisSettings(BaseModel):
    """Credentials and TLS for Redis, read from files (mounted secrets), never from the
    environment or the URL: a password in a URL ends up in shell histories and process lists.

    The files are checked at start-up and read again whenever a connection is opened, so a
    rotated secret is picked up on the next reconnection. TLS needs a ``rediss://`` URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username_file: Path | None = Field(None, description="File holding the Redis ACL user name (default: the 'default' user).")
    password_file: Path | None = Field(None, description="File holding the Redis password (a mounted Secret; one trailing newline is ignored). Do not also put a password in the URL.")
    tls_ca_file: Path | None = Field(None, description="rediss://: PEM file of the CA that signed the server's certificate (default: the system's CAs).")
    tls_cert_file: Path | None = Field(None, description="rediss://: PEM client certificate, for a server that requires one (with tls_key_file).")
    tls_key_file: Path | None = Field(None, description="rediss://: PEM private key of tls_cert_file.")

    @field_validator("username_file", "password_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                text = _read_secret(v)
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read {v}: {getattr(exc, 'strerror', None) or exc}") from None
            if not text.strip():
                raise ValueError(f"{v} is empty")
        return v

    @model_validator(mode="after")
    def _cert_with_key(self) -> RedisSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (a client certificate and its key)")
        if self.username_file is not None and self.password_file is None:
            raise ValueError("username_file needs password_file")
        return self

    @property
    def tls(self) -> bool:
        """True when a TLS file is set."""
        return any(f is not None for f in (self.tls_ca_file, self.tls_cert_file, self.tls_key_file))

    def check_url(self, url: str, field: str) -> None:
        """Raise ValueError (naming ``field``) when ``url`` contradicts these settings: TLS files
        with a URL that is not ``rediss://``, or a password both in a file and in the URL."""
        scheme, _, rest = url.partition("://")
        if self.tls and scheme != "rediss":
            raise ValueError(f"redis.tls_*_file set but {field} is {redact_url(url)!r}: TLS needs a rediss:// URL")
        if self.password_file is not None and ("@" in rest.split("/", 1)[0] or "password=" in rest.lower()):
            raise ValueError(f"redis.password_file is set and {field} carries a password too; keep only the file")

    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password) read from the files now (None where no file is set)."""
        user = _read_secret(self.username_file) if self.username_file is not None else None
        password = _read_secret(self.password_file) if self.password_file is not None else None
        return user, password


class RedisEnvironment(BaseSettings):
    """The sidecar's ``redis`` section as the command-line tools read it from the environment
    (``LAYERWATCH_REDIS__<FIELD>``): ``layerwatch baseline ... --redis URL`` run in a sidecar's
    pod authenticates like the sidecar does."""

    model_config = SettingsConfigDict(env_prefix="LAYERWATCH_", env_nested_delimiter="__", extra="ignore")

    redis: RedisSettings = Field(default_factory=lambda: RedisSettings())


def redis_settings_from_environment() -> RedisSettings:
    """:class:`RedisEnvironment`'s section (ConfigError naming the variable on a bad file)."""
    return build_settings(RedisEnvironment, "LAYERWATCH_").redis


class TapSettings(BaseSettings, StreamSettings):
    """How the tap samples and ships hidden states. Env: ``LAYERWATCH_TAP_<FIELD>`` (the ``redis``
    section: ``LAYERWATCH_TAP_REDIS__<FIELD>``)."""

    model_config = SettingsConfigDict(env_prefix="LAYERWATCH_TAP_", env_nested_delimiter="__", extra="forbid")

    sample_rate: float = Field(0.01, ge=0.0, le=1.0, description="Fraction of requests sampled (deterministic by request id).")
    transport: str = Field("memory://default", description="memory://NAME, redis://HOST:PORT/DB or rediss://...")
    model_name: str | None = Field(None, description="Model label in metrics and records (default: the model's name_or_path).")
    layers: Literal["all"] | list[int] = Field("all", description="States to capture: 'all' or a list of indices (state N is always added).")
    positions: PositionsMode = Field("last+mean", description="last+mean: the mean over the prompt's tokens and its last token (lenses read the last token, the drift detector's context probes also the mean) | last prompt token | all prompt tokens (up to max_positions) | mean over them | each generated token (up to max_positions).")
    windows: int = Field(0, ge=0, le=256, description="Prompt windows per sample (issue 19): beside the positions above, the tap ships the means of up to this many contiguous, equal windows of the prompt's tokens at every captured state (monitor.windows), so the sidecar's local score (baseline.local_score) sees a short foreign segment anywhere in the prompt; 0 = off, the default while the local score is off by default (64 is the setting the wire budget is sized for). Wire cost, whatever the prompt's length: windows x states x hidden size x 2 bytes in float16 (64 x 31 x 576 x 2 = 2.3 MB per sample for SmolLM2-135M; 4 bytes each in float32), so size queue_max_bytes, max_payload_bytes and the stream (stream_maxlen x sample size of Redis memory) for it. Checked against max_payload_bytes when the tap attaches.")
    window_min_tokens: int = Field(4, ge=1, le=4096, description="Shortest prompt window in tokens: a prompt of n tokens gets min(windows, (n-1) // window_min_tokens) windows over its tokens 1..n-1 (token 0, the attention sink, is in none); a prompt of one token gets none.")
    max_positions: int = Field(32, ge=1, le=4096, description="Cap on positions per sample for 'all' and 'generated'.")
    max_samples_per_s: float | None = Field(None, gt=0, description="Per-process budget of sampled requests per second (token bucket); None = unlimited.")
    queue_max_items: int = Field(256, ge=1, description="Bound of the export queue in samples.")
    queue_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Bound of the export queue in bytes of captured tensors.")
    export_batch: int = Field(32, ge=1, description="Samples per publish call; a full batch wakes the exporter at once.")
    export_interval_s: float = Field(0.5, gt=0, le=60, description="Longest wait before a partial batch is exported (flush() does not wait).")
    max_payload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest encoded sample; bigger ones are dropped (encode_error).")
    wire_dtype: Literal["float16", "float32"] = Field("float16", description="Precision of the shipped hidden states: float16 (half the bytes; what the lenses read) or float32 (parity checks).")
    final_topk: int = Field(5, ge=1, le=100, description="How many of the model's own top tokens ride in each header.")
    backoff_initial_s: float = Field(0.5, gt=0, description="First wait after a transport failure; doubles up to backoff_max_s.")
    backoff_max_s: float = Field(5.0, gt=0, description="Longest wait between reconnection attempts (samples are dropped, as transport_down, meanwhile).")
    transport_timeout_s: float = Field(1.0, gt=0, le=60, description="Socket connect/read timeout of the exporter's Redis connection (a hung Redis costs the exporter thread at most this per attempt; never the serving thread).")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="Serve the tap's /metrics on this port (for servers without their own /metrics).")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="Bind address of metrics_port (loopback by default; 0.0.0.0 for a Prometheus in another pod). The tap's metrics hold counters only, never prompt-derived data.")
    sampling_key_file: Path | None = Field(None, description="File holding a secret key (>= 16 bytes): the sampling hash becomes an HMAC under it, so clients cannot pick request ids that are never sampled. Replicas must share it.")
    allow_request_control: bool = Field(False, description="vLLM: honour a request's own 'layerwatch' extra argument (vllm_xargs over HTTP: 'force' or 'skip'). Off by default: clients must not steer monitoring. Forced samples count against the budget.")
    redis: RedisSettings = Field(default_factory=lambda: RedisSettings(), description="Redis credentials and TLS files (see the sidecar's redis section).")

    @field_validator("transport")
    @classmethod
    def _transport_scheme(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("memory", "redis", "rediss", "unix"):
            raise ValueError(f"unsupported URL {redact_url(v)!r}; use memory://NAME, redis://HOST:PORT/DB or rediss://...")
        if scheme != "memory":
            import importlib.util

            if importlib.util.find_spec("redis") is None:
                raise ValueError(f"{redact_url(v)!r} needs the redis package: pip install 'layerwatch[redis]'")
        return v

    @field_validator("layers")
    @classmethod
    def _layers_non_negative(cls, v: Any) -> Any:
        if isinstance(v, list) and any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> TapSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        self.redis.check_url(self.transport, "transport")
        return self
