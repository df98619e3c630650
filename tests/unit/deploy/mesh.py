"""What Istio does with the rendered objects, for the fields llmp's manifests use, so the tests can ask
behaviour questions (would this request be let in? which route takes this call?) instead of comparing
YAML with a copied table.

- Authorization (https://istio.io/latest/docs/reference/config/security/authorization-policy/): for a
  workload, any matching DENY policy denies; otherwise, when ALLOW policies select the workload, one of
  them must match; a policy with an empty spec selects every workload and matches nothing.
- Routing (https://istio.io/latest/docs/reference/config/networking/virtual-service/): the first HTTP
  route whose match list has a matching entry (or which has none) takes the request.
- Istio's CRD schemas (the `istio/api` repository's customresourcedefinitions.gen.yaml, found in a
  `shared/schemas` folder beside or above the checkout, or at $ISTIO_CRDS_FILE): strict, so an unknown
  field fails, as the API server's field validation does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Request:
    principal: str = ""  # the caller's mTLS identity (cluster.local/ns/<ns>/sa/<account>)
    namespace: str = ""
    request_principal: str = ""  # a verified JWT's iss/sub, "" without one
    port: int = 0
    method: str = "GET"
    path: str = "/"


def pod_labels(objects: list[dict]) -> dict[str, dict]:
    """Workload name -> its pods' labels."""
    return {obj["metadata"]["name"]: obj["spec"]["template"]["metadata"].get("labels", {}) for obj in objects
            if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}}


def selects(policy: dict, labels: dict) -> bool:
    selector = (policy.get("spec") or {}).get("selector", {}).get("matchLabels")
    return selector is None or all(labels.get(key) == value for key, value in selector.items())


def _matches(values: list[str], value: str) -> bool:
    """Istio's string match: exact, `prefix*`, `*suffix`, or `*` for any value present."""
    for pattern in values:
        if pattern == "*":
            if value:
                return True
        elif pattern.endswith("*") and value.startswith(pattern[:-1]) or (
                pattern.startswith("*") and value.endswith(pattern[1:])) or pattern == value:
            return True
    return False


def _field(spec: dict, name: str, value: str) -> bool:
    """`name` and `notName` of a source or operation, for one value (absent fields match)."""
    positive = name not in spec or _matches(spec[name], value)
    negative = "not" + name[0].upper() + name[1:]
    return positive and not (negative in spec and _matches(spec[negative], value))


def _source(source: dict, request: Request) -> bool:
    return (_field(source, "principals", request.principal) and _field(source, "namespaces", request.namespace)
            and _field(source, "requestPrincipals", request.request_principal))


def _operation(operation: dict, request: Request) -> bool:
    return (_field(operation, "ports", str(request.port)) and _field(operation, "methods", request.method)
            and _field(operation, "paths", request.path))


def _rule(rule: dict, request: Request) -> bool:
    sources = rule.get("from")
    operations = rule.get("to")
    return ((not sources or any(_source(s["source"], request) for s in sources))
            and (not operations or any(_operation(o["operation"], request) for o in operations)))


def allowed(objects: list[dict], workload: str, request: Request) -> bool:
    labels = pod_labels(objects)[workload]
    policies = [p for p in objects if p["kind"] == "AuthorizationPolicy" and selects(p, labels)]
    if any(p["spec"].get("action") == "DENY" and any(_rule(r, request) for r in p["spec"].get("rules", []))
           for p in policies):
        return False
    allows = [p for p in policies if (p.get("spec") or {}).get("action", "ALLOW") == "ALLOW"]
    return not allows or any(_rule(r, request) for p in allows for r in (p.get("spec") or {}).get("rules", []))


def _string_match(condition: dict, value: str) -> bool:
    if "exact" in condition:
        return value == condition["exact"]
    if "prefix" in condition:
        return value.startswith(condition["prefix"])
    return re.fullmatch(condition["regex"], value) is not None


def route_for(virtual_service: dict, method: str, path: str) -> dict | None:
    """The HTTP route of `virtual_service` that takes `method path` (headers aside)."""
    for route in virtual_service["spec"]["http"]:
        matches = route.get("match")
        if not matches:
            return route
        for match in matches:
            if set(match) - {"uri", "method"}:
                continue  # header-matched routes (the inference deployments') need their header
            if ("uri" not in match or _string_match(match["uri"], path)) and (
                    "method" not in match or _string_match(match["method"], method)):
                return route
    return None


def crd_file() -> Path:
    if os.environ.get("ISTIO_CRDS_FILE"):
        return Path(os.environ["ISTIO_CRDS_FILE"])
    for folder in ROOT.parents:
        candidate = folder / "shared" / "schemas" / "istio-crds.gen.yaml"
        if candidate.exists():
            return candidate
    raise FileNotFoundError("Istio's customresourcedefinitions.gen.yaml: set ISTIO_CRDS_FILE")


@cache
def spec_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the OpenAPI schema of its spec."""
    schemas = {}
    for crd in yaml.safe_load_all(crd_file().read_text()):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
            schemas[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = schema
    return schemas


def unknown_fields(value, schema: dict, where: str = "spec") -> list[str]:
    """Fields the schema does not define (Kubernetes' strict field validation)."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += unknown_fields(item, schema["additionalProperties"], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{where}[{index}]")
    return found


def validate(obj: dict) -> None:
    """Raise jsonschema.ValidationError (or ValueError for an unknown field) when Istio would refuse `obj`."""
    schema = spec_schemas()[(obj["apiVersion"], obj["kind"])]
    jsonschema.validate(obj.get("spec") or {}, schema)
    unknown = unknown_fields(obj.get("spec") or {}, schema)
    if unknown:
        raise ValueError(f"{obj['kind']}/{obj['metadata']['name']}: unknown field(s) {unknown}")
