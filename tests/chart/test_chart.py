"""The Helm chart (helm/electron-serve): `helm lint --strict`, then `helm template` over every
values file in its ci/ folder, each object validated against Kubernetes 1.33's schemas
(kubernetes-validate, strict) and the RayCluster against KubeRay v1.7.0's CRD schema
(shared/kuberay/validate_raycluster.py); then assertions on what matters: GPU requests, Ray's
autoscaler, the pools, probes, environment, secrets never inlined, non-root pods, and command
lines the real CLI accepts.

Helm runs through helm-python-sdk (Helm's own library, no binary): its render output is the
helm binary's.
"""

from __future__ import annotations

import base64
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from cluster.cli import _parser
from cluster.config import load_config
from tests.support.shared_dir import shared_path

CHART = Path(__file__).resolve().parents[2] / "helm" / "electron-serve"
CI_VALUES = sorted(CHART.glob("ci/*-values.yaml"))
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "es", "serving"
FULLNAME = f"{RELEASE}-electron-serve"


def values_of(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render_text(values: dict[str, Any], chart: Path = CHART) -> str:
    with helm_python.Chart.load(chart) as loaded:
        out = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return "\n---\n".join(text for name, text in sorted(out.items())
                          if not name.endswith("NOTES.txt"))


def render(values: dict[str, Any], chart: Path = CHART) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(values, chart)) if doc]


def find(docs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_specs(docs) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            specs.append((name, d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayCluster":
            specs.append((name + "/head", d["spec"]["headGroupSpec"]["template"]["spec"]))
            for group in d["spec"]["workerGroupSpecs"]:
                specs.append((f"{name}/{group['groupName']}", group["template"]["spec"]))
    return specs


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def service_config(docs) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])


@pytest.fixture(scope="module", params=CI_VALUES, ids=lambda p: p.name)
def case(request) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    values = values_of(request.param)
    text = render_text(values)
    return values, text, [d for d in yaml.safe_load_all(text) if d]


# -- lint and schemas -------------------------------------------------------------------------------

def test_ci_values_files_cover_the_four_setups():
    assert {p.name for p in CI_VALUES} == {
        "default-values.yaml", "enterprise-values.yaml", "external-datastores-values.yaml",
        "tracing-values.yaml"}


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict(values_file):
    report = helm_python.lint(CHART, values_of(values_file), strict=True,
                              namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and report["messages"] == [], report


def test_every_object_is_valid_kubernetes(case):
    _, _, docs = case
    custom = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom.append(doc["kind"])  # custom resources: checked below
    assert set(custom) <= {"RayCluster", "ServiceMonitor"}
    assert custom.count("RayCluster") == 1


def test_the_raycluster_matches_kuberays_crd_strictly(case):
    _, text, _ = case
    validator = shared_path("kuberay", "validate_raycluster.py")
    result = subprocess.run([sys.executable, str(validator)], input=text, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 RayCluster document(s) checked, 0 invalid" in result.stdout + result.stderr


def test_the_values_schema_rejects_bad_values():
    for bad, where in [({"pools": [{"name": "acme", "minWorkers": 1, "maxWorkers": 2}]}, "/pools"),
                       ({"router": {"replicas": 0}}, "/router/replicas"),
                       ({"model": {"volume": {"type": "nfs"}}}, "/model/volume/type"),
                       ({"redis": {"url": "http://x"}}, "/redis/url"),
                       ({"typo": True}, "typo")]:
        with pytest.raises(helm_python.HelmValuesError, match=where):
            render(bad)


# -- what matters -----------------------------------------------------------------------------------

def test_one_gpu_worker_group_per_pool_with_ray_autoscaling(case):
    values, _, docs = case
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pools = values.get("pools") or values_of(CHART / "values.yaml")["pools"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {f"pool-{p['name']}" for p in pools}
    config_pools = {p["name"]: p for p in service_config(docs)["autoscaler"]["pools"]}
    for pool in pools:
        group = groups[f"pool-{pool['name']}"]
        assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) \
            == (pool["minWorkers"], pool["maxWorkers"], pool["minWorkers"])
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert group["rayStartParams"]["num-gpus"] == "1"
        # The group offers exactly the custom resource the pool's actors ask for.
        offered = yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"]))
        assert offered == config_pools[pool["name"]]["resources"] == {
            f"electron_pool_{pool['name']}": 1}


def test_the_service_config_loads_and_autoscales_every_pool(case):
    values, _, docs = case
    config = load_config(env={}, overrides=service_config(docs))
    assert config.autoscaler.enabled and config.autoscaler.provider == "ray"
    assert config.cluster.num_gpus_per_worker == 1 and config.cluster.pool == "default"
    assert config.router.host == "0.0.0.0"
    pools = values.get("pools") or values_of(CHART / "values.yaml")["pools"]
    assert [(p.name, p.min_workers, p.max_workers) for p in config.autoscaler.pools] \
        == [(p["name"], p["minWorkers"], p["maxWorkers"]) for p in pools]
    model = values.get("model", {}).get("path", "smollm2-135m-instruct")
    assert config.engine.model == model
    if "kv_cache_bytes" not in values.get("engine", {}):
        assert config.engine.kv_cache_bytes is None  # on GPU: a fraction of free memory


def _cli_args(container: dict[str, Any]) -> list[str]:
    script = " ".join(container["args"])
    commands = [shlex.split(part) for part in script.split("&&")]
    assert commands[0][:2] == ["ray", "start"] and "--num-cpus=0" in commands[0]
    assert commands[1][:2] == ["exec", "electron-serve"]
    return commands[1][2:]


def test_router_and_controller_run_the_real_cli(case):
    values, _, docs = case
    router = one(docs, "Deployment", f"{FULLNAME}-router")
    args = _cli_args(router["spec"]["template"]["spec"]["containers"][0])
    parsed = _parser().parse_args(args)
    assert parsed.command == "router" and parsed.ray_address == "auto"
    assert parsed.port == values.get("router", {}).get("port", 8000)
    controller = one(docs, "Deployment", f"{FULLNAME}-controller")
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"]["type"] == "Recreate"
    parsed = _parser().parse_args(_cli_args(controller["spec"]["template"]["spec"]
                                            ["containers"][0]))
    assert parsed.command == "worker" and parsed.ray_address == "auto"
    assert parsed.config == "/etc/electron-serve/config.yaml"


def test_router_probes_pdb_and_hpa(case):
    _, _, docs = case
    router = one(docs, "Deployment", f"{FULLNAME}-router")
    container = router["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["requests"]["cpu"]
    assert "replicas" not in router["spec"]  # the HPA owns it
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == router["metadata"]["name"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] \
        == router["spec"]["selector"]["matchLabels"]
    service = one(docs, "Service", f"{FULLNAME}-router")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_every_pod_runs_as_non_root_with_a_read_only_root(case):
    _, _, docs = case
    specs = pod_specs(docs)
    assert len(specs) >= 4
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if not name.endswith(("-redis", "-postgresql")):
                assert "/tmp" in mounts, name  # Ray's session dirs and HOME
            if name.startswith("RayCluster"):
                assert "/dev/shm" in mounts, name


def _secret_values(docs) -> set[str]:
    found = set()
    for secret in find(docs, "Secret"):
        for value in secret.get("data", {}).values():
            found.add(base64.b64decode(value).decode())
    return found


def test_secrets_are_never_inlined(case):
    values, text, docs = case
    secrets = _secret_values(docs)
    inlined = [values.get("auth", {}).get("adminKey"), values.get("postgresql", {}).get("url")]
    inlined = [v for v in inlined if v] + [v for v in secrets if len(v) >= 12]
    non_secret = "\n".join(yaml.safe_dump(d) for d in docs if d["kind"] != "Secret")
    for value in inlined:
        assert value not in non_secret
    router = one(docs, "Deployment", f"{FULLNAME}-router")
    env = env_of(router["spec"]["template"]["spec"]["containers"][0])
    auth = values.get("auth", {})
    key_ref = env["ELECTRON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    if auth.get("existingSecret"):
        assert key_ref == {"name": auth["existingSecret"], "key": auth["existingSecretKey"]}
        assert not find(docs, "Secret", f"{FULLNAME}-admin")
    else:
        assert key_ref == {"name": f"{FULLNAME}-admin", "key": "admin-key"}
        assert one(docs, "Secret", f"{FULLNAME}-admin")["data"]["admin-key"]
    for name in ("REDIS_URL", "DATABASE_URL"):
        if name in env:
            assert set(env[name]) == {"name", "valueFrom"}


def test_datastores_external_or_in_chart(case):
    values, _, docs = case
    env = env_of(one(docs, "Deployment", f"{FULLNAME}-router")
                 ["spec"]["template"]["spec"]["containers"][0])
    redis, postgres = values.get("redis", {}), values.get("postgresql", {})
    assert bool(find(docs, "Deployment", f"{FULLNAME}-redis")) == bool(redis.get("deploy"))
    assert bool(find(docs, "StatefulSet", f"{FULLNAME}-postgresql")) \
        == bool(postgres.get("deploy"))
    secrets = {s["metadata"]["name"]: s.get("data", {}) for s in find(docs, "Secret")}

    def url(name: str) -> str:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        return base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()

    if redis.get("deploy"):
        assert url("REDIS_URL") == f"redis://{FULLNAME}-redis:6379/0"
    elif redis.get("existingSecret"):
        assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] \
            == {"name": redis["existingSecret"], "key": redis["existingSecretKey"]}
    else:
        assert "REDIS_URL" not in env
    if postgres.get("deploy"):
        db = url("DATABASE_URL")
        password = base64.b64decode(secrets[f"{FULLNAME}-datastores"]
                                    ["postgres-password"]).decode()
        assert db == f"postgresql://electron:{password}@{FULLNAME}-postgresql:5432/electron"
    elif postgres.get("url"):
        assert url("DATABASE_URL") == postgres["url"]
    else:
        assert "DATABASE_URL" not in env


def test_otlp_settings_reach_every_process(case):
    values, _, docs = case
    otel = values.get("otel", {})
    for name, spec in pod_specs(docs):
        if "redis" in name or "postgresql" in name:
            continue
        env = env_of(spec["containers"][0])
        if otel.get("enabled"):
            assert env["OTEL_SDK_DISABLED"]["value"] == "false"
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == otel["endpoint"]
            assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == otel["samplerArg"]
            assert "team=inference" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        else:
            assert env["OTEL_SDK_DISABLED"]["value"] == "true", name
        assert env["ELECTRON_CONFIG"]["value"] == "/etc/electron-serve/config.yaml"


def test_model_volume_is_mounted_read_only_where_the_model_is_read(case):
    values, _, docs = case
    volume = values.get("model", {}).get("volume", {"type": "none"})
    for name, spec in pod_specs(docs):
        if "redis" in name or "postgresql" in name:
            continue
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        if volume["type"] == "none":
            assert "model" not in mounts
            continue
        assert mounts["model"]["readOnly"] is True and mounts["model"]["mountPath"] == "/models"
        source = {v["name"]: v for v in spec["volumes"]}["model"]
        if volume["type"] == "pvc":
            assert source["persistentVolumeClaim"] == {"claimName": volume["claimName"],
                                                      "readOnly": True}
        else:
            assert source["hostPath"]["path"] == volume["hostPath"]


def test_optional_objects_follow_their_switches(case):
    values, _, docs = case
    monitor = values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    assert bool(find(docs, "ServiceMonitor")) == monitor
    policies = find(docs, "NetworkPolicy")
    assert len(policies) == 2
    router_policy = one(docs, "NetworkPolicy", f"{FULLNAME}-router")
    assert router_policy["spec"]["ingress"][0]["ports"][0]["port"] == 8000


def test_grafana_dashboards_are_mounted_when_present_and_optional(tmp_path):
    # Without dashboard files the chart renders no dashboard ConfigMap.
    assert not [d for d in render({}) if "dashboard" in d["metadata"]["name"]]
    chart = tmp_path / "electron-serve"
    shutil.copytree(CHART, chart)
    board = '{"title": "Electron Serve", "panels": []}'
    (chart / "files" / "dashboards" / "electron-serve.json").write_text(board)
    boards = [d for d in render({}, chart) if "dashboard" in d["metadata"]["name"]]
    assert len(boards) == 1
    assert boards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert boards[0]["data"] == {"electron-serve.json": board}
    assert not [d for d in render({"dashboards": {"enabled": False}}, chart)
                if "dashboard" in d["metadata"]["name"]]


def test_notes_tell_how_to_reach_the_api():
    with helm_python.Chart.load(CHART) as loaded:
        notes = loaded.render({}, name=RELEASE, namespace=NAMESPACE)[
            "electron-serve/templates/NOTES.txt"]
    assert f"port-forward svc/{FULLNAME}-router" in notes
    assert f"get secret {FULLNAME}-admin" in notes and "chat/completions" in notes
