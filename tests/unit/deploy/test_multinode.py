"""Multi-node training on Kubernetes: node 0 publishes an address the other nodes resolve, and the
cluster lets the worker pods connect to each other (c10d rendezvous, then NCCL/Gloo on any port)."""

from __future__ import annotations

import asyncio
import re
import socket
from types import SimpleNamespace

from services.common.config import Settings
from services.training.worker import NodeRunner

WORKER = "training-worker"


def _one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    return found


def expand(env: list[dict], field_values: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: `$(NAME)` of an earlier variable expands."""
    values: dict[str, str] = {}
    for item in env:
        if "valueFrom" in item:
            values[item["name"]] = field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            values[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), item["value"])
    return values


def test_every_worker_advertises_the_dns_name_its_headless_service_gives_it(overlay):
    _, objects = overlay
    workers = _one(objects, "StatefulSet", WORKER)
    service = _one(objects, "Service", workers["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    labels = workers["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    namespace = workers["metadata"]["namespace"]
    (container,) = workers["spec"]["template"]["spec"]["containers"]
    for ordinal in range(max(2, workers["spec"].get("replicas", 1))):
        pod = f"{WORKER}-{ordinal}"  # a StatefulSet's pod names
        env = expand(container["env"], {"metadata.name": pod, "metadata.namespace": namespace})
        # Kubernetes DNS: <pod>.<governing headless service>.<namespace>.svc.<cluster domain>
        dns_name = f"{pod}.{service['metadata']['name']}.{namespace}.svc.cluster.local"
        assert env["LLMP_TRAINING_ADVERTISE_HOST"] == dns_name


class _Rendezvous:
    """Records what node 0 publishes (the coordinator's set_rendezvous)."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def set_rendezvous(self, assignment, endpoint: str) -> None:
        self.published.append(endpoint)


def test_node_zero_publishes_the_advertised_host():
    advertised = "training-worker-0.training-worker.llmp.svc.cluster.local"
    settings = Settings.from_env({"LLMP_TRAINING_ADVERTISE_HOST": advertised})
    coordinator = _Rendezvous()
    assignment = SimpleNamespace(job=SimpleNamespace(nnodes=2), node_rank=0)
    endpoint = asyncio.run(NodeRunner(settings, "w")._rendezvous(coordinator, assignment))
    host, _, port = endpoint.rpartition(":")
    assert coordinator.published == [endpoint]
    assert host == advertised and int(port) > 0
    assert NodeRunner(Settings.from_env({}), "w").host == socket.gethostname()  # local: the machine's name


def _admits(policies: list[dict], source_labels: dict, target_labels: dict) -> bool:
    """Kubernetes NetworkPolicy ingress for pod-to-pod traffic (any port) in one namespace."""
    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    isolating = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], target_labels)]
    if not isolating:
        return True
    return any(selects(peer["podSelector"], source_labels) for p in isolating for rule in p["spec"].get("ingress", [])
               for peer in rule.get("from", []) if "podSelector" in peer and "ports" not in rule)


def test_workers_reach_each_other_on_any_port_and_nobody_else_does(overlay):
    _, objects = overlay
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    templates = {obj["metadata"]["name"]: obj["spec"]["template"] for obj in objects
                 if obj["kind"] in {"Deployment", "StatefulSet"}}
    worker = templates[WORKER]["metadata"]["labels"]
    assert _admits(policies, worker, worker)
    for name, template in templates.items():
        if name != WORKER:
            assert not _admits(policies, template["metadata"]["labels"], worker), name
    # The sidecar does not capture what the NetworkPolicy admits (ports chosen per job; mTLS STRICT
    # would refuse the plaintext that Envoy's passthrough sends to an undeclared port).
    assert templates[WORKER]["metadata"]["annotations"]["traffic.sidecar.istio.io/includeInboundPorts"] == ""
