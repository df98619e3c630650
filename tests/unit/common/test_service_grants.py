"""`identity.SERVICE_GRANTS` is exactly what each service's code calls: a call the grants lack would be refused
(PERMISSION_DENIED) in production, a grant no code uses is privilege no one needs. The calls are derived
from the code the way test_calls.py derives `topology.CALLS` (the import closure of each component's entry
module; a typed stub taken from a `ServiceClients`, then the method called on it)."""

from __future__ import annotations

import ast

from llmp.dataset.v1 import dataset_pb2
from llmp.inference.v1 import inference_pb2
from llmp.registry.v1 import registry_pb2
from llmp.training.v1 import training_pb2

from services.common import topology
from services.common.identity import SERVICE_GRANTS, service_principal
from tests.unit.deploy.test_calls import SERVICE_NAMES, code_of

# The processes that sign as each service (the training worker is the training service's code too).
PRINCIPALS = {
    service_principal(topology.DATASET.name): [topology.DATASET.module],
    service_principal(topology.TRAINING.name): [topology.TRAINING.module, topology.WORKER_APP],
    service_principal(topology.REGISTRY.name): [topology.REGISTRY.module],
    service_principal(topology.INFERENCE.name): [topology.INFERENCE.module],
}
RPCS = {name: {method.name for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods}
        for name, module in (("dataset", dataset_pb2), ("training", training_pb2), ("registry", registry_pb2),
                             ("inference", inference_pb2))}


def calls_made(entries: list[str]) -> set[str]:
    """"<service>/<Method>" for every `….clients.<service>.<Method>` in the code the entries run."""
    found: set[str] = set()
    for entry in entries:
        for tree in code_of(entry).values():
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                        and node.value.attr in SERVICE_NAMES and "clients" in ast.unparse(node.value.value).lower()):
                    found.add(f"{node.value.attr}/{node.attr}")
    return found


def test_every_grant_names_a_real_rpc():
    for principal, grants in SERVICE_GRANTS.items():
        for grant in grants:
            service, _, method = grant.partition("/")
            assert method in RPCS[service], f"{principal} is granted {grant}, which no proto defines"


def test_the_grants_are_what_each_service_calls():
    derived = {principal: calls_made(entries) for principal, entries in PRINCIPALS.items()}
    assert "registry/GetModelVersion" in derived[service_principal("inference")]  # the scan sees calls
    granted = {principal: set(SERVICE_GRANTS.get(principal, ())) for principal in PRINCIPALS}
    assert granted == derived
