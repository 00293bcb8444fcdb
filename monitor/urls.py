"""Backend URLs, parsed in one place: ``memory://NAME``, ``redis://``, ``rediss://``, ``unix://``.

Every component that is chosen by a URL (transport, ledger, baseline store, head store) asks
:func:`parse_url` which backend it names instead of testing prefixes itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

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
        return strip_credentials(self.url)


def parse_url(url: str, *, field: str = "transport") -> BackendURL:
    """Parse ``url``; a ConfigError names ``field`` and the schemes that work."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    kind = SCHEMES.get(scheme)
    if kind is None:
        raise ConfigError(f"{field}: unsupported URL {url!r}; {USAGE}")
    return BackendURL(url, scheme, kind)


def is_backend_url(url: str) -> bool:
    """True when ``url`` names a supported backend."""
    return "://" in url and url.split("://", 1)[0] in SCHEMES


def strip_credentials(url: str) -> str:
    """``redis://user:pw@host/0`` -> ``redis://***@host/0`` (``memory://`` URLs unchanged)."""
    return re.sub(r"^([a-z]+://)[^@/]*@", r"\1***@", url)
