"""PostgreSQL: the server LLMP_DATABASE_URL names when it answers, else our own (the pgserver wheel's
binaries, data in <state>/postgres/data) on that URL's port when it is a free local one."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cli import servers
from cli.stack.component import Component, Launch, Started, await_ports_closed
from cli.stack.settings import LOCAL_HOSTS, host_port, redact, with_port
from cli.stack.state import Record
from services.common import topology

EMBEDDED_GRACE = 30.0  # pg_ctl's fast shutdown checkpoints first


@dataclass(frozen=True)
class Postgres(Component):
    def ports(self, env: Mapping[str, str]) -> list[int]:
        return [host_port(env["LLMP_DATABASE_URL"], topology.POSTGRES_PORT)[1]]

    def start(self, launch: Launch) -> Started:
        url = launch.env["LLMP_DATABASE_URL"]
        parts = urlsplit(url)
        database = parts.path.lstrip("/") or "llmp"
        host, port = parts.hostname or "127.0.0.1", parts.port or topology.POSTGRES_PORT
        server_url = urlunsplit(parts._replace(path="/postgres"))
        if servers.port_open(host, port) and postgres_healthy(server_url):
            ensure_database(server_url, database)
            return Record(self.name, "external", ports=[port], detail=redact(url)), {}
        # Not reachable: our own server, on that very port when it is a free local one.
        if host not in LOCAL_HOSTS or servers.port_open(host, port):
            host, port = "127.0.0.1", servers.free_port()
        superuser = parts.username or "postgres"
        url = with_port(url, host, port, default_user=superuser)
        data_dir = launch.dirs.root / "postgres" / "data"
        log = launch.dirs.log(self.name)
        pid = servers.start_postgres(data_dir, port, log, user=superuser, timeout=min(launch.timeout, 60))
        record = launch.adopt(Record(self.name, "embedded", pid=pid, start_time=servers.process_start_time(pid),
                                     ports=[port], log=str(log), detail=str(data_dir), grace=EMBEDDED_GRACE))
        ensure_database(with_port(server_url, host, port, default_user=superuser), database)
        return record, {"LLMP_DATABASE_URL": url}

    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        return postgres_healthy(env["LLMP_DATABASE_URL"], timeout)

    def stop(self, record: Record) -> None:
        if record.mode == "embedded":  # the daemonized postmaster: pg_ctl stops it cleanly
            servers.stop_postgres(Path(record.detail), timeout=record.grace)
        await_ports_closed(record)


def postgres_healthy(url: str, timeout: float = 2.0) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True) as connection:
            return connection.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:
        return False


def ensure_database(server_url: str, database: str) -> None:
    """CREATE DATABASE `database` on the server at `server_url` (its `postgres` db) unless it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # a concurrent `up` won the race
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
