"""PostgreSQL through a psycopg 3 async pool, with versioned schema migrations applied at start.

Each component keeps its migrations as `migrations/NNN_name.sql` beside its code; `Database.connect`
applies the ones not yet recorded in `llmp_schema_migrations`, in order, each in its own transaction,
under an advisory lock so two replicas starting together do not race.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.common.errors import Internal, Unavailable

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_MIGRATIONS_LOCK = 7_212_001  # advisory-lock key shared by every llmp component
_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS llmp_schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    sha256     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)"""


def read_migrations(directory: Path) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every migration in `directory`, ordered; gaps are an error."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise Internal(f"migration file {path} must be named NNN_lowercase_name.sql")
        found.append((int(match.group(1)), path.name, path.read_text()))
    for expected, (version, name, _) in enumerate(found, start=1):
        if version != expected:
            raise Internal(f"migration {name} in {directory}: expected version {expected:03d}")
    return found


class Database:
    """An open pool plus the operations every service needs."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, url: str, *, component: str, migrations_dir: Path | None = None,
                      min_size: int = 1, max_size: int = 10, timeout: float = 10.0) -> "Database":
        # `check` verifies a connection as it leaves the pool: after PostgreSQL restarts, the pool's
        # old connections are all broken, and without it each would fail one request before being dropped.
        pool = AsyncConnectionPool(url, min_size=min_size, max_size=max_size, open=False, timeout=timeout,
                                   kwargs={"row_factory": dict_row, "autocommit": True},
                                   check=AsyncConnectionPool.check_connection)
        try:
            await pool.open(wait=True, timeout=timeout)
        except psycopg.OperationalError as error:
            await pool.close()
            raise Unavailable(f"PostgreSQL unreachable: {error}", retry_after=2) from error
        except Exception:
            await pool.close()
            raise
        database = cls(pool)
        if migrations_dir is not None:
            await database.migrate(component, migrations_dir)
        return database

    async def migrate(self, component: str, directory: Path) -> list[str]:
        """Apply `directory`'s migrations not yet applied for `component`; return the names applied."""
        migrations = read_migrations(directory)
        applied: list[str] = []
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATIONS_LOCK,))
            try:
                await conn.execute(_BOOKKEEPING)
                cursor = await conn.execute(
                    "SELECT version, sha256 FROM llmp_schema_migrations WHERE component = %s", (component,))
                done = {row["version"]: row["sha256"] for row in await cursor.fetchall()}
                for version, name, sql in migrations:
                    digest = hashlib.sha256(sql.encode()).hexdigest()
                    if version in done:
                        if done[version] != digest:
                            raise Internal(f"migration {component}/{name} changed after it was applied; "
                                           "add a new migration instead")
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO llmp_schema_migrations (component, version, name, sha256) "
                            "VALUES (%s, %s, %s, %s)", (component, version, name, digest))
                    applied.append(name)
                    log.info("applied migration", extra={"migration": f"{component}/{name}"})
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATIONS_LOCK,))
        return applied

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A connection inside one transaction: committed on exit, rolled back on an exception."""
        async with self.pool.connection() as conn:
            async with conn.transaction():
                yield conn

    async def check(self) -> None:
        """Readiness: raise Unavailable unless a query answers within 2 seconds."""
        try:
            async with asyncio.timeout(2):
                async with self.pool.connection(timeout=2) as conn:
                    await conn.execute("SELECT 1")
        except (psycopg.Error, TimeoutError, OSError) as error:
            raise Unavailable(f"PostgreSQL unreachable: {error or 'timeout'}", retry_after=2) from error
        except Exception as error:  # the pool raises its own PoolTimeout
            if type(error).__module__.startswith("psycopg_pool"):
                raise Unavailable(f"PostgreSQL unreachable: {error}", retry_after=2) from error
            raise

    async def close(self) -> None:
        await self.pool.close()
