"""The Celery broker: the Redis or AMQP server LLMP_BROKER_URL names when it answers, else a broker
Celery supports with no server at all, SQLite through SQLAlchemy (<state>/broker/celery.sqlite)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cli import servers
from cli.stack.component import Component, Launch, Started
from cli.stack.errors import StackError
from cli.stack.settings import host_port, redact
from cli.stack.state import Record
from services.common import topology


@dataclass(frozen=True)
class Broker(Component):
    def ports(self, env: Mapping[str, str]) -> list[int]:
        url = env["LLMP_BROKER_URL"]
        return [host_port(url, topology.REDIS_PORT)[1]] if networked(url) else []

    def start(self, launch: Launch) -> Started:
        url = launch.env["LLMP_BROKER_URL"]
        if not url.startswith("sqla+") and broker_reachable(url):
            return Record(self.name, "external", ports=self.ports(launch.env), detail=redact(url)), {}
        path = launch.dirs.root / "broker" / "celery.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        url = url if url.startswith("sqla+") else f"sqla+sqlite:///{path}"
        if not broker_healthy(url):
            raise StackError(f"broker: cannot open the SQLite broker at {path}")
        return Record(self.name, "file", detail=url), {"LLMP_BROKER_URL": url}

    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        return broker_healthy(env["LLMP_BROKER_URL"], timeout)


def networked(url: str) -> bool:
    """A broker served over the network (Redis, AMQP), not a file."""
    return "://" in url and not url.startswith("sqla+")


def broker_healthy(url: str, timeout: float = 2.0) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            return True
    except Exception:  # kombu surfaces each transport's own errors
        return False


def broker_reachable(url: str) -> bool:
    """A networked broker (Redis, AMQP) that answers; checks the port first so a closed one fails fast."""
    if networked(url):
        host, port = host_port(url, topology.REDIS_PORT)
        if not servers.port_open(host, port):
            return False
    return broker_healthy(url)


def supports_broadcast(url: str) -> bool:
    """Remote control (`celery inspect ping`) needs fanout across processes: Redis and AMQP have it,
    the SQLite (SQLAlchemy) broker does not."""
    return url.split("://", 1)[0] in {"redis", "rediss", "amqp", "amqps", "pyamqp"}
