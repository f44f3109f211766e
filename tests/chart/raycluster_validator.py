#!/usr/bin/env python3
"""Checks the RayCluster objects (ray.io/v1) of rendered manifests as the Kubernetes API
server and the KubeRay operator would take them: a chart that passes deploys.

    helm template REL helm/electron-serve | python tests/chart/raycluster_validator.py

Reads multi-document YAML on stdin (or from the files named), checks every RayCluster and
skips the other kinds. Exit 0: every RayCluster valid; 1: one is invalid; 2: unreadable YAML
or no RayCluster at all. ``kubernetes-validate`` only warns on custom resources, hence this.

What is checked, beyond what plain JSON Schema says:
- the CRD's schema, strict (data/kuberay/raycluster-v1.strict.schema.json): an unknown field
  is an error, as with kubectl's default ``--validate=strict``;
- list-maps (``x-kubernetes-list-type: map``): entries unique by their
  ``x-kubernetes-list-map-keys``, a missing key counting as its default -- containers, env
  and volumes by name, ports by containerPort and protocol (TCP unless said);
- ``format: int32`` / ``int64``: the number fits (the operator cannot decode one that does not);
- ``pattern`` as Kubernetes reads it (ECMA-262 / RE2: ``$`` does not match before a final
  newline, Python's does);
- a null given to a field that is not nullable is dropped first, as the API server does
  (a warning, not an error);
- metadata: a name or a generateName; labels and annotations map strings to strings; a name
  the operator accepts (a DNS-1035 label of at most 53 characters);
- worker groups: minReplicas <= maxReplicas (the operator refuses the cluster otherwise), and
  each groupName once (the CRD does not say so, but Ray's autoscaler keys its node types by
  group name: a second group of one name would silently replace the first);
- the YAML as Kubernetes parses it: a repeated key is an error, timestamps stay strings.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import yaml
from jsonschema import ValidationError

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_ROOT))
from tests.support.data import data_path  # noqa: E402

API_VERSION = "ray.io/v1"
MAX_NAME_LENGTH = 53  # KubeRay's MaxRayClusterNameLength: it derives longer names from it
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")


# -- YAML as Kubernetes reads it (sigs.k8s.io/yaml) ---------------------------------------------

class _KubeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with Kubernetes' differences: no timestamps, no repeated keys."""


_KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _mapping_without_repeats(loader: _KubeLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:  # construct_mapping says what is wrong with it
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"key {key!r} repeats the one on line {seen[key] + 1}", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_KubeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                            _mapping_without_repeats)
# A lone "=" is YAML 1.1's value key to PyYAML, a plain string to Kubernetes.
_KubeLoader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)


def load_documents(text: str) -> list[Any]:
    """The documents of multi-document YAML; yaml.YAMLError when Kubernetes would refuse it."""
    return list(yaml.load_all(text, Loader=_KubeLoader))


# -- the schema and what JSON Schema cannot say --------------------------------------------------

def _unique_list_map_keys(validator, list_type, instance, schema) -> Iterator[ValidationError]:
    if list_type != "map" or not isinstance(instance, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    fields = schema.get("items", {}).get("properties", {})
    first: dict[str, int] = {}
    for i, entry in enumerate(instance):
        if not isinstance(entry, dict):
            continue
        values = [entry.get(key, fields.get(key, {}).get("default")) for key in keys]
        at = first.setdefault(json.dumps(values), i)
        if at != i:
            named = ", ".join(f"{key}={value!r}" for key, value in zip(keys, values))
            yield ValidationError(f"[{i}] has the same list-map key as [{at}] ({named})")


def _ecma_pattern(validator, pattern, instance, schema) -> Iterator[ValidationError]:
    if not isinstance(instance, str):
        return
    anchored = pattern.endswith("$") and not pattern.endswith(r"\$")
    if not re.search(pattern[:-1] + r"\Z" if anchored else pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _fits_in(bits: int):
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    return lambda value: not isinstance(value, int) or isinstance(value, bool) \
        or low <= value < high


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("int32")(_fits_in(32))
_FORMATS.checks("int64")(_fits_in(64))

_KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-kubernetes-list-type": _unique_list_map_keys, "pattern": _ecma_pattern})


@cache
def _schema() -> dict[str, Any]:
    return json.loads(data_path("kuberay", "raycluster-v1.strict.schema.json").read_text())


@cache
def _validator() -> jsonschema.Validator:
    return _KubeValidator(_schema(), format_checker=_FORMATS)


def _nullable(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "null" or (isinstance(kind, list) and "null" in kind)


def _drop_nulls(value: Any, schema: dict[str, Any], path: str, warnings: list[str]) -> None:
    """Drops, in place, each null given to a field that is not nullable (the API server
    prunes them before it validates)."""
    if isinstance(value, dict):
        fields, other = schema.get("properties", {}), schema.get("additionalProperties")
        for key in list(value):
            sub = fields.get(key, other if isinstance(other, dict) else None)
            if sub is None:
                continue
            if value[key] is None and not _nullable(sub):
                warnings.append(f"{path}.{key}: null dropped, as the API server does")
                del value[key]
            else:
                _drop_nulls(value[key], sub, f"{path}.{key}", warnings)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _drop_nulls(item, schema["items"], f"{path}[{i}]", warnings)


def _metadata_errors(meta: Any) -> list[str]:
    if not isinstance(meta, dict):
        return ["metadata: must be an object"]
    errors = []
    name, generate_name = meta.get("name"), meta.get("generateName")
    if name is not None and not isinstance(name, str):
        errors.append(f"metadata.name: {name!r} is not a string")
    elif name:
        if len(name) > MAX_NAME_LENGTH:
            errors.append(f"metadata.name: {name!r} is longer than {MAX_NAME_LENGTH} characters")
        if not DNS_1035_LABEL.match(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1035 label "
                          "(lower-case letters, digits and '-', starting with a letter)")
    elif not (isinstance(generate_name, str) and generate_name):
        errors.append("metadata: name or generateName is required")
    for field in ("labels", "annotations"):
        entries = meta.get(field)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            errors.append(f"metadata.{field}: must map strings to strings")
            continue
        errors += [f"metadata.{field}.{key}: {value!r} is not a string (quote it)"
                   for key, value in entries.items()
                   if not isinstance(key, str) or not isinstance(value, str)]
    return errors


def _worker_group_errors(spec: Any) -> list[str]:
    groups = spec.get("workerGroupSpecs") if isinstance(spec, dict) else None
    errors, names = [], {}
    for i, group in enumerate(groups if isinstance(groups, list) else []):
        if not isinstance(group, dict):
            continue  # the schema says so
        where = f".spec.workerGroupSpecs[{i}]"
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append(f"{where}: minReplicas {low} is over maxReplicas {high}")
        name = group.get("groupName")
        if isinstance(name, str) and names.setdefault(name, i) != i:
            errors.append(f"{where}: groupName {name!r} is also [{names[name]}]'s")
    return errors


def _where(error: ValidationError) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                   for part in error.absolute_path) or "."


class Verdict(NamedTuple):
    errors: list[str]    # empty: valid
    warnings: list[str]  # what the API server would change silently


def check_raycluster(doc: dict[str, Any]) -> Verdict:
    """The errors and warnings of one RayCluster object (``doc`` is left as it is)."""
    if doc.get("apiVersion") != API_VERSION:
        return Verdict([f"apiVersion {doc.get('apiVersion')!r} is not {API_VERSION}"], [])
    doc, warnings = copy.deepcopy(doc), []
    _drop_nulls(doc, _schema(), "", warnings)
    errors = [f"{_where(e)}: {e.message}" for e in
              sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.path])]
    errors += _metadata_errors(doc.get("metadata")) + _worker_group_errors(doc.get("spec"))
    return Verdict(errors, warnings)


def check_manifests(text: str) -> list[tuple[str, Verdict]]:
    """(``doc#N RayCluster/NAME``, verdict) for each RayCluster in multi-document YAML;
    yaml.YAMLError when the YAML is unreadable."""
    found = []
    for i, doc in enumerate(load_documents(text)):
        if isinstance(doc, dict) and doc.get("kind") == "RayCluster":
            meta = doc.get("metadata")
            name = meta.get("name", "?") if isinstance(meta, dict) else "?"
            found.append((f"doc#{i} RayCluster/{name}", check_raycluster(doc)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="YAML files (default: standard input)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no OK lines")
    args = parser.parse_args(argv)
    checked = invalid = 0
    unreadable = False
    for source in args.files or ["-"]:
        label = "<stdin>" if source == "-" else source
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
            found = check_manifests(text)
        except (OSError, yaml.YAMLError) as e:
            print(f"ERROR {label}: unreadable YAML: {e}")
            unreadable = True
            continue
        for where, verdict in found:
            checked += 1
            invalid += bool(verdict.errors)
            for warning in verdict.warnings:
                print(f"WARN  {label} {where}: {warning}")
            for error in verdict.errors:
                print(f"ERROR {label} {where}: {error}")
            if not verdict.errors and not args.quiet:
                print(f"OK    {label} {where}")
    print(f"{checked} RayCluster document(s) checked, {invalid} invalid")
    if invalid:
        return 1
    if not checked and not unreadable:
        print("ERROR no RayCluster document found")
    return 2 if unreadable or not checked else 0


if __name__ == "__main__":
    sys.exit(main())
