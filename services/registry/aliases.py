"""Aliases: named pointers to versions, moved under optimistic concurrency, with an append-only history.

Creating an alias needs `must_not_exist` (HTTP `If-None-Match: *`); moving one needs its current etag
(HTTP `If-Match`). The move is one `UPDATE ... WHERE etag = expected`: of N concurrent moves holding
the same etag, the row lock lets exactly one match; the others see the new etag and fail with
PreconditionFailed. Each move appends to `registry_alias_history` in the same transaction.
"""

from __future__ import annotations

import hashlib
from typing import Any

from services.common import contracts
from services.common.db import Database
from services.common.errors import NotFound, PreconditionFailed, PreconditionRequired


def etag_for(tenant: str, name: str, alias: str, version: int, revision: int) -> str:
    """A strong validator: changes with every move, even back to an earlier version."""
    return hashlib.sha256(f"{tenant}\0{name}\0{alias}\0{version}\0{revision}".encode()).hexdigest()[:32]


async def set_alias(db: Database, tenant: str, name: str, alias: str, version: int, *, expected_etag: str = "",
                    must_not_exist: bool = False, actor: str, reason: str = "", gate: str = "") -> dict[str, Any]:
    contracts.validate_name(name, "model name")
    contracts.validate_name(alias, "alias")
    contracts.validate_version(version)
    if expected_etag and must_not_exist:
        raise PreconditionFailed("an alias cannot both exist with an etag and not exist")
    async with db.transaction() as conn:
        target = await (await conn.execute(
            "SELECT 1 FROM registry_versions WHERE tenant = %s AND name = %s AND version = %s AND state = 'READY' "
            "FOR SHARE", (tenant, name, version))).fetchone()
        if target is None:
            raise NotFound(f"model {name} version {version} not found")
        if must_not_exist:
            created = await (await conn.execute(
                """INSERT INTO registry_aliases (tenant, name, alias, version, etag, revision, updated_by)
                   VALUES (%s, %s, %s, %s, %s, 1, %s) ON CONFLICT DO NOTHING RETURNING *""",
                (tenant, name, alias, version, etag_for(tenant, name, alias, version, 1), actor))).fetchone()
            if created is None:
                raise PreconditionFailed(f"alias {alias} of {name} already exists")
            row, previous = created, 0
        elif expected_etag:
            current = await (await conn.execute(
                "SELECT version, revision, etag FROM registry_aliases WHERE tenant = %s AND name = %s AND alias = %s "
                "FOR UPDATE", (tenant, name, alias))).fetchone()
            if current is None:
                raise NotFound(f"alias {alias} of {name} not found")
            if current["etag"] != expected_etag:
                raise PreconditionFailed(f"alias {alias} of {name} has changed (etag mismatch)")
            revision = current["revision"] + 1
            row = await (await conn.execute(
                """UPDATE registry_aliases SET version = %s, etag = %s, revision = %s, updated_at = now(),
                          updated_by = %s WHERE tenant = %s AND name = %s AND alias = %s RETURNING *""",
                (version, etag_for(tenant, name, alias, version, revision), revision, actor, tenant, name,
                 alias))).fetchone()
            previous = current["version"]
        else:
            raise PreconditionRequired(f"setting alias {alias} needs its current etag (If-Match) to move it, "
                                       "or must_not_exist (If-None-Match: *) to create it")
        await conn.execute(
            """INSERT INTO registry_alias_history (tenant, name, alias, sequence, from_version, to_version, actor,
                   reason, gate) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (tenant, name, alias, row["revision"], previous, version, actor, reason, gate))
    return row


async def get_alias(db: Database, tenant: str, name: str, alias: str) -> dict[str, Any]:
    async with db.pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT * FROM registry_aliases WHERE tenant = %s AND name = %s AND alias = %s",
            (tenant, name, alias))).fetchone()
    if row is None:
        raise NotFound(f"alias {alias} of model {name} not found")
    return row


async def history(db: Database, tenant: str, name: str, alias: str) -> list[dict[str, Any]]:
    async with db.pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT * FROM registry_alias_history WHERE tenant = %s AND name = %s AND alias = %s ORDER BY sequence, id",
            (tenant, name, alias))).fetchall()
    if not rows:
        raise NotFound(f"alias {alias} of model {name} not found")
    return rows
