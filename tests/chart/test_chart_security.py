"""The chart's doors: who may reach which port (the rendered NetworkPolicies, evaluated as
Kubernetes does: a pod selected by any policy takes only what some policy allows), Ray's own
token on every Ray process, and Ray's ports pinned where the policies name them."""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.chart.test_chart import (
    FULLNAME,
    GEN,
    TRIAL,
    env_of,
    find,
    one,
    render,
    router_container,
    routers_config,
    service_config,
)
from tests.chart.test_chart_operations import merged

SCRAPERS = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
OPERATORS = [{"namespaceSelector": {"matchLabels": {"name": "ops"}}}]
NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "serving"}
OUTSIDER = {"app": "someone-else"}  # a pod of the same namespace, not of the release


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _peer_admits(peer: dict[str, Any], source: tuple[dict[str, str], dict[str, str]]) -> bool:
    pod_labels, namespace_labels = source
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif namespace_labels != NAMESPACE_LABELS:
        return False  # a bare podSelector means this namespace only
    return _selects(peer.get("podSelector", {}), pod_labels)


def _port_admits(rule: dict[str, Any], port: int) -> bool:
    if "ports" not in rule:
        return True
    return any(p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"])


def reachable(docs, source, target: dict[str, str], port: int) -> bool:
    """Whether a pod (labels, its namespace's labels) may open ``port`` on a pod with the
    labels ``target``."""
    policies = [p for p in find(docs, "NetworkPolicy")
                if "Ingress" in p["spec"]["policyTypes"]
                and _selects(p["spec"]["podSelector"], target)]
    if not policies:
        return True
    return any(_port_admits(rule, port)
               and ("from" not in rule or any(_peer_admits(peer, source) for peer in rule["from"]))
               for policy in policies for rule in policy["spec"].get("ingress", []))


def pods(docs) -> dict[str, dict[str, str]]:
    """The labels of each kind of pod the release runs."""
    def template(kind, name):
        return one(docs, kind, name)["spec"]["template"]["metadata"]["labels"]

    ray = one(docs, "RayCluster")["spec"]
    found = {
        "router": template("Deployment", f"{FULLNAME}-router"),
        "controller": template("Deployment", f"{FULLNAME}-controller-{GEN}"),
        "head": ray["headGroupSpec"]["template"]["metadata"]["labels"],
        "worker": ray["workerGroupSpecs"][0]["template"]["metadata"]["labels"],
    }
    if find(docs, "Deployment", f"{FULLNAME}-redis"):
        found["redis"] = template("Deployment", f"{FULLNAME}-redis")
    if find(docs, "StatefulSet", f"{FULLNAME}-postgresql"):
        found["postgresql"] = template("StatefulSet", f"{FULLNAME}-postgresql")
    if find(docs, "Job"):
        found["migrate"] = one(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    return found


def ray_ports(docs) -> dict[str, int]:
    """The ports Ray is told to use, the same on every Ray node (checked here)."""
    ray = one(docs, "RayCluster")["spec"]
    groups = [ray["headGroupSpec"]] + ray["workerGroupSpecs"]
    seen = []
    for group in groups:
        params = group["rayStartParams"]
        seen.append({k: int(v) for k, v in params.items() if k.endswith("-port")})
    containers = [router_container(docs)] + [
        d["spec"]["template"]["spec"]["containers"][0] for d in find(docs, "Deployment")
        if d["metadata"]["name"].startswith(f"{FULLNAME}-controller-")]
    for container in containers:
        words = shlex.split(" ".join(container["args"]).split("&&")[0])
        flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
        seen.append({k: int(v) for k, v in flags.items() if k.endswith("-port")})
    assert all(ports == seen[0] for ports in seen), seen
    return seen[0]


@pytest.fixture(scope="module")
def trial():
    return render(merged(TRIAL, {"networkPolicy": {"metricsFrom": SCRAPERS,
                                                   "rayDashboardFrom": OPERATORS}}))


def test_worker_grpc_is_reachable_from_routers_and_controllers_only(trial):
    labels = pods(trial)
    grpc_port = 9094
    worker_pod = one(trial, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "worker-grpc", "containerPort": grpc_port, "protocol": "TCP"} \
        in worker_pod["containers"][0]["ports"]
    # The port the worker actors serve on (their config), the one the policy opens.
    assert service_config(trial)["cluster"]["worker_port"] == grpc_port
    assert "worker_port" not in routers_config(trial)["cluster"]
    for name, source in labels.items():
        expected = name in ("router", "controller")
        assert reachable(trial, (source, NAMESPACE_LABELS), labels["worker"], grpc_port) \
            == expected, name
    assert not reachable(trial, (OUTSIDER, NAMESPACE_LABELS), labels["worker"], grpc_port)
    assert not reachable(trial, ({}, {"name": "monitoring"}), labels["worker"], grpc_port)


def test_metrics_ports_are_for_the_scrapers(trial, tmp_path):
    labels = pods(trial)
    scraper = ({"app": "prometheus"}, {"name": "monitoring"})
    for target, port in ((labels["worker"], 9095), (labels["router"], 9090)):
        assert reachable(trial, scraper, target, port)
        for name in ("router", "controller", "head", "redis"):
            if labels[name] is not target:
                assert not reachable(trial, (labels[name], NAMESPACE_LABELS), target, port)
    # The scraper gets nothing else of the release's: not gRPC, not Ray.
    assert not reachable(trial, scraper, labels["worker"], 9094)
    assert not reachable(trial, scraper, labels["worker"], ray_ports(trial)["node-manager-port"])


def test_ray_ports_are_open_between_ray_nodes_only(trial):
    labels = pods(trial)
    ports = ray_ports(trial)
    assert ports["min-worker-port"] < ports["max-worker-port"]
    nodes = ("router", "controller", "head", "worker")
    probe = [ports[k] for k in ("node-manager-port", "object-manager-port",
                                "runtime-env-agent-port", "dashboard-agent-grpc-port",
                                "dashboard-agent-listen-port")]
    probe += [ports["min-worker-port"], ports["max-worker-port"]]
    for target in nodes:
        for port in probe:
            for source in nodes:
                assert reachable(trial, (labels[source], NAMESPACE_LABELS), labels[target],
                                 port), (source, target, port)
            for outsider in ("redis", "postgresql", "migrate"):
                assert not reachable(trial, (labels[outsider], NAMESPACE_LABELS),
                                     labels[target], port), (outsider, target, port)
            assert not reachable(trial, (OUTSIDER, NAMESPACE_LABELS), labels[target], port)
    # The GCS: Ray nodes only.
    for source in nodes:
        assert reachable(trial, (labels[source], NAMESPACE_LABELS), labels["head"], 6379)
    assert not reachable(trial, (labels["redis"], NAMESPACE_LABELS), labels["head"], 6379)


@pytest.mark.parametrize("port", [8265, 10001], ids=["dashboard-jobs-api", "ray-client"])
def test_the_ray_dashboard_and_jobs_api_are_not_reachable_from_the_release(trial, port):
    labels = pods(trial)
    for name, source in labels.items():
        assert not reachable(trial, (source, NAMESPACE_LABELS), labels["head"], port), name
    assert reachable(trial, ({}, {"name": "ops"}), labels["head"], port)
    closed = render(TRIAL)  # rayDashboardFrom empty: nobody
    for namespace in (NAMESPACE_LABELS, {"name": "ops"}):
        assert not reachable(closed, ({}, namespace), pods(closed)["head"], port)


def test_the_datastores_take_only_their_clients(trial):
    labels = pods(trial)
    for name, source in labels.items():
        # The head: its GCS keeps its tables there (GCS fault tolerance, on by default with
        # the in-chart Redis).
        assert reachable(trial, (source, NAMESPACE_LABELS), labels["redis"], 6379) \
            == (name in ("router", "head")), name
        assert reachable(trial, (source, NAMESPACE_LABELS), labels["postgresql"], 5432) \
            == (name in ("router", "migrate")), name


def test_the_api_port_stays_open_and_nothing_else_is_open_by_default(trial):
    labels = pods(trial)
    assert reachable(trial, (OUTSIDER, {"name": "elsewhere"}), labels["router"], 8000)
    for name, target in labels.items():
        assert not reachable(trial, (OUTSIDER, NAMESPACE_LABELS), target, 12345), name


def test_every_ray_process_runs_with_rays_token_auth(trial):
    secret = {"name": f"{FULLNAME}-ray-auth", "key": "auth_token"}
    ray = one(trial, "RayCluster")["spec"]
    containers = {"head": ray["headGroupSpec"]["template"]["spec"]["containers"][0],
                  "router": router_container(trial)}
    for group in ray["workerGroupSpecs"]:
        containers[group["groupName"]] = group["template"]["spec"]["containers"][0]
    for d in find(trial, "Deployment"):
        if d["metadata"]["name"].startswith(f"{FULLNAME}-controller-"):
            containers[d["metadata"]["name"]] = d["spec"]["template"]["spec"]["containers"][0]
    containers["autoscaler"] = ray["autoscalerOptions"]
    for name, container in containers.items():
        env = env_of(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == secret, name
    token = one(trial, "Secret", secret["name"])
    assert token["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(token["data"]["auth_token"]) > 40
    off = render(merged(TRIAL, {"ray": {"auth": {"enabled": False}}}))
    assert not find(off, "Secret", secret["name"])
    assert "RAY_AUTH_TOKEN" not in env_of(router_container(off))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_in_chart_redis_refuses_a_client_without_its_password(trial):
    """The chart's own Redis command, run for real: a client without the password is
    refused, the routers' URL (from the chart's Secret) and the readiness probe get in."""
    server = one(trial, "Deployment", f"{FULLNAME}-redis")["spec"]["template"]["spec"][
        "containers"][0]
    secret = one(trial, "Secret", f"{FULLNAME}-datastores")["data"]
    password = base64.b64decode(secret["redis-password"]).decode()
    url = base64.b64decode(secret["redis-url"]).decode()
    port = _free_port()
    script = " ".join(server["args"]) + f" --port {port} --bind 127.0.0.1"
    proc = subprocess.Popen([*server["command"], script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "REDISCLI_AUTH": password})
    try:
        anonymous = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                anonymous.ping()
                pytest.fail("Redis answered a client without its password")
            except redis.AuthenticationError:
                break  # NOAUTH: refused
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        wrong = redis.Redis(port=port, password="not-the-password")
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        routers = redis.Redis.from_url(url.replace(f"@{FULLNAME}-redis:6379",
                                                   f"@127.0.0.1:{port}"))
        assert routers.ping() is True
        cli, *words = server["readinessProbe"]["exec"]["command"]
        probe = subprocess.run([cli, "-p", str(port), *words],
                               env={**os.environ, "REDISCLI_AUTH": password},
                               capture_output=True, text=True, timeout=10)
        assert probe.stdout.strip() == "PONG"
        assert routers.config_get("protected-mode") == {"protected-mode": "yes"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _as_postgres(*command: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Runs a PostgreSQL server binary (which refuses root) as the postgres user."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *command], check=True, capture_output=True, text=True,
                          timeout=60, **kwargs)


@pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("psql") is None
                    or (os.geteuid() == 0 and shutil.which("runuser") is None),
                    reason="needs PostgreSQL's server binaries")
def test_the_in_chart_postgresql_role_is_no_superuser_and_migrates(trial):
    """The chart's init script, run as the image's entrypoint runs it on a fresh data
    directory (local connections trusted, the database made first): the service's role
    logs in with its password, is no superuser, and the schema migrations succeed; the
    bootstrap superuser cannot log in over TCP."""
    from core.config import TenancyConfig
    from router.tenancy.sqldb import database_of

    script = one(trial, "ConfigMap", f"{FULLNAME}-postgresql-init")["data"][
        "10-electron-role.sh"]
    server = one(trial, "StatefulSet", f"{FULLNAME}-postgresql")["spec"]["template"]["spec"][
        "containers"][0]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["POSTGRES_USER"] == "postgres" and env["ELECTRON_DB_USER"] == "electron"
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts["/docker-entrypoint-initdb.d"]["readOnly"] is True
    password = base64.b64decode(one(trial, "Secret", f"{FULLNAME}-datastores")["data"][
        "postgres-password"]).decode()

    # Not under tmp_path: the postgres user must reach it (pytest's base is root's alone).
    root = Path(tempfile.mkdtemp(prefix="electron-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    root.chmod(0o755)
    data, port = root / "data", _free_port()
    pwfile = root / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres")
    _as_postgres("initdb", "-D", str(data), "-U", "postgres", "--auth-local=trust",
                 "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
    _as_postgres("pg_ctl", "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                 f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        local = {**os.environ, "PGHOST": str(root), "PGPORT": str(port)}
        subprocess.run(["psql", "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1",
                        "-c", f'CREATE DATABASE "{env["POSTGRES_DB"]}"'], env=local,
                       check=True, capture_output=True, timeout=30)
        subprocess.run(["sh", "-c", script], check=True, capture_output=True, timeout=30,
                       env={**local, **{k: v for k, v in env.items() if v is not None},
                            "POSTGRES_PASSWORD": password})

        url = f"postgresql://electron:{password}@127.0.0.1:{port}/{env['POSTGRES_DB']}"
        db = database_of(TenancyConfig(database_url=url))
        try:
            assert db.migrate() >= 1  # the service's role can make its schema
        finally:
            db.close()
        tcp = {**os.environ, "PGPASSWORD": password}
        superuser = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "electron", "-d",
             env["POSTGRES_DB"], "-tAc", "SELECT rolsuper FROM pg_roles "
             "WHERE rolname = current_user"], env=tcp, capture_output=True, text=True,
            timeout=30)
        assert superuser.stdout.strip() == "f", superuser.stderr
        bootstrap = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
             "-c", "SELECT 1"], env=tcp, capture_output=True, text=True, timeout=30)
        assert bootstrap.returncode != 0 and "password authentication failed" in bootstrap.stderr
    finally:
        _as_postgres("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
