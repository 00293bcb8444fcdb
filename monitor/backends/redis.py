"""The Redis backend: one connection pool per process, one set of timeouts, one error mapping.

Everything layerwatch keeps in Redis (the sample stream, the ledger, baselines, audit heads)
connects through :func:`connect`, so a process holds one pool per URL (and per timeout pair:
the tap's exporter asks for its own, shorter ones) instead of one per component, and every
redis-py error is translated by :func:`mapped_errors` into the project's exception tree::

    redis.ResponseError  -> <error class>("<what>: <server message>")
    redis.AuthenticationError -> <error class>("<what>: Redis at <url> refused the credentials (...)")
    redis.RedisError     -> <error class>("<what>: Redis at <url> is unavailable (...); check the URL")

Timeouts (:data:`TIMEOUTS`): connecting waits at most 1 s, a command at most 2 s; no retry on a
timeout (the caller decides: the sidecar leaves entries pending, the tap drops and backs off).
Pools are per process: a forked child (gunicorn workers) opens its own on first use.

Trust (:class:`monitor.config.RedisSettings`, the ``redis`` section of the tap's and the
sidecar's settings): the user name and password come from files, read again by
:class:`FileCredentials` each time a connection is opened (a rotated Secret is picked up at the
next reconnection); a ``rediss://`` URL verifies the server against ``tls_ca_file`` and presents
``tls_cert_file``/``tls_key_file`` when set. Every URL in a message is redacted
(:func:`monitor.urls.redact_url`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.credentials import CredentialProvider
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from monitor.config import RedisSettings
from monitor.errors import LayerwatchError, TransportError
from monitor.urls import BackendURL, parse_url, redact_url

if TYPE_CHECKING:  # pragma: no cover
    from monitor.backends.ledger_redis import RedisLedger
    from monitor.transport.base import Transport


@dataclass(frozen=True)
class Timeouts:
    """Socket timeouts of a Redis connection, in seconds."""

    connect_s: float = 1.0
    command_s: float = 2.0


TIMEOUTS = Timeouts()
NO_SETTINGS = RedisSettings()

_POOLS: dict[tuple[int, str, Timeouts, RedisSettings], redis.ConnectionPool] = {}
_POOLS_LOCK = threading.Lock()


class FileCredentials(CredentialProvider):
    """The user name and password of :class:`RedisSettings`, read from their files each time
    redis-py opens a connection (so a rotated Secret needs no restart)."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        try:
            user, password = self.settings.credentials()
        except OSError as exc:
            raise redis.AuthenticationError(f"cannot read the Redis credentials: {exc}") from exc
        return (user, password or "") if user else (password or "",)


def connection_options(url: str, settings: RedisSettings) -> dict[str, Any]:
    """redis-py connection keywords for ``settings`` (credentials provider, TLS files)."""
    options: dict[str, Any] = {}
    if settings.password_file is not None:
        options["credential_provider"] = FileCredentials(settings)
    if url.startswith("rediss://"):
        options.update(ssl_cert_reqs="required", ssl_ca_certs=_str(settings.tls_ca_file),
                       ssl_certfile=_str(settings.tls_cert_file), ssl_keyfile=_str(settings.tls_key_file))
    return options


def _str(path: Any) -> str | None:
    return str(path) if path is not None else None


def connect(url: str, timeouts: Timeouts = TIMEOUTS, settings: RedisSettings = NO_SETTINGS) -> redis.Redis:
    """A client on this process's pool for ``url`` and ``settings`` (created on first use)."""
    key = (os.getpid(), url, timeouts, settings)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            try:
                pool = redis.ConnectionPool.from_url(
                    url, socket_timeout=timeouts.command_s, socket_connect_timeout=timeouts.connect_s,
                    retry_on_timeout=False, health_check_interval=10, **connection_options(url, settings))
            except ValueError as exc:
                raise TransportError(f"invalid redis URL {redact_url(url)!r}: {exc}") from exc
            _POOLS[key] = pool
    return redis.Redis(connection_pool=pool)


@contextmanager
def mapped_errors(error: type[LayerwatchError], what: str, url: str = "") -> Iterator[None]:
    """Run a block of Redis calls, raising ``error`` (with ``what`` in its message) on failure."""
    try:
        yield
    except ResponseError as exc:
        raise error(f"{what}: {exc}") from exc
    except AuthenticationError as exc:  # NOAUTH, WRONGPASS: no or wrong credentials
        where = f" at {redact_url(url)}" if url else ""
        raise error(f"{what}: Redis{where} refused the credentials ({exc}); check redis.password_file "
                    "(and redis.username_file)") from exc
    except RedisError as exc:
        where = f" at {redact_url(url)}" if url else ""
        raise error(f"{what}: Redis{where} is unavailable ({exc}); check the Redis URL") from exc


class RedisBackend:
    """Hands out the stream transport, the ledger and clients, all on one pool."""

    def __init__(self, url: BackendURL | str, timeouts: Timeouts = TIMEOUTS,
                 settings: RedisSettings = NO_SETTINGS) -> None:
        self.url = url if isinstance(url, BackendURL) else parse_url(url)
        self.timeouts = timeouts
        self.settings = settings

    def client(self) -> redis.Redis:
        """A client on the shared pool (for the baseline store and the audit head store)."""
        return connect(self.url.url, self.timeouts, self.settings)

    def transport(self, *, stream: str, maxlen: int, **options: Any) -> Transport:
        """The Redis Streams transport on the shared pool."""
        from monitor.transport.redis import RedisTransport

        return RedisTransport(self.url.url, stream=stream, maxlen=maxlen, client=self.client(), **options)

    def ledger(self, *, key_prefix: str, ttl_s: int) -> RedisLedger:
        """The ledger shared by every replica of the consumer group."""
        from monitor.backends.ledger_redis import RedisLedger

        return RedisLedger(self.client(), key_prefix, ttl_s, self.url.url)

    def close(self) -> None:
        """Disconnect this process's pool for the URL (clients reconnect on next use)."""
        with _POOLS_LOCK:
            pool = _POOLS.pop((os.getpid(), self.url.url, self.timeouts, self.settings), None)
        if pool is not None:
            pool.disconnect()


def close_all() -> None:
    """Disconnect every pool of this process (tests and shutdown)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for p in pools:
        p.disconnect()


def url_of(client: Any) -> str:
    """The redacted address a client talks to (for error messages and ``describe()``)."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
