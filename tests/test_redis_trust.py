"""Redis trust and secrets (issue 17, items 6 and 8): the tap and the sidecar authenticate with a
password read from a file and speak TLS with client certificates to a real redis-server; no
password reaches ``--check-config``, ``/readyz``, the audit ``config`` record or checkpoint
records, whatever form the URL gives it."""

from __future__ import annotations

import json
import logging
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

import monitor
from monitor.backends import open_backend
from monitor.backends.redis import close_all, connect
from monitor.cli import main as cli_main
from monitor.config import RedisSettings, TapSettings, build_settings
from monitor.errors import ConfigError, TransportError
from monitor.lenses.torch_lens import TorchLogitLens
from monitor.sidecar.config import load_settings
from monitor.sidecar.http import SidecarHTTPServer
from monitor.sidecar.service import Sidecar
from monitor.tap.core import open_tap_transport
from monitor.urls import redact_config, redact_url, strip_credentials
from tests.conftest import make_tiny
from tests.redis_server import PrivateRedis, TlsFiles, make_tls_files

SECRET = "hunter2"
# The last '@' ends the user info: a password holding '@' unencoded still parses (redis-py splits
# there too), and a redactor that stops at the first '@' prints what follows it.
PASSWORD = f"lw@{SECRET}"

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture
def tiny() -> torch.nn.Module:
    return make_tiny("llama", seed=0)


@pytest.fixture(autouse=True)
def _fresh_pools() -> Any:
    """Each test opens its own pools (private servers come and go on reused ports)."""
    close_all()
    yield
    close_all()


def _secret_file(tmp_path: Path, text: str, name: str = "redis-password") -> Path:
    f = tmp_path / name
    f.write_text(text + "\n")  # as `kubectl create secret --from-file` and editors leave it
    return f


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}@h:6379/0",
    f"redis://user:{SECRET}@h:6379/0",
    f"redis://:{PASSWORD}@h:6379/0",
    f"redis://:lw%40{SECRET}@h:6379/0",
    f"rediss://:lw/{SECRET}@h:6380/0",
    f"redis://h:6379/0?password={SECRET}",
    f"redis://h:6379/0?db=1&password=lw@{SECRET}",
    f"unix:///run/redis.sock?db=0&password={SECRET}",
])
def test_every_url_form_of_a_password_is_redacted(url: str) -> None:
    """User info (with '@', '/' or percent-encoding in the password) and ?password= lose the
    password and keep the host; the former name strip_credentials does the same."""
    for redact in (redact_url, strip_credentials):
        out = redact(url)
        assert SECRET not in out, out
        assert "h:63" in out or "/run/redis.sock" in out
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("memory://demo") == "memory://demo"


def test_a_configuration_dump_loses_urls_credentials_and_secret_values() -> None:
    """redact_config redacts every URL at any depth and masks secret-named keys, not file paths."""
    dump = {"transport": f"redis://:{PASSWORD}@h/0", "audit": {"head_store": f"redis://h/0?password={SECRET}",
            "hmac_key": SECRET, "hmac_key_file": "/run/hmac"}, "list": [f"rediss://u:{SECRET}@h/0"],
            "redis": {"password_file": "/run/pw", "token": None}}
    out = redact_config(dump)
    assert SECRET not in json.dumps(out)
    assert out["audit"]["hmac_key_file"] == "/run/hmac" and out["redis"]["password_file"] == "/run/pw"
    assert out["transport"] == "redis://***@h/0" and out["redis"]["token"] is None


def test_check_config_prints_no_password(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`layerwatch sidecar --check-config` prints the settings with every URL's password hidden."""
    monkeypatch.setenv("LAYERWATCH_TRANSPORT", f"redis://:{PASSWORD}@127.0.0.1:6379/0")
    monkeypatch.setenv("LAYERWATCH_AUDIT__HEAD_STORE", f"redis://127.0.0.1:6379/1?password={SECRET}")
    assert cli_main(["sidecar", "--check-config"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    printed = json.loads(out)
    assert printed["transport"] == "redis://***@127.0.0.1:6379/0"
    assert printed["audit"]["head_store"] == "redis://127.0.0.1:6379/1?password=***"


def test_config_errors_name_the_redis_field_and_its_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing or empty secret file, TLS files with redis://, a password both in the file and
    the URL, or a certificate without its key fail at start-up naming the field."""
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"redis\.password_file \(env LAYERWATCH_REDIS__PASSWORD_FILE\).*cannot read"):
        load_settings(transport="redis://h/0", redis={"password_file": missing})
    with pytest.raises(ConfigError, match=r"redis\.password_file .* is empty"):
        load_settings(transport="redis://h/0", redis={"password_file": _secret_file(tmp_path, "")})
    pw = _secret_file(tmp_path, SECRET)
    with pytest.raises(ConfigError, match=r"TLS needs a rediss:// URL"):
        load_settings(transport="redis://h/0", redis={"tls_ca_file": pw})
    with pytest.raises(ConfigError, match=r"carries a password too") as err:
        load_settings(transport=f"redis://:{SECRET}x@h/0", redis={"password_file": pw})
    assert f"{SECRET}x" not in str(err.value)
    with pytest.raises(ConfigError, match=r"tls_cert_file and tls_key_file go together"):
        load_settings(transport="rediss://h/0", redis={"tls_cert_file": pw})
    monkeypatch.setenv("LAYERWATCH_TAP_REDIS__PASSWORD_FILE", str(missing))
    with pytest.raises(ConfigError, match=r"redis\.password_file \(env LAYERWATCH_TAP_REDIS__PASSWORD_FILE\)"):
        build_settings(TapSettings, "LAYERWATCH_TAP_", transport="redis://h/0")
    monkeypatch.setenv("LAYERWATCH_TAP_REDIS__PASSWORD_FILE", str(pw))
    assert build_settings(TapSettings, "LAYERWATCH_TAP_", transport="redis://h/0").redis.password_file == pw


@needs_redis_server
@pytest.mark.timeout(120)
def test_tap_and_sidecar_authenticate_with_a_password_file(tmp_path: Path, tiny: torch.nn.Module,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Against a redis-server with requirepass, a tap and a sidecar given the password file carry a
    sample end to end; without the file Redis refuses the sidecar (NOAUTH), and the tap drops the
    sample and logs why, once."""
    pw = _secret_file(tmp_path, PASSWORD)
    with PrivateRedis(tmp_path, password=PASSWORD) as srv:
        stream = "lw:trust:auth"
        tap = monitor.attach(tiny, sample_rate=1.0, transport=srv.url, stream=stream,
                             redis={"password_file": pw})
        with tap.request("r1"):
            tiny(input_ids=torch.tensor([[5, 6, 7]]))
        assert tap.flush(10)
        assert tap.exporter.exported == 1
        tap.close()
        settings = load_settings(transport=srv.url, stream=stream, group="g", http_port=0, batch_wait_ms=10,
                                 audit={"directory": tmp_path / "audit"}, baseline={"learn_samples": 400},
                                 redis={"password_file": pw})
        sc = Sidecar(settings, bank=TorchLogitLens(tiny))
        sc.transport.ensure_group("g")  # from the stream's start: the sample is already there
        for _ in range(50):
            if sc.step().processed:
                break
        assert sc.processed_total == 1

        close_all()
        anonymous = open_backend(srv.url)
        with pytest.raises(TransportError, match="refused the credentials .*check redis.password_file"):
            anonymous.ledger(key_prefix="lw:trust:ledger", ttl_s=60).mark(["x"])
        tap = monitor.attach(tiny, sample_rate=1.0, transport=srv.url, stream=stream)
        with tap.request("r2"):
            tiny(input_ids=torch.tensor([[5, 6, 7]]))
        with caplog.at_level(logging.WARNING, logger="layerwatch.tap"):
            tap.flush(10)
        assert tap.exporter.exported == 0 and tap.exporter.drops["transport_error"] == 1
        tap.close()
        (logged,) = [r.getMessage() for r in caplog.records if r.name == "layerwatch.tap"]
        assert "refused the credentials" in logged and "redis.password_file" in logged


@needs_redis_server
def test_a_rotated_password_file_is_read_at_the_next_reconnection(tmp_path: Path) -> None:
    """The password file is read whenever a connection opens: after the server's password and the
    file change and the connection drops, the same pool reconnects with the new one."""
    pw = _secret_file(tmp_path, "first-password")
    with PrivateRedis(tmp_path, password="first-password") as srv:
        client = connect(srv.url, settings=RedisSettings(password_file=pw))
        assert client.ping()
        client.config_set("requirepass", "second-password")
        pw.write_text("second-password\n")
        client.client_kill_filter(_type="normal", skipme=False)
        assert client.ping()


@pytest.mark.parametrize("form", ["unencoded_at", "percent_encoded", "query"])
@needs_redis_server
@pytest.mark.timeout(120)
def test_readyz_config_and_checkpoint_records_carry_no_password(tmp_path: Path, tiny: torch.nn.Module,
                                                                 form: str) -> None:
    """A sidecar whose transport URL holds the password (in the user info with a raw '@', percent-
    encoded, or as ?password=) serves /readyz and writes config and checkpoint records (its head
    store is that Redis) without it."""
    with PrivateRedis(tmp_path, password=PASSWORD) as srv:
        host = srv.url.split("://", 1)[1]
        url = {"unencoded_at": f"redis://:{PASSWORD}@{host}", "percent_encoded": f"redis://:lw%40{SECRET}@{host}",
               "query": f"{srv.url}?password=lw%40{SECRET}"}[form]
        settings = load_settings(transport=url, group="g", http_port=0, audit={"directory": tmp_path / "audit"},
                                 baseline={"learn_samples": 400})
        sc = Sidecar(settings, bank=TorchLogitLens(tiny)).start()
        http = SidecarHTTPServer(sc, "127.0.0.1", 0).start()
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{http.port}/readyz").read().decode()
        finally:
            http.close()
            sc.stop(10)
        assert json.loads(body)["ready"]  # it did authenticate with the password in the URL
        assert SECRET not in body
        trail = "".join(p.read_text() for p in (tmp_path / "audit").rglob("*") if p.is_file())
        kinds = {json.loads(line)["kind"] for line in trail.splitlines() if line.startswith("{")}
        assert {"config", "checkpoint"} <= kinds
        assert SECRET not in trail


def _tls_settings(tls: TlsFiles, pw: Path, **changes: Any) -> RedisSettings:
    fields: dict[str, Any] = {"password_file": pw, "tls_ca_file": tls.ca, "tls_cert_file": tls.client_cert,
                              "tls_key_file": tls.client_key}
    fields.update(changes)
    return RedisSettings(**{k: v for k, v in fields.items() if v is not None})


@needs_redis_server
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.timeout(120)
def test_tls_with_a_client_certificate_carries_samples_and_refuses_strangers(tmp_path: Path) -> None:
    """Over rediss:// to a TLS-only server that requires client certificates, the tap's and the
    sidecar's connections (CA, client certificate and key, password from files) work; no client
    certificate, or a server signed by another CA, fails."""
    tls = make_tls_files(tmp_path / "tls")
    other = make_tls_files(tmp_path / "other", name="other")
    pw = _secret_file(tmp_path, PASSWORD)
    with PrivateRedis(tmp_path, password=PASSWORD, tls=tls) as srv:
        assert srv.url.startswith("rediss://")
        redis_settings = _tls_settings(tls, pw)
        tap_side = open_tap_transport(build_settings(TapSettings, "LAYERWATCH_TAP_", transport=srv.url,
                                                     stream="lw:trust:tls", redis=redis_settings.model_dump()))
        backend = open_backend(srv.url, redis=redis_settings)
        side = backend.transport(stream="lw:trust:tls", maxlen=100)
        side.ensure_group("g")
        tap_side.publish([b"sample-over-tls"])
        assert [e.data for e in side.read("g", "c", 10, 0)] == [b"sample-over-tls"]

        for bad in (_tls_settings(tls, pw, tls_cert_file=None, tls_key_file=None), _tls_settings(other, pw)):
            close_all()
            with pytest.raises(TransportError):
                open_backend(srv.url, redis=bad).ledger(key_prefix="lw:trust:l", ttl_s=60).mark(["x"])


@needs_redis_server
def test_baseline_cli_authenticates_with_the_sidecars_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`layerwatch baseline list --redis URL` run where LAYERWATCH_REDIS__PASSWORD_FILE is set (a
    sidecar's pod) authenticates with that file; without it the error says Redis wants auth."""
    pw = _secret_file(tmp_path, PASSWORD)
    with PrivateRedis(tmp_path, password=PASSWORD) as srv:
        monkeypatch.setenv("LAYERWATCH_REDIS__PASSWORD_FILE", str(pw))
        assert cli_main(["baseline", "list", "--redis", srv.url, "--model-name", "m"]) == 0
        close_all()
        monkeypatch.delenv("LAYERWATCH_REDIS__PASSWORD_FILE")
        assert cli_main(["baseline", "list", "--redis", srv.url, "--model-name", "m"]) != 0
        assert "auth" in capsys.readouterr().err.lower()


@needs_redis_server
@pytest.mark.timeout(60)
def test_an_audit_head_store_of_its_own_authenticates_with_the_redis_section(tmp_path: Path,
                                                                              tiny: torch.nn.Module) -> None:
    """audit.head_store naming a password-protected Redis (the samples come from elsewhere) gets
    the redis section's password file: the writer's head lands there."""
    pw = _secret_file(tmp_path, PASSWORD)
    with PrivateRedis(tmp_path, password=PASSWORD) as srv:
        settings = load_settings(transport="memory://trust-heads", group="g", http_port=0,
                                 audit={"directory": tmp_path / "audit", "head_store": srv.url},
                                 baseline={"learn_samples": 400}, redis={"password_file": pw}, consumer="replica-a")
        sc = Sidecar(settings, bank=TorchLogitLens(tiny))
        sc.parts.audit.sync()
        sc.parts.audit.close()
        admin = connect(srv.url, settings=RedisSettings(password_file=pw))
        head = admin.get("layerwatch:audit:head:replica-a")
        assert head is not None and json.loads(head)["writer"] == "replica-a"


@needs_redis_server
@pytest.mark.timeout(60)
def test_audit_verify_reads_a_password_protected_head_store_with_the_redis_section(
        tmp_path: Path, tiny: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """`layerwatch audit verify --head redis://...` run where LAYERWATCH_REDIS__PASSWORD_FILE is set
    checks the trail against the head in that Redis (before: it connected without the password and
    could not read the head)."""
    pw = _secret_file(tmp_path, PASSWORD)
    with PrivateRedis(tmp_path, password=PASSWORD) as srv:
        settings = load_settings(transport="memory://trust-verify", group="g", http_port=0,
                                 audit={"directory": tmp_path / "audit", "head_store": srv.url},
                                 baseline={"learn_samples": 400}, redis={"password_file": pw}, consumer="replica-v")
        sc = Sidecar(settings, bank=TorchLogitLens(tiny))
        sc.parts.audit.sync()
        sc.parts.audit.close()
        close_all()
        monkeypatch.setenv("LAYERWATCH_REDIS__PASSWORD_FILE", str(pw))
        args = ["audit", "verify", str(tmp_path / "audit" / "replica-v"), "--head", srv.url, "--require-head"]
        assert cli_main(args) == 0


def test_an_unusable_head_store_url_is_refused_without_its_password() -> None:
    """A head_store spec that is not a usable store fails at start-up naming the field, with its
    password redacted from the message."""
    from monitor.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_settings(transport="memory://x", audit={"head_store": "http://admin:s3cret-pw@host:6379/0"})
    assert "s3cret-pw" not in str(err.value) and "head_store" in str(err.value)
