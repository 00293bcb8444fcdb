"""The sidecar's HTTP server under idle and slow clients (issue 17): ``python -m benchmarks.http_exposure``.

A real sidecar (tiny Llama, memory transport) serves its endpoints with the default HTTP settings.
``--idle`` connections each send half a request and go quiet, ``--drip`` connections send one
byte every 0.2 s; meanwhile ``--scrapes`` GET /metrics are timed one after another. Printed as
JSON: scrape latency (median, max, failures), threads before/after, the connections the server
closed by reason, and with ``--stdlib`` the same run against ``http.server.ThreadingHTTPServer``
(the server before issue 17) for comparison.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def _sidecar(tmp: Path) -> Any:
    from monitor.lenses.torch_lens import TorchLogitLens
    from monitor.sidecar.config import load_settings
    from monitor.sidecar.service import Sidecar
    from tests.conftest import make_tiny

    settings = load_settings(transport="memory://bench-http", group="g", http_port=0, warm_up=False,
                             audit={"directory": tmp / "audit"}, baseline={"learn_samples": 400})
    return Sidecar(settings, bank=TorchLogitLens(make_tiny("llama", seed=0)))


def _stdlib_server() -> Any:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a: Any) -> None:
            return

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.handle_error = lambda *_a: None  # type: ignore[method-assign]  # clients cut by the benchmark
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _attack(port: int, idle: int, drip: int, scrapes: int, seconds: float) -> dict[str, Any]:
    threads0 = threading.active_count()
    socks = []
    for _ in range(idle):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    stop = threading.Event()

    def dripper() -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            while not stop.is_set():
                s.sendall(b"X-Slow: y\r\n"[:1])
                time.sleep(0.2)
        except OSError:
            pass
        finally:
            s.close()

    drippers = [threading.Thread(target=dripper, daemon=True) for _ in range(drip)]
    for t in drippers:
        t.start()
    time.sleep(0.5)
    threads_under_attack = threading.active_count() - drip
    lat, failures = [], 0
    t_end = time.monotonic() + seconds
    for _ in range(scrapes):
        t0 = time.monotonic()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            lat.append(time.monotonic() - t0)
        except OSError:
            failures += 1
    while time.monotonic() < t_end:
        time.sleep(0.1)
    still_open = 0
    for s in socks:  # closed by the server: EOF (after a 408) or a reset; still open: nothing to read
        s.settimeout(0.01)
        try:
            s.recv(4096)
        except TimeoutError:
            still_open += 1
        except OSError:
            pass
    stop.set()
    for s in socks:
        s.close()
    return {"scrape_ms_median": round(1000 * statistics.median(lat), 2) if lat else None,
            "scrape_ms_max": round(1000 * max(lat), 2) if lat else None, "scrape_failures": failures,
            "server_threads_added": threads_under_attack - threads0,
            f"idle_still_open_after_{seconds:.0f}s": still_open}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=200)
    ap.add_argument("--drip", type=int, default=20)
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=8.0, help="how long to hold the attack before counting")
    ap.add_argument("--stdlib", action="store_true", help="also run against http.server.ThreadingHTTPServer")
    args = ap.parse_args(argv)
    from monitor.sidecar.http import SidecarHTTPServer

    out: dict[str, Any] = {"idle": args.idle, "drip": args.drip, "scrapes": args.scrapes}
    with tempfile.TemporaryDirectory() as tmp:
        sc = _sidecar(Path(tmp))
        http = SidecarHTTPServer(sc).start()
        s = sc.settings
        out["settings"] = {"http_threads": s.http_threads, "http_timeout_s": s.http_timeout_s,
                           "http_max_connections": s.http_max_connections}
        out["layerwatch"] = _attack(http.port, args.idle, args.drip, args.scrapes, args.seconds)
        st = http.server.stats
        out["layerwatch"]["closed"] = {"timed_out": st.timed_out, "evicted": st.evicted, "busy": st.busy}
        http.close()
        sc.processor.shutdown()
    if args.stdlib:
        srv = _stdlib_server()
        out["stdlib_threading_server"] = _attack(srv.server_address[1], args.idle, args.drip, args.scrapes,
                                                 args.seconds)
        srv.shutdown()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
