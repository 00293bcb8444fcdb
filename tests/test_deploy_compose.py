"""The compose stack (deploy/docker-compose.yml, the GPU override and the Dockerfiles), statically.

No Docker engine runs here. ``docker compose config`` (or the standalone ``docker-compose``) only
parses and validates the files, which needs no engine; the other tests check that files,
ports, environment and health checks agree across services.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from test_prometheus import ROOT

from monitor.config import TapSettings, build_settings
from monitor.sidecar.config import load_settings

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GPU_OVERRIDE = DEPLOY / "docker-compose.gpu.yml"
ONE_SHOT = {"audit-init"}  # services that run to completion


def compose_cli() -> list[str] | None:
    """A compose client that can run `config`: the docker plugin or the standalone binary."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def load(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def services() -> dict[str, dict[str, Any]]:
    return load()["services"]


def env(service: str, doc: dict[str, Any] | None = None) -> dict[str, str]:
    """A service's environment as strings (compose accepts a mapping here)."""
    raw = (doc or load())["services"][service].get("environment", {})
    assert isinstance(raw, dict), f"{service}: use the mapping form for environment"
    return {k: str(v) for k, v in raw.items()}


def volume_spec(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) of a short-syntax volume, ${VAR:-default} resolved to its default."""
    resolved = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", spec)
    source, target, *mode = resolved.split(":")
    return source, target, mode[0] if mode else "rw"


def published_ports(service: str) -> dict[int, int]:
    """container port -> host port of a service."""
    out = {}
    for spec in services()[service].get("ports", []):
        host, container = str(spec).split(":")[-2:]
        out[int(container)] = int(host)
    return out


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU_OVERRIDE]], ids=["base", "gpu"])
def test_compose_config_validates(files: list[Path]) -> None:
    """The compose client accepts the stack (and the stack with the GPU override)."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose client (docker compose plugin or docker-compose) installed")
    args = [a for f in files for a in ("-f", str(f))]
    result = subprocess.run([*cli, *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr


def test_stack_has_the_five_services() -> None:
    """Redis, the demo server, the sidecar, Prometheus and Grafana are all in the stack."""
    assert {"redis", "demo-server", "sidecar", "prometheus", "grafana"} <= set(services())


def test_built_services_use_existing_dockerfiles_and_context() -> None:
    """Each build names a Dockerfile that exists, with the repository root as context."""
    for name, svc in services().items():
        if "build" in svc:
            context = (DEPLOY / svc["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / svc["build"]["dockerfile"]).is_file(), name


def test_bind_mount_sources_exist() -> None:
    """Every host path mounted into a container exists in the repository."""
    declared = set(load().get("volumes", {}))
    for name, svc in services().items():
        for spec in svc.get("volumes", []):
            source, _, _ = volume_spec(spec)
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: undeclared volume {source}"


def test_long_running_services_have_healthchecks_and_restart() -> None:
    """Every service but the one-shot init has a healthcheck and a restart policy."""
    for name, svc in services().items():
        if name in ONE_SHOT:
            assert "restart" not in svc, name
            continue
        assert svc.get("healthcheck", {}).get("test"), name
        assert svc.get("restart") == "unless-stopped", name


def test_dependency_conditions_match_the_dependencies() -> None:
    """service_healthy waits only on services with a healthcheck; completion only on one-shots."""
    svcs = services()
    for name, svc in svcs.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in svcs, f"{name} -> {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svcs[dep], f"{name} -> {dep}"
            elif cond["condition"] == "service_completed_successfully":
                assert dep in ONE_SHOT, f"{name} -> {dep}"


def test_tap_and_sidecar_agree_on_transport_stream_and_model() -> None:
    """The demo server's tap publishes to the Redis stream the sidecar reads, under the same model name."""
    tap, sidecar = env("demo-server"), env("sidecar")
    assert tap["LAYERWATCH_TAP_TRANSPORT"] == sidecar["LAYERWATCH_TRANSPORT"]
    url = urlparse(sidecar["LAYERWATCH_TRANSPORT"])
    assert url.scheme == "redis" and url.hostname == "redis" and url.port == 6379
    assert tap["LAYERWATCH_TAP_STREAM"] == sidecar["LAYERWATCH_STREAM"]
    assert tap["LAYERWATCH_TAP_MODEL_NAME"] == sidecar["LAYERWATCH_MODEL_NAME"]
    # The tap trims the stream to its MAXLEN; the sidecar exports its own setting as the bound the
    # lag alert projects against (model:layerwatch_stream_maxlen:config), so the two must agree.
    assert tap["LAYERWATCH_TAP_STREAM_MAXLEN"] == sidecar["LAYERWATCH_STREAM_MAXLEN"]


def settings_field(dumped: dict[str, Any], env_name: str, prefix: str) -> Any:
    """The value of the settings field an environment variable names (KeyError: no such field)."""
    value: Any = dumped
    for part in env_name.removeprefix(prefix).lower().split("__"):
        value = value[part]
    return value


def assert_env_sets_settings(env_vars: dict[str, str], prefix: str, dumped: dict[str, Any]) -> None:
    """Every variable names a settings field (unknown names are silently ignored by pydantic-settings,
    so a typo would go unnoticed) and the field took its value."""
    for name, raw in env_vars.items():
        if not name.startswith(prefix):
            continue
        try:
            value = settings_field(dumped, name, prefix)
        except KeyError:
            raise AssertionError(f"{name} is not a setting") from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert value == float(raw), f"{name}={raw!r} became {value!r}"
        elif isinstance(value, list | dict):  # complex settings are JSON in the environment
            assert value == json.loads(raw), f"{name}={raw!r} became {value!r}"
        else:
            assert str(value).lower() == raw.lower(), f"{name}={raw!r} became {value!r}"


def sidecar_settings_from(env_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The sidecar's settings (as `layerwatch sidecar --check-config` prints them) under ``env_vars``."""
    import os

    for name in [n for n in os.environ if n.startswith("LAYERWATCH_")]:
        monkeypatch.delenv(name)
    for name, value in env_vars.items():
        monkeypatch.setenv(name, value)
    return load_settings().model_dump(mode="json")


def tap_settings_from(env_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The tap's settings (what monitor.attach reads) under ``env_vars``."""
    import os

    for name in [n for n in os.environ if n.startswith("LAYERWATCH_")]:
        monkeypatch.delenv(name)
    for name, value in env_vars.items():
        monkeypatch.setenv(name, value)
    return build_settings(TapSettings, "LAYERWATCH_TAP_").model_dump(mode="json")


def test_sidecar_environment_is_valid_sidecar_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar's compose environment passes the sidecar's settings validation, every variable taking effect."""
    sidecar_env = env("sidecar")
    assert_env_sets_settings(sidecar_env, "LAYERWATCH_", sidecar_settings_from(sidecar_env, monkeypatch))


def test_demo_server_environment_is_valid_tap_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo server's LAYERWATCH_TAP_* environment passes the tap's settings validation, every variable taking effect."""
    tap_env = env("demo-server")
    assert_env_sets_settings(tap_env, "LAYERWATCH_TAP_", tap_settings_from(tap_env, monkeypatch))


def test_sidecar_environment_matches_its_mounts() -> None:
    """The sidecar's bundle, audit directory and HMAC key paths are mounted, the key read-only."""
    sidecar_env = env("sidecar")
    modes = {target: mode for _, target, mode in map(volume_spec, services()["sidecar"]["volumes"])}
    assert modes[sidecar_env["LAYERWATCH_BUNDLE"]] == "ro"
    assert modes[sidecar_env["LAYERWATCH_AUDIT__DIRECTORY"]] == "rw"
    key_dir = str(Path(sidecar_env["LAYERWATCH_AUDIT__HMAC_KEY_FILE"]).parent)
    assert modes[key_dir] == "ro"
    init_targets = {target for _, target, _ in map(volume_spec, services()["audit-init"]["volumes"])}
    assert {key_dir, sidecar_env["LAYERWATCH_AUDIT__DIRECTORY"]} <= init_targets


def test_sidecar_runs_read_only_without_privileges() -> None:
    """The sidecar container has a read-only root, a /tmp tmpfs, no capabilities and no new privileges."""
    sidecar = services()["sidecar"]
    assert sidecar["read_only"] is True and "/tmp" in sidecar["tmpfs"]
    assert sidecar["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in sidecar["security_opt"]


def test_prometheus_scrapes_the_compose_services_on_their_ports() -> None:
    """Prometheus' targets are the sidecar's HTTP port and the demo server's port, as published."""
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    (sd,) = jobs["layerwatch-sidecar"]["file_sd_configs"]
    for targets_file in sd["files"]:
        (group,) = yaml.safe_load((DEPLOY / "prometheus" / targets_file).read_text())
        assert group["targets"] == [f"sidecar:{env('sidecar')['LAYERWATCH_HTTP_PORT']}"]
    assert int(env("sidecar")["LAYERWATCH_HTTP_PORT"]) in published_ports("sidecar")
    (static,) = jobs["layerwatch-tap"]["static_configs"]
    host, port = static["targets"][0].split(":")
    assert host == "demo-server" and int(port) in published_ports("demo-server")
    mounts = services()["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in mounts
    assert "--config.file=/etc/prometheus/prometheus.yml" in services()["prometheus"]["command"]


def test_grafana_gets_the_provisioning_and_the_dashboards() -> None:
    """Grafana mounts the provisioning folder and the dashboards where the provider looks, and the
    datasource points at the Prometheus service."""
    mounts = dict(spec.split(":")[:2] for spec in services()["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/layerwatch.yml").read_text())["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = env("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / Path(home).relative_to(provider["options"]["path"])).is_file()
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    url = urlparse(ds["url"])
    assert url.hostname == "prometheus" and url.port in published_ports("prometheus")


def test_gpu_override_expects_a_gpu_everywhere() -> None:
    """The GPU override builds onnxruntime-gpu, requests a GPU, sets LAYERWATCH_EXPECT_GPU and swaps in
    the expect_gpu="true" scrape target, while the base stack expects none."""
    gpu = load(GPU_OVERRIDE)
    sidecar = gpu["services"]["sidecar"]
    assert sidecar["build"]["args"]["EXTRA"] == "sidecar-gpu"
    assert env("sidecar", gpu)["LAYERWATCH_EXPECT_GPU"] == "true"
    assert sidecar["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    (mount,) = gpu["services"]["prometheus"]["volumes"]
    source, target, _ = mount.split(":")
    (group,) = yaml.safe_load((DEPLOY / source).read_text())
    assert group["labels"]["expect_gpu"] == "true" and target == "/etc/prometheus/targets/sidecar.yml"
    (base_group,) = yaml.safe_load((DEPLOY / "prometheus/targets/sidecar.yml").read_text())
    assert base_group["labels"]["expect_gpu"] == env("sidecar")["LAYERWATCH_EXPECT_GPU"] == "false"


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize(("dockerfile", "port", "entrypoint"), [
    ("sidecar.Dockerfile", 9400, '["layerwatch"]'),
    ("demo-server.Dockerfile", 8000, '["python3", "-m", "monitor.demo_server"]'),
])
def test_dockerfiles_run_non_root_with_healthcheck_on_their_port(dockerfile: str, port: int, entrypoint: str) -> None:
    """Each image copies existing sources, runs as a numeric non-root user, exposes its port and checks health."""
    instructions = dockerfile_instructions(dockerfile)
    copies = [args.split()[:-1] for word, args in instructions if word == "COPY" and "--from" not in args]
    for sources in copies:
        # Docker accepts a wildcard that matches nothing as long as the COPY matches something.
        assert [m for source in sources for m in ROOT.glob(source)], f"{dockerfile}: COPY {sources}"
        for source in sources:
            assert "*" in source or (ROOT / source).exists(), f"{dockerfile}: COPY {source}"
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] != "root" and not users[-1].startswith("0")
    assert ("EXPOSE", str(port)) in instructions
    healthcheck = " ".join(args for word, args in instructions if word == "HEALTHCHECK")
    assert f"127.0.0.1:{port}/" in healthcheck
    assert ("ENTRYPOINT", entrypoint) in instructions
    assert any(word == "RUN" and 'torch==${TORCH_VERSION}' in args for word, args in instructions)


def test_image_entry_points_exist_in_the_package() -> None:
    """The images' commands exist: `layerwatch sidecar` (with --config) and the demo server module."""
    from monitor.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    sidecar = sub.choices["sidecar"]  # type: ignore[index]
    assert "--config" in sidecar._option_string_actions
    assert services()["sidecar"]["command"] == ["sidecar"]
    assert importlib.util.find_spec("monitor.demo_server") is not None


def test_images_install_the_right_extras() -> None:
    """The sidecar image installs the sidecar extra (onnxruntime); the demo server only the tap's."""
    sidecar = " ".join(a for w, a in dockerfile_instructions("sidecar.Dockerfile") if w in {"RUN", "ARG"})
    demo = " ".join(a for w, a in dockerfile_instructions("demo-server.Dockerfile") if w == "RUN")
    assert "EXTRA=sidecar" in sidecar and '.[${EXTRA}]' in sidecar
    assert ".[demo,redis,train]" in demo and "sidecar" not in demo
