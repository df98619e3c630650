"""istio/: the mesh policy holds, checked on the rendered production overlay (which includes istio/).

Objects validate against Istio's own CRD schemas (strict); the policy is asked behaviour questions
(mesh.py: would Istio let this request in, which route takes this call) derived from the code: who calls
whom from services/common/topology.py (itself checked against the code), the streaming endpoints from
the protos and the gateway's views.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import subprocess
import sys

import jsonschema
import mesh
import pytest
import yaml
from conftest import ROOT, render
from json_patch import apply_patch
from test_kubernetes import llmp_containers

from services.common import topology
from services.common.grpc_client import DEPLOYMENT_KEY
from services.inference.mesh import virtual_service_patch

NAMESPACE = "llmp"
INGRESS = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
MONITORING = "namespace:monitoring"


def expected_calls() -> dict[str, set[str]]:
    """Workload -> the callers topology.CALLS (checked against the code by test_calls.py) gives it."""
    expected: dict[str, set[str]] = {}
    for caller, callees in topology.CALLS.items():
        for callee in callees:
            expected.setdefault(callee, set()).add(f"llmp-{caller}")
    expected.setdefault("gateway", set()).add(INGRESS)
    for component in topology.METRICS_PORTS:
        expected[component].add(MONITORING)
    return expected


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
    assert {obj["kind"] for obj in istio} >= set(API_VERSIONS) - {"RequestAuthentication"}
    for obj in istio:
        mesh.validate(obj)  # Istio's CRD schema, strict
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


def test_istio_schema_validation_catches_a_wrong_field(prod):
    policy = copy.deepcopy(named(prod, "AuthorizationPolicy")["dataset"])
    policy["spec"]["rules"][0]["from"][0]["source"]["principal"] = ["x"]
    with pytest.raises(ValueError, match="principal"):
        mesh.validate(policy)
    policy = copy.deepcopy(named(prod, "AuthorizationPolicy")["dataset"])
    policy["spec"]["action"] = "PERMIT"
    with pytest.raises(jsonschema.ValidationError):
        mesh.validate(policy)


def test_authorization_policies_are_generated_from_the_topology():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_istio_policy.py"), "--check"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


def test_only_the_calls_the_code_makes_are_allowed(prod):
    calls = allowed_calls(prod)
    # The canary track is the same service: it takes the same callers.
    assert calls.pop("inference-canary") == calls["inference"]
    assert calls == expected_calls()


def _component_request(caller: str, port: int) -> mesh.Request:
    return mesh.Request(principal=f"cluster.local/ns/{NAMESPACE}/sa/llmp-{caller}", namespace=NAMESPACE, port=port,
                        method="POST", path="/")


def test_the_mesh_admits_exactly_the_calls_of_the_topology(prod):
    """Every component asks every other on its serving ports: let in exactly when topology.CALLS says
    it calls it (the gateway reaches MinIO for /v1/status; worker nodes reach each other on any port; the data
    workers serve nothing, so any port of theirs is refused to everyone)."""
    components = set(topology.CALLS) | {c for callees in topology.CALLS.values() for c in callees}
    workloads = mesh.pod_labels(prod)
    assert components <= set(workloads), components - set(workloads)
    for callee in sorted(components):
        ports = topology.SERVING_PORTS.get(callee) or (29500, 41234)  # rendezvous and an NCCL port; any port
        for caller in sorted(components):
            for port in ports:
                expected = callee in topology.CALLS.get(caller, ())
                got = mesh.allowed(prod, callee, _component_request(caller, port))
                assert got == expected, f"{caller} -> {callee}:{port} allowed={got}, topology says {expected}"
    assert mesh.allowed(prod, "minio", _component_request("gateway", topology.S3_PORT))


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


def _edge(path: str, *, jwt: str = "", method: str = "GET") -> mesh.Request:
    return mesh.Request(principal=INGRESS, namespace="istio-system", request_principal=jwt,
                        port=topology.GATEWAY_PORT, method=method, path=path)


def test_api_keys_work_through_the_default_ingress(overlay):
    """No RequestAuthentication in the shipped overlays (one on `Authorization` would reject every llmp
    API key as a malformed JWT): requests from the ingress gateway reach the API with the key alone."""
    _, objects = overlay
    assert not of_kind(objects, "RequestAuthentication")
    for method, path in [("GET", "/v1/datasets"), ("POST", "/v1/completions"), ("GET", "/v1/status"),
                         ("GET", "/"), ("GET", "/healthz"), ("GET", "/openapi.json")]:
        assert mesh.allowed(objects, "gateway", _edge(path, method=method)), (method, path)


def test_metrics_are_not_public(overlay):
    _, objects = overlay
    assert not mesh.allowed(objects, "gateway", _edge("/metrics"))
    scrape = mesh.Request(principal="cluster.local/ns/monitoring/sa/prometheus", namespace="monitoring",
                          port=topology.GATEWAY_PORT, path="/metrics")
    assert mesh.allowed(objects, "gateway", scrape)
    assert not mesh.allowed(objects, "gateway", mesh.Request(**{**scrape.__dict__, "path": "/v1/datasets"}))


def test_readiness_names_no_backend():
    # What is public at the edge must not describe the backends: /readyz is the process's own state.
    from gateway.views import system

    assert "backends" not in inspect.getsource(system.readyz).split('"""')[2]


@pytest.fixture(scope="module")
def with_edge_jwt(tmp_path_factory) -> list[dict]:
    """An overlay as the README shows it: prod, the edge-jwt component, the issuer and JWKS set."""
    overlay = tmp_path_factory.mktemp("overlay")
    relative = lambda path: os.path.relpath(path, overlay)  # noqa: E731  (kustomize wants relative paths)
    (overlay / "kustomization.yaml").write_text(f"""\
namespace: llmp
resources: [{relative(ROOT / "deploy/overlays/prod")}]
components: [{relative(ROOT / "istio/components/edge-jwt")}]
patches:
  - target: {{kind: RequestAuthentication, name: gateway-jwt}}
    patch: |-
      - {{op: replace, path: /spec/jwtRules/0/issuer, value: "https://login.example.org/"}}
      - {{op: replace, path: /spec/jwtRules/0/jwksUri, value: "https://login.example.org/jwks.json"}}
""")
    return render(overlay)


def test_the_edge_jwt_component_requires_a_jwt_from_the_ingress_only(with_edge_jwt):
    (authn,) = of_kind(with_edge_jwt, "RequestAuthentication")
    mesh.validate(authn)
    assert {rule["issuer"] for rule in authn["spec"]["jwtRules"]} == {"https://login.example.org/"}
    # Not on Authorization, where the llmp API key travels.
    assert all(header["name"] != "Authorization" for rule in authn["spec"]["jwtRules"]
               for header in rule.get("fromHeaders", []))
    assert not mesh.allowed(with_edge_jwt, "gateway", _edge("/v1/datasets"))
    assert mesh.allowed(with_edge_jwt, "gateway", _edge("/v1/datasets", jwt="https://login.example.org//alice"))
    assert mesh.allowed(with_edge_jwt, "gateway", _edge("/readyz"))
    assert mesh.allowed(with_edge_jwt, "dataset", _component_request("gateway", topology.DATASET.port))


def test_the_edge_jwt_component_leaves_no_placeholder_to_an_overlay(with_edge_jwt):
    component = (ROOT / "istio/components/edge-jwt/request-authentication.yaml").read_text()
    placeholder = "SET-IN-OVERLAY"
    assert placeholder in component  # an overlay that forgets to set them is visible ...
    rendered = [obj for obj in with_edge_jwt if obj["kind"] == "RequestAuthentication"]
    assert placeholder not in str(rendered)  # ... and the README's overlay sets both


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


# -- streams: no per-try timeout, no retry ------------------------------------------------------------

def streaming_rpcs() -> list[tuple[str, str]]:
    """(service, gRPC path) of every streaming RPC, from the generated descriptors."""
    import importlib

    found = []
    for service in topology.GRPC_SERVICES:
        module = importlib.import_module(f"llmp.{service.name}.v1.{service.name}_pb2")
        for descriptor in module.DESCRIPTOR.services_by_name.values():
            found += [(service.name, f"/{descriptor.full_name}/{method.name}") for method in descriptor.methods
                      if method.server_streaming or method.client_streaming]
    return found


def _streams_events(function, seen: set | None = None) -> bool:
    """Whether a view (or a function of its module it calls) answers with text/event-stream."""
    seen = seen if seen is not None else set()
    if function in seen or not inspect.isfunction(function):
        return False
    seen.add(function)
    source = inspect.getsource(function)
    if "text/event-stream" in source or "EVENT_STREAM_HEADERS" in source:
        return True
    module = sys.modules[function.__module__]
    return any(_streams_events(getattr(module, name), seen) for name in re.findall(r"\b(\w+)\(", source)
               if name in vars(module))


def streaming_routes() -> list[tuple[str, str]]:
    """(method, concrete path) of every REST route that can answer with Server-Sent Events."""
    from gateway import routes

    return [(route.method, re.sub(r"\{[^}]+\}", "x", route.path)) for route in routes.all_routes()
            if _streams_events(route.handler)]


def _assert_stream_route(route: dict | None, what: str) -> None:
    assert route is not None, f"no route takes {what}"
    retries = route.get("retries", {})
    assert "perTryTimeout" not in retries and retries.get("attempts") == 0, f"{what}: route {route['name']} {retries}"
    assert route["timeout"] == "0s" or int(route["timeout"].rstrip("s")) >= 300, f"{what}: {route['timeout']}"


def test_the_code_has_streams():
    # Guards the derivations below: the three SSE endpoints and their streaming RPCs.
    from gateway.http import EVENT_STREAM_HEADERS

    assert EVENT_STREAM_HEADERS["Content-Type"] == "text/event-stream"
    assert {path for _, path in streaming_routes()} >= {"/v1/training-jobs/x/events",
                                                         "/v1/datasets/x/versions/x/events", "/v1/completions"}
    assert {path.rsplit("/", 1)[1] for _, path in streaming_rpcs()} >= {"WatchJob", "WatchIngest", "GenerateStream"}


def test_every_public_stream_has_a_route_without_a_per_try_timeout(prod):
    public = named(prod, "VirtualService")["gateway-public"]
    for method, path in streaming_routes():
        _assert_stream_route(mesh.route_for(public, method, path), f"{method} {path}")


def test_every_streaming_rpc_has_a_route_without_a_per_try_timeout(prod):
    services = named(prod, "VirtualService")
    for service, path in streaming_rpcs():
        _assert_stream_route(mesh.route_for(services[service], "POST", path), path)


# -- canary: compared on equal terms, never ejected whole ---------------------------------------------

def test_canary_and_stable_pods_get_the_same_resources(overlay):
    _, objects = overlay
    tracks: dict[str, dict[str, list]] = {}
    for obj in of_kind(objects, "Deployment"):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        if "llmp.dev/track" in labels:
            resources = [(c["name"], c.get("resources")) for c in obj["spec"]["template"]["spec"]["containers"]]
            tracks.setdefault(labels["app.kubernetes.io/name"], {})[labels["llmp.dev/track"]] = resources
    assert tracks, "no tracked workloads"
    for name, by_track in tracks.items():
        assert by_track["canary"] == by_track["stable"], name


def _ejectable(detection: dict, hosts: int) -> int:
    """How many of `hosts` Envoy's outlier detection may eject at once (it ejects at least one whatever the
    percentage; both error counters at 0 turn it off)."""
    if detection.get("consecutive5xxErrors", 5) == 0 and detection.get("consecutiveGatewayErrors", 0) == 0:
        return 0
    return min(hosts, max(1, hosts * detection.get("maxEjectionPercent", 10) // 100))


def test_outlier_ejection_leaves_a_canary_pod(overlay):
    _, objects = overlay
    for rule in of_kind(objects, "DestinationRule"):
        service = named(objects, "Service")[rule["spec"]["host"]]
        for subset in rule["spec"].get("subsets", []):
            if subset["name"] != "canary":
                continue
            labels = {**service["spec"]["selector"], **subset["labels"]}
            pods = sum(obj["spec"].get("replicas", 1) for obj in of_kind(objects, "Deployment")
                       if all(obj["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in labels.items()))
            detection = {**rule["spec"]["trafficPolicy"].get("outlierDetection", {}),
                         **subset.get("trafficPolicy", {}).get("outlierDetection", {})}
            assert _ejectable(detection, pods) < pods, f"{rule['metadata']['name']}/canary: all {pods} ejectable"


def _proxy_config(pod_metadata: dict) -> dict:
    return yaml.safe_load(pod_metadata.get("annotations", {}).get("proxy.istio.io/config", "{}")) or {}


def _drain_seconds(config: dict) -> float:
    """The sidecar's drain after SIGTERM: the pod's proxy.istio.io/config, else Istio's default of 5 s."""
    duration = config.get("terminationDrainDuration", "5s")
    assert re.fullmatch(r"\d+s", duration), f"a drain Istio would not parse as this test does: {duration}"
    return float(duration[:-1])


def test_every_llmp_sidecar_outlives_its_pods_shutdown(overlay):
    """A sidecar stops proxying when its drain ends, whatever the app is still doing: an llmp pod's app may use
    its whole termination grace (calls drained, builds released, a job's last checkpoint) and needs the mesh
    until then, so its sidecar drains at least that long, and leaves as soon as the app's connections are
    closed (else every pod would take its whole grace to go, a GPU worker's replacement 5 minutes to start)."""
    _, objects = overlay
    injected = {obj["metadata"]["name"] for obj in of_kind(objects, "Namespace")
                if obj["metadata"].get("labels", {}).get("istio-injection") == "enabled"}
    assert injected, "every shipped overlay runs in the mesh (deploy/base/namespace.yaml)"
    pods = {obj["metadata"]["name"]: obj for obj, _ in llmp_containers(objects)
            if obj["metadata"].get("namespace", NAMESPACE) in injected}
    assert {"gateway", "training-worker", "data-worker"} <= set(pods)
    for name, obj in pods.items():
        template = obj["spec"]["template"]
        grace = template["spec"].get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        config = _proxy_config(template["metadata"])
        assert _drain_seconds(config) >= grace, f"{name}: sidecar drain shorter than its {grace} s"
        assert config.get("proxyMetadata", {}).get("EXIT_ON_ZERO_ACTIVE_CONNECTIONS") == "true", name
