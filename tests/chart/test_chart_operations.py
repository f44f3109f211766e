"""The chart as an operator runs it (issue 19): what each kind of change rolls, the worker
upgrade path through generations, model delivery and start bounds, standard pod settings
and their schema, the edge (Ingress, Gateway API with TLS; preStop and grace), datastores
and their secrets, the migration hook Job, and the versions that must agree.

Each test renders a scenario with helm-python-sdk (Helm's own library) and asserts on the
objects; every rendered scenario is also validated strictly (Kubernetes 1.33 schemas and
KubeRay's CRD) as in test_chart.py. kubernetes-validate has no Gateway API schemas: the
HTTPRoute and Gateway are checked here against the fields of gateway.networking.k8s.io/v1
that the chart uses (a minimal shape check, not the CRD)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from cluster.cli import _parser
from core.config import load_config
from router.api.drain import CUT_GRACE_S
from tests.chart.test_chart import (
    CHART,
    FULLNAME,
    KUBE_VERSION,
    ROOT,
    ROUTER_CONFIG,
    TRIAL,
    env_of,
    find,
    one,
    pod_specs,
    render,
    resolved_env,
    routers_config,
    service_config,
    values_of,
)

GPU_CLUSTER = values_of(CHART / "ci" / "gpu-cluster-values.yaml")
EXTERNAL = {"redis": {"existingSecret": "electron-redis", "existingSecretKey": "url"},
            "postgresql": {"existingSecret": "electron-db", "existingSecretKey": "url"}}


def merged(base: dict[str, Any], *changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for change in changes:
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def validate_strictly(docs: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(docs)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] in {"RayCluster", "ServiceMonitor", "PodMonitor", "HTTPRoute",
                                   "Gateway"}, doc["kind"]
    validator = Path(__file__).with_name("raycluster_validator.py")
    result = subprocess.run([sys.executable, str(validator)], input=text, text=True,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def checksum(deployment: dict[str, Any]) -> str:
    return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def worker_side(docs) -> dict[str, Any]:
    """Everything a GPU worker's life depends on."""
    return {"controllers": [d for d in find(docs, "Deployment") if "-controller-" in
                            d["metadata"]["name"]],
            "configs": [d for d in find(docs, "ConfigMap")
                        if "-worker-config-" in d["metadata"]["name"]],
            "raycluster": one(docs, "RayCluster")["spec"]}


def groups_of(docs, generation: str) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
            if g["template"]["metadata"]["labels"]["electron-serve/generation"] == generation}


# -- 1. what a change rolls ----------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"plans": {"pro": {"rpm": 600, "concurrency": 32, "priority": 50}}},
    {"config": {"tenancy": {"price_output": "2.00"}}},
    {"router": {"policy": "least_load", "maxStreamSeconds": 1200}},
    {"auth": {"adminKey": "sk-admin-rotated-0123456789abcdef"}},
    {"image": {"router": {"tag": "0.1.1"}}},
], ids=["plans", "prices", "routing", "admin-key", "router-image"])
def test_a_router_only_change_rolls_routers_only(change):
    base = merged(TRIAL, {"auth": {"adminKey": "sk-admin-initial-0123456789abcdef"}})
    before, after = render(base), render(merged(base, change))
    assert worker_side(after) == worker_side(before)  # no controller restart, no GPU pod
    router_before = one(before, "Deployment", f"{FULLNAME}-router")
    router_after = one(after, "Deployment", f"{FULLNAME}-router")
    assert router_after != router_before
    if "plans" in change or "config" in change or "policy" in change.get("router", {}):
        assert checksum(router_after) != checksum(router_before)


def test_a_worker_side_change_restarts_that_generations_controller_not_the_routers():
    before = render(TRIAL)
    after = render(merged(TRIAL, {"engine": {"gpu_memory_fraction": 0.9}}))
    controller = f"{FULLNAME}-controller-g1"
    assert checksum(one(after, "Deployment", controller)) \
        != checksum(one(before, "Deployment", controller))
    assert checksum(one(after, "Deployment", f"{FULLNAME}-router")) \
        == checksum(one(before, "Deployment", f"{FULLNAME}-router"))


def test_router_and_worker_configs_hold_only_their_side(tmp_path):
    docs = render(merged(TRIAL, {"plans": {"pro": {"rpm": 10, "concurrency": 2}}}))
    routers, workers = routers_config(docs), service_config(docs)
    assert "tenancy" not in workers and "auth" not in workers  # no plans, prices, keys
    assert set(workers["router"]) == {"model_id"}
    assert routers["tenancy"]["plans"] == {"pro": {"rpm": 10, "concurrency": 2}}
    assert set(routers["engine"]) == {"model"}  # the tokenizer's path only
    # Both load as the service's config; routers know each pool's fallback.
    for config in (routers, workers):
        load_config(env={}, overrides=config)
    assert routers["autoscaler"]["pools"] == [{"name": "default", "fallback_to_shared": False}]


def test_the_controller_drains_on_sigterm_within_its_grace():
    docs = render(merged(TRIAL, {"autoscaling": {"drainTimeoutSeconds": 600}}))
    spec = one(docs, "Deployment", f"{FULLNAME}-controller-g1")["spec"]
    assert spec["strategy"]["type"] == "Recreate" and spec["replicas"] == 1
    drain = service_config(docs)["autoscaler"]["drain_timeout_s"]
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= drain + 30


# -- 2. a new worker image or model: generations --------------------------------------------------

def upgrade_steps() -> list[list[dict[str, Any]]]:
    """docs/deploy-kubernetes.md, "Upgrade the workers": g1 serves 0.1.0; g2 (0.2.0) starts
    beside it; g1 drains; g1 is removed."""
    base = merged(TRIAL, {"image": {"worker": {"tag": "0.1.0"}},
                          "pools": [{"name": "default", "minWorkers": 2, "maxWorkers": 4}]})
    g2 = {"image": {"worker": {"tag": "0.2.0"}}, "workers": {"generation": "g2"},
          "engine": {"gpu_memory_fraction": 0.9}}
    previous = {"generation": "g1", "image": {"tag": "0.1.0"},
                "engine": values_of(CHART / "values.yaml")["engine"]}
    return [render(v) for v in (
        base,
        merged(base, g2, {"workers": {"previous": previous}}),
        merged(base, g2, {"workers": {"previous": {**previous, "draining": True}}}),
        merged(base, g2))]


def test_a_worker_image_change_is_a_new_generation_beside_the_old_one():
    serving, beside, draining, done = upgrade_steps()
    name = f"{FULLNAME}-controller-g1"
    old_groups = groups_of(serving, "g1")
    # Step 1: g1 is rendered exactly as it was (its controller is not restarted, its pods and
    # config are untouched); g2 comes up on the new image with its own controller and groups.
    assert one(beside, "Deployment", name) == one(serving, "Deployment", name)
    assert one(beside, "ConfigMap", f"{FULLNAME}-worker-config-g1") \
        == one(serving, "ConfigMap", f"{FULLNAME}-worker-config-g1")
    assert groups_of(beside, "g1") == old_groups
    new = one(beside, "Deployment", f"{FULLNAME}-controller-g2")["spec"]["template"]["spec"]
    assert new["containers"][0]["image"].endswith(":0.2.0")
    for group in groups_of(beside, "g2").values():
        assert group["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0")
    assert service_config(beside, "g2")["engine"]["gpu_memory_fraction"] == 0.9
    assert service_config(beside, "g1")["engine"]["gpu_memory_fraction"] == 0.85
    # Both register in the same pools (routers use both), on distinct Ray resources.
    pools = {g: [(p["name"], tuple(p["resources"])) for p in
                 service_config(beside, g)["autoscaler"]["pools"]] for g in ("g1", "g2")}
    assert [n for n, _ in pools["g1"]] == [n for n, _ in pools["g2"]] == ["default"]
    assert pools["g1"][0][1] != pools["g2"][0][1]
    # KubeRay leaves running pods alone: nothing is recreated all at once.
    for docs in (serving, beside, draining, done):
        assert one(docs, "RayCluster")["spec"]["upgradeStrategy"] == {"type": "None"}
        validate_strictly(docs)
    # The routers are not restarted by any step (same model, same router config).
    sums = {checksum(one(d, "Deployment", f"{FULLNAME}-router"))
            for d in (serving, beside, draining, done)}
    assert len(sums) == 1
    # Step 2: g1's controller goes (on SIGTERM it drains its workers); its groups stay, with
    # the same pods, and may shrink to nothing as Ray's autoscaler removes idle pods.
    assert not find(draining, "Deployment", name)
    for group_name, group in groups_of(draining, "g1").items():
        old = old_groups[group_name]
        assert group["minReplicas"] == 0
        assert group["replicas"] == old["replicas"]  # no scale-down forced on busy pods
        assert group["template"] == old["template"]
    # Step 3: g1 is gone.
    assert not groups_of(done, "g1")
    assert not find(done, "ConfigMap", f"{FULLNAME}-worker-config-g1")
    assert groups_of(done, "g2") == groups_of(beside, "g2")
    assert one(done, "Deployment", f"{FULLNAME}-controller-g2") \
        == one(beside, "Deployment", f"{FULLNAME}-controller-g2")


def test_the_previous_generation_must_be_another_one():
    with pytest.raises(helm_python.HelmError, match="must differ"):
        render(merged(TRIAL, {"workers": {"previous": {"generation": "g1"}}}))


def test_upgrade_strategy_is_exposed():
    docs = render(merged(TRIAL, {"ray": {"upgradeStrategy": "Recreate"}}))
    assert one(docs, "RayCluster")["spec"]["upgradeStrategy"] == {"type": "Recreate"}
    with pytest.raises(helm_python.HelmValuesError, match="/ray/upgradeStrategy"):
        render(merged(TRIAL, {"ray": {"upgradeStrategy": "RollingUpdate"}}))


# -- 3. model delivery and start bounds ------------------------------------------------------------

def test_model_fetch_fills_a_chart_made_claim_before_routers_and_workers_start():
    docs = render(GPU_CLUSTER)
    claim = one(docs, "PersistentVolumeClaim", f"{FULLNAME}-models")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    fetch = GPU_CLUSTER["model"]["fetch"]
    for name, spec in pod_specs(docs):
        inits = {c["name"]: c for c in spec.get("initContainers", [])}
        reads_model = name.endswith("-router") or "/pool-" in name
        assert ("model-fetch" in inits) == reads_model, name
        if reads_model:
            init = inits["model-fetch"]
            assert init["image"] == fetch["image"] and init["args"] == fetch["args"]
            assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
            main = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
            assert main["model"]["readOnly"] is True
            volume = {v["name"]: v for v in spec["volumes"]}["model"]
            assert volume["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-models"


def test_model_fetch_into_a_node_local_empty_dir_and_from_an_oci_image():
    docs = render(merged(TRIAL, {"model": {
        "path": "/models/qwen", "volume": {"type": "emptyDir", "sizeLimit": "40Gi"},
        "fetch": {"enabled": True, "image": "registry.example.com/models/qwen:2.5-7b",
                  "command": ["cp", "-r", "/model/.", "/models/qwen"]}}}))
    validate_strictly(docs)
    for name, spec in pod_specs(docs):
        if "/pool-" in name:
            assert {v["name"]: v for v in spec["volumes"]}["model"]["emptyDir"] \
                == {"sizeLimit": "40Gi"}
            assert spec["initContainers"][0]["command"][0] == "cp"
    with pytest.raises(helm_python.HelmError, match="model.fetch needs a model volume"):
        render(merged(TRIAL, {"model": {"fetch": {"enabled": True, "image": "x"}}}))


def test_workers_have_a_start_timeout_and_a_startup_probe():
    docs = render(GPU_CLUSTER)
    timeout = GPU_CLUSTER["workers"]["startTimeoutSeconds"]
    config = service_config(docs)
    assert config["cluster"]["start_timeout_s"] == timeout
    for group in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]:
        probe = group["template"]["spec"]["containers"][0]["startupProbe"]
        assert probe["httpGet"] == {"path": "/metrics", "port": "worker-metrics"}
        assert probe["periodSeconds"] * probe["failureThreshold"] >= timeout
    controller = one(docs, "Deployment", f"{FULLNAME}-controller-g1")
    container = controller["spec"]["template"]["spec"]["containers"][0]
    # Ready once the first worker serves (the file the config names); the probe outlasts the
    # timeout, after which the process exits with the reason (`helm install --wait` fails).
    ready = config["cluster"]["ready_file"]
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-f", ready]
    probe = container["startupProbe"]
    assert probe["exec"]["command"] == ["test", "-f", ready]
    assert probe["periodSeconds"] * probe["failureThreshold"] > timeout
    assert ready.startswith("/tmp/")  # writable: /tmp is an emptyDir
    assert load_config(env={}, overrides=config).cluster.start_timeout_s == timeout


# -- 4 and 5. standard pod settings; one GPU per worker -------------------------------------------

def test_standard_pod_settings_render_where_asked():
    docs = render(GPU_CLUSTER)
    v = GPU_CLUSTER
    specs = dict(pod_specs(docs))
    router = specs[f"Deployment/{FULLNAME}-router"]
    assert router["priorityClassName"] == "serving-critical"
    assert router["topologySpreadConstraints"] == v["router"]["topologySpreadConstraints"]
    assert router["affinity"] == v["router"]["affinity"]
    assert env_of(router["containers"][0])["TZ"] == {"name": "TZ", "value": "UTC"}
    assert {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}} in router["volumes"]
    assert v["router"]["extraVolumeMounts"][0] in router["containers"][0]["volumeMounts"]
    deployment = one(docs, "Deployment", f"{FULLNAME}-router")
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "inference"
    controller = specs[f"Deployment/{FULLNAME}-controller-g1"]
    assert controller["nodeSelector"] == {"node-pool": "system"}
    head = specs[f"RayCluster/{FULLNAME}/head"]
    assert head["affinity"] == v["ray"]["head"]["affinity"]
    assert head["priorityClassName"] == "serving-critical"
    default = specs[f"RayCluster/{FULLNAME}/pool-default-g1"]
    acme = specs[f"RayCluster/{FULLNAME}/pool-acme-g1"]
    for spec in (default, acme):
        assert spec["runtimeClassName"] == "nvidia"
        assert spec["priorityClassName"] == "gpu-serving"
        assert spec["topologySpreadConstraints"] == v["workers"]["topologySpreadConstraints"]
        assert [c["name"] for c in spec["initContainers"]] == ["model-fetch", "gpu-check"]
        container = spec["containers"][0]
        assert env_of(container)["NCCL_DEBUG"]["value"] == "WARN"
        assert {"name": "nvme", "mountPath": "/scratch"} in container["volumeMounts"]
    # Per pool: its own node group, taints, CPU/memory and a MIG profile.
    assert default["nodeSelector"] == {"node-pool": "h100"}
    assert acme["nodeSelector"] == {"node-pool": "h100-mig"}
    assert acme["tolerations"] == v["pools"][1]["tolerations"]
    assert default["tolerations"] == values_of(CHART / "values.yaml")["workers"]["tolerations"]
    assert default["containers"][0]["resources"]["limits"] == {
        "cpu": "8", "memory": "48Gi", "nvidia.com/gpu": 1}
    assert acme["containers"][0]["resources"]["limits"] == {
        "cpu": "4", "memory": "24Gi", "nvidia.com/mig-3g.40gb": 1}
    validate_strictly(docs)


@pytest.mark.parametrize("bad, where", [
    ({"workers": {"gpusPerWorker": 2}}, "/workers/gpusPerWorker"),
    ({"workers": {"tolerations": [{"key": "a", "operator": "Maybe"}]}},
     "/workers/tolerations/0/operator"),
    ({"router": {"topologySpreadConstraints": [{"maxSkew": 1,
                                                 "whenUnsatisfiable": "DoNotSchedule"}]}},
     "/router/topologySpreadConstraints/0"),
    ({"controller": {"extraEnv": [{"value": "x"}]}}, "/controller/extraEnv/0"),
    ({"ray": {"head": {"extraVolumeMounts": [{"name": "x"}]}}},
     "/ray/head/extraVolumeMounts/0"),
    ({"workers": {"initContainers": [{"name": "x"}]}}, "/workers/initContainers/0"),
    ({"router": {"affinity": {"nodeAfinity": {}}}}, "/router/affinity"),
    ({"router": {"priorityClassName": 5}}, "/router/priorityClassName"),
    ({"pools": [{"name": "default", "minWorkers": 1, "maxWorkers": 2,
                 "gpuResourceName": "mig 3g"}]}, "/pools/0/gpuResourceName"),
    ({"image": {"worker": {"digest": "sha256:abc"}}}, "/image/worker/digest"),
    ({"workers": {"generation": "Green_1"}}, "/workers/generation"),
    ({"router": {"ingress": {"tls": [{"hosts": ["a"]}]}}}, "/router/ingress/tls/0"),
])
def test_the_schema_types_pod_settings_and_refuses_more_than_one_gpu(bad, where):
    with pytest.raises(helm_python.HelmValuesError, match=where):
        render(merged(TRIAL, bad))


def test_the_readme_says_a_model_must_fit_one_gpu():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"must fit (on )?one GPU", readme)
    schema = json.loads((CHART / "values.schema.json").read_text())
    gpus = schema["properties"]["workers"]["properties"]["gpusPerWorker"]
    assert gpus["maximum"] == 1 and "one GPU" in gpus["description"]


# -- 6. the edge -------------------------------------------------------------------------------------

def _check_httproute(route: dict[str, Any], service: dict[str, Any]) -> None:
    """The Gateway API v1 HTTPRoute fields the chart uses, and that they point at the router
    Service (kubernetes-validate has no Gateway API schemas)."""
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert set(route) == {"apiVersion", "kind", "metadata", "spec"}
    spec = route["spec"]
    assert set(spec) <= {"parentRefs", "hostnames", "rules"}
    assert spec["parentRefs"] and all(set(p) <= {"name", "namespace", "sectionName", "port",
                                                 "group", "kind"} and p["name"]
                                       for p in spec["parentRefs"])
    for host in spec.get("hostnames", []):
        assert re.fullmatch(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                            r"[a-z0-9])?)*", host)
    (rule,) = spec["rules"]
    assert set(rule) <= {"matches", "backendRefs", "timeouts", "filters"}
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    (backend,) = rule["backendRefs"]
    assert backend == {"name": service["metadata"]["name"],
                       "port": service["spec"]["ports"][0]["port"]}
    assert re.fullmatch(r"([0-9]{1,5}(h|m|s|ms)){1,4}", rule["timeouts"]["request"])


def test_ingress_and_httproute_with_tls():
    docs = render(GPU_CLUSTER)
    validate_strictly(docs)  # the Ingress against Kubernetes' schema
    service = one(docs, "Service", f"{FULLNAME}-router")
    ingress = one(docs, "Ingress")["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"secretName": "api-example-com-tls",
                               "hosts": ["api.example.com"]}]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert service["spec"]["ports"][0]["name"] == "http"
    route = one(docs, "HTTPRoute")
    _check_httproute(route, service)
    max_stream = GPU_CLUSTER["router"]["maxStreamSeconds"]
    assert route["spec"]["rules"][0]["timeouts"]["request"] == f"{max_stream}s"
    gateway = one(docs, "Gateway")
    assert gateway["apiVersion"] == "gateway.networking.k8s.io/v1"
    (listener,) = gateway["spec"]["listeners"]
    assert listener["protocol"] == "HTTPS" and listener["port"] == 443
    assert listener["tls"] == {"mode": "Terminate", "certificateRefs": [
        {"kind": "Secret", "name": "llm-example-com-tls"}]}
    assert {"name": gateway["metadata"]["name"], "sectionName": listener["name"]} \
        in route["spec"]["parentRefs"]
    # An HTTPRoute to an existing Gateway's HTTPS listener.
    docs = render(merged(TRIAL, {"router": {"httpRoute": {"enabled": True, "parentRefs": [
        {"name": "public", "namespace": "gateways", "sectionName": "https"}]}}}))
    assert not find(docs, "Gateway")
    _check_httproute(one(docs, "HTTPRoute"), one(docs, "Service", f"{FULLNAME}-router"))


def test_routers_stop_gracefully_and_stay_in_the_service_without_workers():
    docs = render(GPU_CLUSTER)
    spec = one(docs, "Deployment", f"{FULLNAME}-router")["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert sleep > 0
    assert pod["terminationGracePeriodSeconds"] >= GPU_CLUSTER["router"]["maxStreamSeconds"] \
        + sleep
    # The router drains for the longest stream, and its cut and exit fit in what is left.
    drain = routers_config(docs)["router"]["drain_timeout_s"]
    assert drain == GPU_CLUSTER["router"]["maxStreamSeconds"]
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + CUT_GRACE_S + 5
    # /ready without ?workers: ready once started, so no worker does not empty the Service.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_the_router_hpa_can_scale_on_streams_in_flight():
    hpa = one(render(GPU_CLUSTER), "HorizontalPodAutoscaler")["spec"]
    kinds = {m["type"]: m for m in hpa["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"] == {"metric": {"name": "electron_router_streams_in_flight"},
                                     "target": {"type": "AverageValue", "averageValue": "48"}}
    assert [m["type"] for m in one(render(TRIAL), "HorizontalPodAutoscaler")["spec"][
        "metrics"]] == ["Resource"]


# -- 7. datastores, secrets, migrations -----------------------------------------------------------

def test_a_release_must_choose_its_datastores():
    with pytest.raises(helm_python.HelmError, match="redis: set redis.url"):
        render({})
    with pytest.raises(helm_python.HelmError, match="postgresql: set postgresql.url"):
        render({"redis": {"deploy": True}})
    with pytest.raises(helm_python.HelmError, match=r"router.processes > 1 needs Redis"):
        render({**EXTERNAL, "redis": {"enabled": False}, "router": {"processes": 2}})
    docs = render(EXTERNAL)  # production: external, nothing in the chart
    assert not find(docs, "StatefulSet") and not find(docs, "Deployment", f"{FULLNAME}-redis")
    docs = render({"redis": {"enabled": False}, "postgresql": {"enabled": False}})
    assert not find(docs, "Job") and routers_config(docs)["tenancy"]["migrate_on_start"] is True


def test_generated_secrets_are_kept_and_the_datastores_secret_exists_before_the_migration():
    docs = render(merged(TRIAL, {"postgresql": {"url": None}}))
    admin = one(docs, "Secret", f"{FULLNAME}-admin")
    datastores = one(docs, "Secret", f"{FULLNAME}-datastores")
    for secret in (admin, datastores):
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    hooks = datastores["metadata"]["annotations"]
    job = one(docs, "Job")["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) >= {"pre-install", "pre-upgrade"}
    assert int(hooks["helm.sh/hook-weight"]) < int(job["helm.sh/hook-weight"])
    assert "hook-succeeded" not in hooks["helm.sh/hook-delete-policy"]


def test_under_gitops_every_password_comes_from_an_existing_secret():
    docs = render(GPU_CLUSTER)  # secrets.generate false, every password in a Secret
    assert not find(docs, "Secret")
    with pytest.raises(helm_python.HelmError, match="auth.adminKey: secrets.generate is false"):
        render(merged(GPU_CLUSTER, {"auth": {"existingSecret": ""}}))
    with pytest.raises(helm_python.HelmError, match="clusterToken.value: secrets.generate"):
        render(merged(GPU_CLUSTER, {"clusterToken": {"existingSecret": ""}}))
    with pytest.raises(helm_python.HelmError, match="ray.auth: secrets.generate"):
        render(merged(GPU_CLUSTER, {"ray": {"auth": {"existingSecret": ""}}}))
    with pytest.raises(helm_python.HelmError, match="redis.password: secrets.generate"):
        render(merged(TRIAL, {"secrets": {"generate": False},
                              "auth": {"existingSecret": "a"},
                              "clusterToken": {"existingSecret": "t"},
                              "ray": {"auth": {"existingSecret": "r"}}}))
    with pytest.raises(helm_python.HelmError, match="postgresql.password"):
        render(merged(TRIAL, {"secrets": {"generate": False},
                              "redis": {"password": "a-redis-password-0123456789"},
                              "auth": {"existingSecret": "a"},
                              "clusterToken": {"existingSecret": "t"},
                              "ray": {"auth": {"existingSecret": "r"}}}))


def test_the_in_chart_postgresql_password_from_an_existing_secret(tmp_path):
    values = merged(TRIAL, {"postgresql": {"existingPasswordSecret": "pg-pass",
                                           "existingPasswordSecretKey": "pw"}})
    docs = render(values)
    validate_strictly(docs)
    assert "postgres-password" not in one(docs, "Secret", f"{FULLNAME}-datastores")["data"]
    pg = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(pg)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "pg-pass", "key": "pw"}
    for name, spec in pod_specs(docs):
        if name.endswith(("-router", "-migrate")):
            env = env_of(spec["containers"][0])
            assert env["ELECTRON_POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "pg-pass", "key": "pw"}
            names = [e["name"] for e in spec["containers"][0]["env"]]
            # The kubelet expands $(VAR) from variables defined before it.
            assert names.index("ELECTRON_POSTGRES_PASSWORD") \
                < names.index("ELECTRON_TENANCY__DATABASE_URL")
            assert env["ELECTRON_TENANCY__DATABASE_URL"]["value"] == (
                f"postgresql://electron:$(ELECTRON_POSTGRES_PASSWORD)@{FULLNAME}"
                "-postgresql:5432/electron")


@pytest.mark.parametrize("values, hook", [
    (EXTERNAL, "pre-install,pre-upgrade"),
    (TRIAL, "post-install,pre-upgrade"),  # the in-chart database exists only after install
])
def test_migrations_run_once_per_release_in_a_hook_job(values, hook, tmp_path):
    docs = render(values)
    job = one(docs, "Job", f"{FULLNAME}-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == hook
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and "serviceAccountName" not in spec
    container = spec["containers"][0]
    assert container["command"][0] == "electron-serve"
    assert _parser().parse_args(container["command"][1:]).command == "migrate"
    env = env_of(container)
    router_env = env_of(one(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"][
        "spec"]["containers"][0])
    assert env["ELECTRON_TENANCY__DATABASE_URL"] == router_env["ELECTRON_TENANCY__DATABASE_URL"]
    # The routers then do not migrate at start.
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", ROUTER_CONFIG)["data"]["config.yaml"])
    assert load_config(path, env={}).tenancy.migrate_on_start is False
    assert not find(render(merged(values, {"migrations": {"enabled": False}})), "Job")


def test_the_migration_job_reaches_the_database_the_routers_use(tmp_path):
    docs = render(TRIAL)
    job = one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]
    router = one(docs, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"][
        "containers"][0]
    url = "ELECTRON_TENANCY__DATABASE_URL"
    assert resolved_env(job, docs)[url] == resolved_env(router, docs)[url]


# -- 8. versions that must agree -------------------------------------------------------------------

def _pinned_ray() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if re.match(r"ray(\[.*\])?==", d)]
    return spec.split("==")[1]


def test_ray_in_the_chart_is_the_ray_the_images_pin():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    defaults = values_of(CHART / "values.yaml")
    assert defaults["ray"]["version"] == chart["annotations"]["electron-serve/ray-version"] \
        == _pinned_ray()
    assert one(render(TRIAL), "RayCluster")["spec"]["rayVersion"] == _pinned_ray()
    with pytest.raises(helm_python.HelmError, match="differs from the Ray the images pin"):
        render(merged(TRIAL, {"ray": {"version": "2.59.0"}}))


# The KubeRay release that added each RayCluster spec field the chart may render (older fields:
# 1.0.0, the first ray.io/v1). A field the chart starts to use must be added here.
KUBERAY_FIELD_SINCE = {"upgradeStrategy": "1.6.0", "rayVersion": "1.0.0",
                       "enableInTreeAutoscaling": "1.0.0", "autoscalerOptions": "1.0.0",
                       "headGroupSpec": "1.0.0", "workerGroupSpecs": "1.0.0",
                       "gcsFaultToleranceOptions": "1.3.0"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_the_kuberay_minimum_covers_every_crd_field_the_chart_renders():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    minimum = chart["annotations"]["electron-serve/kuberay-minimum"]
    assert minimum in chart["annotations"]["electron-serve/requires"]
    used = set()
    for path in sorted(CHART.glob("ci/*-values.yaml")):
        used |= set(one(render(values_of(path)), "RayCluster")["spec"])
    assert used <= set(KUBERAY_FIELD_SINCE), used - set(KUBERAY_FIELD_SINCE)
    assert _version(minimum) >= max(_version(KUBERAY_FIELD_SINCE[f]) for f in used)
    # The CRD the validator checks against (v1.7.0) is at least that minimum.
    readme = (ROOT / "data" / "kuberay" / "README.md").read_text()
    tested = re.search(r"tag v([0-9.]+)", readme).group(1)
    assert _version(tested) >= _version(minimum)
    docs = (ROOT / "docs" / "deploy-kubernetes.md").read_text()
    assert f"KubeRay >= {minimum}" in docs or f"KubeRay {minimum}" in docs


def test_images_by_digest():
    docs = render(GPU_CLUSTER)
    router = GPU_CLUSTER["image"]["router"]
    worker = GPU_CLUSTER["image"]["worker"]
    images = {c["image"] for _, spec in pod_specs(docs) for c in spec["containers"]}
    assert f"{router['repository']}:{router['tag']}@{router['digest']}" in images
    assert f"{worker['repository']}@{worker['digest']}" in images
    for name, spec in pod_specs(docs):
        if "RayCluster" in name or "-controller-" in name:
            assert spec["containers"][0]["image"] == f"{worker['repository']}@{worker['digest']}"


def test_the_previous_generation_runs_what_it_was_given_not_the_new_settings():
    # g2 adds an engine setting and a digest; g1, described by its tag and its old engine
    # settings, keeps exactly what it ran (not the new digest, not the new setting).
    g1 = merged(TRIAL, {"engine": {"dtype": "bfloat16"}, "image": {"worker": {"tag": "0.1.0"}}})
    g2 = merged(g1, {"engine": {"max_model_len": 4096},
                     "image": {"worker": {"tag": "0.2.0", "digest": "sha256:" + "3" * 64}},
                     "workers": {"generation": "g2", "previous": {
                         "generation": "g1", "image": {"tag": "0.1.0"},
                         "engine": {"dtype": "bfloat16"}}}})
    before, after = render(g1), render(g2)
    name = f"{FULLNAME}-controller-g1"
    assert one(after, "Deployment", name) == one(before, "Deployment", name)
    assert service_config(after, "g1") == service_config(before, "g1")
    assert "max_model_len" not in service_config(after, "g1")["engine"]
    assert service_config(after, "g2")["engine"]["max_model_len"] == 4096
    assert service_config(after, "g1")["engine"]["kv_cache_bytes"] is None


def test_the_engine_defaults_a_previous_generation_starts_from_are_values_yamls():
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = helpers.split('define "electron-serve.engineDefaults" -}}', 1)[1].split("{{-", 1)[0]
    assert yaml.safe_load(block) == values_of(CHART / "values.yaml")["engine"]
