"""The chart's locks (issue 17, items 5 and 6, chart side): the bundled Redis needs a password from
a Secret that the sidecars and the taps read as files, bounds its memory without evicting, speaks
TLS when asked; NetworkPolicies admit only the sidecars, the taps and Prometheus; the narratives
endpoints are off, or behind a bearer token Secret; the ServiceMonitor can scrape over https; the
README's security section states the chart's defaults."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_helm import (
    CHART,
    ROOT,
    by_kind,
    effective_tap_env,
    env_of,
    helm_env,
    manifests,
    needs_helm,
    render,
    sidecar_statefulset,
    vllm_container,
    vllm_deployment,
)

from tests.redis_server import free_port

__all__ = ["helm_env"]  # the fixture, shared with test_helm

HARDENED = CHART / "ci" / "hardened-values.yaml"
needs_redis_binaries = pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("redis-cli") and shutil.which("openssl")),
    reason="redis-server, redis-cli and openssl are needed")
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


def redis_statefulset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (sts,) = [d for d in by_kind(docs, "StatefulSet") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"]
    return sts


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that ``path`` is inside ``container``; fails when no Secret volume holds it."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            assert m.get("readOnly") is True, m
            secret = volumes[m["name"]]["secret"]
            key = path[len(m["mountPath"].rstrip("/")) + 1:]
            items = secret.get("items")
            assert items is None or {"key": key, "path": key} in items, (items, key)
            return secret["secretName"], key
    raise AssertionError(f"{path} is not on a mounted Secret of {container['name']}")


def memory_bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|kb|mb|gb)?", quantity)
    assert m, quantity
    unit = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "kb": 1024, "mb": 1024**2, "gb": 1024**3, None: 1}[m.group(2)]
    return int(m.group(1)) * unit


@needs_helm
def test_bundled_redis_requires_the_password_the_sidecars_and_taps_read_from_files(helm_env: dict[str, str]) -> None:
    """By default the chart generates a password Secret; Redis runs with --requirepass from it, and
    the sidecar and the vLLM tap get LAYERWATCH(_TAP)_REDIS__PASSWORD_FILE pointing at the same key
    mounted read-only; no URL carries a password."""
    docs = manifests(render(helm_env, None, "vllm.enabled=true").stdout)
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    generated = secrets["lw-layerwatch-redis-auth"]
    password = generated["stringData"]["password"]
    assert len(password) == 32 and generated["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    redis = pod_of(redis_statefulset(docs))["containers"][0]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_of(redis)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "lw-layerwatch-redis-auth", "key": "password"}}
    assert env_of(redis)["REDISCLI_AUTH"] == "$(REDIS_PASSWORD)"  # the probes authenticate

    sidecar = pod_of(sidecar_statefulset(docs))["containers"][0]
    sidecar_file = env_of(sidecar)["LAYERWATCH_REDIS__PASSWORD_FILE"]
    assert mounted_file(pod_of(sidecar_statefulset(docs)), sidecar, sidecar_file) == ("lw-layerwatch-redis-auth", "password")
    vllm = vllm_container(docs)
    tap_file = effective_tap_env(docs, vllm)["LAYERWATCH_TAP_REDIS__PASSWORD_FILE"]
    assert tap_file == sidecar_file
    assert mounted_file(pod_of(vllm_deployment(docs)), vllm, tap_file) == ("lw-layerwatch-redis-auth", "password")
    urls = [v for s in secrets.values() for v in s.get("stringData", {}).values() if "redis://" in v]
    assert urls and all("@" not in u for u in urls)


@needs_helm
def test_an_existing_password_secret_replaces_the_generated_one(helm_env: dict[str, str]) -> None:
    """redis.auth.existingSecret: no Secret is generated; Redis, sidecars and taps use the user's keys
    (password and user name)."""
    docs = manifests(render(helm_env, HARDENED).stdout)
    assert "lw-layerwatch-redis-auth" not in {s["metadata"]["name"] for s in by_kind(docs, "Secret")}
    redis = pod_of(redis_statefulset(docs))["containers"][0]
    assert env_of(redis)["REDIS_PASSWORD"]["secretKeyRef"]["name"] == "layerwatch-redis-auth"
    pod = pod_of(sidecar_statefulset(docs))
    env = env_of(pod["containers"][0])
    assert mounted_file(pod, pod["containers"][0], env["LAYERWATCH_REDIS__PASSWORD_FILE"]) == ("layerwatch-redis-auth", "password")
    assert mounted_file(pod, pod["containers"][0], env["LAYERWATCH_REDIS__USERNAME_FILE"]) == ("layerwatch-redis-auth", "username")
    tap = {s["metadata"]["name"]: s["stringData"] for s in by_kind(docs, "Secret")}["lw-layerwatch-tap-env"]
    assert tap["LAYERWATCH_TAP_REDIS__USERNAME_FILE"] == env["LAYERWATCH_REDIS__USERNAME_FILE"]


@needs_helm
def test_bundled_redis_bounds_its_memory_and_never_evicts(helm_env: dict[str, str]) -> None:
    """The bundled Redis runs with maxmemory below its container's memory limit and the noeviction
    policy (a full Redis refuses writes; it never drops stream entries or ledger keys silently)."""
    redis = pod_of(redis_statefulset(manifests(render(helm_env).stdout)))["containers"][0]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = memory_bytes(args[args.index("--maxmemory") + 1])
    assert 0 < maxmemory < memory_bytes(redis["resources"]["limits"]["memory"])
    assert redis["resources"]["requests"]["memory"] == redis["resources"]["limits"]["memory"]  # never overcommitted


@needs_helm
def test_tls_makes_every_redis_client_use_rediss_with_the_mounted_ca_and_client_certificate(helm_env: dict[str, str]) -> None:
    """redis.tls: Redis listens with TLS only and requires client certificates; the URL is rediss://;
    sidecars and taps get the CA, certificate and key files from the mounted TLS Secret; the probes
    speak TLS."""
    docs = manifests(render(helm_env, HARDENED, "vllm.enabled=true").stdout)
    redis_pod = pod_of(redis_statefulset(docs))
    redis = redis_pod["containers"][0]
    args = redis["args"]
    assert args[args.index("--port") + 1] == "0" and args[args.index("--tls-port") + 1] == "6379"
    assert args[args.index("--tls-auth-clients") + 1] == "yes"
    for flag in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        assert mounted_file(redis_pod, redis, args[args.index(flag) + 1])[0] == "layerwatch-redis-tls"
    assert "--tls" in redis["readinessProbe"]["exec"]["command"]
    secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in by_kind(docs, "Secret")}
    assert secrets["lw-layerwatch-redis-url"]["url"].startswith("rediss://")
    for workload, container, prefix in ((sidecar_statefulset(docs), pod_of(sidecar_statefulset(docs))["containers"][0],
                                         "LAYERWATCH_REDIS__"),
                                        (vllm_deployment(docs), vllm_container(docs), "LAYERWATCH_TAP_REDIS__")):
        env = {**env_of(container), **effective_tap_env(docs, container)}
        for key, name in (("TLS_CA_FILE", "ca.crt"), ("TLS_CERT_FILE", "tls.crt"), ("TLS_KEY_FILE", "tls.key")):
            assert mounted_file(pod_of(workload), container, env[prefix + key]) == ("layerwatch-redis-tls", name)


@needs_helm
def test_network_policies_admit_only_the_sidecars_taps_and_prometheus(helm_env: dict[str, str]) -> None:
    """On by default: the bundled Redis takes connections on its port only from the sidecar pods, the
    chart's vLLM pods and pods with redisClientLabels; the sidecars' HTTP port and the vLLM pods'
    tap metrics port only from Prometheus pods (vLLM's API stays open). Off: no NetworkPolicy; an
    empty metricsFrom admits nobody (not everybody)."""
    docs = manifests(render(helm_env, None, "vllm.enabled=true").stdout)
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "NetworkPolicy")}
    redis = policies["lw-layerwatch-redis"]
    assert redis["podSelector"]["matchLabels"] == redis_statefulset(docs)["spec"]["selector"]["matchLabels"]
    assert redis["policyTypes"] == ["Ingress"]
    (rule,) = redis["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    selectors = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert selectors == [sidecar_statefulset(docs)["spec"]["selector"]["matchLabels"],
                         vllm_deployment(docs)["spec"]["selector"]["matchLabels"],
                         {"layerwatch.io/redis-client": "true"}]
    sidecar = policies["lw-layerwatch-sidecar"]
    assert sidecar["podSelector"]["matchLabels"] == sidecar_statefulset(docs)["spec"]["selector"]["matchLabels"]
    (rule,) = sidecar["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]

    vllm = policies["lw-layerwatch-vllm"]
    assert vllm["podSelector"]["matchLabels"] == vllm_deployment(docs)["spec"]["selector"]["matchLabels"]
    api, tap_metrics = vllm["ingress"]
    assert api == {"ports": [{"port": "api", "protocol": "TCP"}]}  # the API stays open to every client
    assert tap_metrics["ports"] == [{"port": "tap-metrics", "protocol": "TCP"}] and tap_metrics["from"] == rule["from"]

    assert not by_kind(manifests(render(helm_env, None, "networkPolicy.enabled=false").stdout), "NetworkPolicy")
    closed = manifests(render(helm_env, None, "networkPolicy.metricsFrom=null").stdout)
    assert {p["metadata"]["name"]: p["spec"] for p in by_kind(closed, "NetworkPolicy")}["lw-layerwatch-sidecar"]["ingress"] == []
    hardened = manifests(render(helm_env, HARDENED).stdout)
    (rule,) = {p["metadata"]["name"]: p["spec"] for p in by_kind(hardened, "NetworkPolicy")}["lw-layerwatch-redis"]["ingress"]
    assert {"podSelector": {"matchLabels": {"app": "inference-server"}}} in rule["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "batch-jobs"}}} in rule["from"]
    external = manifests(render(helm_env, CHART / "ci" / "external-redis-values.yaml").stdout)
    assert [p["metadata"]["name"] for p in by_kind(external, "NetworkPolicy")] == ["lw-layerwatch-sidecar"]


@needs_helm
def test_narratives_are_off_by_default_and_served_only_behind_a_token_secret(helm_env: dict[str, str]) -> None:
    """By default the sidecars get no narratives settings (the sidecar's default: not served, no
    tokens) and listen on all interfaces for probes and Prometheus; enabled, the bearer token file
    is a mounted Secret key; enabled without a Secret, the chart refuses to render."""
    env = env_of(pod_of(sidecar_statefulset(manifests(render(helm_env).stdout)))["containers"][0])
    assert not [n for n in env if n.startswith("LAYERWATCH_NARRATIVES__")]
    assert env["LAYERWATCH_HTTP_HOST"] == "0.0.0.0"
    docs = manifests(render(helm_env, None, "sidecar.narratives.enabled=true",
                            "sidecar.narratives.bearerToken.existingSecret=layerwatch-narratives-token").stdout)
    pod = pod_of(sidecar_statefulset(docs))
    env = env_of(pod["containers"][0])
    assert env["LAYERWATCH_NARRATIVES__SERVE"] == "true" and "LAYERWATCH_NARRATIVES__INCLUDE_TOKENS" not in env
    assert mounted_file(pod, pod["containers"][0], env["LAYERWATCH_NARRATIVES__BEARER_TOKEN_FILE"]) == \
        ("layerwatch-narratives-token", "token")
    refused = render(helm_env, None, "sidecar.narratives.enabled=true", ok=False)
    assert refused.returncode != 0 and "sidecar.narratives.bearerToken.existingSecret is required" in refused.stderr


@needs_helm
def test_kube_rbac_proxy_fronts_a_loopback_sidecar_with_kubernetes_authorization(helm_env: dict[str, str]) -> None:
    """sidecar.kubeRbacProxy: the sidecar binds loopback; the proxy serves the Service's "metrics"
    port over TLS, forwards to the sidecar's port and lets only the probes' paths through without
    a token; the kubelet probes it over HTTPS; only the proxy container gets a ServiceAccount token
    (projected), whose ClusterRole may create Token- and SubjectAccessReviews; the ServiceMonitor
    scrapes https with Prometheus' token; narratives need no bearer token Secret behind it."""
    docs = manifests(render(helm_env, CHART / "ci" / "kube-rbac-proxy-values.yaml",
                            "sidecar.narratives.enabled=true").stdout)
    sts = sidecar_statefulset(docs)
    pod = pod_of(sts)
    sidecar, proxy = pod["containers"]
    env = env_of(sidecar)
    assert env["LAYERWATCH_HTTP_HOST"] == "127.0.0.1" and "LAYERWATCH_NARRATIVES__BEARER_TOKEN_FILE" not in env
    assert "ports" not in sidecar and proxy["name"] == "kube-rbac-proxy"
    args = dict(a.removeprefix("--").split("=", 1) for a in proxy["args"])
    assert args["upstream"] == f"http://127.0.0.1:{env['LAYERWATCH_HTTP_PORT']}/"
    (port,) = proxy["ports"]
    assert port["name"] == "metrics" and args["secure-listen-address"] == f"0.0.0.0:{port['containerPort']}"
    assert args["ignore-paths"].split(",") == ["/healthz", "/readyz"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = sidecar[probe]["httpGet"]
        assert get["scheme"] == "HTTPS" and get["port"] == port["containerPort"] and get["path"] in args["ignore-paths"]
    assert pod["automountServiceAccountToken"] is False
    api = {m["name"]: m for m in proxy["volumeMounts"]}["kube-api-access"]
    assert api["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and api["readOnly"]
    assert "kube-api-access" not in {m["name"] for m in sidecar["volumeMounts"]}
    assert mounted_file(pod, proxy, args["tls-cert-file"]) == ("layerwatch-metrics-tls", "tls.crt")
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    assert {(g, r) for rule in roles["lw-layerwatch-kube-rbac-proxy"]["rules"]
            for g in rule["apiGroups"] for r in rule["resources"]} == {
        ("authentication.k8s.io", "tokenreviews"), ("authorization.k8s.io", "subjectaccessreviews")}
    assert roles["lw-layerwatch-metrics-reader"]["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "models"}]
    (sm,) = by_kind(docs, "ServiceMonitor")
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["port"] == "metrics"
    assert endpoint["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert endpoint["tlsConfig"]["serverName"] == "lw-layerwatch.models.svc"
    plain = manifests(render(helm_env, None, "sidecar.kubeRbacProxy.enabled=true").stdout)
    assert by_kind(plain, "ServiceMonitor")[0]["spec"]["endpoints"][0]["tlsConfig"] == {"insecureSkipVerify": True}
    assert not by_kind(manifests(render(helm_env).stdout), "ClusterRole")


@needs_helm
def test_servicemonitor_scrapes_over_https_with_the_given_tls_config(helm_env: dict[str, str]) -> None:
    """serviceMonitor.scheme/tlsConfig reach the endpoint; the default scrapes plain http."""
    (default,) = by_kind(manifests(render(helm_env).stdout), "ServiceMonitor")
    assert default["spec"]["endpoints"][0]["scheme"] == "http" and "tlsConfig" not in default["spec"]["endpoints"][0]
    (sm,) = by_kind(manifests(render(helm_env, HARDENED).stdout), "ServiceMonitor")
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"ca": {"secret": {"name": "layerwatch-metrics-ca", "key": "ca.crt"}},
                                     "serverName": "lw-layerwatch.models.svc"}


@needs_helm
@pytest.mark.parametrize(("sets", "message"), [
    (("redis.bundled.enabled=false", "redis.url=rediss://:s3cret@r.example:6380/0", "redis.auth.existingSecret=pw"),
     "carries a password and redis.auth.existingSecret is set"),
    (("redis.bundled.enabled=false", "redis.url=redis://r.example:6379/0", "redis.tls.enabled=true",
      "redis.tls.existingSecret=tls"), "redis.tls.enabled needs a rediss:// redis.url"),
    (("redis.tls.enabled=true",), "redis.tls.existingSecret is required"),
    (("redis.bundled.maxmemoryPolicy=allkeys-lru",), "/redis/bundled/maxmemoryPolicy"),
    (("redis.bundled.enabled=false", "redis.url=http://:s3cret@x"), "must start with redis://"),
])
def test_unsafe_redis_values_fail_naming_the_setting_and_never_echo_a_password(helm_env: dict[str, str],
                                                                              sets: tuple[str, ...], message: str) -> None:
    """A password both in the URL and a Secret, TLS without rediss:// or a Secret, an evicting policy
    fail at render time with the setting named; the error never repeats the URL's password."""
    result = render(helm_env, None, *sets, ok=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "s3cret" not in result.stderr


def readme_security_defaults() -> dict[str, str]:
    """The 'chart value | default' rows of the README's security section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Security", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-zA-Z.]+)` \| `([^`]*)` \|", section, flags=re.MULTILINE)
    assert rows, "the README's security section has no table of chart defaults"
    return dict(rows)


def value_at(path: str) -> Any:
    node: Any = DEFAULTS
    for part in path.split("."):
        node = node[part]
    return node


def test_readme_security_section_states_the_chart_defaults() -> None:
    """Every chart value the README's security section lists has the default the README gives."""
    rows = readme_security_defaults()
    assert {"networkPolicy.enabled", "sidecar.narratives.enabled", "redis.bundled.maxmemoryPolicy",
            "redis.tls.enabled", "serviceMonitor.scheme"} <= rows.keys()
    for path, stated in rows.items():
        assert stated == shown(value_at(path)), f"README says {path} defaults to {stated!r}; values.yaml has {value_at(path)!r}"


def shown(value: Any) -> str:
    """A default as the README writes it: strings bare (empty as ""), the rest as flow YAML."""
    if isinstance(value, str):
        return value or '""'
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()



def _run_rendered_redis(args: list[str], env: dict[str, str], tmp_path: Path, mounts: dict[str, Path]) -> tuple[int, int]:
    """Start redis-server with the chart's container args as the kubelet would pass them ($(VAR)
    expanded from ``env``, Secret mount paths mapped to local files), on a free local port; returns
    (port, pid)."""
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    for mount, local in mounts.items():
        expanded = [a.replace(mount, str(local)) for a in expanded]
    expanded = [str(tmp_path) if a == "/data" else a for a in expanded]  # the data volume
    assert expanded[0] == "redis-server"
    port = free_port()
    listen = ["--tls-port" if "--tls-port" in expanded else "--port", str(port)]
    cmd = [*expanded, *listen, "--bind", "127.0.0.1", "--dir", str(tmp_path), "--appendonly", "no",
           "--daemonize", "yes", "--pidfile", str(tmp_path / "redis.pid")]
    subprocess.run(cmd, check=True, timeout=10)
    deadline = time.monotonic() + 10
    while not (tmp_path / "redis.pid").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return port, int((tmp_path / "redis.pid").read_text())


def _probe(command: list[str], port: int, env: dict[str, str], mounts: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    """The chart's redis-cli probe against the local server (its TLS flags kept, paths mapped)."""
    cmd = list(command)
    for mount, local in mounts.items():
        cmd = [a.replace(mount, str(local)) for a in cmd]
    cmd = [cmd[0], "-h", "127.0.0.1", "-p", str(port), *cmd[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, env={**os.environ, **env})


@needs_helm
@needs_redis_binaries
@pytest.mark.timeout(120)
@pytest.mark.parametrize("tls", [False, True], ids=["password", "tls"])
def test_the_rendered_redis_and_client_settings_work_against_a_real_redis_server(helm_env: dict[str, str],
                                                                                tmp_path: Path, tls: bool) -> None:
    """redis-server run with the chart's own args (password from the generated Secret, maxmemory,
    noeviction; with redis.tls its TLS files and client certificates) answers the chart's probe,
    refuses a client without the password, and accepts one built from the sidecar's rendered
    LAYERWATCH_REDIS__* settings, with the Secrets' files where the chart mounts them."""
    from monitor.backends.redis import close_all, connect
    from monitor.config import RedisSettings
    from tests.redis_server import make_tls_files

    sets = ("redis.tls.enabled=true", "redis.tls.existingSecret=layerwatch-redis-tls") if tls else ()
    docs = manifests(render(helm_env, None, *sets).stdout)
    secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in by_kind(docs, "Secret")}
    password = secrets["lw-layerwatch-redis-auth"]["password"]
    auth_dir = tmp_path / "auth"
    auth_dir.mkdir()
    (auth_dir / "password").write_text(password)
    mounts = {"/run/layerwatch/redis-tls": tmp_path / "tls", "/run/layerwatch/redis": auth_dir}
    if tls:  # the Secret's keys, cert-manager style: ca.crt, tls.crt, tls.key
        files = make_tls_files(tmp_path / "made")
        (tmp_path / "tls").mkdir()
        for src, key in ((files.ca, "ca.crt"), (files.server_cert, "tls.crt"), (files.server_key, "tls.key")):
            shutil.copy(src, tmp_path / "tls" / key)
    redis = pod_of(redis_statefulset(docs))["containers"][0]
    env = {"REDIS_PASSWORD": password, "REDISCLI_AUTH": password}  # as the container's env expands them
    assert env_of(redis)["REDISCLI_AUTH"] == "$(REDIS_PASSWORD)"
    port, pid = _run_rendered_redis(redis["args"], env, tmp_path, mounts)
    try:
        deadline = time.monotonic() + 10
        while (probe := _probe(redis["readinessProbe"]["exec"]["command"], port, env, mounts)).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(0.05)
        assert "NOAUTH" in _probe(redis["readinessProbe"]["exec"]["command"], port, {"REDISCLI_AUTH": ""}, mounts).stdout
        sidecar_env = env_of(pod_of(sidecar_statefulset(docs))["containers"][0])
        fields = {k.removeprefix("LAYERWATCH_REDIS__").lower(): v for k, v in sidecar_env.items()
                  if k.startswith("LAYERWATCH_REDIS__")}
        for k, v in fields.items():
            for mount, local in mounts.items():
                v = v.replace(mount, str(local))
            fields[k] = v
        url = secrets["lw-layerwatch-redis-url"]["url"]
        assert url.startswith("rediss://" if tls else "redis://")
        local_url = re.sub(r"//[^/]+/", f"//127.0.0.1:{port}/", url)
        close_all()
        client = connect(local_url, settings=RedisSettings(**fields))
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == memory_bytes(DEFAULTS["redis"]["bundled"]["maxmemory"])
    finally:
        close_all()
        os.kill(pid, signal.SIGTERM)
