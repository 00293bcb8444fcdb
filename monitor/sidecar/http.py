"""The sidecar's HTTP endpoints (a bounded server, :mod:`monitor.httpserver`).

* ``/metrics``: Prometheus exposition of the sidecar's registry;
* ``/healthz``: 200 while the process is alive, 503 once the audit trail has failed for longer than
  ``audit.unhealthy_after_s`` (the orchestrator should restart it);
* ``/readyz``: 200 when the bundle is loaded, the transport answers, the audit trail writes and a
  baseline is loaded or being learned (the JSON body says which), else 503;
* ``/narratives``: ids of the recent narratives; ``/narratives/{sample_id}``: one narrative. Off
  by default (``narratives.serve``): 404 as for any unknown path. When on, behind a bearer token
  (401 without credentials, 403 with wrong ones, checked before the id is looked up) or on a
  loopback-only listener (:mod:`monitor.sidecar.access`).

Bind address, handler threads, the request deadline and the bound on waiting connections are
settings (``http_host``, ``http_threads``, ``http_timeout_s``, ``http_max_connections``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitor.httpserver import BoundedHTTPServer, BoundedRequestHandler
from monitor.sidecar.access import BearerToken, check_exposure

if TYPE_CHECKING:  # pragma: no cover
    from monitor.sidecar.service import Sidecar

LIST_MAX = 100  # ids listed by /narratives, newest last


class SidecarHTTPServer:
    """Serves one :class:`Sidecar`'s endpoints; ``host``/``port`` default to the settings'
    ``http_host``/``http_port`` (port 0 picks a free one). Narratives served without a token on a
    non-loopback address are refused here too (ConfigError), whatever the settings said."""

    def __init__(self, sidecar: Sidecar, host: str | None = None, port: int | None = None) -> None:
        s = sidecar.settings
        host = s.http_host if host is None else host
        port = s.http_port if port is None else port
        check_exposure(s.narratives, host)
        self.sidecar = sidecar
        token = BearerToken(s.narratives.bearer_token_file) if s.narratives.bearer_token_file else None
        self.server = BoundedHTTPServer(host, port, _make_handler(sidecar, s.narratives.serve, token),
                                        threads=s.http_threads, timeout_s=s.http_timeout_s,
                                        max_connections=s.http_max_connections)
        self.port = int(self.server.server_address[1])

    def start(self) -> SidecarHTTPServer:
        self.server.start()
        return self

    def close(self) -> None:
        self.server.close()


def _make_handler(sidecar: Sidecar, serve_narratives: bool, token: BearerToken | None) -> type[BoundedRequestHandler]:
    endpoints = ["/metrics", "/healthz", "/readyz"] + (["/narratives", "/narratives/{sample_id}"] if serve_narratives else [])

    class Handler(BoundedRequestHandler):
        server_version = "layerwatch"
        sys_version = ""

        def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(code, json.dumps(obj, default=str).encode(), headers=headers)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/metrics":
                self._send(200, generate_latest(sidecar.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                live, details = sidecar.liveness()
                self._json(200 if live else 503, {"status": "alive" if live else "not live", **details})
            elif path == "/readyz":
                ready, details = sidecar.readiness()
                self._json(200 if ready else 503, {"ready": ready, **details})
            elif serve_narratives and (path == "/narratives" or path.startswith("/narratives/")):
                self._narratives(path)
            else:
                self._json(404, {"error": "not found", "endpoints": endpoints})

        def _narratives(self, path: str) -> None:
            private = {"Cache-Control": "no-store"}
            if token is not None:
                auth = self.headers.get("Authorization")
                if not auth:
                    self._json(401, {"error": "the narratives endpoints need 'Authorization: Bearer <token>'"},
                               {**private, "WWW-Authenticate": 'Bearer realm="layerwatch narratives"'})
                    return
                if not token.check(auth):
                    self._json(403, {"error": "invalid bearer token"},
                               {**private, "WWW-Authenticate": 'Bearer realm="layerwatch narratives", error="invalid_token"'})
                    return
            if path == "/narratives":
                self._json(200, {"recent": sidecar.recent.ids(LIST_MAX)}, private)
                return
            item = sidecar.narrative(unquote(path.split("/", 2)[2]))
            if item is None:
                self._json(404, {"error": "unknown or expired sample id"}, private)
            else:
                self._json(200, item, private)

    return Handler
