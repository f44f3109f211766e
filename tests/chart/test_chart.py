"""The Helm chart (helm/electron-serve): `helm lint --strict`, then `helm template` over every
values file in its ci/ folder, each object validated against Kubernetes 1.33's schemas
(kubernetes-validate, strict) and the RayCluster against KubeRay v1.7.0's CRD schema
(tests/chart/raycluster_validator.py); then assertions on what matters: GPU requests, Ray's
autoscaler, the pools, probes, environment, secrets never inlined, non-root pods, command
lines the real CLI accepts, and that the router's ConfigMap and environment (its Secrets
resolved) load with ``core.config.load_config`` into the settings the values asked for.

Helm runs through helm-python-sdk (Helm's own library, no binary): its render output is the
helm binary's.
"""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from cluster.cli import _parser
from core.config import ENV_PREFIX, Config, PlanConfig, load_config
from core.endpoints import HEAD_RESOURCE

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "electron-serve"
DASHBOARD = CHART / "files" / "dashboards" / "electron-serve.json"
CI_VALUES = sorted(CHART.glob("ci/*-values.yaml"))
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "es", "serving"
FULLNAME = f"{RELEASE}-electron-serve"
GEN = "g1"  # the default worker generation (workers.generation)
ROUTER_CONFIG = f"{FULLNAME}-router-config"


def values_of(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


# The least a release needs: the datastores chosen (here the in-chart trial ones).
TRIAL = values_of(CHART / "ci" / "default-values.yaml")


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
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs.append((name, d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayCluster":
            specs.append((name + "/head", d["spec"]["headGroupSpec"]["template"]["spec"]))
            for group in d["spec"]["workerGroupSpecs"]:
                specs.append((f"{name}/{group['groupName']}", group["template"]["spec"]))
    return specs


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def service_config(docs, generation: str = GEN) -> dict[str, Any]:
    """A worker generation's service config (its controller's and worker actors')."""
    return yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-worker-config-{generation}")[
        "data"]["config.yaml"])


def routers_config(docs) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", ROUTER_CONFIG)["data"]["config.yaml"])


def defaults() -> dict[str, Any]:
    return values_of(CHART / "values.yaml")


def env_name(section: str, field: str) -> str:
    """The environment variable core/config.py reads for ``section.field``."""
    assert field in type(getattr(Config(), section)).model_fields, (section, field)
    return f"{ENV_PREFIX}{section.upper()}__{field.upper()}"


ADMIN_KEY, REDIS_URL, DATABASE_URL = (env_name("auth", "admin_key"),
                                      env_name("tenancy", "redis_url"),
                                      env_name("tenancy", "database_url"))
CLUSTER_TOKEN = env_name("cluster", "token")
# What a Secret the chart does not create (existingSecret) holds, for load_config.
EXTERNAL = {ADMIN_KEY: "sk-admin-external-0123456789", REDIS_URL: "redis://ext-redis:6379/0",
            DATABASE_URL: "postgresql://u:p@ext-db:5432/electron",
            CLUSTER_TOKEN: "external-cluster-token-0123456789",
            "RAY_AUTH_TOKEN": "external-ray-auth-token-0123456789"}


def router_container(docs) -> dict[str, Any]:
    return one(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"][
        "containers"][0]


def resolved_env(container: dict[str, Any], docs) -> dict[str, str]:
    """The container's environment as the kubelet gives it: secretKeyRefs read from the
    rendered Secrets (or EXTERNAL for a Secret that exists outside the chart)."""
    secrets = {s["metadata"]["name"]: s.get("data", {}) for s in find(docs, "Secret")}
    env = {}
    for name, entry in env_of(container).items():
        if "value" in entry:
            env[name] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        if ref["name"] in secrets:
            env[name] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
        else:
            env[name] = EXTERNAL[name]
    return env


def router_config(docs, tmp_path: Path) -> tuple[Config, dict[str, str]]:
    """The config the router process builds: the ConfigMap's file plus its environment."""
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", ROUTER_CONFIG)["data"]["config.yaml"])
    env = resolved_env(router_container(docs), docs)
    assert env["ELECTRON_CONFIG"] == "/etc/electron-serve/config.yaml"
    return load_config(env={**env, "ELECTRON_CONFIG": str(path)}), env


@pytest.fixture(scope="module", params=CI_VALUES, ids=lambda p: p.name)
def case(request) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    values = values_of(request.param)
    text = render_text(values)
    return values, text, [d for d in yaml.safe_load_all(text) if d]


# -- lint and schemas -------------------------------------------------------------------------------

def test_ci_values_files_cover_the_six_setups():
    assert {p.name for p in CI_VALUES} == {
        "default-values.yaml", "enterprise-values.yaml", "external-datastores-values.yaml",
        "tracing-values.yaml", "gpu-cluster-values.yaml", "upgrade-values.yaml"}


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
    # Gateway API objects: kubernetes-validate has no schemas for them; test_chart_edge.py
    # checks their shape.
    assert set(custom) <= {"RayCluster", "ServiceMonitor", "PodMonitor", "HTTPRoute", "Gateway"}
    assert custom.count("RayCluster") == 1


def test_the_raycluster_matches_kuberays_crd_strictly(case):
    _, text, _ = case
    validator = Path(__file__).with_name("raycluster_validator.py")
    result = subprocess.run([sys.executable, str(validator)], input=text, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 RayCluster document(s) checked, 0 invalid" in result.stdout + result.stderr


def test_the_values_schema_rejects_bad_values():
    for bad, where in [({"pools": [{"name": "acme", "minWorkers": 1, "maxWorkers": 2}]}, "/pools"),
                       ({"router": {"replicas": 0}}, "/router/replicas"),
                       ({"router": {"processes": 0}}, "/router/processes"),
                       ({"model": {"volume": {"type": "nfs"}}}, "/model/volume/type"),
                       ({"redis": {"url": "http://x"}}, "/redis/url"),
                       ({"plans": {"pro": {"rpm": 10, "concurrency": 2, "pool": "acme"}}},
                        "/plans/pro"),
                       ({"plans": {"pro": {"rpm": 10}}}, "/plans/pro"),
                       ({"plans": {"pro": {"rpm": 10, "concurrency": 0}}},
                        "/plans/pro/concurrency"),
                       ({"logs": {"format": "xml"}}, "/logs/format"),
                       ({"metrics": {"workerPort": 0}}, "/metrics/workerPort"),
                       ({"clusterToken": {"value": "too-short"}}, "/clusterToken/value"),
                       ({"clusterToken": {"value": "a token with spaces"}},
                        "/clusterToken/value"),
                       ({"typo": True}, "typo")]:
        with pytest.raises(helm_python.HelmValuesError, match=where):
            render(bad)


def test_the_values_schema_describes_plans_as_the_config_does():
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    plan = schema["properties"]["plans"]["additionalProperties"]
    assert set(plan["properties"]) == set(PlanConfig.model_fields)
    assert set(plan["required"]) == {n for n, f in PlanConfig.model_fields.items()
                                     if f.is_required()}


# -- what matters -----------------------------------------------------------------------------------

def test_one_gpu_worker_group_per_pool_with_ray_autoscaling(case):
    values, _, docs = case
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # The head alone offers the resource the registry asks for: it is placed there.
    assert yaml.safe_load(yaml.safe_load(cluster["headGroupSpec"]["rayStartParams"][
        "resources"])) == {HEAD_RESOURCE: 1}
    pools = values.get("pools") or values_of(CHART / "values.yaml")["pools"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    generations = generations_of(values)
    assert set(groups) == {f"pool-{p['name']}-{g}" for p in pools for g in generations}
    gpu = values.get("workers", {}).get("gpuResourceName", "nvidia.com/gpu")
    for generation in generations:
        config_pools = {p["name"]: p for p in service_config(docs, generation)["autoscaler"][
            "pools"]}
        for pool in pools:
            group = groups[f"pool-{pool['name']}-{generation}"]
            assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) \
                == (pool["minWorkers"], pool["maxWorkers"], pool["minWorkers"])
            container = group["template"]["spec"]["containers"][0]
            name = pool.get("gpuResourceName", gpu)
            assert container["resources"]["requests"][name] == 1
            assert container["resources"]["limits"][name] == 1
            assert group["rayStartParams"]["num-gpus"] == "1"
            # The group offers exactly the custom resource the pool's actors ask for.
            offered = yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"]))
            assert offered == config_pools[pool["name"]]["resources"] == {
                f"electron_pool_{pool['name']}_{generation}": 1}


def generations_of(values: dict[str, Any]) -> list[str]:
    """The worker generations a values file renders, oldest first."""
    workers = values.get("workers", {})
    previous = workers.get("previous", {}).get("generation")
    return [g for g in (previous, workers.get("generation", GEN)) if g]


def test_the_service_config_loads_and_autoscales_every_pool(case):
    values, _, docs = case
    config = load_config(env={}, overrides=service_config(docs))
    assert config.autoscaler.enabled and config.autoscaler.provider == "ray"
    assert config.cluster.num_gpus_per_worker == 1 and config.cluster.pool == "default"
    assert load_config(env={}, overrides=routers_config(docs)).router.host == "0.0.0.0"
    pools = values.get("pools") or values_of(CHART / "values.yaml")["pools"]
    assert [(p.name, p.min_workers, p.max_workers) for p in config.autoscaler.pools] \
        == [(p["name"], p["minWorkers"], p["maxWorkers"]) for p in pools]
    model = values.get("model", {}).get("path", "smollm2-135m-instruct")
    assert config.engine.model == model
    if "kv_cache_bytes" not in values.get("engine", {}):
        assert config.engine.kv_cache_bytes is None  # on GPU: a fraction of free memory
    # Each generation's controller keeps (and adopts after a restart) its own fleet only.
    for generation in generations_of(values):
        fleet = load_config(env={}, overrides=service_config(docs, generation)).cluster.fleet
        assert fleet == generation


def _ray_start(container: dict[str, Any]) -> tuple[set[str], list[str]]:
    """The variables `env -u` keeps from `ray start` (and so from the raylet), and the rest
    of that command."""
    script = " ".join(container["args"])
    words = shlex.split(script.split("&&")[0])
    unset: set[str] = set()
    if words[0] == "env":
        words = words[1:]
        while words[0] == "-u":
            unset.add(words[1])
            words = words[2:]
    assert words[:2] == ["ray", "start"] and "--num-cpus=0" in words
    return unset, words


def _cli_args(container: dict[str, Any]) -> list[str]:
    _ray_start(container)
    script = " ".join(container["args"])
    commands = [shlex.split(part) for part in script.split("&&")]
    assert commands[1][:2] == ["exec", "electron-serve"]
    return commands[1][2:]


def test_the_raylets_of_routers_and_controllers_inherit_no_secret(case):
    _, _, docs = case
    containers = [router_container(docs)] + [
        d["spec"]["template"]["spec"]["containers"][0] for d in find(docs, "Deployment")
        if d["metadata"]["name"].startswith(f"{FULLNAME}-controller-")]
    for container in containers:
        unset, _ = _ray_start(container)
        secret = {name for name, entry in env_of(container).items()
                  if "secretKeyRef" in entry.get("valueFrom", {})
                  or name == "ELECTRON_TENANCY__DATABASE_URL"}  # may embed $(password)
        # Ray's own token is the raylet's to hold; every other secret stays with the router.
        assert secret - {"RAY_AUTH_TOKEN"} <= unset, container["name"]


def test_router_and_controller_run_the_real_cli(case):
    values, _, docs = case
    router = one(docs, "Deployment", f"{FULLNAME}-router")
    args = _cli_args(router["spec"]["template"]["spec"]["containers"][0])
    parsed = _parser().parse_args(args)
    assert parsed.command == "router" and parsed.ray_address == "auto"
    assert parsed.port == values.get("router", {}).get("port", 8000)
    assert parsed.processes == values.get("router", {}).get("processes", 1)
    controller = one(docs, "Deployment", f"{FULLNAME}-controller-{GEN}")
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
    env = env_of(router_container(docs))
    auth = values.get("auth", {})
    key_ref = env[ADMIN_KEY]["valueFrom"]["secretKeyRef"]
    if auth.get("existingSecret"):
        assert key_ref == {"name": auth["existingSecret"], "key": auth["existingSecretKey"]}
        assert not find(docs, "Secret", f"{FULLNAME}-admin")
    else:
        assert key_ref == {"name": f"{FULLNAME}-admin", "key": "admin-key"}
        assert one(docs, "Secret", f"{FULLNAME}-admin")["data"]["admin-key"]
    # Every setting the router reads from its environment comes from a Secret.
    settings = [name for name in env if name.startswith(ENV_PREFIX) and "__" in name]
    assert settings and set(settings) <= {ADMIN_KEY, REDIS_URL, DATABASE_URL, CLUSTER_TOKEN}
    for name in settings:
        assert set(env[name]) == {"name", "valueFrom"}, name


def _controllers(docs) -> list[dict[str, Any]]:
    return [d for d in find(docs, "Deployment")
            if d["metadata"]["name"].startswith(f"{FULLNAME}-controller-")]


def test_routers_and_controllers_share_the_cluster_token_from_a_secret(case, tmp_path):
    values, _, docs = case
    token = values.get("clusterToken", {})
    if token.get("existingSecret"):
        expected = {"name": token["existingSecret"], "key": token["existingSecretKey"]}
        assert not find(docs, "Secret", f"{FULLNAME}-cluster-token")
    else:
        expected = {"name": f"{FULLNAME}-cluster-token", "key": "cluster-token"}
        secret = one(docs, "Secret", f"{FULLNAME}-cluster-token")
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    containers = [router_container(docs)] + [
        c["spec"]["template"]["spec"]["containers"][0] for c in _controllers(docs)]
    assert len(containers) >= 2
    for container in containers:
        entry = env_of(container)[CLUSTER_TOKEN]
        assert entry == {"name": CLUSTER_TOKEN, "valueFrom": {"secretKeyRef": expected}}
    # It loads: a valid token, the one every controller's worker actors get.
    config, env = router_config(docs, tmp_path)
    assert config.cluster.token == env[CLUSTER_TOKEN]
    for container in containers[1:]:
        assert resolved_env(container, docs)[CLUSTER_TOKEN] == config.cluster.token
    # The other processes get none of them (the migration Job: the database's only).
    for name, spec in pod_specs(docs):
        if name.endswith("-migrate"):
            assert set(env_of(spec["containers"][0])) & {ADMIN_KEY, REDIS_URL} == set()
        elif not name.endswith("-router"):
            assert not set(env_of(spec["containers"][0])) & {ADMIN_KEY, REDIS_URL,
                                                             DATABASE_URL}, name


def test_the_router_loads_the_settings_the_values_ask_for(case, tmp_path):
    values, _, docs = case
    config, env = router_config(docs, tmp_path)
    # The admin key: the auth.admin_key setting, from the Secret; not a chat key.
    assert config.auth.enabled is True
    assert config.auth.admin_key == env[ADMIN_KEY]
    assert config.auth.admin_key.startswith("sk-admin-") and len(config.auth.admin_key) >= 24
    assert config.auth.static_keys == ()
    if values.get("auth", {}).get("adminKey"):
        assert config.auth.admin_key == values["auth"]["adminKey"]
    # Plans: tenancy.plans, as given (the built-in ones stay unless replaced).
    plans = values.get("plans", {})
    assert config.tenancy.plans == {n: PlanConfig(**p) for n, p in plans.items()}
    assert {"standard", "enterprise"} <= set(config.tenancy.plan_names())
    # JSON logs unless asked otherwise; the workers' fixed metrics port.
    logs = {**defaults()["logs"], **values.get("logs", {})}
    assert config.observability.log_format == logs["format"]
    port = values.get("metrics", {}).get("workerPort", defaults()["metrics"]["workerPort"])
    assert config.observability.worker_metrics_port == port


def test_sqlite_and_the_ledger_spool_are_on_a_writable_volume(case, tmp_path):
    _, _, docs = case
    config, _ = router_config(docs, tmp_path)
    router = one(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in router["volumes"]}
    writable = {m["mountPath"]: volumes[m["name"]]
                for m in router["containers"][0]["volumeMounts"] if not m.get("readOnly")}
    for path in (config.tenancy.sqlite_path, config.tenancy.spool_path):
        assert path.startswith("/") and "~" not in path
        mount = str(Path(path).parent)
        assert mount in writable, path
        assert "emptyDir" in writable[mount]
        assert mount != "/tmp"  # its own volume, not Ray's scratch space


def test_datastores_external_or_in_chart(case, tmp_path):
    values, _, docs = case
    config, _ = router_config(docs, tmp_path)
    defaults = values_of(CHART / "values.yaml")
    redis = {**defaults["redis"], **values.get("redis", {})}
    postgres = {**defaults["postgresql"], **values.get("postgresql", {})}
    assert bool(find(docs, "Deployment", f"{FULLNAME}-redis")) == bool(redis.get("deploy"))
    assert bool(find(docs, "StatefulSet", f"{FULLNAME}-postgresql")) \
        == bool(postgres.get("deploy"))
    env = env_of(router_container(docs))
    if redis.get("deploy"):
        # The in-chart Redis asks for its password (requirepass), which the URL carries.
        secret = one(docs, "Secret", f"{FULLNAME}-datastores")["data"]
        password = base64.b64decode(secret["redis-password"]).decode()
        assert len(password) >= 32
        assert config.tenancy.redis_url == f"redis://:{password}@{FULLNAME}-redis:6379/0"
        server = one(docs, "Deployment", f"{FULLNAME}-redis")["spec"]["template"]["spec"][
            "containers"][0]
        command = " ".join(server["args"])
        assert "--protected-mode yes" in command and '--requirepass "$REDISCLI_AUTH"' in command
        assert env_of(server)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] \
            == {"name": f"{FULLNAME}-datastores", "key": "redis-password"}
    elif redis.get("existingSecret"):
        assert env[REDIS_URL]["valueFrom"]["secretKeyRef"] \
            == {"name": redis["existingSecret"], "key": redis["existingSecretKey"]}
        assert config.tenancy.redis_url == EXTERNAL[REDIS_URL]
    else:
        assert REDIS_URL not in env and config.tenancy.redis_url is None
    if postgres.get("deploy"):
        secret = one(docs, "Secret", f"{FULLNAME}-datastores")["data"]
        password = base64.b64decode(secret["postgres-password"]).decode()
        assert config.tenancy.database_url \
            == f"postgresql://electron:{password}@{FULLNAME}-postgresql:5432/electron"
    elif postgres.get("existingSecret"):
        assert env[DATABASE_URL]["valueFrom"]["secretKeyRef"] \
            == {"name": postgres["existingSecret"], "key": postgres["existingSecretKey"]}
        assert config.tenancy.database_url == EXTERNAL[DATABASE_URL]
    elif postgres.get("url"):
        assert config.tenancy.database_url == postgres["url"]
    else:
        assert DATABASE_URL not in env and config.tenancy.database_url is None


def test_otlp_settings_reach_every_process(case):
    values, _, docs = case
    otel = values.get("otel", {})
    for name, spec in pod_specs(docs):
        if "redis" in name or "postgresql" in name or name.endswith("-migrate"):
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
    fetch = values.get("model", {}).get("fetch", {}).get("enabled", False)
    for name, spec in pod_specs(docs):
        if "redis" in name or "postgresql" in name or name.endswith("-migrate"):
            continue
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        if volume["type"] == "none":
            assert "model" not in mounts
            continue
        assert mounts["model"]["readOnly"] is True and mounts["model"]["mountPath"] == "/models"
        source = {v["name"]: v for v in spec["volumes"]}["model"]
        if volume["type"] == "pvc":
            claim = volume.get("claimName") or f"{FULLNAME}-models"
            assert source["persistentVolumeClaim"] == (
                {"claimName": claim} if fetch else {"claimName": claim, "readOnly": True})
        elif volume["type"] == "hostPath":
            assert source["hostPath"]["path"] == volume["hostPath"]
        else:
            assert "emptyDir" in source
        # Only the model-fetch init container writes to it.
        for init in spec.get("initContainers", []):
            if init["name"] == "model-fetch":
                assert {m["name"]: m for m in init["volumeMounts"]}["model"].get(
                    "readOnly") is not True


def test_optional_objects_follow_their_switches(case):
    values, _, docs = case
    monitor = values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    assert len(find(docs, "PodMonitor")) == (2 if monitor else 0)  # routers, workers
    policies = {p["metadata"]["name"].removeprefix(f"{FULLNAME}-")
                for p in find(docs, "NetworkPolicy")}
    datastores = {name for name in ("redis", "postgresql")
                  if values.get(name, {}).get("deploy")}
    assert policies == {"default-deny", "ray-nodes", "ray-head", "router", "worker-metrics",
                        "worker-grpc", *datastores}
    router_policy = one(docs, "NetworkPolicy", f"{FULLNAME}-router")
    assert router_policy["spec"]["ingress"][0]["ports"][0]["port"] == 8000


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_monitors_scrape_the_routers_and_every_worker(case, tmp_path):
    values, _, docs = case
    metrics = values.get("metrics", {})
    if not metrics.get("serviceMonitor", {}).get("enabled"):  # this setup, monitors on
        metrics = {**metrics, "serviceMonitor": {**metrics.get("serviceMonitor", {}),
                                                 "enabled": True}}
        values = {**values, "metrics": metrics}
        docs = render(values)
    config, _ = router_config(docs, tmp_path)
    labels = metrics["serviceMonitor"].get("labels", {})
    # Routers: /metrics on each router pod's metrics port, the one the config serves it on;
    # the API port and the router Service do not serve it.
    assert config.router.metrics_port and config.router.metrics_port != config.router.port
    assert not find(docs, "ServiceMonitor")
    router_monitor = one(docs, "PodMonitor", f"{FULLNAME}-router")
    router_pod = one(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"]
    assert _selects(router_monitor["spec"]["selector"], router_pod["metadata"]["labels"])
    assert router_monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics",
         "interval": metrics["serviceMonitor"].get("interval", "30s")}]
    router_ports = {p["name"]: p["containerPort"] for p in router_container(docs)["ports"]}
    assert router_ports == {"http": config.router.port, "metrics": config.router.metrics_port}
    service = one(docs, "Service", f"{FULLNAME}-router")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # Workers: /metrics on the port the config gives every worker actor, on each pool's pods.
    pod_monitor = one(docs, "PodMonitor", f"{FULLNAME}-workers")
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    groups = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    for group in groups:
        template = group["template"]
        assert _selects(pod_monitor["spec"]["selector"], template["metadata"]["labels"])
        ports = {p["name"]: p for p in template["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]]["containerPort"] \
            == config.observability.worker_metrics_port
        assert "electron-serve/pool" in template["metadata"]["labels"]
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not _selects(pod_monitor["spec"]["selector"], head)
    for monitor in (router_monitor, pod_monitor):
        assert labels.items() <= monitor["metadata"]["labels"].items()
    # The NetworkPolicies let the scraper reach the workers' metrics port and the routers'.
    scrapers = values.get("networkPolicy", {}).get("metricsFrom", [])
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-worker-metrics")
    assert policy["spec"]["ingress"] == [
        {"ports": [{"port": config.observability.worker_metrics_port, "protocol": "TCP"}],
         **({"from": scrapers} if scrapers else {})}]
    assert _selects(policy["spec"]["podSelector"], groups[0]["template"]["metadata"]["labels"])
    router_rules = one(docs, "NetworkPolicy", f"{FULLNAME}-router")["spec"]["ingress"]
    api_from = values.get("networkPolicy", {}).get("routerIngressFrom")
    assert router_rules == [
        {"ports": [{"port": config.router.port, "protocol": "TCP"}],
         **({"from": api_from} if api_from else {})},
        {"ports": [{"port": config.router.metrics_port, "protocol": "TCP"}],
         **({"from": scrapers} if scrapers else {})}]


def test_the_grafana_dashboard_is_the_charts_one_file_rendered_in_a_config_map():
    # One file: the repository's dashboards/ path is a link to the chart's copy.
    assert (ROOT / "dashboards" / "electron-serve.json").resolve() == DASHBOARD.resolve()
    assert DASHBOARD.resolve() == DASHBOARD  # the chart holds the file itself
    board = DASHBOARD.read_text()
    boards = [d for d in render(TRIAL) if "dashboard" in d["metadata"]["name"]]
    assert len(boards) == 1
    assert boards[0]["metadata"]["name"] == f"{FULLNAME}-dashboard-electron-serve"
    assert boards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(boards[0]["data"]) == ["electron-serve.json"]
    assert boards[0]["data"]["electron-serve.json"] == board.rstrip("\n")
    assert json.loads(boards[0]["data"]["electron-serve.json"])["title"] == "Electron Serve"
    assert len(yaml.safe_dump(boards[0])) < 1 << 20  # a ConfigMap's limit
    assert not [d for d in render({**TRIAL, "dashboards": {"enabled": False}})
                if "dashboard" in d["metadata"]["name"]]


def test_notes_tell_how_to_reach_the_api_and_make_the_first_key():
    def notes(values: dict[str, Any]) -> str:
        with helm_python.Chart.load(CHART) as loaded:
            return loaded.render(values, name=RELEASE, namespace=NAMESPACE)[
                "electron-serve/templates/NOTES.txt"]

    text = notes(values_of(CHART / "ci" / "default-values.yaml"))
    assert f"port-forward svc/{FULLNAME}-router" in text
    assert f"get secret {FULLNAME}-admin" in text and "chat/completions" in text
    assert "$BASE_URL/admin/tenants" in text
    # The CLI line runs: the command kubectl exec would start parses with the real CLI.
    line = next(ln for ln in text.splitlines() if "kubectl" in ln and " exec " in ln)
    command = shlex.split(line.split(" -- ", 1)[1])
    assert command[0] == "electron-serve"
    parsed = _parser().parse_args(command[1:])
    assert (parsed.command, parsed.verb, parsed.plan) == ("tenants", "add", "standard")
    # In-chart PostgreSQL and Redis: tenants work across replicas; the database is not HA.
    assert "no PostgreSQL" not in text and "no Redis" not in text and "not HA" in text
    bare = notes({"postgresql": {"enabled": False}, "redis": {"enabled": False}})
    assert "no PostgreSQL is configured" in bare and "no Redis is configured" in bare
    external = notes(values_of(CHART / "ci" / "external-datastores-values.yaml"))
    assert "no PostgreSQL" not in external and "no Redis" not in external
