"""Backend URLs, parsed in one place: ``memory://NAME``, ``redis://``, ``rediss://``, ``unix://``.

Every component that is chosen by a URL (transport, ledger, baseline store, head store) asks
:func:`parse_url` which backend it names instead of testing prefixes itself.

Redaction lives here too, as the one helper used wherever a URL or a configuration is printed,
logged, audited or served (``--check-config``, ``/readyz``, the audit ``config`` and checkpoint
records, error messages): :func:`redact_url` for one URL, :func:`redact_config` for a settings
dump. Both err on the side of hiding too much: whatever might be a credential becomes ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from monitor.errors import ConfigError

BackendKind = Literal["memory", "redis"]

# scheme -> backend kind; the only list of supported schemes.
SCHEMES: dict[str, BackendKind] = {"memory": "memory", "redis": "redis", "rediss": "redis", "unix": "redis"}
USAGE = "use memory://NAME, redis://HOST:PORT/DB, rediss://... or unix:///path/to/redis.sock"


@dataclass(frozen=True)
class BackendURL:
    """A parsed backend URL: ``kind`` says which backend serves it."""

    url: str
    scheme: str
    kind: BackendKind

    @property
    def shared(self) -> bool:
        """True when other processes (replicas, taps) see the same data: every kind but memory."""
        return self.kind != "memory"

    @property
    def redacted(self) -> str:
        """The URL without credentials (for logs, readiness and audit records)."""
        return redact_url(self.url)


def parse_url(url: str, *, field: str = "transport") -> BackendURL:
    """Parse ``url``; a ConfigError names ``field`` and the schemes that work."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    kind = SCHEMES.get(scheme)
    if kind is None:
        raise ConfigError(f"{field}: unsupported URL {redact_url(url)!r}; {USAGE}")
    return BackendURL(url, scheme, kind)


def is_backend_url(url: str) -> bool:
    """True when ``url`` names a supported backend."""
    return "://" in url and url.split("://", 1)[0] in SCHEMES


MASK = "***"
# ``password=...`` (and ``username=``/``user=``) in a query string, whatever follows it up to the next
# parameter: redis-py reads ``?password=`` as the password.
_QUERY_SECRET = re.compile(r"([?&;](?:password|passwd|pass|username|user)=)[^&;#]*", re.IGNORECASE)
# Keys of a configuration whose values are secrets themselves (a ``*_file`` path is not).
_SECRET_KEY = re.compile(r"(?:^|_)(?:password|passwd|secret|token|hmac_key|api_key|credentials?)$", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``.

    ``redis://user:pw@host/0`` and ``redis://:pw@host/0`` -> ``redis://***@host/0``; a password
    holding ``@``, ``/`` or ``?`` (percent-encoded or not) is hidden whole: everything between
    ``scheme://`` and the last ``@`` goes. ``?password=pw`` -> ``?password=***``. A string that is
    not a URL comes back unchanged.
    """
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    rest = _QUERY_SECRET.sub(rf"\1{MASK}", rest)
    if "@" in rest:  # the last '@' ends the user info, whatever the password holds
        rest = f"{MASK}@{rest.rsplit('@', 1)[1]}"
    return f"{scheme}://{rest}"


def strip_credentials(url: str) -> str:
    """Former name of :func:`redact_url`."""
    return redact_url(url)


def redact_config(data: Any) -> Any:
    """A copy of JSON-like ``data`` (a settings dump) that is safe to print, log, audit or serve:
    every string holding ``://`` goes through :func:`redact_url`, and the value of every key named
    like a secret (``password``, ``token``, ``secret``, ``hmac_key``, ...) becomes ``***``, unless
    it is empty. Paths of secret files (``password_file``) stay: they say where, not what."""
    if isinstance(data, Mapping):
        return {k: (MASK if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "") else redact_config(v))
                for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_config(v) for v in data]
    if isinstance(data, str) and "://" in data:
        return redact_url(data)
    return data
