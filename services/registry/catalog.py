"""Reading the registry (models, versions, lineage both ways), deleting versions, deployment pins.

Readers only see READY versions. A version is pinned while a deployment uses it (the inference service
records that with MarkDeployed) or an alias points at it; deleting a pinned version is a Conflict.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass, field
from typing import Any

from services.common import contracts
from services.common.db import Database
from services.common.errors import Conflict, InvalidArgument, NotFound
from services.common.s3 import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class VersionView:
    """A READY version with everything hanging off it."""

    row: dict[str, Any]
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    deployments: list[str] = field(default_factory=list)



def encode_token(value: str | int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode()


def decode_token(token: str) -> str:
    try:
        value = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        value = ""
    if not value:
        raise InvalidArgument("page_token is not one this service issued")
    return value


def decode_version_token(token: str) -> int:
    value = decode_token(token)
    if not value.isdigit():
        raise InvalidArgument("page_token is not one this service issued")
    return int(value)


async def get_model(db: Database, tenant: str, name: str) -> dict[str, Any]:
    rows, _ = await _models(db, tenant, name=name)
    if not rows:
        raise NotFound(f"model {name} not found")
    return rows[0]


async def list_models(db: Database, tenant: str, size: int, token: str) -> tuple[list[dict[str, Any]], str]:
    after = decode_token(token) if token else ""
    return await _models(db, tenant, after=after, limit=contracts.page_size(size))


async def _models(db: Database, tenant: str, *, name: str | None = None, after: str = "",
                  limit: int = 1) -> tuple[list[dict[str, Any]], str]:
    async with db.pool.connection() as conn:
        rows = await (await conn.execute(
            """SELECT m.name, m.created_at, max(v.version) AS latest_version, count(*) AS version_count
               FROM registry_models m JOIN registry_versions v USING (tenant, name)
               WHERE m.tenant = %s AND v.state = 'READY' AND (%s::text IS NULL OR m.name = %s) AND m.name > %s
               GROUP BY m.name, m.created_at ORDER BY m.name LIMIT %s""",
            (tenant, name, name, after, limit + 1))).fetchall()
        page, more = rows[:limit], len(rows) > limit
        aliases = await (await conn.execute(
            "SELECT * FROM registry_aliases WHERE tenant = %s AND name = ANY(%s) ORDER BY name, alias",
            (tenant, [row["name"] for row in page]))).fetchall()
    for row in page:
        row["aliases"] = [alias for alias in aliases if alias["name"] == row["name"]]
    return page, encode_token(page[-1]["name"]) if more else ""


async def get_version(db: Database, tenant: str, name: str, version: int) -> VersionView:
    views, _ = await _versions(db, tenant, name, only=version)
    if not views:
        raise NotFound(f"model {name} version {version} not found")
    return views[0]


async def list_versions(db: Database, tenant: str, name: str, size: int, token: str) -> tuple[list[VersionView], str]:
    before = decode_version_token(token) if token else None
    views, more = await _versions(db, tenant, name, before=before, limit=contracts.page_size(size))
    if not views and before is None:
        await get_model(db, tenant, name)  # NotFound for an unknown model, an empty page otherwise
    return views, encode_token(views[-1].row["version"]) if more else ""


async def _versions(db: Database, tenant: str, name: str, *, only: int | None = None, before: int | None = None,
                    limit: int = 1) -> tuple[list[VersionView], bool]:
    async with db.pool.connection() as conn:
        rows = await (await conn.execute(
            """SELECT * FROM registry_versions WHERE tenant = %s AND name = %s AND state = 'READY'
               AND (%s::bigint IS NULL OR version = %s) AND (%s::bigint IS NULL OR version < %s)
               ORDER BY version DESC LIMIT %s""", (tenant, name, only, only, before, before, limit + 1))).fetchall()
        rows, more = rows[:limit], len(rows) > limit
        numbers = [row["version"] for row in rows]
        key = (tenant, name, numbers)
        condition = "WHERE tenant = %s AND name = %s AND version = ANY(%s)"
        artifacts = await (await conn.execute(
            f"SELECT * FROM registry_artifacts {condition} ORDER BY path", key)).fetchall()
        exports = await (await conn.execute(
            f"SELECT * FROM registry_exports {condition} ORDER BY format", key)).fetchall()
        aliases = await (await conn.execute(
            f"SELECT version, alias FROM registry_aliases {condition} ORDER BY alias", key)).fetchall()
        deployments = await (await conn.execute(
            f"SELECT version, deployment FROM registry_deployments {condition} ORDER BY deployment", key)).fetchall()
    views = {row["version"]: VersionView(row) for row in rows}
    for item in artifacts:
        views[item["version"]].artifacts.append(item)
    for item in exports:
        views[item["version"]].exports.append(item)
    for item in aliases:
        views[item["version"]].aliases.append(item["alias"])
    for item in deployments:
        views[item["version"]].deployments.append(item["deployment"])
    return list(views.values()), more


async def list_by_dataset(db: Database, tenant: str, dataset_name: str, dataset_version: int) -> list[tuple[str, int]]:
    """Versions (READY, or PENDING: about to be) whose lineage names the dataset version."""
    async with db.pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT name, version FROM registry_versions WHERE tenant = %s AND dataset_name = %s "
            "AND dataset_version = %s AND state IN ('PENDING', 'READY') ORDER BY name, version",
            (tenant, dataset_name, dataset_version))).fetchall()
    return [(row["name"], row["version"]) for row in rows]


async def delete_version(db: Database, store: ObjectStore, tenant: str, name: str, version: int) -> int:
    """Delete a READY version that no deployment serves and no alias names; returns objects deleted.

    The row turns DELETING (invisible, unpinnable) in the transaction that checks the pins, so a
    concurrent MarkDeployed either commits first (and the delete is refused) or finds no READY version.
    """
    async with db.transaction() as conn:
        row = await (await conn.execute(
            "SELECT prefix FROM registry_versions WHERE tenant = %s AND name = %s AND version = %s "
            "AND state = 'READY' FOR UPDATE", (tenant, name, version))).fetchone()
        if row is None:
            raise NotFound(f"model {name} version {version} not found")
        deployed = await (await conn.execute(
            "SELECT deployment FROM registry_deployments WHERE tenant = %s AND name = %s AND version = %s "
            "ORDER BY deployment", (tenant, name, version))).fetchall()
        if deployed:
            names = ", ".join(item["deployment"] for item in deployed)
            raise Conflict(f"model {name} version {version} is deployed ({names}); undeploy it first")
        aliased = await (await conn.execute(
            "SELECT alias FROM registry_aliases WHERE tenant = %s AND name = %s AND version = %s ORDER BY alias",
            (tenant, name, version))).fetchall()
        if aliased:
            names = ", ".join(item["alias"] for item in aliased)
            raise Conflict(f"model {name} version {version} is the target of alias(es) {names}; move them first")
        await conn.execute("UPDATE registry_versions SET state = 'DELETING' WHERE tenant = %s AND name = %s "
                           "AND version = %s", (tenant, name, version))
    deleted = await asyncio.to_thread(store.delete_prefix, row["prefix"])
    async with db.pool.connection() as conn:
        await conn.execute("DELETE FROM registry_versions WHERE tenant = %s AND name = %s AND version = %s "
                           "AND state = 'DELETING'", (tenant, name, version))
    log.info("deleted version", extra={"model": name, "version": version, "objects": deleted})
    return deleted


async def mark_deployed(db: Database, tenant: str, name: str, version: int, deployment: str,
                        export_format: str = "") -> list[str]:
    contracts.validate_name(deployment, "deployment name")
    async with db.transaction() as conn:
        row = await (await conn.execute(
            "SELECT 1 FROM registry_versions WHERE tenant = %s AND name = %s AND version = %s AND state = 'READY' "
            "FOR SHARE", (tenant, name, version))).fetchone()
        if row is None:
            raise NotFound(f"model {name} version {version} not found")
        if export_format:
            contracts.validate_export_format(export_format)
            export = await (await conn.execute(
                "SELECT state FROM registry_exports WHERE tenant = %s AND name = %s AND version = %s AND format = %s",
                (tenant, name, version, export_format))).fetchone()
            if export is None or export["state"] != "READY":
                state = export["state"] if export else "missing"
                raise Conflict(f"the {export_format} export of {name} v{version} is {state}, not READY: "
                               "it cannot be deployed")
        await conn.execute("INSERT INTO registry_deployments (tenant, name, version, deployment) "
                           "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING", (tenant, name, version, deployment))
        return await _deployments(conn, tenant, name, version)


async def unmark_deployed(db: Database, tenant: str, name: str, version: int, deployment: str) -> list[str]:
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM registry_deployments WHERE tenant = %s AND name = %s AND version = %s "
                           "AND deployment = %s", (tenant, name, version, deployment))
        return await _deployments(conn, tenant, name, version)


async def _deployments(conn, tenant: str, name: str, version: int) -> list[str]:
    rows = await (await conn.execute(
        "SELECT deployment FROM registry_deployments WHERE tenant = %s AND name = %s AND version = %s "
        "ORDER BY deployment", (tenant, name, version))).fetchall()
    return [row["deployment"] for row in rows]
