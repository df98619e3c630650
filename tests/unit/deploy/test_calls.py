"""`topology.CALLS` says what llmp's code does: each llmp row is derived here from the code itself.

A component's code is the import closure of its entry module (`python -m …`, the Celery app), plus the
modules it launches with `-m` (torchrun's `services.training.train`). In that code, a typed stub taken
from a `ServiceClients` (`clients.registry.GetModelVersion(…)`, `clients(request).inference.Generate(…)`)
or a channel naming a service (`.channel(topology.X)`) reaches that service, and reading a Settings
field of `topology.ADDRESSED_BY` reaches that backend. The Istio policies are generated from CALLS
(test_istio.py), so a new call in the code that CALLS does not list fails here instead of being refused
by the mesh in production.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from services.common import topology
from services.common.config import Settings

ROOT = Path(__file__).resolve().parents[3]
SOURCE_ROOTS = (ROOT, ROOT / "gen")
OWN_PACKAGES = ("services", "gateway")
CLIENT_METHODS = {"channel"}  # ServiceClients' methods that take a service's name
SERVICE_NAMES = {service.name for service in topology.GRPC_SERVICES}
SERVICE_CONSTANTS = {name: value.name for name, value in vars(topology).items()
                     if isinstance(value, topology.GrpcService)}
ENTRY_MODULES = {"gateway": topology.GATEWAY_MODULE, topology.TRAINING_WORKER: topology.WORKER_APP,
                 topology.DATA_WORKER: topology.DATA_WORKER_APP,
                 **{service.name: service.module for service in topology.GRPC_SERVICES}}


def _source(module: str) -> Path | None:
    for root in SOURCE_ROOTS:
        for path in (root / (module.replace(".", "/") + ".py"), root / module.replace(".", "/") / "__init__.py"):
            if path.exists():
                return path
    return None


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _edges(tree: ast.Module) -> list[str]:
    """Modules this one imports (not under `if TYPE_CHECKING`) or launches with `-m`."""
    skipped = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for inner in ast.walk(node)}
    found: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, (ast.List, ast.Tuple)):
            for flag, value in zip(node.elts, node.elts[1:], strict=False):
                if (isinstance(flag, ast.Constant) and flag.value == "-m" and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)):
                    found.append(value.value)
    return found


def code_of(entry: str) -> dict[str, ast.Module]:
    """Module name -> syntax tree of every llmp module a component's process can run."""
    trees: dict[str, ast.Module] = {}
    pending = [entry]
    while pending:
        module = pending.pop()
        if module in trees or not module.startswith(OWN_PACKAGES) or (path := _source(module)) is None:
            continue
        trees[module] = ast.parse(path.read_text(), str(path))
        pending += _edges(trees[module])
    return trees


def _named_service(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and node.value in SERVICE_NAMES:
        return node.value
    if isinstance(node, ast.Attribute) and node.attr in SERVICE_CONSTANTS:
        return SERVICE_CONSTANTS[node.attr]
    if isinstance(node, ast.Name) and node.id in SERVICE_CONSTANTS:
        return SERVICE_CONSTANTS[node.id]
    return None


def _stub_of(node: ast.Attribute) -> str | None:
    """The service whose typed stub `node` takes from a ServiceClients (`clients.registry`, `self.clients.dataset`,
    `clients(request).inference`, `app[CLIENTS].training`): the stub properties are named for the services."""
    if node.attr in SERVICE_NAMES and "clients" in ast.unparse(node.value).lower():
        return node.attr
    return None


def calls_in_code(entry: str) -> dict[str, set[str]]:
    """Component reached -> the modules that reach it, in the code of the component started by `entry`."""
    reached: dict[str, set[str]] = {}
    for module, tree in code_of(entry).items():
        if module == "services.common.config":  # defines the settings; reading them there connects nowhere
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                method = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if method in CLIENT_METHODS:
                    for argument in node.args[:2]:  # rpc(request, "x", …) names it second
                        if (service := _named_service(argument)) is not None:
                            reached.setdefault(service, set()).add(module)
            elif isinstance(node, ast.Attribute) and (service := _stub_of(node)) is not None:
                reached.setdefault(service, set()).add(module)
            elif isinstance(node, ast.Attribute) and node.attr in topology.ADDRESSED_BY:
                reached.setdefault(topology.ADDRESSED_BY[node.attr], set()).add(module)
    return reached


def test_the_scan_sees_known_calls():
    # Guards the scanner: the gateway's views call every service, the dataset service's lineage the registry.
    assert set(calls_in_code(topology.GATEWAY_MODULE)) >= SERVICE_NAMES
    assert "services.dataset.lineage" in calls_in_code(topology.DATASET.module)[topology.REGISTRY.name]


def test_addressing_settings_exist():
    fields = {field.name for field in dataclasses.fields(Settings)}
    assert set(topology.ADDRESSED_BY) <= fields, set(topology.ADDRESSED_BY) - fields


def test_calls_table_is_what_the_code_does():
    derived = {component: set(calls_in_code(entry)) for component, entry in ENTRY_MODULES.items()}
    # A worker node's peers are the other nodes of its job (published rendezvous endpoint, then NCCL).
    declared = {component: set(topology.CALLS[component]) - {component} for component in ENTRY_MODULES}
    assert declared == derived


def test_every_component_called_is_in_the_table():
    for component, callees in topology.CALLS.items():
        for callee in callees:
            assert callee in topology.SERVING_PORTS, f"{component} calls {callee}, which has no ports"
