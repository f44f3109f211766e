"""tests/chart/raycluster_validator.py, the check the chart's RayCluster must pass: it refuses
what the API server or the KubeRay operator would refuse, and passes a good RayCluster."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import yaml

from tests.chart.raycluster_validator import check_manifests, check_raycluster, main
from tests.chart.test_chart import TRIAL, render_text

GOOD = yaml.safe_load("""
apiVersion: ray.io/v1
kind: RayCluster
metadata: {name: demo, labels: {app: demo}}
spec:
  headGroupSpec:
    rayStartParams: {num-cpus: "0"}
    template:
      spec:
        containers:
          - name: ray-head
            image: rayproject/ray:2.60.0
            ports: [{name: gcs-server, containerPort: 6379}, {name: dashboard, containerPort: 8265}]
  workerGroupSpecs:
    - groupName: gpu
      minReplicas: 0
      maxReplicas: 2
      rayStartParams: {num-gpus: "1"}
      template:
        spec:
          containers: [{name: ray-worker, image: rayproject/ray:2.60.0}]
""")


def changed(edit) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    edit(doc)
    return doc


def head(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["headGroupSpec"]["template"]["spec"]


def test_a_good_raycluster_passes():
    assert check_raycluster(GOOD).errors == []
    # Same port, another protocol: a different list-map key (protocol defaults to TCP).
    udp = changed(lambda d: head(d)["containers"][0]["ports"].append(
        {"name": "gcs-udp", "containerPort": 6379, "protocol": "UDP"}))
    assert check_raycluster(udp).errors == []


@pytest.mark.parametrize("edit, error", [
    (lambda d: d["spec"].update(rayVerison="2.60.0"), "'rayVerison' was unexpected"),
    (lambda d: head(d)["containers"][0].update(imagePolicy="Always"),
     "'imagePolicy' was unexpected"),
    (lambda d: head(d)["containers"].append({"name": "ray-head", "image": "busybox"}),
     "containers: [1] has the same list-map key as [0] (name='ray-head')"),
    (lambda d: head(d)["containers"][0]["ports"].append({"name": "x", "containerPort": 6379}),
     "ports: [2] has the same list-map key as [0] (containerPort=6379, protocol='TCP')"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**31), "'int32'"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=3), "minReplicas 3 is over"),
    (lambda d: d["spec"]["workerGroupSpecs"].append(dict(d["spec"]["workerGroupSpecs"][0])),
     "groupName 'gpu' is also [0]'s"),
    (lambda d: d["metadata"].update(name="Demo_1"), "is not a DNS-1035 label"),
    (lambda d: d["metadata"].update(name="a" * 54), "longer than 53 characters"),
    (lambda d: d["metadata"].pop("name"), "name or generateName is required"),
    (lambda d: d["metadata"]["labels"].update(replicas=2), "2 is not a string"),
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "is not ray.io/v1"),
], ids=["unknown-field", "unknown-container-field", "duplicate-container-name",
        "duplicate-port", "int32-range", "min-over-max", "duplicate-group", "bad-name",
        "long-name", "no-name", "label-not-a-string", "old-api-version"])
def test_a_bad_raycluster_fails(edit, error):
    bad = changed(edit)
    errors = check_raycluster(bad).errors
    assert any(error in e for e in errors), errors
    assert bad == changed(edit)  # the caller's object is left as it was


def test_a_null_the_api_server_prunes_is_a_warning_not_an_error():
    verdict = check_raycluster(changed(lambda d: d["spec"]["workerGroupSpecs"][0].update(
        scaleStrategy=None)))
    assert verdict.errors == [] and "scaleStrategy: null dropped" in verdict.warnings[0]


def test_the_chart_with_a_typo_its_values_schema_lets_through_fails():
    # securityContext is passed through to every container, the RayCluster's included.
    typo = {**TRIAL, "securityContext": {"runAsNonRot": True}}
    ((where, verdict),) = check_manifests(render_text(typo))
    assert where.endswith("RayCluster/es-electron-serve")
    assert any("'runAsNonRot' was unexpected" in e for e in verdict.errors), verdict.errors
    ((_, verdict),) = check_manifests(render_text(TRIAL))
    assert verdict.errors == []


def run(text: str, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    code = main([])
    return code, capsys.readouterr().out


def test_the_command_line_contract(monkeypatch, capsys):
    service = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
    good = yaml.safe_dump(GOOD)
    bad = yaml.safe_dump(changed(lambda d: d["spec"].update(typo=True)))
    code, out = run(f"{service}---\n{good}", monkeypatch, capsys)
    assert code == 0 and "1 RayCluster document(s) checked, 0 invalid" in out
    code, out = run(f"{good}---\n{bad}", monkeypatch, capsys)
    assert code == 1 and "2 RayCluster document(s) checked, 1 invalid" in out
    assert run(service, monkeypatch, capsys)[0] == 2  # no RayCluster
    # A repeated key: Kubernetes' YAML reader refuses it, PyYAML would keep the last.
    code, out = run(good.replace("kind: RayCluster", "kind: RayCluster\nkind: RayCluster"),
                    monkeypatch, capsys)
    assert code == 2 and "repeats" in out
