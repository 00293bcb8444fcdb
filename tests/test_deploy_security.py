"""The compose stack's Redis trust (issue 17, item 6): Redis requires the password audit-init
creates, every client reads it from the same mounted file, memory is bounded without eviction,
and the monitoring ports are published on loopback only. The Redis command line and health
check are run for real with a local redis-server (no Docker engine here)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_deploy_compose import VLLM_OVERRIDE, env, load, services, stack, volume_spec

from monitor.backends.redis import close_all, connect
from monitor.config import RedisSettings
from tests.redis_server import free_port

PASSWORD_FILE = "/run/layerwatch/redis/password"
CLIENTS = {"demo-server": "LAYERWATCH_TAP_REDIS__PASSWORD_FILE", "sidecar": "LAYERWATCH_REDIS__PASSWORD_FILE"}


def interpolated(text: str) -> str:
    """What compose hands the container: ``$$`` is a literal ``$``."""
    return text.replace("$$", "$")


def mounts(service: dict[str, object]) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of a service's volumes."""
    return {t: (s, m) for s, t, m in (volume_spec(str(v)) for v in service.get("volumes", []))}  # type: ignore[attr-defined]


def test_every_redis_client_reads_the_password_audit_init_creates() -> None:
    """Redis takes --requirepass from the file audit-init writes into the redis-auth volume; the tap
    of the demo server, the sidecar and the vLLM server point their password file setting at that
    same file, mounted read-only from the same volume; no Redis URL carries a password."""
    svc = services()
    command = interpolated(" ".join(svc["redis"]["command"]))
    assert f'--requirepass "$(cat {PASSWORD_FILE})"' in command
    volume_dir = os.path.dirname(PASSWORD_FILE)
    assert mounts(svc["redis"])[volume_dir] == ("redis-auth", "ro")
    assert PASSWORD_FILE in svc["audit-init"]["command"][0] and mounts(svc["audit-init"])[volume_dir][0] == "redis-auth"
    assert svc["redis"]["depends_on"]["audit-init"]["condition"] == "service_completed_successfully"
    vllm = stack(VLLM_OVERRIDE)["services"]["vllm-server"]
    for name, service, variable in [(n, svc[n], v) for n, v in CLIENTS.items()] + [
            ("vllm-server", vllm, "LAYERWATCH_TAP_REDIS__PASSWORD_FILE")]:
        environment = {k: str(v) for k, v in service["environment"].items()}
        assert environment[variable] == PASSWORD_FILE, name
        assert mounts(service)[volume_dir] == ("redis-auth", "ro"), name
        urls = [v for k, v in environment.items() if k.endswith("TRANSPORT")]
        assert urls and all("@" not in u and "password" not in u for u in urls), name
    assert "redis-auth" in load()["volumes"]


def test_monitoring_ports_are_published_on_loopback_only() -> None:
    """The sidecar's HTTP port and the vLLM tap's metrics port reach the host's loopback only
    (Prometheus scrapes them over the compose network), while the sidecar listens on all of the
    container's interfaces for that scrape."""
    assert services()["sidecar"]["ports"] == ["127.0.0.1:9400:9400"]
    assert env("sidecar")["LAYERWATCH_HTTP_HOST"] == "0.0.0.0"
    assert "127.0.0.1:9401:9401" in stack(VLLM_OVERRIDE)["services"]["vllm-server"]["ports"]


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                    reason="redis-server and redis-cli not installed")
@pytest.mark.timeout(60)
def test_compose_redis_command_and_healthcheck_run_for_real(tmp_path: Path) -> None:
    """The compose Redis command line, run by sh as the container would (a local redis-server in
    place of the image's entrypoint), requires the file's password, bounds memory with noeviction,
    and its health check passes with the password and fails without it."""
    password_file = tmp_path / "password"
    password_file.write_text("0123456789abcdef0123456789abcdef")
    svc = services()["redis"]
    port = free_port()
    command = interpolated(" ".join(svc["command"])).replace(PASSWORD_FILE, str(password_file))
    command = command.replace("docker-entrypoint.sh redis-server", "redis-server") + " " + shlex.join(
        ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--appendonly", "no",
         "--daemonize", "yes", "--pidfile", str(tmp_path / "redis.pid")])
    subprocess.run(["sh", "-c", command], check=True, timeout=10)
    try:
        health = interpolated(svc["healthcheck"]["test"][1]).replace(PASSWORD_FILE, str(password_file))
        health = health.replace("redis-cli", f"redis-cli -p {port}")
        deadline = time.monotonic() + 10
        while subprocess.run(["sh", "-c", health], timeout=5).returncode != 0:
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.05)
        anonymous = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, timeout=5)
        assert "NOAUTH" in anonymous.stdout
        close_all()
        client = connect(f"redis://127.0.0.1:{port}/0", settings=RedisSettings(password_file=password_file))
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == 1536 * 1024 * 1024
    finally:
        close_all()
        os.kill(int((tmp_path / "redis.pid").read_text()), signal.SIGTERM)
