"""The Helm chart (helm/layerwatch): lint, render with every ci/ values file, validate.

helm is the static binary scripts/services.sh puts in .tools/ (HELM_*_HOME point into a temp
dir); rendered manifests go through ``kubernetes-validate --strict -k 1.33.0``; the
PrometheusRule's rules go through promtool, including the alert unit tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_compose import assert_env_sets_settings, sidecar_settings_from, tap_settings_from
from test_prometheus import ALERT_TESTS, ROOT, RULES, needs_promtool, run_promtool

CHART = ROOT / "helm" / "layerwatch"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
HELM = shutil.which("helm") or (str(ROOT / ".tools" / "helm") if (ROOT / ".tools" / "helm").exists() else None)
HAS_KUBERNETES_VALIDATE = importlib.util.find_spec("kubernetes_validate") is not None
KUBE_VERSION = "1.33.0"

needs_helm = pytest.mark.skipif(HELM is None, reason="helm not installed (scripts/services.sh puts it in .tools/)")


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for helm with its cache, config and data homes in a temp dir."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    env.update(HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"))
    return env


@cache
def _render(values: tuple[str, ...], sets: tuple[str, ...], env_items: tuple[tuple[str, str], ...]) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    args = [HELM, "template", "lw", str(CHART), "--namespace", "models", "--kube-version", KUBE_VERSION]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=dict(env_items))


def render(helm_env: dict[str, str], values: Path | None = None, *sets: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm template` the chart with a values file and --set overrides (cached per arguments)."""
    result = _render((str(values),) if values else (), sets, tuple(sorted(helm_env.items())))
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def manifests(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def sidecar_statefulset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (sts,) = [d for d in by_kind(docs, "StatefulSet") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "sidecar"]
    return sts


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_generated_files_are_current() -> None:
    """Every generated file (the chart's dashboards and rules, deploy's dashboards, the README's
    references) holds what `make generate` writes from its one source now."""
    from monitor.docsgen import stale_files

    assert stale_files() == [], "run `make generate`"


def test_the_chart_gets_every_dashboard_and_rule_file_from_the_generator() -> None:
    """The chart's files are exactly the generated set: nothing extra that someone edits by hand."""
    from monitor.docsgen import CHART_FILES, generated_files

    chart = {p for p in CHART_FILES.rglob("*") if p.is_file() and p.name != "README.md"}
    assert chart == {p for p in generated_files() if CHART_FILES in p.parents}


@needs_helm
@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_helm_lint_strict(helm_env: dict[str, str], values: Path | None) -> None:
    """`helm lint --strict` passes with the defaults and with each ci/ values file."""
    assert HELM is not None
    args = [HELM, "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=helm_env)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
@pytest.mark.skipif(not HAS_KUBERNETES_VALIDATE, reason="kubernetes-validate not installed (pip install kubernetes-validate)")
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.name)
def test_rendered_manifests_pass_kubernetes_validate_strict(helm_env: dict[str, str], values: Path) -> None:
    """Every rendered built-in resource validates strictly against the Kubernetes 1.33 schemas."""
    rendered = render(helm_env, values).stdout
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, "-"],
                            input=rendered, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output, output
    builtin = [d for d in manifests(rendered) if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert output.count("passed for resource") == len(builtin), output


# The subset of prometheus-operator's CRDs the chart fills (kubernetes-validate has no CRD schemas).
_RELABEL = {"type": "object", "additionalProperties": False, "required": ["targetLabel", "replacement", "action"],
            "properties": {"targetLabel": {"type": "string"}, "replacement": {"type": "string"},
                           "action": {"const": "replace"}}}
_ENDPOINT = {"type": "object", "required": ["port", "path", "interval", "relabelings"],
             "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "scheme": {"enum": ["http", "https"]},
                            "bearerTokenFile": {"type": "string", "pattern": "^/"},
                            "tlsConfig": {"type": "object", "additionalProperties": False,  # TLSConfig's fields
                                          "properties": {k: {"type": ["object", "string", "boolean"]} for k in (
                                              "ca", "cert", "keySecret", "serverName", "insecureSkipVerify",
                                              "caFile", "certFile", "keyFile", "minVersion", "maxVersion")}}},
             "additionalProperties": False}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                       "properties": {"selector": {"type": "object", "required": ["matchLabels"]},
                                      "namespaceSelector": {"type": "object"},
                                      "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}},
    "PodMonitor": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
                   "properties": {"selector": {"type": "object", "required": ["matchLabels"]},
                                  "namespaceSelector": {"type": "object"},
                                  "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}},
    "PrometheusRule": {"type": "object", "required": ["groups"], "additionalProperties": False,
                       "properties": {"groups": {"type": "array", "minItems": 1}}},
}


@needs_helm
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.name)
def test_prometheus_operator_resources_match_their_schema(helm_env: dict[str, str], values: Path) -> None:
    """ServiceMonitor, PodMonitor and PrometheusRule specs have the fields prometheus-operator expects."""
    import jsonschema

    for doc in manifests(render(helm_env, values).stdout):
        if doc["kind"] in CRD_SCHEMAS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            jsonschema.validate(doc["spec"], CRD_SCHEMAS[doc["kind"]])


@needs_helm
def test_prometheusrule_specs_are_the_deploy_rule_files(helm_env: dict[str, str]) -> None:
    """The PrometheusRules carry exactly the groups of deploy/prometheus/rules (recording, then alerts)."""
    rules = by_kind(manifests(render(helm_env).stdout), "PrometheusRule")
    assert [r["metadata"]["name"] for r in rules] == ["lw-layerwatch-recording", "lw-layerwatch-alerts"]
    for rule, path in zip(rules, (RULES["recording"], RULES["alerts"]), strict=True):
        assert rule["spec"] == yaml.safe_load(path.read_text())


@needs_helm
def test_runbook_base_url_rewrites_only_runbook_links(helm_env: dict[str, str]) -> None:
    """prometheusRule.runbookBaseUrl turns each relative runbook_url into an absolute one and changes nothing else."""
    base = "https://docs.example.org/layerwatch/runbooks.md"
    (alerts,) = [r for r in by_kind(manifests(render(helm_env, None, f"prometheusRule.runbookBaseUrl={base}").stdout),
                                    "PrometheusRule") if r["metadata"]["name"].endswith("-alerts")]
    original = yaml.safe_load(RULES["alerts"].read_text())
    for got, want in zip(alerts["spec"]["groups"][0]["rules"], original["groups"][0]["rules"], strict=True):
        assert got["annotations"].pop("runbook_url") == want["annotations"].pop("runbook_url").replace("deploy/runbooks.md", base)
        assert got == want


@needs_helm
@needs_promtool
def test_rendered_rules_pass_promtool_check_and_the_alert_unit_tests(helm_env: dict[str, str], tmp_path: Path) -> None:
    """The rendered PrometheusRules' rules pass `promtool check rules` and the same unit tests as deploy/."""
    rules = by_kind(manifests(render(helm_env).stdout), "PrometheusRule")
    files = []
    for rule in rules:
        path = tmp_path / f"{rule['metadata']['name']}.yml"
        path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
        files.append(path.name)
    check = run_promtool("check", "rules", *files, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tests["rule_files"] = files
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run_promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.name)
def test_every_container_is_non_root_read_only_and_bounded(helm_env: dict[str, str], values: Path) -> None:
    """All containers run as non-root with a read-only root, no privilege escalation, no capabilities, and resources."""
    for doc in manifests(render(helm_env, values).stdout):
        if doc["kind"] not in {"StatefulSet", "Deployment"}:
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]


@needs_helm
def test_sidecar_env_and_tap_env_agree(helm_env: dict[str, str]) -> None:
    """The tap's env Secret names the stream, model and Redis URL the sidecars read."""
    docs = manifests(render(helm_env).stdout)
    sidecar = env_of(sidecar_statefulset(docs)["spec"]["template"]["spec"]["containers"][0])
    secrets = {s["metadata"]["name"]: s["stringData"] for s in by_kind(docs, "Secret")}
    tap = secrets["lw-layerwatch-tap-env"]
    url_ref = sidecar["LAYERWATCH_TRANSPORT"]["secretKeyRef"]
    assert tap["LAYERWATCH_TAP_TRANSPORT"] == secrets[url_ref["name"]][url_ref["key"]] == \
        "redis://lw-layerwatch-redis.models.svc:6379/0"
    assert tap["LAYERWATCH_TAP_STREAM"] == sidecar["LAYERWATCH_STREAM"]
    assert tap["LAYERWATCH_TAP_MODEL_NAME"] == sidecar["LAYERWATCH_MODEL_NAME"]
    # The sidecars export the taps' MAXLEN as the bound of the lag alert: one value for both.
    assert tap["LAYERWATCH_TAP_STREAM_MAXLEN"] == sidecar["LAYERWATCH_STREAM_MAXLEN"] == "10000"
    docs = manifests(render(helm_env, None, "tap.streamMaxlen=50000").stdout)
    sidecar = env_of(sidecar_statefulset(docs)["spec"]["template"]["spec"]["containers"][0])
    tap = {s["metadata"]["name"]: s["stringData"] for s in by_kind(docs, "Secret")}["lw-layerwatch-tap-env"]
    assert tap["LAYERWATCH_TAP_STREAM_MAXLEN"] == sidecar["LAYERWATCH_STREAM_MAXLEN"] == "50000"
    assert sidecar["LAYERWATCH_CONSUMER"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert sidecar["LAYERWATCH_EXPECT_GPU"] == "false"


@needs_helm
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.name)
def test_rendered_env_is_valid_sidecar_and_tap_configuration(helm_env: dict[str, str], values: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar container's env and the tap env Secret pass their settings validation, every variable taking effect."""
    docs = manifests(render(helm_env, values).stdout)
    secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in by_kind(docs, "Secret")}
    sidecar_env = {}
    for name, value in env_of(sidecar_statefulset(docs)["spec"]["template"]["spec"]["containers"][0]).items():
        if isinstance(value, str):
            sidecar_env[name] = value
        elif "fieldRef" in value:
            sidecar_env[name] = "lw-layerwatch-0"
        else:  # secretKeyRef: the chart's Secret, or an existing one holding a URL
            ref = value["secretKeyRef"]
            sidecar_env[name] = secrets.get(ref["name"], {}).get(ref["key"], "redis://redis.example:6379/0")
    assert_env_sets_settings(sidecar_env, "LAYERWATCH_", sidecar_settings_from(sidecar_env, monkeypatch))
    tap_env = secrets["lw-layerwatch-tap-env"]
    assert_env_sets_settings(tap_env, "LAYERWATCH_TAP_", tap_settings_from(tap_env, monkeypatch))


@needs_helm
def test_audit_and_bundle_volumes_are_mounted_where_the_env_says(helm_env: dict[str, str]) -> None:
    """The audit PVC template and the read-only bundle PVC are mounted at the configured paths."""
    sts = sidecar_statefulset(manifests(render(helm_env).stdout))
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["audit"]["mountPath"] == env["LAYERWATCH_AUDIT__DIRECTORY"]
    assert mounts["bundle"]["mountPath"] == env["LAYERWATCH_BUNDLE"] and mounts["bundle"]["readOnly"] is True
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "audit" and claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["bundle"]["persistentVolumeClaim"] == {"claimName": "layerwatch-bundle", "readOnly": True}
    assert "audit" not in volumes


@needs_helm
def test_external_redis_values_use_url_secret_image_bundle_and_hmac(helm_env: dict[str, str]) -> None:
    """With an external Redis, no Redis is deployed; the bundle image is copied by an init container;
    the HMAC key is mounted; the audit trail falls back to an emptyDir."""
    docs = manifests(render(helm_env, CHART / "ci" / "external-redis-values.yaml").stdout)
    assert [d["metadata"]["name"] for d in by_kind(docs, "StatefulSet")] == ["lw-layerwatch"]
    pod = sidecar_statefulset(docs)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["cp", "-R", "/bundle/.", "/var/lib/layerwatch/bundle/"]
    env = env_of(pod["containers"][0])
    assert env["LAYERWATCH_AUDIT__HMAC_KEY_FILE"] == "/run/layerwatch/hmac/hmac-key"
    assert env["LAYERWATCH_BASELINE__ID"] == "2025-06-01-normal"
    assert json.loads(env["LAYERWATCH_BASELINE__WATCH"]) == ["topic@mean=legal"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["audit"] == {"name": "audit", "emptyDir": {}}
    assert volumes["hmac-key"]["secret"]["secretName"] == "layerwatch-audit-hmac"
    secrets = {s["metadata"]["name"]: s["stringData"] for s in by_kind(docs, "Secret")}
    assert secrets["lw-layerwatch-redis-url"]["url"].startswith("rediss://")
    assert secrets["lw-layerwatch-tap-env"]["LAYERWATCH_TAP_METRICS_PORT"] == "9401"
    (pm,) = by_kind(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"app": "inference-server"}
    assert {r["targetLabel"]: r["replacement"] for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]} == \
        {"job": "layerwatch-tap"}
    assert len(by_kind(docs, "ConfigMap")) == 3
    assert not by_kind(docs, "PodDisruptionBudget")


@needs_helm
def test_gpu_values_request_a_gpu_and_label_the_target(helm_env: dict[str, str]) -> None:
    """expectGpu requests one GPU, sets LAYERWATCH_EXPECT_GPU and labels the scrape target expect_gpu="true"."""
    docs = manifests(render(helm_env, CHART / "ci" / "gpu-values.yaml").stdout)
    container = sidecar_statefulset(docs)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["LAYERWATCH_EXPECT_GPU"] == "true"
    assert env_of(container)["LAYERWATCH_TRANSPORT"] == {"secretKeyRef": {"name": "layerwatch-redis", "key": "redis-url"}}
    (sm,) = by_kind(docs, "ServiceMonitor")
    relabel = {r["targetLabel"]: r["replacement"] for r in sm["spec"]["endpoints"][0]["relabelings"]}
    assert relabel == {"job": "layerwatch-sidecar", "expect_gpu": "true"}
    assert "LAYERWATCH_TAP_TRANSPORT" not in {k for s in by_kind(docs, "Secret") for k in s["stringData"]}


@needs_helm
def test_servicemonitor_selects_the_sidecar_service_port(helm_env: dict[str, str]) -> None:
    """The ServiceMonitor's selector and port name match the sidecars' Service, and its job label the alerts'."""
    docs = manifests(render(helm_env).stdout)
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "lw-layerwatch"]
    labels = svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert 'job="layerwatch-sidecar"' in RULES["alerts"].read_text()
    sts = sidecar_statefulset(docs)
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]


@needs_helm
@pytest.mark.parametrize(("sets", "message"), [
    (("redis.bundled.enabled=false",), "no Redis"),
    (("redis.bundled.enabled=false", "redis.url=http://x"), "must start with redis://"),
    (("bundle.configMap=extra",), "exactly one lens bundle source"),
    (("bundle.existingClaim=",), "exactly one lens bundle source"),
    (("model.name=",), "model.name is required"),
    (("tapPodMonitor.enabled=true",), "tapPodMonitor.podSelector is required"),
    (("sidecar.replica=3",), "additional properties 'replica' not allowed"),  # values.schema.json
    (("tap.sampleRate=2",), "/tap/sampleRate"),
    (("sidecar.watch={legal}",), "/sidecar/watch/0"),  # not '<probe>=<label>'
    (("vllm.enabled=true", "vllm.model.volume.hostPath.path=/data/models"), "/vllm/model/volume"),
    (("vllm.enabled=true", "vllm.model.existingClaim=weights", "vllm.model.volume.nfs.server=nfs.example",
      "vllm.model.volume.nfs.path=/models"), "at most one weights volume"),
    (("vllm.enabled=true", "vllm.model.existingClaim=weights", "vllm.model.path=/weights/m"), "must be under vllm.model.mountPath"),
    (("vllm.enabled=true", "vllm.model.existingClaim=weights", "vllm.model.path=org/model"), "is a Hugging Face id"),
    (("vllm.enabled=true", "vllm.gpuCount=0"), "/vllm/gpuCount"),
    (("vllm.enabled=true", "vllm.image.pullPolicy=Sometimes"), "/vllm/image/pullPolicy"),
])
def test_invalid_values_fail_with_a_message_naming_the_setting(helm_env: dict[str, str], sets: tuple[str, ...], message: str) -> None:
    """Missing or contradictory values stop `helm template` with an error that says what to set."""
    result = render(helm_env, None, *sets, ok=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# ------------------------------------------------------------------ the optional vLLM server (vllm.*)
VLLM_VALUES = [CHART / "ci" / "vllm-cpu-values.yaml", CHART / "ci" / "vllm-gpu-values.yaml"]


def vllm_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"]
    return dep


def vllm_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = vllm_deployment(docs)["spec"]["template"]["spec"]["containers"]
    return container


def cli_args(args: list[str]) -> dict[str, str]:
    return {flag: value for flag, value in zip(args, args[1:], strict=False) if flag.startswith("--")}


def effective_tap_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The LAYERWATCH_TAP_* environment the container's process sees: envFrom Secrets, then env
    (which wins); a secretKeyRef to a Secret the chart does not render stands for a Redis URL."""
    secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in by_kind(docs, "Secret")}
    out: dict[str, str] = {}
    for source in container.get("envFrom", []):
        out.update(secrets[source["secretRef"]["name"]])
    for name, value in env_of(container).items():
        if isinstance(value, str):
            out[name] = value
        elif "secretKeyRef" in value:
            ref = value["secretKeyRef"]
            out[name] = secrets.get(ref["name"], {}).get(ref["key"], "redis://redis.example:6379/0")
    return {k: v for k, v in out.items() if k.startswith("LAYERWATCH_TAP_")}


@needs_helm
def test_vllm_is_off_by_default(helm_env: dict[str, str]) -> None:
    """Without vllm.enabled the chart renders no vLLM Deployment or Service, and the ci files that do not
    enable it render none either."""
    for values in [None, *(v for v in CI_VALUES if v not in VLLM_VALUES)]:
        docs = manifests(render(helm_env, values).stdout)
        assert not by_kind(docs, "Deployment"), values
        assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-vllm")], values


@needs_helm
@pytest.mark.parametrize("values", VLLM_VALUES, ids=lambda v: v.name)
def test_vllm_deployment_gets_the_tap_env_secret_and_the_sidecars_stream(helm_env: dict[str, str], values: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM container takes the tap env Secret through envFrom (the plugin's on switch); its effective
    tap environment is valid TapSettings, every variable taking effect, and names the sidecars' Redis,
    stream, MAXLEN and model, which is also the name vLLM serves the model under."""
    docs = manifests(render(helm_env, values).stdout)
    container = vllm_container(docs)
    assert container["envFrom"] == [{"secretRef": {"name": "lw-layerwatch-tap-env"}}]
    assert container["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    tap_env = effective_tap_env(docs, container)
    settings = tap_settings_from(tap_env, monkeypatch)
    assert_env_sets_settings(tap_env, "LAYERWATCH_TAP_", settings)
    sidecar = sidecar_statefulset(docs)["spec"]["template"]["spec"]["containers"][0]
    sidecar_env = env_of(sidecar)
    assert tap_env["LAYERWATCH_TAP_STREAM"] == sidecar_env["LAYERWATCH_STREAM"]
    assert tap_env["LAYERWATCH_TAP_STREAM_MAXLEN"] == sidecar_env["LAYERWATCH_STREAM_MAXLEN"]
    assert tap_env["LAYERWATCH_TAP_MODEL_NAME"] == sidecar_env["LAYERWATCH_MODEL_NAME"]
    # The same Redis URL, from the chart's Secret or the same existing Secret.
    transport = env_of(container).get("LAYERWATCH_TAP_TRANSPORT")
    if transport is None:
        ref = sidecar_env["LAYERWATCH_TRANSPORT"]["secretKeyRef"]
        secrets = {s["metadata"]["name"]: s["stringData"] for s in by_kind(docs, "Secret")}
        assert tap_env["LAYERWATCH_TAP_TRANSPORT"] == secrets[ref["name"]][ref["key"]]
    else:
        assert transport == sidecar_env["LAYERWATCH_TRANSPORT"]
    args = cli_args(container["args"])
    assert args["--served-model-name"] == tap_env["LAYERWATCH_TAP_MODEL_NAME"]
    assert args["--host"] == "0.0.0.0" and int(args["--port"]) == container["ports"][0]["containerPort"]


@needs_helm
@pytest.mark.parametrize("values", VLLM_VALUES, ids=lambda v: v.name)
def test_tap_podmonitor_scrapes_the_vllm_tap_port(helm_env: dict[str, str], values: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The tap PodMonitor selects the vLLM pods and has an endpoint on the named container port where the
    tap serves its metrics, on all interfaces; that port is not vLLM's API port; with a podSelector the
    user's own pods keep their endpoint, with none only the vLLM pods are selected."""
    docs = manifests(render(helm_env, values).stdout)
    (pm,) = by_kind(docs, "PodMonitor")
    pod_labels = vllm_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = vllm_container(docs)
    settings = tap_settings_from(effective_tap_env(docs, container), monkeypatch)
    ports = {p["containerPort"]: p["name"] for p in container["ports"]}
    tap_port = ports[settings["metrics_port"]]
    assert settings["metrics_host"] == "0.0.0.0"
    endpoints = [e["port"] for e in pm["spec"]["podMetricsEndpoints"]]
    assert tap_port in endpoints and len(endpoints) == len(set(endpoints))
    assert int(cli_args(container["args"])["--port"]) != settings["metrics_port"]
    user_selector = yaml.safe_load(values.read_text())["tapPodMonitor"].get("podSelector")
    if user_selector:
        assert pm["spec"]["selector"]["matchLabels"] == user_selector
    else:
        assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "vllm"
        assert endpoints == [tap_port]


@needs_helm
def test_tap_env_binds_the_metrics_port_on_all_interfaces_for_the_podmonitor(helm_env: dict[str, str]) -> None:
    """With tap.metricsPort the tap env Secret also sets LAYERWATCH_TAP_METRICS_HOST=0.0.0.0 (the tap's own
    default is loopback, which the PodMonitor could not reach); without it, neither is set."""
    secrets = {s["metadata"]["name"]: s["stringData"] for s in
               by_kind(manifests(render(helm_env, CHART / "ci" / "external-redis-values.yaml").stdout), "Secret")}
    tap = secrets["lw-layerwatch-tap-env"]
    assert tap["LAYERWATCH_TAP_METRICS_PORT"] == "9401" and tap["LAYERWATCH_TAP_METRICS_HOST"] == "0.0.0.0"
    default = {s["metadata"]["name"]: s["stringData"] for s in by_kind(manifests(render(helm_env).stdout), "Secret")}
    assert not {"LAYERWATCH_TAP_METRICS_PORT", "LAYERWATCH_TAP_METRICS_HOST"} & set(default["lw-layerwatch-tap-env"])


@needs_helm
def test_vllm_requests_a_gpu_only_with_gpu_values(helm_env: dict[str, str]) -> None:
    """vllm.gpu requests and limits vllm.gpuCount GPUs (matching --tensor-parallel-size) and rolls pods
    one at a time instead of surging onto a GPU that is not free; the CPU values request no GPU."""
    cpu_docs = manifests(render(helm_env, CHART / "ci" / "vllm-cpu-values.yaml").stdout)
    cpu = vllm_container(cpu_docs)["resources"]
    assert not [k for section in cpu.values() for k in section if "gpu" in k]
    assert "strategy" not in vllm_deployment(cpu_docs)["spec"]
    gpu_docs = manifests(render(helm_env, CHART / "ci" / "vllm-gpu-values.yaml").stdout)
    container = vllm_container(gpu_docs)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert cli_args(container["args"])["--tensor-parallel-size"] == "2"
    assert vllm_deployment(gpu_docs)["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    one = vllm_container(manifests(render(helm_env, None, "vllm.enabled=true", "vllm.gpu=true").stdout))
    assert one["resources"]["limits"]["nvidia.com/gpu"] == 1


@needs_helm
@pytest.mark.parametrize("values", VLLM_VALUES, ids=lambda v: v.name)
def test_vllm_caches_are_emptydirs_under_a_read_only_root_and_probes_use_health(helm_env: dict[str, str], values: Path) -> None:
    """Every cache vLLM, torch.compile, Triton and the HF hub write, /tmp and /dev/shm (in memory) are
    bounded emptyDirs under the read-only root; startup, liveness and readiness probe /health on the API
    port, which the Service targets."""
    docs = manifests(render(helm_env, values).stdout)
    pod = vllm_deployment(docs)["spec"]["template"]["spec"]
    container = vllm_container(docs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}
    for path, volume in mounts.items():
        assert volume["emptyDir"]["sizeLimit"], path
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory" and "/tmp" in mounts
    env = env_of(container)
    for name in ("HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert any(Path(env[name]) == Path(m) or Path(m) in Path(env[name]).parents for m in mounts), name
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "api"}, probe
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 600
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "lw-layerwatch-vllm"]
    assert svc["spec"]["ports"][0]["targetPort"] == "api" and "api" in {p["name"] for p in container["ports"]}
    assert svc["spec"]["selector"].items() <= vllm_deployment(docs)["spec"]["template"]["metadata"]["labels"].items()


@needs_helm
def test_vllm_weights_come_read_only_from_a_claim_a_volume_or_the_hub(helm_env: dict[str, str]) -> None:
    """A weights PVC or another volume source is mounted read-only where --model points, offline; a
    Hugging Face id mounts nothing and lets the hub download into the cache."""
    container = vllm_container(manifests(render(helm_env, CHART / "ci" / "vllm-gpu-values.yaml").stdout))
    pod = vllm_deployment(manifests(render(helm_env, CHART / "ci" / "vllm-gpu-values.yaml").stdout))["spec"]["template"]["spec"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model"]
    assert mount["readOnly"] is True
    assert Path(mount["mountPath"]) in Path(cli_args(container["args"])["--model"]).parents
    assert {v["name"]: v for v in pod["volumes"]}["model"]["persistentVolumeClaim"] == \
        {"claimName": "llama-3-8b-weights", "readOnly": True}
    assert env_of(container)["HF_HUB_OFFLINE"] == "1"
    nfs = manifests(render(helm_env, None, "vllm.enabled=true", "vllm.model.volume.nfs.server=nfs.example",
                           "vllm.model.volume.nfs.path=/models", "vllm.model.volume.nfs.readOnly=true").stdout)
    volumes = {v["name"]: v for v in vllm_deployment(nfs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"] == {"name": "model", "nfs": {"server": "nfs.example", "path": "/models", "readOnly": True}}
    hub = manifests(render(helm_env, CHART / "ci" / "vllm-cpu-values.yaml").stdout)
    container = vllm_container(hub)
    assert cli_args(container["args"])["--model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "model" not in {m["name"] for m in container["volumeMounts"]}
    assert env_of(container)["HF_HUB_OFFLINE"] == "0"


@needs_helm
def test_sampling_key_secret_is_mounted_where_the_tap_env_points(helm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """tap.samplingKey puts LAYERWATCH_TAP_SAMPLING_KEY_FILE in the tap env Secret, and the vLLM pod mounts
    that Secret's key read-only at exactly that file; without it neither appears."""
    docs = manifests(render(helm_env, CHART / "ci" / "vllm-cpu-values.yaml").stdout)
    container = vllm_container(docs)
    key_file = Path(effective_tap_env(docs, container)["LAYERWATCH_TAP_SAMPLING_KEY_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "sampling-key"]
    assert mount["readOnly"] is True and Path(mount["mountPath"]) == key_file.parent
    volume = {v["name"]: v for v in vllm_deployment(docs)["spec"]["template"]["spec"]["volumes"]}["sampling-key"]
    assert volume["secret"]["secretName"] == "layerwatch-sampling-key"
    assert volume["secret"]["items"] == [{"key": "sampling-key", "path": key_file.name}]
    plain = manifests(render(helm_env, None, "vllm.enabled=true").stdout)
    assert "LAYERWATCH_TAP_SAMPLING_KEY_FILE" not in effective_tap_env(plain, vllm_container(plain))
    assert "sampling-key" not in {m["name"] for m in vllm_container(plain)["volumeMounts"]}
