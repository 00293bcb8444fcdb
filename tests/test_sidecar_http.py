"""The sidecar's HTTP exposure (issue 17): loopback by default, narratives off unless served behind a
bearer token or on a loopback listener, and a server that idle or slow clients cannot exhaust."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import monitor
from monitor.errors import ConfigError
from monitor.httpserver import BoundedHTTPServer, BoundedRequestHandler
from monitor.lenses.torch_lens import TorchLogitLens
from monitor.sidecar.config import load_settings
from monitor.sidecar.http import SidecarHTTPServer
from monitor.sidecar.service import Sidecar
from monitor.transport import MemoryTransport
from tests.conftest import make_tiny

TOKEN = "0123456789abcdef-narratives-token"


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return make_tiny("llama", seed=0)


@pytest.fixture
def make_sidecar(tmp_path: Path, tiny: torch.nn.Module) -> Iterator[Any]:
    """A sidecar on a memory transport that has processed one real sample (request 'r1'); returns
    (sidecar, sample id)."""
    made: list[Sidecar] = []

    def make(**kw: Any) -> tuple[Sidecar, str]:
        MemoryTransport.reset_all()
        url = f"memory://http-{len(made)}"
        settings = load_settings(transport=url, group="g", batch_wait_ms=10, warm_up=False,
                                 audit={"directory": tmp_path / f"audit-{len(made)}"},
                                 baseline={"learn_samples": 400}, **kw)
        sc = Sidecar(settings, bank=TorchLogitLens(tiny))
        made.append(sc)
        tap = monitor.attach(tiny, sample_rate=1.0, transport=url)
        with tap.request("r1") as h, torch.no_grad():
            tiny(input_ids=torch.tensor([[5, 6, 7]]))
        tap.flush(5)
        tap.close()
        tap.detach()
        sc.step()
        assert sc.narrative(h.sample_ids[0]) is not None
        return sc, h.sample_ids[0]

    yield make
    for sc in made:
        sc.processor.shutdown()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return p


def get(url: str, token: str | None = None) -> tuple[int, dict[str, Any], Any]:
    """(status, headers, JSON body) of a GET, with an optional bearer token."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_default_settings_bind_loopback_and_serve_no_narratives(make_sidecar: Any) -> None:
    """With default settings the port is bound to 127.0.0.1 and /narratives, /narratives/{id} are
    404 (even for an id the sidecar holds), exactly like an unknown path; /metrics still answers."""
    assert load_settings().http_host == "127.0.0.1" and load_settings().narratives.serve is False
    sc, sid = make_sidecar(http_port=0)
    http = SidecarHTTPServer(sc).start()
    try:
        assert http.server.server_address[0] == "127.0.0.1"
        base = f"http://127.0.0.1:{http.port}"
        for path in ("/narratives", f"/narratives/{sid}"):
            code, _, body = get(base + path)
            assert code == 404 and "/narratives" not in json.dumps(body)
        assert urllib.request.urlopen(base + "/metrics", timeout=10).status == 200
    finally:
        http.close()


def test_narratives_need_the_bearer_token(make_sidecar: Any, token_file: Path) -> None:
    """Served with a token file: no credentials 401 (with WWW-Authenticate), a wrong token 403, for
    known and unknown ids alike (no way to tell them apart); the right token gets the listing and
    the narrative, and 404 for an unknown id."""
    sc, sid = make_sidecar(http_host="0.0.0.0", http_port=0,
                           narratives={"serve": True, "bearer_token_file": str(token_file)})
    http = SidecarHTTPServer(sc).start()
    base = f"http://127.0.0.1:{http.port}"
    try:
        for path in ("/narratives", f"/narratives/{sid}", "/narratives/unknown"):
            code, headers, _ = get(base + path)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
            assert get(base + path, "wrong-token-of-some-length")[0] == 403
            assert get(base + path, TOKEN[:-1])[0] == 403
        code, headers, body = get(base + "/narratives", TOKEN)
        assert code == 200 and body["recent"] == [sid] and headers["Cache-Control"] == "no-store"
        code, _, item = get(base + f"/narratives/{sid}", TOKEN)
        assert code == 200 and item["request_id"] == "r1" and item["narrative"]["layers"]
        assert get(base + "/narratives/unknown", TOKEN)[0] == 404
        assert urllib.request.urlopen(base + "/metrics", timeout=10).status == 200  # no token needed
    finally:
        http.close()


def test_a_rotated_token_file_takes_effect_without_a_restart(make_sidecar: Any, token_file: Path) -> None:
    """After the mounted secret changes, the old token is refused and the new one accepted."""
    sc, sid = make_sidecar(http_port=0, narratives={"serve": True, "bearer_token_file": str(token_file)})
    http = SidecarHTTPServer(sc).start()
    url = f"http://127.0.0.1:{http.port}/narratives/{sid}"
    try:
        assert get(url, TOKEN)[0] == 200
        new = "fedcba9876543210-rotated-token"
        token_file.write_text(new)
        assert get(url, TOKEN)[0] == 403 and get(url, new)[0] == 200
    finally:
        http.close()


def test_narratives_without_a_token_need_a_loopback_listener(make_sidecar: Any, tmp_path: Path) -> None:
    """narratives.serve without a token file: fine on 127.0.0.1 (200 without credentials), a start-up
    ConfigError naming the setting on 0.0.0.0, from the settings and from the server alike."""
    with pytest.raises(ConfigError, match="narratives.serve.*bearer_token_file"):
        load_settings(http_host="0.0.0.0", narratives={"serve": True})
    sc, sid = make_sidecar(http_port=0, narratives={"serve": True})
    with pytest.raises(ConfigError, match="narratives.serve"):
        SidecarHTTPServer(sc, "0.0.0.0", 0)
    http = SidecarHTTPServer(sc).start()
    try:
        assert get(f"http://127.0.0.1:{http.port}/narratives/{sid}")[0] == 200
    finally:
        http.close()


def test_a_missing_or_short_token_file_fails_at_start_up(tmp_path: Path) -> None:
    """A token file that does not exist, or holds fewer than 16 characters, is a ConfigError naming
    narratives.bearer_token_file."""
    with pytest.raises(ConfigError, match="narratives.bearer_token_file.*cannot read"):
        load_settings(narratives={"serve": True, "bearer_token_file": str(tmp_path / "nope")})
    short = tmp_path / "short"
    short.write_text("secret\n")
    with pytest.raises(ConfigError, match="narratives.bearer_token_file.*at least 16"):
        load_settings(narratives={"serve": True, "bearer_token_file": str(short)})


def _half_requests(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each send a request line and one header, never the blank line."""
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        out.append(s)
    return out


def test_200_idle_half_requests_do_not_exhaust_the_server(make_sidecar: Any) -> None:
    """200 connections holding half a request each: the server starts no thread for them, a scrape
    still answers at once, and each is closed (408) once the request deadline passes."""
    sc, _ = make_sidecar(http_port=0, http_timeout_s=1.5, http_threads=2, http_max_connections=256)
    http = SidecarHTTPServer(sc).start()
    threads_before = threading.active_count()
    idle = _half_requests(http.port, 200)
    try:
        t0 = time.monotonic()
        assert urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=5).status == 200
        assert time.monotonic() - t0 < 1.0
        assert threading.active_count() <= threads_before + 1
        for s in idle:
            s.settimeout(10)
            data = s.recv(4096)  # blocks until the server gives up on it
            assert data.startswith(b"HTTP/1.0 408") or data == b""
        assert http.server.stats.timed_out == 200
    finally:
        for s in idle:
            s.close()
        http.close()


def test_connections_beyond_the_bound_evict_the_oldest_waiting_one(make_sidecar: Any) -> None:
    """With room for 20 waiting connections, 50 idle ones leave 20 open (30 evicted) and a scrape
    still gets through."""
    sc, _ = make_sidecar(http_port=0, http_timeout_s=30, http_max_connections=20)
    http = SidecarHTTPServer(sc).start()
    idle = _half_requests(http.port, 50)
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{http.port}/healthz", timeout=5).status == 200
        deadline = time.monotonic() + 5
        while http.server.stats.evicted < 31 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.server.stats.evicted == 31  # 30 of the idle ones, then one more for the scrape
    finally:
        for s in idle:
            s.close()
        http.close()


def test_a_dripping_client_is_cut_at_the_deadline_not_at_each_byte() -> None:
    """A client that sends one byte every 0.2 s never completes its head and is closed after the
    1 s deadline, although it was never idle for a whole timeout."""
    server = BoundedHTTPServer("127.0.0.1", 0, BoundedRequestHandler, threads=1, timeout_s=1.0).start()
    s = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
    t0 = time.monotonic()
    try:
        closed_after = None
        for ch in b"GET /metrics HTTP/1.1\r\nHost: a-very-long-host-name\r\n":
            try:
                s.sendall(bytes([ch]))
            except OSError:
                closed_after = time.monotonic() - t0
                break
            time.sleep(0.2)
        if closed_after is None:
            s.recv(4096)
            closed_after = time.monotonic() - t0
        assert closed_after < 3.0 and server.stats.timed_out == 1
    finally:
        s.close()
        server.close()


def test_busy_workers_answer_503_beyond_the_queue() -> None:
    """With one worker stuck and its queue (2) full, the next complete request gets 503 at once."""
    release = threading.Event()

    class Slow(BoundedRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            release.wait(10)
            self.send_response(200)
            self.end_headers()

    server = BoundedHTTPServer("127.0.0.1", 0, Slow, threads=1, timeout_s=5.0).start()
    port = server.server_address[1]
    socks = []
    try:
        for _ in range(3):  # one in the worker, two queued
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            socks.append(s)
            time.sleep(0.1)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert extra.recv(4096).startswith(b"HTTP/1.0 503")
        extra.close()
        release.set()
        for s in socks:
            assert s.recv(4096).startswith(b"HTTP/1.0 200")
        assert server.stats.busy == 1
    finally:
        release.set()
        for s in socks:
            s.close()
        server.close()


def test_the_demo_serves_narratives_with_tokens_behind_a_generated_token(tmp_path: Path, tiny: torch.nn.Module) -> None:
    """The demo's embedded sidecar turns narratives on explicitly: served behind a token it
    generates into a user-only file (401 without it, 200 with it), with the tokens in them."""
    import argparse

    from monitor import demo

    MemoryTransport.reset_all()
    args = argparse.Namespace(redis=None, metrics_port=0)
    sc, proc, port = demo._start_sidecar(args, TorchLogitLens(tiny), None, None, tmp_path, "tiny", None)
    try:
        assert proc is None and args.token_file.stat().st_mode & 0o077 == 0
        tap = monitor.attach(tiny, sample_rate=1.0, transport="memory://demo")
        with tap.request("demo-r") as h, torch.no_grad():
            tiny(input_ids=torch.tensor([[5, 6, 7]]))
        tap.flush(5)
        tap.close()
        tap.detach()
        url = f"http://127.0.0.1:{port}/narratives/{h.sample_ids[0]}"
        deadline = time.monotonic() + 20
        while sc.narrative(h.sample_ids[0]) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(url)[0] == 401
        item = demo._get(url, args.token_file.read_text().strip())
        assert item["narrative"]["tokens"] is True and item["narrative"]["layers"][0]["top"][0][0].startswith("<")
    finally:
        sc.stop(5)


def test_the_taps_metrics_port_gives_idle_connections_no_thread(tiny: torch.nn.Module) -> None:
    """Inside the inference server, the tap's /metrics (metrics_port) is the same bounded server:
    100 idle half-requests start no thread in the serving process, a scrape still answers, and
    close() stops it."""
    tap = monitor.attach(tiny, sample_rate=0.0, transport="memory://tap-metrics")
    for _ in range(20):  # a free port can be taken by another process between probe and bind
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            tap.serve_metrics(port, addr="127.0.0.1")
            break
        except OSError:
            continue
    threads_before = threading.active_count()
    idle = _half_requests(port, 100)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "layerwatch_tap_" in text
        assert threading.active_count() == threads_before
    finally:
        for s in idle:
            s.close()
        tap.close()
        tap.detach()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
