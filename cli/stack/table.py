"""The stack's components, in one ordered table, and the order `up` starts them in (`down` stops them in
reverse)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Mapping

from cli.stack.broker import Broker
from cli.stack.component import Component
from cli.stack.errors import StackError
from cli.stack.gateway import Gateway
from cli.stack.postgres import Postgres
from cli.stack.s3 import S3
from cli.stack.services import Service
from cli.stack.state import Record
from cli.stack.triton import Triton
from cli.stack.worker import Worker
from services.common import topology

STORAGE = ("postgres", "s3")
COMPONENTS: tuple[Component, ...] = (
    Postgres("postgres"),
    S3("s3", grace=3.0),  # SeaweedFS drains its filer subscriptions for ~25 s on SIGTERM
    Broker("broker"),
    Triton("triton"),
    Service.of(topology.DATASET, STORAGE),
    Service.of(topology.TRAINING, (*STORAGE, "broker")),
    Service.of(topology.REGISTRY, STORAGE),
    Service.of(topology.INFERENCE, (*STORAGE, "triton")),
    Worker("worker", (*STORAGE, "broker"), topology.WORKER_APP, grace=30.0),
    Gateway("gateway", tuple(s.name for s in topology.GRPC_SERVICES), topology.GATEWAY_MODULE),
)
BY_NAME = {component.name: component for component in COMPONENTS}
INFRA = ("postgres", "s3", "broker", "triton")  # the third-party servers


def select(names: Iterable[str] | None, components: Mapping[str, Component] = BY_NAME) -> list[str]:
    """The named components plus everything they require (all when `names` is None), in table order."""
    if names is None:
        return list(components)
    unknown = sorted(set(names) - set(components))
    if unknown:
        raise StackError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(components)}")
    chosen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in chosen:
            chosen.add(name)
            pending.extend(components[name].requires)
    return [name for name in components if name in chosen]


def start_levels(names: Iterable[str], components: Mapping[str, Component] = BY_NAME) -> list[list[str]]:
    """Group `names` into levels: each level only requires earlier ones, so a level starts in parallel."""
    remaining = list(names)
    placed: set[str] = set()
    levels: list[list[str]] = []
    while remaining:
        level = [n for n in remaining if all(r in placed or r not in remaining for r in components[n].requires)]
        if not level:
            raise StackError(f"dependency cycle among {', '.join(remaining)}")
        levels.append(level)
        placed.update(level)
        remaining = [n for n in remaining if n not in placed]
    return levels


def missing_modules(names: Iterable[str], components: Mapping[str, Component] = BY_NAME,
                    find_spec: Callable = importlib.util.find_spec) -> dict[str, str]:
    """Components whose python module does not exist (yet): name -> module."""
    missing = {}
    for name in names:
        module = components[name].module
        if module is None:
            continue
        try:
            found = find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing[name] = module
    return missing


def component_of(record: Record) -> Component:
    """The component a record (perhaps read from stack.json) is of."""
    try:
        return BY_NAME[record.name]
    except KeyError:
        raise StackError(f"stack.json names {record.name!r}, which is not a component of this llmp") from None


def healthy(record: Record, env: Mapping[str, str], timeout: float = 2.0) -> bool:
    """Is `record`'s component doing its job now?"""
    return component_of(record).healthy(record, env, timeout)
