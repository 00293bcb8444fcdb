"""A small HTTP/1.0 server whose cost is bounded whatever the clients do.

``http.server.ThreadingHTTPServer`` gives every connection a thread that waits, without a
timeout, for the request to arrive: 200 idle half-requests hold 200 threads. Here:

* one thread accepts connections and reads request heads with a selector; a connection costs a
  thread only once its whole head (through the blank line) has arrived;
* a head must arrive within ``timeout_s`` of the connection (a deadline, so a client dripping one
  byte at a time gains nothing) and fit in ``max_head_bytes``; otherwise 408 / 431 and closed;
* at most ``max_connections`` connections wait for their heads; a new one beyond that evicts the
  oldest waiting one, so idle connections cannot lock a scrape out;
* ``threads`` workers handle complete requests from a queue of ``2 * threads``; a request that
  finds the queue full gets 503 at once; a worker's socket has ``timeout_s`` too (a client that
  does not read its response is dropped).

Handlers are :class:`http.server.BaseHTTPRequestHandler` subclasses built on
:class:`BoundedRequestHandler`; only requests without a body (GET, HEAD) are expected.
"""

from __future__ import annotations

import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

log = logging.getLogger("layerwatch.sidecar")

_HEAD_END = (b"\r\n\r\n", b"\n\n")


def _canned(code: int, reason: str) -> bytes:
    body = f'{{"error": "{reason}"}}'.encode()
    return (f"HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


@dataclass
class ServerStats:
    """Connections the server turned away, by reason (read by tests and logs)."""

    served: int = 0
    timed_out: int = 0  # no complete head within timeout_s (408)
    evicted: int = 0  # the oldest waiting connection, closed to make room
    too_large: int = 0  # head over max_head_bytes (431)
    busy: int = 0  # every worker busy and the queue full (503)
    errors: dict[str, int] = field(default_factory=dict)


class _SocketWriter(io.BufferedIOBase):
    """``wfile`` of a handler: every write is one ``sendall`` (under the socket's timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        return len(b)


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """Reads the head the acceptor already read; writes straight to the socket."""

    server: BoundedHTTPServer  # type: ignore[assignment]

    def setup(self) -> None:
        sock, head = self.request
        self.connection = sock
        sock.settimeout(self.server.timeout_s)
        self.rfile = io.BytesIO(head)
        self.wfile = _SocketWriter(sock)

    def log_message(self, *_args: Any) -> None:  # no access log per scrape
        return


class BoundedHTTPServer:
    """Serves ``handler`` on ``(host, port)`` (port 0 picks a free one) with the bounds above."""

    def __init__(self, host: str, port: int, handler: type[BoundedRequestHandler], *, threads: int = 4,
                 timeout_s: float = 5.0, max_connections: int = 64, max_head_bytes: int = 16 * 1024) -> None:
        self.handler, self.timeout_s = handler, timeout_s
        self.max_connections, self.max_head_bytes = max_connections, max_head_bytes
        self.stats = ServerStats()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._waiting: OrderedDict[socket.socket, tuple[float, bytearray, Any]] = OrderedDict()
        self._queue: queue.Queue[tuple[socket.socket, bytes, Any] | None] = queue.Queue(maxsize=2 * threads)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"layerwatch-http-{i}", daemon=True)
                         for i in range(threads)]
        self._acceptor = threading.Thread(target=self._serve, name="layerwatch-http", daemon=True)

    def start(self) -> BoundedHTTPServer:
        for t in self._threads:
            t.start()
        self._acceptor.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, let the workers finish their request, close every socket."""
        self._stop.set()
        self._wake_w.send(b"x")
        if self._acceptor.is_alive():
            self._acceptor.join(timeout)
        for _ in self._threads:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                break
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)
        for conn in list(self._waiting):
            self._drop(conn)
        self._selector.close()
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()

    # --- the acceptor thread ----------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            wait = 0.5
            if self._waiting:
                wait = max(0.0, min(wait, next(iter(self._waiting.values()))[0] - time.monotonic()))
            for key, _ in self._selector.select(wait):
                sock = key.fileobj
                try:
                    if sock is self.socket:
                        self._accept()
                    elif sock is self._wake_r:
                        self._wake_r.recv(64)
                    else:
                        self._read(sock)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - the acceptor must outlive any one connection
                    log.exception("http acceptor: unexpected error")
            self._expire()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: wait for the next round
                log.warning("http accept failed: %s", exc)
                return
            conn.setblocking(False)
            while len(self._waiting) >= self.max_connections:
                oldest = next(iter(self._waiting))
                self.stats.evicted += 1
                self._drop(oldest)
            self._waiting[conn] = (time.monotonic() + self.timeout_s, bytearray(), addr)
            self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        waiting = self._waiting.get(conn)
        if waiting is None:  # evicted by an accept earlier in this round
            return
        _, buf, addr = waiting
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        buf += chunk
        if any(end in buf for end in _HEAD_END):
            self._selector.unregister(conn)
            del self._waiting[conn]
            try:
                self._queue.put_nowait((conn, bytes(buf), addr))
            except queue.Full:
                self.stats.busy += 1
                self._refuse(conn, 503, "Service Unavailable")
        elif len(buf) > self.max_head_bytes:
            self.stats.too_large += 1
            self._drop(conn, _canned(431, "Request Header Fields Too Large"))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting:
            conn, (deadline, _, _) = next(iter(self._waiting.items()))
            if deadline > now:
                return
            self.stats.timed_out += 1
            self._drop(conn, _canned(408, "Request Timeout"))

    def _drop(self, conn: socket.socket, reply: bytes = b"") -> None:
        if self._waiting.pop(conn, None) is not None:
            self._selector.unregister(conn)
        self._refuse(conn, reply=reply)

    @staticmethod
    def _refuse(conn: socket.socket, code: int = 0, reason: str = "", reply: bytes = b"") -> None:
        """Send a short canned answer if the socket takes it at once, then close."""
        data = reply or (_canned(code, reason) if code else b"")
        try:
            if data:
                conn.setblocking(False)
                conn.send(data)
        except OSError:
            pass
        finally:
            conn.close()

    # --- the workers --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            conn, head, addr = item
            try:
                conn.setblocking(True)
                self.handler((conn, head), addr, self)  # type: ignore[arg-type]
                self.stats.served += 1
            except Exception as exc:  # noqa: BLE001 - one bad client never stops a worker
                name = type(exc).__name__
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
                log.debug("http request from %s failed: %s", addr, exc)
            finally:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()


def serve_registry(registry: Any, host: str, port: int, *, threads: int = 2, timeout_s: float = 5.0,
                   max_connections: int = 32) -> BoundedHTTPServer:
    """A started bounded server answering every GET with ``registry``'s Prometheus exposition (the
    tap's metrics port, in place of ``prometheus_client.start_http_server``, which gives every
    connection a thread and no timeout)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Metrics(BoundedRequestHandler):
        server_version = "layerwatch"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return BoundedHTTPServer(host, port, Metrics, threads=threads, timeout_s=timeout_s,
                             max_connections=max_connections).start()
