"""Issue 16, defect 10: a PostgreSQL role per llmp component, with rights on its own tables only.

deploy/base/postgres-init/llmp-roles.psql (what the postgres container runs on its first start, in
Kubernetes and compose) runs here against the real server, in a fresh database, with a role prefix of
this test's own (roles are cluster-wide). Then each component's migrations run as its role, exactly as
its server runs them at start (`Database.connect`), and each role is tried on the others' tables.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo

from services.common.db import Database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
INIT = ROOT / "deploy" / "base" / "postgres-init"
MIGRATIONS = {"gateway": ROOT / "gateway" / "migrations",
              **{name: ROOT / "services" / name / "migrations"
                 for name in ("dataset", "training", "registry", "inference")}}
# One table each component's first migration creates, to try the others on.
OWN_TABLE = {"gateway": "api_keys", "dataset": "datasets", "training": "training_jobs",
             "registry": "registry_models", "inference": "inference_deployments"}


@pytest.fixture
def roles(database_url):
    """(database URL as the superuser, role name prefix) after llmp-roles.psql ran in a fresh database."""
    name = f"llmp_roles_{uuid.uuid4().hex[:8]}"
    prefix = f"r{uuid.uuid4().hex[:6]}_"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = conninfo.make_conninfo(database_url, dbname=name)
    command = ["psql", "--no-psqlrc", "--quiet", "-v", "ON_ERROR_STOP=1", "--dbname", url, "--set", f"prefix={prefix}",
               *[arg for component in MIGRATIONS for arg in ("--set", f"{component}_password=pw-{component}")],
               "--file", str(INIT / "llmp-roles.psql")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        yield url, prefix
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for component in MIGRATIONS:
                conn.execute(f'DROP ROLE IF EXISTS "{prefix}{component}"')


def _as(url: str, role: str) -> str:
    return conninfo.make_conninfo(url, user=role, password="")


async def test_each_component_migrates_into_its_own_schema_and_reaches_no_other(roles):
    url, prefix = roles
    for component, migrations in MIGRATIONS.items():
        database = await Database.connect(_as(url, prefix + component), component=component,
                                          migrations_dir=migrations)
        await database.close()
    with psycopg.connect(url) as conn:
        placed = dict(conn.execute("SELECT tablename, schemaname FROM pg_tables WHERE tablename = ANY(%s)",
                                   (list(OWN_TABLE.values()),)).fetchall())
        owners = dict(conn.execute("SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace").fetchall())
    assert placed == {table: component for component, table in OWN_TABLE.items()}
    assert {owners[component] for component in MIGRATIONS} == {prefix + component for component in MIGRATIONS}

    for component in MIGRATIONS:
        with psycopg.connect(_as(url, prefix + component), autocommit=True) as conn:
            conn.execute(f"SELECT count(*) FROM {OWN_TABLE[component]}")  # its own, by its search_path
            for other, table in OWN_TABLE.items():
                if other == component:
                    continue
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"SELECT count(*) FROM {other}.{table}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE public.stray (id int)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"CREATE SCHEMA {component}_more")


def test_no_other_role_may_connect(roles, database_url):
    url, _ = roles
    outsider = f"o{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{outsider}" LOGIN')
    try:
        with pytest.raises(psycopg.OperationalError, match="permission denied"):
            psycopg.connect(_as(url, outsider)).close()
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP ROLE "{outsider}"')
