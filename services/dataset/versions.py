"""Dataset versions: rows in PostgreSQL, objects in S3, and the rules that keep the two consistent.

- A version is reserved PENDING under a content address (corpus SHA-256 + canonical options);
  reserving the same address again returns the live version instead (idempotent create).
- It becomes READY only after every object is uploaded and verified against the server's size and
  recorded SHA-256, and the manifest written — in one transaction that also records its statistics.
- A failed ingest deletes whatever it uploaded and marks the row FAILED with the reason.
- A PENDING version has an owner (the replica building it) holding a lease it renews while it builds, or
  none while it waits for a build slot (queued: any replica with a slot for its tenant claims it);
  its corpus is stored at `contracts.dataset_corpus_key(...)` until it is READY or FAILED, so that when the lease lapses
  (the owner stopped or died) any replica can claim the version and build it again from that corpus.
  Only the owner may publish or fail it.
- Version numbers come from a per-dataset counter and are never reused, even after a delete.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from psycopg.types.json import Jsonb

from services.common import contracts
from services.common.contracts import SPLITS
from services.common.db import Database
from services.common.errors import Conflict, Internal, InvalidArgument, NotFound, RateLimited, Unavailable
from services.common.s3 import ObjectStore, StoredObject
from services.dataset.options import DatasetOptions
from services.dataset.pipeline import Built

log = logging.getLogger(__name__)

# models_using(tenant, name, version) -> "model:version" strings whose lineage points at the version
ModelsUsing = Callable[[str, str, int], Awaitable[list[str]]]


@dataclass
class VersionRow:
    """One dataset version as stored."""

    id: int
    tenant: str
    name: str
    version: int
    state: str
    digest: str
    options: DatasetOptions
    source_bytes: int
    stats: dict = field(default_factory=dict)
    objects: list[dict] = field(default_factory=list)
    manifest_key: str = ""
    error: str = ""
    created_at: datetime | None = None
    finished_at: datetime | None = None
    owner: str = ""  # the replica building a PENDING version
    attempts: int = 0  # builds started, the first one included

    @classmethod
    def from_row(cls, row: dict) -> "VersionRow":
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["options"] = DatasetOptions.from_dict(row["options"])
        return cls(**values)

    @property
    def prefix(self) -> str:
        return contracts.dataset_version_prefix(self.tenant, self.name, self.version)

    @property
    def source_key(self) -> str:
        return contracts.dataset_corpus_key(self.tenant, self.name, self.version)


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    version_count: int
    latest: VersionRow
    created_at: datetime


class LeaseLost(Unavailable):
    """This replica no longer holds the PENDING version it was building."""


def content_digest(corpus_sha256: str, options: DatasetOptions) -> str:
    """The content address of a version."""
    return hashlib.sha256(f"{corpus_sha256}\n{options.canonical()}".encode()).hexdigest()


def encode_token(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def decode_token(token: str):
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"page_token {token!r} is not one this service issued") from None


INGEST_RETRY_AFTER = 3600.0  # seconds: the 24-hour window of the ingest bytes quota slides by the hour
_COLUMNS = ("id, tenant, name, version, state, digest, options, source_bytes, stats, objects, manifest_key, "
            "error, created_at, finished_at, owner, attempts")


class VersionStore:
    """Reads and writes dataset versions."""

    def __init__(self, db: Database, store: ObjectStore) -> None:
        self.db = db
        self.store = store

    # -- create ---------------------------------------------------------------------------------
    async def reserve(self, tenant: str, options: DatasetOptions, digest: str, source_bytes: int,
                      owner: str, lease_seconds: float, *, bytes_per_day: int | None = None
                      ) -> tuple[VersionRow, bool]:
        """A new PENDING version for this content, leased to `owner`, or the live one that already has it
        (created False). A new version is refused (RateLimited, nothing created) when its corpus would take
        the tenant's versions created in the last 24 hours past `bytes_per_day`."""
        async with self.db.transaction() as conn:
            await conn.execute("INSERT INTO datasets (tenant, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                               (tenant, options.name))
            await conn.execute("SELECT 1 FROM datasets WHERE tenant = %s AND name = %s FOR UPDATE",
                               (tenant, options.name))
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM dataset_versions WHERE tenant = %s AND name = %s AND digest = %s "
                "AND state <> 'FAILED'", (tenant, options.name, digest))
            existing = await cursor.fetchone()
            if existing:
                return VersionRow.from_row(existing), False
            if bytes_per_day is not None:
                await _admit_bytes(conn, tenant, source_bytes, bytes_per_day)
            cursor = await conn.execute(
                "UPDATE datasets SET last_version = last_version + 1 WHERE tenant = %s AND name = %s "
                "RETURNING last_version", (tenant, options.name))
            version = (await cursor.fetchone())["last_version"]
            cursor = await conn.execute(
                f"INSERT INTO dataset_versions (tenant, name, version, state, digest, options, source_bytes, owner, "
                f"lease_expires_at, attempts) VALUES (%s, %s, %s, 'PENDING', %s, %s, %s, %s, "
                f"now() + make_interval(secs => %s), 1) RETURNING {_COLUMNS}",
                (tenant, options.name, version, digest, Jsonb(options.as_dict()), source_bytes, owner, lease_seconds))
            row = VersionRow.from_row(await cursor.fetchone())
        log.info("dataset version reserved", extra={"dataset": options.name, "version": version})
        return row, True

    async def publish(self, row: VersionRow, built: Built, owner: str) -> VersionRow:
        """Upload the built files, verify them, write the manifest, and mark the version READY (only while
        `owner` still holds it); then delete its stored corpus."""
        tenant, name, number = row.tenant, row.name, row.version
        tokenizer_prefix = contracts.dataset_tokenizer_prefix(tenant, name, number)
        uploads: list[tuple[Path, str, str]] = [
            (path, tokenizer_prefix + path.name, "tokenizer") for path in built.tokenizer_files]
        shard_keys = {split: tuple(contracts.dataset_shard_key(tenant, name, number, split, index)
                                   for index in range(len(built.splits[split].shards))) for split in SPLITS}
        for split in SPLITS:
            uploads += [(path, key, f"{split}-shard")
                        for path, key in zip(built.splits[split].shards, shard_keys[split], strict=True)]
        # Supervised versions: each shard's loss mask and the split's example index.
        mask_keys = {split: tuple(contracts.dataset_loss_mask_key(tenant, name, number, split, index)
                                  for index in range(len(built.splits[split].loss_masks))) for split in SPLITS}
        example_keys = {split: contracts.dataset_examples_key(tenant, name, number, split)
                        if built.splits[split].examples else "" for split in SPLITS}
        for split in SPLITS:
            uploads += [(path, key, f"{split}-loss-mask")
                        for path, key in zip(built.splits[split].loss_masks, mask_keys[split], strict=True)]
            if example_keys[split]:
                uploads.append((built.splits[split].examples, example_keys[split], f"{split}-examples"))
        objects = [await asyncio.to_thread(self._upload_verified, path, key, role) for path, key, role in uploads]
        info = built.tokenizer
        manifest = contracts.DatasetManifest(
            name=name, version=number, tenant=tenant, format=row.options.format, digest=row.digest,
            dtype=built.dtype.name, vocab_size=info.vocab_size, eos_token_id=info.eos_token_id,
            pad_token_id=info.pad_token_id,
            tokenizer=contracts.TokenizerManifest(info.kind, info.vocab_size, tokenizer_prefix, sha256=info.sha256,
                                                  model=info.model, model_version=info.model_version),
            splits={split: contracts.SplitManifest(**built.splits[split].stats(), shards=shard_keys[split],
                                                   loss_masks=mask_keys[split], examples=example_keys[split])
                    for split in SPLITS},
            objects=tuple(contracts.ManifestObject(**obj) for obj in objects),
            cleaning=vars(built.cleaning).copy(), options=row.options.as_dict(),
        )
        body = manifest.to_dict()
        stats = {"splits": body["splits"], "cleaning": body["cleaning"], "dtype": manifest.dtype,
                 "tokenizer": {**built.tokenizer.as_dict(), "prefix": tokenizer_prefix}}
        manifest_key = contracts.dataset_manifest_key(tenant, name, number)
        data = manifest.to_json().encode()
        stored = await asyncio.to_thread(self.store.put_bytes, manifest_key, data, "application/json")
        await asyncio.to_thread(self._verify, stored)
        objects.append(stored.as_dict("manifest"))
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                f"UPDATE dataset_versions SET state = 'READY', stats = %s, objects = %s, manifest_key = %s, "
                f"finished_at = now(), owner = '', lease_expires_at = NULL "
                f"WHERE id = %s AND state = 'PENDING' AND owner = %s RETURNING {_COLUMNS}",
                (Jsonb(stats), Jsonb(objects), manifest_key, row.id, owner))
            updated = await cursor.fetchone()
        if updated is None:
            raise LeaseLost(f"dataset {row.name} version {row.version} was taken over or finished by another "
                            "replica while this one built it")
        await self._delete_source(row)
        log.info("dataset version ready", extra={"dataset": row.name, "version": row.version,
                                                 "objects": len(objects)})
        return VersionRow.from_row(updated)

    def _upload_verified(self, path: Path, key: str, role: str) -> dict:
        stored = self.store.put_file(key, path)
        self._verify(stored)
        return stored.as_dict(role)

    def _verify(self, expected: StoredObject) -> None:
        """The server holds `expected.size` bytes with `expected.sha256` recorded, or Internal."""
        found = self.store.stat(expected.key)
        if (found.size, found.sha256) != (expected.size, expected.sha256):
            raise Internal(f"S3 object {expected.key} failed verification: stored {found.size} bytes "
                           f"sha256 {found.sha256!r}, wrote {expected.size} bytes sha256 {expected.sha256}")

    async def fail(self, row: VersionRow, reason: str, owner: str) -> bool:
        """Mark the version FAILED with `reason` and remove what it uploaded and its stored corpus, if
        `owner` still holds it (False: another replica took it over, and its files are that one's)."""
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE dataset_versions SET state = 'FAILED', error = %s, stats = '{}', objects = '[]', "
                "manifest_key = '', finished_at = now(), owner = '', lease_expires_at = NULL "
                "WHERE id = %s AND state = 'PENDING' AND owner = %s RETURNING id", (reason, row.id, owner))
            failed = await cursor.fetchone() is not None
        if not failed:
            return False
        log.warning("dataset version failed", extra={"dataset": row.name, "version": row.version, "reason": reason})
        try:
            await asyncio.to_thread(self.store.delete_prefix, row.prefix)
        finally:
            await self._delete_source(row)
        return True

    async def _delete_source(self, row: VersionRow) -> None:
        try:
            await asyncio.to_thread(self.store.delete, row.source_key)
        except Exception as error:  # a leftover corpus costs space, not correctness: say so and go on
            log.warning("could not delete the stored corpus %s: %s", row.source_key, error)

    async def renew(self, ids: list[int], owner: str, lease_seconds: float) -> set[int]:
        """Extend `owner`'s lease on these PENDING versions; return the ids it still holds."""
        if not ids:
            return set()
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE dataset_versions SET lease_expires_at = now() + make_interval(secs => %s) "
                "WHERE id = ANY(%s) AND owner = %s AND state = 'PENDING' RETURNING id", (lease_seconds, ids, owner))
            return {row["id"] for row in await cursor.fetchall()}

    async def release(self, row: VersionRow, owner: str) -> None:
        """Give up a PENDING version this owner will not finish: any replica may claim it at once."""
        async with self.db.pool.connection() as conn:
            await conn.execute(
                "UPDATE dataset_versions SET owner = '', lease_expires_at = now() "
                "WHERE id = %s AND owner = %s AND state = 'PENDING'", (row.id, owner))
        log.info("dataset version released", extra={"dataset": row.name, "version": row.version})

    async def queue(self, row: VersionRow, owner: str) -> VersionRow:
        """Hand a version `owner` reserved but has no build slot for to whichever replica first has one (the
        claim of `claim_expired`). Its build has not started, so it does not count as an attempt."""
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                f"UPDATE dataset_versions SET owner = '', lease_expires_at = now(), attempts = attempts - 1 "
                f"WHERE id = %s AND owner = %s AND state = 'PENDING' RETURNING {_COLUMNS}", (row.id, owner))
            queued = await cursor.fetchone()
        log.info("dataset version queued", extra={"dataset": row.name, "version": row.version})
        return VersionRow.from_row(queued) if queued else await self.get(row.tenant, row.name, row.version)

    async def claim_expired(self, owner: str, lease_seconds: float, skip_tenants: list[str] | None = None
                            ) -> VersionRow | None:
        """Take over a PENDING version whose lease has lapsed (None: there is none), of the tenant whose builds
        started least recently (`dataset_tenant_turns`), its oldest first, none of `skip_tenants` (those at
        their bound on this replica). A version reserved before leases existed counts as lapsed
        `lease_seconds` after it was created."""
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                f"UPDATE dataset_versions SET owner = %s, lease_expires_at = now() + make_interval(secs => %s), "
                f"attempts = attempts + 1 WHERE id = (SELECT v.id FROM dataset_versions v "
                f"LEFT JOIN dataset_tenant_turns t ON t.tenant = v.tenant WHERE v.state = 'PENDING' "
                f"AND COALESCE(v.lease_expires_at, v.created_at + make_interval(secs => %s)) < now() "
                f"AND v.tenant <> ALL(%s) ORDER BY t.last_started_at NULLS FIRST, v.id LIMIT 1 "
                f"FOR UPDATE OF v SKIP LOCKED) RETURNING {_COLUMNS}",
                (owner, lease_seconds, lease_seconds, list(skip_tenants or ())))
            found = await cursor.fetchone()
            if found is not None:  # its turn is taken now, so the next claim (here or elsewhere) serves another
                await _record_turn(conn, found["tenant"])
        return VersionRow.from_row(found) if found else None

    async def record_turn(self, tenant: str) -> None:
        """Note that a build of `tenant` started now (the order `claim_expired` serves tenants in)."""
        async with self.db.pool.connection() as conn:
            await _record_turn(conn, tenant)

    # -- read -----------------------------------------------------------------------------------
    async def get(self, tenant: str, name: str, version: int) -> VersionRow:
        """A version; `version` 0 means the latest READY one."""
        async with self.db.pool.connection() as conn:
            if version:
                cursor = await conn.execute(
                    f"SELECT {_COLUMNS} FROM dataset_versions WHERE tenant = %s AND name = %s AND version = %s",
                    (tenant, name, version))
            else:
                cursor = await conn.execute(
                    f"SELECT {_COLUMNS} FROM dataset_versions WHERE tenant = %s AND name = %s AND state = 'READY' "
                    "ORDER BY version DESC LIMIT 1", (tenant, name))
            row = await cursor.fetchone()
        if row is None:
            which = f"version {version}" if version else "READY version"
            raise NotFound(f"dataset {name} has no {which}")
        return VersionRow.from_row(row)

    async def list_versions(self, tenant: str, name: str, size: int, token: str) -> tuple[list[VersionRow], str]:
        """A page of a dataset's versions, newest first, and the next page's token."""
        before = int(decode_token(token)) if token else None
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute("SELECT 1 FROM datasets WHERE tenant = %s AND name = %s", (tenant, name))
            if await cursor.fetchone() is None:
                raise NotFound(f"dataset {name} not found")
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM dataset_versions WHERE tenant = %s AND name = %s "
                "AND (%s::bigint IS NULL OR version < %s) ORDER BY version DESC LIMIT %s",
                (tenant, name, before, before, size + 1))
            rows = [VersionRow.from_row(row) for row in await cursor.fetchall()]
        next_token = encode_token(rows[size - 1].version) if len(rows) > size else ""
        return rows[:size], next_token

    async def list_datasets(self, tenant: str, size: int, token: str) -> tuple[list[DatasetSummary], str]:
        """A page of the tenant's datasets that have versions, by name, and the next page's token."""
        after = str(decode_token(token)) if token else ""
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT DISTINCT ON (v.name) {', '.join('v.' + c.strip() for c in _COLUMNS.split(','))}, "
                "d.created_at AS dataset_created_at, "
                "count(*) OVER (PARTITION BY v.name) AS version_count "
                "FROM dataset_versions v JOIN datasets d USING (tenant, name) "
                "WHERE v.tenant = %s AND v.name > %s ORDER BY v.name, v.version DESC LIMIT %s",
                (tenant, after, size + 1))
            rows = await cursor.fetchall()
        summaries = [DatasetSummary(row["name"], row["version_count"], VersionRow.from_row(row),
                                    row["dataset_created_at"]) for row in rows]
        next_token = encode_token(summaries[size - 1].name) if len(summaries) > size else ""
        return summaries[:size], next_token

    # -- delete ---------------------------------------------------------------------------------
    async def delete(self, tenant: str, name: str, version: int, models_using: ModelsUsing) -> int:
        """Delete a finished version that no model's lineage uses; return the objects removed."""
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM dataset_versions WHERE tenant = %s AND name = %s AND version = %s "
                "FOR UPDATE", (tenant, name, version))
            found = await cursor.fetchone()
            if found is None:
                raise NotFound(f"dataset {name} has no version {version}")
            row = VersionRow.from_row(found)
            if row.state == "PENDING":
                raise Conflict(f"dataset {name} version {version} is still being ingested")
            users = await models_using(tenant, name, version)
            if users:
                raise Conflict(f"dataset {name} version {version} is in the lineage of model version(s) "
                               f"{', '.join(users[:5])}{' and more' if len(users) > 5 else ''}")
            await conn.execute("DELETE FROM dataset_versions WHERE id = %s", (row.id,))
        removed = await asyncio.to_thread(self.store.delete_prefix, row.prefix)
        log.info("dataset version deleted", extra={"dataset": name, "version": version, "objects": removed})
        return removed


async def _record_turn(conn, tenant: str) -> None:
    await conn.execute(
        "INSERT INTO dataset_tenant_turns (tenant, last_started_at) VALUES (%s, clock_timestamp()) "
        "ON CONFLICT (tenant) DO UPDATE SET last_started_at = excluded.last_started_at", (tenant,))


async def _admit_bytes(conn, tenant: str, source_bytes: int, bytes_per_day: int) -> None:
    """The ingest bytes quota, counted from the versions themselves (failed ones too: their corpus was taken
    in and built), under a per-tenant lock so two replicas cannot both admit the corpus that passes it.
    429 with Retry-After: the 24-hour window slides, so the same request succeeds later."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('llmp.dataset.ingest-quota:' || %s, 0))",
                       (tenant,))
    cursor = await conn.execute(
        "SELECT coalesce(sum(source_bytes), 0) AS used FROM dataset_versions "
        "WHERE tenant = %s AND created_at > now() - interval '1 day'", (tenant,))
    used = await cursor.fetchone()
    if used["used"] + source_bytes > bytes_per_day:
        raise RateLimited(
            f"ingest bytes quota: tenant {tenant!r} ingested {used['used']} bytes in the last 24 hours; this "
            f"corpus's {source_bytes} would pass LLMP_TENANT_INGEST_BYTES_PER_DAY={bytes_per_day}",
            retry_after=INGEST_RETRY_AFTER)
