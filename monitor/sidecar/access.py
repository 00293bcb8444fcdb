"""Who may read what over the sidecar's HTTP port, and what a narrative may hold.

* ``/metrics``, ``/healthz`` and ``/readyz`` hold counters, readings aggregated over samples and
  the sidecar's state: never a prompt, a token, a request id or a sample id. They are served to
  whoever reaches the listener (``http_host``: loopback by default; a Prometheus in another pod
  needs ``0.0.0.0``).
* ``/narratives`` and ``/narratives/{sample_id}`` hold one request's readings: off by default
  (``narratives.serve``). When on, every request carries ``Authorization: Bearer <token>``, the
  token read from ``narratives.bearer_token_file`` (a mounted secret, re-read when the file
  changes, compared in constant time); without a token file the listener itself must be
  loopback-only (``http_host`` 127.0.0.1 or ::1; a kube-rbac-proxy or ``kubectl port-forward`` in
  front). The credentials are checked before the sample id is looked up, so an unauthenticated
  client cannot tell a known id from an unknown one.
* What a narrative holds (``narratives.include_tokens``): by default neither the audit records nor
  the served narratives carry token strings or token ids, since the top tokens of a layer can
  spell the prompt out ("My name is John Sm" reads 'ith'); they keep the numeric readings
  (top-k probabilities, entropy, KL, rank, prediction depth, probe labels, flags).
* Which probe readings a narrative prints: only those at layers that pass the bundle's quality
  bar (:mod:`monitor.lenses.trust`); ``narratives.min_probe_margin`` and
  ``narratives.min_probe_confidence`` can only make that bar stricter.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from monitor.errors import ConfigError

log = logging.getLogger("layerwatch.sidecar")

MIN_TOKEN_CHARS = 16


class NarrativeSettings(BaseModel):
    """The ``narratives`` section: whether the endpoints are served, behind what, and whether
    narratives (served and audited) name tokens."""

    serve: bool = Field(False, description="Serve /narratives and /narratives/{sample_id} (off by default). When on, they need a bearer token (bearer_token_file) or a loopback-only http_host.")
    bearer_token_file: Path | None = Field(None, description="File holding the bearer token of the narratives endpoints (a mounted secret, >= 16 characters; re-read when it changes). Requests carry 'Authorization: Bearer <token>'.")
    include_tokens: bool = Field(False, description="Narratives (audit records and /narratives) carry the lens' top token strings and ids. Off by default: a layer's top tokens can spell out the prompt; the numeric readings stay.")
    min_probe_margin: float | None = Field(None, ge=0.0, le=1.0, description="A stricter quality bar for printing concept probes: the held-out accuracy a probe layer must have over its control task (the bundle's own margin, 0.10 when built by this version, applies when unset; a lower value is refused at start-up).")
    min_probe_confidence: float | None = Field(None, ge=0.0, le=1.0, description="A stricter abstention threshold: a reliable probe reading whose top probability is below it reads 'none of these' (the bundle's own threshold, 0.60 when built by this version, applies when unset; a lower value is refused at start-up).")

    @model_validator(mode="after")
    def _check_token_file(self) -> NarrativeSettings:
        if self.bearer_token_file is not None:
            read_token(self.bearer_token_file)  # unreadable or too short: fail at start-up
        return self


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace ignored); ValueError naming the setting when
    the file cannot be read or the token is shorter than 16 characters."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"narratives.bearer_token_file: cannot read {path}: {exc}") from exc
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"narratives.bearer_token_file: the token in {path} has {len(token)} characters; "
                         f"use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")
    return token


def is_loopback(host: str) -> bool:
    """True for a loopback bind address (127.0.0.0/8, ::1, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: NarrativeSettings, http_host: str) -> None:
    """Narratives served without a token need a loopback-only listener: ConfigError otherwise."""
    if settings.serve and settings.bearer_token_file is None and not is_loopback(http_host):
        raise ConfigError(
            f"narratives.serve: the narratives endpoints need narratives.bearer_token_file (a mounted secret) "
            f"when http_host is {http_host!r}, which is not a loopback address; set the token file, or bind "
            "http_host to 127.0.0.1 and put an authenticating proxy in front")


class BearerToken:
    """The narratives' bearer token from a file, re-read when the file changes (a rotated secret);
    a file that becomes unreadable denies every request until it is readable again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int, int] | None = None
        self._token: bytes | None = None
        self._load()

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._token is not None:
                log.error("narratives.bearer_token_file %s is unreadable (%s): denying narratives", self.path, exc)
            self._stamp, self._token = None, None
            return
        stamp = (st.st_mtime, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            self._token = read_token(self.path).encode("utf-8")
        except ValueError as exc:
            log.error("%s: denying narratives", exc)
            self._token = None
        self._stamp = stamp

    def check(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (constant-time compare)."""
        with self._lock:
            self._load()
            token = self._token
        if token is None or not authorization:
            return False
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token)
