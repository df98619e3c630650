"""istio/: the mesh policy holds, checked on the rendered production overlay (which includes istio/).

No cluster and no Istio CRD schemas offline: objects are checked structurally (API versions, the spec
fields of Istio's API reference that these manifests use) and by the policy properties they promise.
"""

from __future__ import annotations

import copy
import re

import pytest
from json_patch import apply_patch

from services.common import topology
from services.common.grpc_client import DEPLOYMENT_KEY
from services.inference.mesh import virtual_service_patch

NAMESPACE = "llmp"
INGRESS = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
MONITORING = "namespace:monitoring"
# Who may call which workload: the architecture's calls and nothing else (see istio/authorization.yaml).
EXPECTED_CALLS = {
    "gateway": {INGRESS, MONITORING},
    "dataset": {"llmp-gateway", "llmp-training", "llmp-training-worker", "llmp-registry", MONITORING},
    "training": {"llmp-gateway", MONITORING},
    "registry": {"llmp-gateway", "llmp-dataset", "llmp-training", "llmp-training-worker", "llmp-inference",
                 MONITORING},
    "inference": {"llmp-gateway", MONITORING},
    "triton": {"llmp-inference", MONITORING},
    "minio": {"llmp-dataset", "llmp-training", "llmp-training-worker", "llmp-registry", "llmp-inference",
              "llmp-triton", "llmp-minio"},
    "postgres": {"llmp-gateway", "llmp-dataset", "llmp-training", "llmp-training-worker", "llmp-registry",
                 "llmp-inference"},
    "redis": {"llmp-training", "llmp-training-worker"},
}
# The spec fields each Istio kind may use (from Istio's API reference); a typo is an unknown field.
SPEC_FIELDS = {
    "PeerAuthentication": {"selector", "mtls", "portLevelMtls"},
    "AuthorizationPolicy": {"selector", "targetRefs", "action", "rules", "provider"},
    "RequestAuthentication": {"selector", "targetRefs", "jwtRules"},
    "Gateway": {"selector", "servers"},
    "VirtualService": {"hosts", "gateways", "http", "tcp", "tls", "exportTo"},
    "DestinationRule": {"host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"},
}
API_VERSIONS = {"PeerAuthentication": "security.istio.io/v1", "AuthorizationPolicy": "security.istio.io/v1",
                "RequestAuthentication": "security.istio.io/v1", "Gateway": "networking.istio.io/v1",
                "VirtualService": "networking.istio.io/v1", "DestinationRule": "networking.istio.io/v1"}
HTTP_ROUTE_FIELDS = {"name", "match", "route", "timeout", "retries", "rewrite", "headers", "fault", "mirror",
                     "corsPolicy", "redirect"}
READ_RPC = re.compile(r"/\((Get|List|Describe)(\|(Get|List|Describe))*\)")


def of_kind(objects, kind):
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects, kind):
    return {obj["metadata"]["name"]: obj for obj in of_kind(objects, kind)}


def workload_labels(objects) -> dict[str, dict]:
    """Workload name -> its pod labels and service account."""
    return {obj["metadata"]["name"]: obj["spec"]["template"] for obj in objects
            if obj["kind"] in {"Deployment", "StatefulSet"}}


def selected_workloads(objects, match_labels: dict) -> set[str]:
    return {name for name, template in workload_labels(objects).items()
            if all(template["metadata"]["labels"].get(k) == v for k, v in match_labels.items())}


def http_routes(objects):
    for vs in of_kind(objects, "VirtualService"):
        for route in vs["spec"]["http"]:
            yield vs, route


def test_istio_objects_are_structurally_valid(prod):
    istio = [obj for obj in prod if obj["kind"] in API_VERSIONS]
    assert {obj["kind"] for obj in istio} == set(API_VERSIONS)
    for obj in istio:
        assert obj["apiVersion"] == API_VERSIONS[obj["kind"]]
        assert obj["metadata"]["namespace"] == NAMESPACE
        assert set(obj.get("spec", {})) <= SPEC_FIELDS[obj["kind"]], obj["metadata"]["name"]
    for vs, route in http_routes(prod):
        assert set(route) <= HTTP_ROUTE_FIELDS, f"{vs['metadata']['name']}: {sorted(route)}"


def test_mutual_tls_is_strict_for_the_whole_namespace(prod):
    policies = of_kind(prod, "PeerAuthentication")
    namespace_wide = [p for p in policies if "selector" not in p["spec"]]
    assert len(namespace_wide) == 1 and namespace_wide[0]["spec"]["mtls"]["mode"] == "STRICT"
    for policy in policies:  # nothing weakens it for one workload or port
        modes = [policy["spec"].get("mtls", {}).get("mode", "STRICT"),
                 *(port["mode"] for port in policy["spec"].get("portLevelMtls", {}).values())]
        assert set(modes) == {"STRICT"}
    for rule in of_kind(prod, "DestinationRule"):
        assert rule["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"


def test_authorization_denies_by_default(prod):
    policies = named(prod, "AuthorizationPolicy")
    deny_all = [p for p in policies.values() if p.get("spec") in ({}, None)]
    assert deny_all, "an ALLOW-nothing policy for the namespace"
    for name, policy in policies.items():
        spec = policy.get("spec") or {}
        if not spec or spec.get("action") == "DENY":  # DENY policies only take away
            continue
        assert "selector" in spec, f"{name} applies to the whole namespace"
        for rule in spec["rules"]:
            sources = rule.get("from")
            assert sources, f"{name}: a rule without `from` would allow any caller"
            for source in sources:
                values = [*source["source"].get("principals", []), *source["source"].get("namespaces", [])]
                assert values and "*" not in values, f"{name}: {source}"


def allowed_calls(objects) -> dict[str, set[str]]:
    """Workload -> the callers the ALLOW policies let in (service account names, or namespace:…)."""
    calls: dict[str, set[str]] = {}
    prefix = f"cluster.local/ns/{NAMESPACE}/sa/"
    for policy in of_kind(objects, "AuthorizationPolicy"):
        spec = policy.get("spec") or {}
        if spec.get("action", "ALLOW") != "ALLOW" or not spec:
            continue
        targets = selected_workloads(objects, spec["selector"]["matchLabels"])
        assert targets, f"{policy['metadata']['name']} selects no workload"
        for rule in spec["rules"]:
            callers = set()
            for source in rule["from"]:
                callers |= {p.removeprefix(prefix) for p in source["source"].get("principals", [])}
                callers |= {f"namespace:{n}" for n in source["source"].get("namespaces", [])}
            for target in targets:
                calls.setdefault(target, set()).update(callers)
    return calls


def test_only_the_calls_the_architecture_makes_are_allowed(prod):
    calls = allowed_calls(prod)
    # The canary track is the same service: it takes the same callers.
    assert calls.pop("inference-canary") == calls["inference"]
    calls.pop("training-worker", None)  # takes no calls at all
    assert calls == EXPECTED_CALLS


def test_allowed_principals_are_service_accounts_that_exist(prod):
    accounts = set(named(prod, "ServiceAccount"))
    used_by_workloads = {t["spec"]["serviceAccountName"] for t in workload_labels(prod).values()}
    for callers in allowed_calls(prod).values():
        for caller in callers:
            if caller.startswith("llmp-"):
                assert caller in accounts and (caller in used_by_workloads or caller == "llmp-minio"), caller


def test_allowed_ports_are_ports_of_the_selected_workloads(prod):
    templates = workload_labels(prod)
    for policy in of_kind(prod, "AuthorizationPolicy"):
        spec = policy.get("spec") or {}
        if spec.get("action", "ALLOW") != "ALLOW" or not spec:
            continue
        for target in selected_workloads(prod, spec["selector"]["matchLabels"]):
            offered = {str(p["containerPort"]) for c in templates[target]["spec"]["containers"]
                       for p in c.get("ports", [])}
            for rule in spec["rules"]:
                for operation in rule.get("to", []):
                    assert set(operation["operation"]["ports"]) <= offered, (policy["metadata"]["name"], target)


def test_a_jwt_is_required_at_the_edge(prod):
    (authn,) = of_kind(prod, "RequestAuthentication")
    edge = selected_workloads(prod, authn["spec"]["selector"]["matchLabels"])
    assert edge == {"gateway"}
    for rule in authn["spec"]["jwtRules"]:
        assert rule["issuer"] and rule["jwksUri"].startswith("https://") and rule["audiences"]
    denies = [p for p in of_kind(prod, "AuthorizationPolicy") if p["spec"].get("action") == "DENY"]
    requiring = [p for p in denies
                 if selected_workloads(prod, p["spec"]["selector"]["matchLabels"]) == edge
                 and any(s["source"].get("notRequestPrincipals") == ["*"]
                         for r in p["spec"]["rules"] for s in r["from"])]
    assert requiring, "a DENY policy for requests without a valid JWT"
    exempt = {path for p in requiring for r in p["spec"]["rules"] for o in r.get("to", [])
              for path in o["operation"].get("notPaths", [])}
    assert not any(path.startswith("/v1") for path in exempt), "the API itself always needs a JWT"


def test_public_entry_is_the_rest_gateway_over_tls(prod):
    (gateway,) = of_kind(prod, "Gateway")
    https = [s for s in gateway["spec"]["servers"] if s["port"]["protocol"] == "HTTPS"]
    assert https and all(s["tls"]["mode"] == "SIMPLE" and s["tls"]["credentialName"] for s in https)
    assert all(s["tls"].get("httpsRedirect") for s in gateway["spec"]["servers"] if s["port"]["protocol"] == "HTTP")
    public = [vs for vs in of_kind(prod, "VirtualService") if vs["spec"].get("gateways")]
    assert len(public) == 1 and public[0]["spec"]["gateways"] == [gateway["metadata"]["name"]]
    hosts = {h for s in gateway["spec"]["servers"] for h in s["hosts"]}
    assert set(public[0]["spec"]["hosts"]) <= hosts
    for route in public[0]["spec"]["http"]:
        for destination in route["route"]:
            assert destination["destination"] == {"host": "gateway", "port": {"number": topology.GATEWAY_PORT}}


def test_every_route_has_a_timeout(prod):
    for vs, route in http_routes(prod):
        assert re.fullmatch(r"\d+s", route.get("timeout", "")), f"{vs['metadata']['name']}/{route.get('name')}"


def is_read_only(route: dict) -> bool:
    """Whether every request the route matches is a read: HTTP GET/HEAD, or a Get/List/Describe RPC."""
    matches = route.get("match")
    if not matches:
        return False
    for match in matches:
        method = match.get("method", {}).get("exact")
        regex = match.get("uri", {}).get("regex", "")
        if method not in {"GET", "HEAD"} and not READ_RPC.search(regex):
            return False
    return True


def test_only_read_only_routes_are_retried(prod):
    retried = 0
    for vs, route in http_routes(prod):
        attempts = route.get("retries", {}).get("attempts")
        # Istio retries twice when `retries` is absent, so every route must say.
        assert attempts is not None, f"{vs['metadata']['name']}/{route.get('name')} has Istio's default retries"
        if attempts > 0:
            retried += 1
            assert is_read_only(route), f"{vs['metadata']['name']}/{route.get('name')} retries a write"
    assert retried >= 3  # reads are retried: public GETs and the services' Get/List RPCs


def test_read_only_classification():
    assert is_read_only({"match": [{"method": {"exact": "GET"}}, {"method": {"exact": "HEAD"}}]})
    assert is_read_only({"match": [{"uri": {"regex": "^/llmp\\.x\\.v1\\.S/(Get|List)[A-Za-z]*$"}}]})
    assert not is_read_only({"match": [{"uri": {"exact": "/v1/completions"}}]})
    assert not is_read_only({"match": [{"method": {"exact": "GET"}}, {"method": {"exact": "POST"}}]})
    assert not is_read_only({})


def test_weights_sum_to_100_over_subsets_that_exist(prod):
    rules = {rule["spec"]["host"]: rule for rule in of_kind(prod, "DestinationRule")}
    services = named(prod, "Service")
    for vs, route in http_routes(prod):
        destinations = route["route"]
        if len(destinations) > 1 or "weight" in destinations[0]:
            assert sum(d.get("weight", 0) for d in destinations) == 100, vs["metadata"]["name"]
        for destination in destinations:
            host = destination["destination"]["host"]
            assert host in services, f"{vs['metadata']['name']} routes to unknown host {host}"
            subset = destination["destination"].get("subset")
            if subset:
                assert subset in {s["name"] for s in rules[host]["spec"].get("subsets", [])}, (host, subset)


def test_every_subset_selects_running_pods(prod):
    for rule in of_kind(prod, "DestinationRule"):
        service = named(prod, "Service")[rule["spec"]["host"]]
        for subset in rule["spec"].get("subsets", []):
            labels = {**service["spec"]["selector"], **subset["labels"]}
            assert selected_workloads(prod, labels), f"{rule['metadata']['name']}/{subset['name']} selects no pods"


def test_inference_default_route_sends_everything_to_stable(prod):
    """The route every call without a deployment route of its own takes; the deployments' routes are
    inserted before it (services/inference/canary.py virtual_service_patch)."""
    inference = named(prod, "VirtualService")["inference"]
    (default,) = inference["spec"]["http"]
    assert "match" not in default
    assert [(d["destination"]["subset"], d.get("weight", 100)) for d in default["route"]] == [("stable", 100)]
    assert default["route"][0]["destination"]["port"]["number"] == topology.INFERENCE.port
    assert default["retries"] == {"attempts": 0}  # a completion is never retried by the mesh


def test_subsets_are_the_tracks_the_pods_serve(prod):
    """Subset `stable`/`canary` selects exactly the pods running with LLMP_INFERENCE_TRACK stable/canary."""
    rule = next(r for r in of_kind(prod, "DestinationRule") if r["spec"]["host"] == "inference")
    service = named(prod, "Service")["inference"]
    templates = workload_labels(prod)
    for subset in rule["spec"]["subsets"]:
        pods = selected_workloads(prod, {**service["spec"]["selector"], **subset["labels"]})
        assert pods, subset["name"]
        for pod in pods:
            (container,) = templates[pod]["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("LLMP_INFERENCE_TRACK") == subset["name"], (pod, subset["name"])


# Deployments as the inference service would route them on Kubernetes: (tenant, name, canary weight).
MESH_DEPLOYMENTS = (("acme", "chat", 5), ("acme", "chat.v2", 50), ("globex", "chat", 100), ("acme", "summ", 25))


@pytest.fixture(scope="module")
def prod_with_deployment_routes(prod) -> list[dict]:
    """The rendered production objects with VirtualService `inference` patched as the service patches it."""
    objects = copy.deepcopy(prod)
    inference = named(objects, "VirtualService")["inference"]
    patched = inference
    for tenant, name, weight in MESH_DEPLOYMENTS:
        patched = apply_patch(patched, virtual_service_patch(patched, tenant, name, weight))
    patched = apply_patch(patched, virtual_service_patch(patched, "acme", "summ", 0))  # rolled back: no route
    inference["spec"] = patched["spec"]
    return objects


def test_deployment_routes_come_before_the_default_and_match_one_deployment(prod_with_deployment_routes):
    routes = named(prod_with_deployment_routes, "VirtualService")["inference"]["spec"]["http"]
    *own, default = routes
    assert "match" not in default and default["name"] == "stable"
    matched = [route["match"][0]["headers"][DEPLOYMENT_KEY]["exact"] for route in own]
    assert matched == ["acme/chat", "acme/chat.v2", "globex/chat"]
    assert all(len(route["match"]) == 1 and set(route["match"][0]) == {"headers"} for route in own)
    assert len({route["name"] for route in routes}) == len(routes)
    weights = [{d["destination"]["subset"]: d["weight"] for d in route["route"]} for route in own]
    assert weights == [{"stable": 95, "canary": 5}, {"stable": 50, "canary": 50}, {"stable": 0, "canary": 100}]


@pytest.mark.parametrize("check", [test_istio_objects_are_structurally_valid, test_every_route_has_a_timeout,
                                   test_only_read_only_routes_are_retried,
                                   test_weights_sum_to_100_over_subsets_that_exist])
def test_deployment_routes_keep_the_mesh_policy(prod_with_deployment_routes, check):
    """Every route the patch creates: known fields, a timeout, no retries (Generate is not idempotent),
    weights summing to 100 over subsets the DestinationRule defines."""
    check(prod_with_deployment_routes)
    for route in named(prod_with_deployment_routes, "VirtualService")["inference"]["spec"]["http"]:
        assert route["retries"] == {"attempts": 0} and route["timeout"] == "300s", route["name"]


@pytest.mark.parametrize("field", ["outlierDetection", "connectionPool"])
def test_every_destination_rule_has_outlier_detection_and_a_connection_pool(prod, field):
    rules = of_kind(prod, "DestinationRule")
    assert {r["spec"]["host"] for r in rules} >= {"gateway", "triton", "minio",
                                                  *(s.name for s in topology.GRPC_SERVICES)}
    for rule in rules:
        assert rule["spec"]["trafficPolicy"][field], rule["metadata"]["name"]
        detection = rule["spec"]["trafficPolicy"]["outlierDetection"]
        assert detection["baseEjectionTime"] and detection["interval"]


def test_every_mesh_host_has_a_route_with_a_timeout(prod):
    routed = {d["destination"]["host"] for _, route in http_routes(prod) for d in route["route"]}
    assert routed >= {"gateway", "triton", *(s.name for s in topology.GRPC_SERVICES)}
