"""The settings of an `llmp up` stack of its own for a test: a fresh database, free ports, a broker, a key."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from cli import servers
from services.common import topology

ADMIN_DATABASE_URL = os.environ.get("LLMP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def stack_settings(state_dir: Path, broker_url: str, label: str) -> Iterator[tuple[dict[str, str], str]]:
    """(LLMP_* settings, admin key) of a stack in `state_dir` on `broker_url`: a database of the machine's
    PostgreSQL created for it (dropped afterwards) and a free port for every server the launcher starts."""
    name = f"llmp_{label}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    admin_key = f"llmp_{label}_{uuid.uuid4().hex}"
    s3, triton_http, triton_grpc, triton_metrics, gateway, *service_ports = servers.free_ports(
        5 + len(topology.GRPC_SERVICES))
    settings = {
        "LLMP_STATE_DIR": str(state_dir),
        "LLMP_DATABASE_URL": ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}",
        "LLMP_BROKER_URL": broker_url,
        "LLMP_S3_ENDPOINT": f"127.0.0.1:{s3}",
        "LLMP_TRITON_HTTP_URL": f"127.0.0.1:{triton_http}",
        "LLMP_TRITON_GRPC_URL": f"127.0.0.1:{triton_grpc}",
        "LLMP_TRITON_METRICS_PORT": str(triton_metrics),
        "LLMP_GATEWAY_PORT": str(gateway),
        "LLMP_ADMIN_KEY": admin_key,
    }
    for service, port in zip(topology.GRPC_SERVICES, service_ports, strict=True):
        settings[service.addr_env] = f"127.0.0.1:{port}"
    try:
        yield settings, admin_key
    finally:
        with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
