"""The sidecar's HTTP endpoints (stdlib server on a daemon thread).

* ``/metrics``: Prometheus exposition of the sidecar's registry;
* ``/healthz``: 200 while the process is alive, 503 once the audit trail has failed for longer than
  ``audit.unhealthy_after_s`` (the orchestrator should restart it);
* ``/readyz``: 200 when the bundle is loaded, the transport answers, the audit trail writes and a
  baseline is loaded or being learned (the JSON body says which), else 503;
* ``/narratives``: ids of the recent narratives; ``/narratives/{sample_id}``: one narrative.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:  # pragma: no cover
    from monitor.sidecar.service import Sidecar


class SidecarHTTPServer:
    """Serves one :class:`Sidecar`'s endpoints; ``port`` 0 picks a free port."""

    def __init__(self, sidecar: Sidecar, host: str = "0.0.0.0", port: int = 9400) -> None:
        self.sidecar = sidecar
        handler = _make_handler(sidecar)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="layerwatch-http", daemon=True)

    def start(self) -> SidecarHTTPServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _make_handler(sidecar: Sidecar) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "layerwatch"

        def log_message(self, *_args: Any) -> None:  # no access log per scrape
            return

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj, default=str).encode())

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
            elif path == "/narratives":
                self._json(200, {"recent": sidecar.recent.ids(100)})
            elif path.startswith("/narratives/"):
                item = sidecar.narrative(path.rsplit("/", 1)[1])
                if item is None:
                    self._json(404, {"error": "unknown or expired sample id"})
                else:
                    self._json(200, item)
            else:
                self._json(404, {"error": "not found", "endpoints": ["/metrics", "/healthz", "/readyz", "/narratives/{sample_id}"]})

    return Handler
