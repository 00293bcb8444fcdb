"""A private redis-server on a free port, for tests that stop and restart Redis, or that need one
with a password (``--requirepass``) or TLS only (``--tls-port``, client certificates required),
with a throwaway CA made by :func:`make_tls_files` (openssl)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path, name: str = "test") -> TlsFiles:
    """Create a CA and two certificates it signs (openssl; 2048-bit RSA, valid one day)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not installed")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}-ca",
        "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt")
    ext = d / f"{name}-san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}-{who}",
            "-keyout", f"{name}-{who}.key", "-out", f"{name}-{who}.csr")
        run("x509", "-req", "-in", f"{name}-{who}.csr", "-CA", f"{name}-ca.crt", "-CAkey", f"{name}-ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", ext.name, "-out", f"{name}-{who}.crt")
    return TlsFiles(d / f"{name}-ca.crt", d / f"{name}-server.crt", d / f"{name}-server.key",
                    d / f"{name}-client.crt", d / f"{name}-client.key")


class PrivateRedis:
    """``with PrivateRedis(tmp) as srv: srv.url; srv.stop(); srv.start()`` (same port each time).

    ``password``: the server requires it (``--requirepass``; ``srv.url`` carries none). ``tls``:
    the server listens with TLS only and requires a client certificate signed by ``tls.ca``
    (``srv.url`` is ``rediss://``)."""

    def __init__(self, workdir: Path, port: int | None = None, *, password: str | None = None,
                 tls: TlsFiles | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (scripts/services.sh installs it)")
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.pidfile = self.dir / f"redis-{self.port}.pid"
        self.password = password
        self.tls = tls
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]
        if self.tls:
            args += ["--tls-cert-file", str(self.tls.server_cert), "--tls-key-file", str(self.tls.server_key),
                     "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "yes"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    def _answers(self) -> bool:
        """The server answers PING (+PONG, or -NOAUTH when it wants a password)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            s: socket.socket = raw
            if self.tls:
                ctx = ssl.create_default_context(cafile=str(self.tls.ca))
                ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
                s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))

    def start(self) -> None:
        subprocess.run(
            ["redis-server", *self._args(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "yes", "--pidfile", str(self.pidfile), "--dir", str(self.dir),
             "--logfile", str(self.dir / f"redis-{self.port}.log")],
            check=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self._answers():
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """SIGKILL the server (an abrupt outage), then wait until the port is closed."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
            except OSError:
                break
            time.sleep(0.02)
        self.pidfile.unlink(missing_ok=True)

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
