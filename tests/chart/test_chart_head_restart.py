"""GCS fault tolerance in the chart (ray.gcsFaultTolerance, KubeRay's
spec.gcsFaultToleranceOptions): on by default when the chart deploys its own Redis (the
GCS then writes there, with that Redis's password, and the Redis admits the head), off with
an external Redis unless enabled with an address, refused when on with no Redis; the Ray
nodes KubeRay does not make (routers, controllers) wait for a restarted head as long as
its worker pods do. Every rendering passes the strict RayCluster CRD check."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.chart.test_chart import (
    CHART,
    FULLNAME,
    TRIAL,
    env_of,
    find,
    one,
    render,
    render_text,
    values_of,
)

EXTERNAL_REDIS = values_of(CHART / "ci" / "external-datastores-values.yaml")
RECONNECT = "RAY_gcs_rpc_server_reconnect_timeout_s"


def with_ft(values: dict[str, Any], **ft: Any) -> dict[str, Any]:
    values = copy.deepcopy(values)
    values.setdefault("ray", {})["gcsFaultTolerance"] = ft
    return values


def raycluster_ok(text: str) -> None:
    validator = Path(__file__).with_name("raycluster_validator.py")
    result = subprocess.run([sys.executable, str(validator)], input=text, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def ft_options(docs) -> dict[str, Any] | None:
    return one(docs, "RayCluster")["spec"].get("gcsFaultToleranceOptions")


def joined_nodes_env(docs) -> list[dict[str, Any]]:
    """The env of the Ray nodes the chart starts itself: the routers and the controllers."""
    return [env_of(d["spec"]["template"]["spec"]["containers"][0])
            for d in find(docs, "Deployment")
            if d["metadata"]["name"].startswith((f"{FULLNAME}-router",
                                                 f"{FULLNAME}-controller"))]


def redis_ingress_components(docs) -> set[str]:
    policy = one(docs, "NetworkPolicy", f"{FULLNAME}-redis")
    return {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for rule in policy["spec"]["ingress"] for peer in rule["from"]}


def test_on_by_default_with_the_in_chart_redis():
    text = render_text(TRIAL)
    raycluster_ok(text)
    docs = render(TRIAL)
    assert ft_options(docs) == {
        "redisAddress": f"{FULLNAME}-redis:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {
            "name": f"{FULLNAME}-datastores", "key": "redis-password"}}}}
    # The password the GCS gets is the one the in-chart Redis asks for.
    assert "redis-password" in one(docs, "Secret", f"{FULLNAME}-datastores")["data"]
    assert redis_ingress_components(docs) == {"router", "ray-head"}
    nodes = joined_nodes_env(docs)
    assert len(nodes) == 2 and all(env[RECONNECT]["value"] == "600" for env in nodes)


def test_off_by_choice_or_with_an_external_redis():
    for values in (with_ft(TRIAL, enabled=False), EXTERNAL_REDIS):
        text = render_text(values)
        raycluster_ok(text)
        docs = render(values)
        assert ft_options(docs) is None
        assert all(RECONNECT not in env for env in joined_nodes_env(docs))
    assert redis_ingress_components(render(with_ft(TRIAL, enabled=False))) == {"router"}


def test_on_with_an_external_redis_and_its_password_secret():
    values = with_ft(EXTERNAL_REDIS, enabled=True, redisAddress="redis-ha:6379",
                     existingSecret="gcs-redis", existingSecretKey="password",
                     externalStorageNamespace="electron-prod")
    text = render_text(values)
    raycluster_ok(text)
    docs = render(values)
    assert ft_options(docs) == {
        "redisAddress": "redis-ha:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "gcs-redis",
                                                         "key": "password"}}},
        "externalStorageNamespace": "electron-prod"}
    assert all(env[RECONNECT]["value"] == "600" for env in joined_nodes_env(docs))
    # Without a password Secret: none is passed (a Redis without auth).
    bare = ft_options(render(with_ft(EXTERNAL_REDIS, enabled=True,
                                     redisAddress="redis-ha:6379")))
    assert bare == {"redisAddress": "redis-ha:6379"}


def test_on_with_no_redis_is_refused():
    with pytest.raises(Exception, match="gcsFaultTolerance.enabled needs a Redis"):
        render(with_ft(EXTERNAL_REDIS, enabled=True))


def test_the_values_schema_rejects_a_redis_url_as_the_address():
    with pytest.raises(Exception, match="redisAddress"):
        render(with_ft(EXTERNAL_REDIS, enabled=True, redisAddress="redis://redis-ha:6379/0"))
