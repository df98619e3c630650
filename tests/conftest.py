"""Fixtures shared by every test tier: real servers, never mocks, and the tiny dataset (tests/tiny_dataset.py).

Every server fixture is lazy: nothing starts until a test asks for it, and tests/unit/conftest.py refuses
them, so a unit run starts nothing.

- PostgreSQL: the server at LLMP_TEST_DATABASE_URL (default the machine's, 127.0.0.1:5432); each test
  session creates its own database and drops it afterwards, so parallel runs never collide.
- S3: a real SeaweedFS started on free ports for the session.
- Broker: Redis at LLMP_TEST_BROKER_URL (default 127.0.0.1:6379, database 15).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
import pytest

from cli import servers
from services.common.config import Settings

from .identities import SERVICE_SECRET
from .tiny_dataset import dataset_uploader, tiny_dataset, write_dataset_fixture  # noqa: F401 (fixtures)

ADMIN_DATABASE_URL = os.environ.get("LLMP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKER_URL = os.environ.get("LLMP_TEST_BROKER_URL", "redis://127.0.0.1:6379/15")
S3_ACCESS_KEY, S3_SECRET_KEY = "llmp-test", "llmp-test-secret"


@pytest.fixture(scope="session")
def database_url():
    """A fresh, empty PostgreSQL database for this test session."""
    name = f"llmp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def claim_redis_database(owner: str) -> int:
    """An empty Redis database number claimed for `owner` ("<name>-<pid>"), so two stacks (or a stack and a
    leftover worker of an earlier run) never share a Celery queue. 0 is the default broker and 15 the tests'
    shared one, so the claim is among 1-14. A database whose claimant process is gone (a run that was killed
    before it could flush) is flushed and claimed again. Raises when none is free."""
    import redis

    for number in range(1, 15):
        client = redis.Redis(host="127.0.0.1", port=6379, db=number)
        try:
            if client.dbsize() == 0 and client.set(CLAIM_KEY, owner, nx=True):
                return number
            claimant = client.get(CLAIM_KEY)
            if claimant is not None and not _alive(claimant.decode()):
                client.flushdb()
                if client.set(CLAIM_KEY, owner, nx=True):
                    return number
        finally:
            client.close()
    raise RuntimeError("no empty Redis database (1-14) to claim for a test broker")


CLAIM_KEY = "llmp-test-claim"


def _alive(claimant: str) -> bool:
    """Whether the process named by a claim ("<name>-<pid>") still runs on this machine."""
    pid = claimant.rsplit("-", 1)[-1]
    return not pid.isdigit() or Path(f"/proc/{pid}").exists()


def release_redis_database(number: int) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=number)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="session")
def claim_broker():
    """Claims an empty Redis database per call, for a broker URL of its own; every one is flushed when the
    session ends. Each stack or worker fleet a session starts takes its own: two fleets' workers on one
    queue take each other's tasks and end them as "nothing to run" against the wrong database. There are
    only 14: a test that needs one of its own takes `own_broker_url`, which gives it back at its end."""
    claimed: list[int] = []

    def claim(owner: str) -> str:
        claimed.append(claim_redis_database(f"{owner}-{os.getpid()}"))
        return f"redis://127.0.0.1:6379/{claimed[-1]}"

    yield claim
    for number in claimed:
        release_redis_database(number)


@pytest.fixture
def own_broker_url(request):
    """A Redis broker URL on a database of this test's own, flushed and given back when the test ends."""
    number = claim_redis_database(f"{request.node.name[:40]}-{os.getpid()}")
    yield f"redis://127.0.0.1:6379/{number}"
    release_redis_database(number)


@pytest.fixture(scope="session")
def private_broker_url(claim_broker):
    """A Redis broker URL on a database no one else uses; flushed when the session ends."""
    return claim_broker("pytest")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """host:port of a real SeaweedFS S3 server for this session."""
    root: Path = tmp_path_factory.mktemp("seaweedfs")
    ports = servers.SeaweedPorts.free()
    process = servers.start_seaweedfs(root / "data", ports, S3_ACCESS_KEY, S3_SECRET_KEY, root / "weed.log")
    yield f"127.0.0.1:{ports.s3}"
    servers.stop(process)


@pytest.fixture(scope="session")
def settings_env(database_url, s3_endpoint, tmp_path_factory) -> dict[str, str]:
    """LLMP_* variables pointing at this session's servers (free ports for every llmp server)."""
    env = {
        "LLMP_DATABASE_URL": database_url,
        "LLMP_S3_ENDPOINT": s3_endpoint,
        "LLMP_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "LLMP_S3_SECRET_KEY": S3_SECRET_KEY,
        "LLMP_S3_BUCKET": f"llmp-test-{uuid.uuid4().hex[:8]}",
        "LLMP_BROKER_URL": BROKER_URL,
        "LLMP_STATE_DIR": str(tmp_path_factory.mktemp("state")),
        "LLMP_LOG_FORMAT": "text",
        "LLMP_GATEWAY_PORT": str(servers.free_port()),
        "LLMP_SHUTDOWN_GRACE": "2",
        "LLMP_SERVICE_SECRET": SERVICE_SECRET,  # what tests/identities.py signs with
    }
    from services.common import topology

    for service, port in zip(topology.GRPC_SERVICES, servers.free_ports(len(topology.GRPC_SERVICES)), strict=True):
        env[service.addr_env] = f"127.0.0.1:{port}"
    return env


@pytest.fixture(scope="session")
def settings(settings_env) -> Settings:
    return Settings.from_env(settings_env)
