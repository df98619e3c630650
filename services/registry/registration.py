"""Atomic registration of model versions, and the sweep that collects what interrupted ones left.

Two ways in, one guarantee: a version is READY only once every object under its own prefix has
matched the size and SHA-256 recorded for it, a SHA-256 computed from the stored bytes by the registry
(reading them back) or by the S3 server (a checksum it enforced on upload), in one transaction.

- **Reserve, upload, commit** (the fast path: the bytes are written once, where they stay):
  `reserve` allocates the next number PENDING and returns the version's prefix and a reservation id;
  the caller uploads the save_pretrained folder straight there (one streamed PUT per file, hashing as
  it sends, the digest sent as the S3 trailing checksum) and renews the reservation while it does;
  `commit` lists the prefix, requires exactly the declared files, checks every object's size and
  SHA-256 (the one the S3 server computed and enforced on upload, else by reading the object back),
  and flips the row to READY with the artifacts.
- **Register from a source prefix** (`register`), for callers that already uploaded elsewhere:

A registration from a source prefix runs in three steps:
1. one short transaction takes the next number from the model's counter row (locked `FOR UPDATE`, so
   concurrent registrations get distinct consecutive numbers) and inserts the version PENDING;
2. every object under the source prefix is copied server-side to `models/{tenant}/{name}/v{n}/` and
   read back to verify its SHA-256 against the one recorded at upload (a heartbeat keeps the
   PENDING row's lease alive meanwhile);
3. one transaction records the artifacts and flips the row to READY, only if it is still PENDING.

Readers only see READY rows, so a registration that dies anywhere before step 3 (or before `commit`)
never shows.
Its PENDING row outlives its heartbeat lease; `sweep` then marks it FAILED and deletes its objects,
and also deletes any object under `models/` that belongs to no PENDING or READY version.
A failed registration's number is not reused (as in MLflow): FAILED rows keep it, hidden from readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import xxhash
from psycopg.types.json import Jsonb

from services.common import contracts
from services.common.db import Database
from services.common.errors import Conflict, Internal, NotFound, ValidationFailed
from services.common.identity import Caller
from services.common.periodic import Periodic
from services.common.s3 import ObjectStore, StoredObject
from services.registry import layout

log = logging.getLogger(__name__)

COPY_PARALLELISM = 4  # objects copied and verified at once
HEARTBEAT_SECONDS = 5.0  # how often a running registration renews its lease
LEASE_SECONDS = 120.0  # a PENDING row whose heartbeat is older than this is abandoned


@dataclass(frozen=True)
class Lineage:
    """What produced a version."""

    dataset_name: str = ""
    dataset_version: int = 0
    training_job_id: str = ""
    code_version: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    parent_name: str = ""
    parent_version: int = 0
    origin: str = ""  # how the version came to be: "imported", or empty for a registration


@dataclass(frozen=True)
class Registration:
    """A request to register the save_pretrained folder at `source_prefix` as a new version."""

    model_name: str
    source_prefix: str
    lineage: Lineage = field(default_factory=Lineage)
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class SweepReport:
    abandoned: int  # PENDING registrations marked FAILED
    collected: int  # FAILED / DELETING versions whose objects were removed
    orphan_objects: int  # objects under models/ deleted because no live version owns them


@dataclass(frozen=True)
class Reservation:
    """A PENDING version handed to a caller that uploads into `prefix` and then commits."""

    name: str
    version: int
    reservation_id: uuid.UUID
    prefix: str
    lease_seconds: float


@dataclass(frozen=True)
class DeclaredArtifact:
    """What the uploader says it stored at `path` (relative to the version prefix)."""

    path: str
    size: int
    sha256: str
    xxh3_128: str = ""  # optional: the uploader's XXH3-128 of the same bytes, from the same pass
    crc32: str = ""  # optional: the uploader's CRC32 of the same bytes, from the same pass


def _validate(request: Registration, tenant: str, *, reserving: bool = False) -> None:
    contracts.validate_name(request.model_name, "model name")
    if not reserving:
        if not request.source_prefix or not request.source_prefix.endswith("/"):
            raise ValidationFailed(
                f"source_prefix {request.source_prefix!r} must be a non-empty S3 prefix ending in '/'")
        allowed = contracts.registrable_prefixes(tenant)
        if not request.source_prefix.startswith(allowed):
            raise ValidationFailed(f"source_prefix must lie under {' or '.join(allowed)} (the caller tenant's "
                                   "job outputs or imports)")
    lineage = request.lineage
    if lineage.dataset_name:
        contracts.validate_name(lineage.dataset_name, "lineage dataset name")
        contracts.validate_version(lineage.dataset_version, "lineage dataset version")
    if lineage.parent_name:
        contracts.validate_name(lineage.parent_name, "lineage parent model name")
        contracts.validate_version(lineage.parent_version, "lineage parent version")
    for key, value in request.metrics.items():
        if not key or value != value:  # NaN is not a metric
            raise ValidationFailed(f"metric {key!r} must have a name and a number")


def _check_folder(paths: Iterable[str], where: str) -> None:
    paths = set(paths)
    if "config.json" not in paths or not any(name in paths for name in layout.WEIGHT_FILES):
        raise ValidationFailed(f"{where} is not a save_pretrained folder: it needs config.json "
                               f"and one of {', '.join(layout.WEIGHT_FILES)}")


def copy_verified(store: ObjectStore, source_key: str, destination_key: str) -> StoredObject:
    """Copy one object server-side, then read the copy back and check its SHA-256 and size.

    The expected digest is the one recorded when the source was uploaded (`ObjectStore` writes it as
    metadata); a source without one is hashed first.
    """
    source = store.stat(source_key)
    expected = source.sha256 or _hash_object(store, source_key)[0]
    store.copy(source_key, destination_key)
    actual, size, fast = _hash_object(store, destination_key)
    if actual != expected or size != source.size:
        raise Internal(f"checksum mismatch copying {source_key}: expected {expected} ({source.size} bytes), "
                       f"stored {actual} ({size} bytes)")
    return StoredObject(destination_key, size, actual, fast)


def verify_in_place(store: ObjectStore, key: str, expected: DeclaredArtifact) -> StoredObject:
    """Check a stored object has the declared size and SHA-256.

    What the registry checks is never only the uploader's word. The S3 server computed a checksum over
    the bytes it received and enforced it on the PUT (`ObjectStore.upload_file`'s trailing checksum,
    reported by a HEAD): its SHA-256 is compared with the declared one; its CRC32 with the declared CRC32,
    which the uploader took in the same pass over the same bytes as the declared SHA-256 and XXH3-128.
    An object stored without either (multipart, other writers, an uploader that declares no CRC32) is
    read back and hashed here.
    """
    attested = store.server_checksums(key)
    if attested.sha256:  # the XXH3-128 is the uploader's, from the pass whose SHA-256 S3 verified
        actual, size, fast = attested.sha256, attested.size, expected.xxh3_128
    elif attested.crc32 and expected.crc32:
        if attested.crc32 != expected.crc32:
            raise Internal(f"checksum mismatch for {key}: declared CRC32 {expected.crc32}, S3 stored {attested.crc32}")
        actual, size, fast = expected.sha256, attested.size, expected.xxh3_128
    else:
        actual, size, fast = _hash_object(store, key)
        if expected.xxh3_128 and expected.xxh3_128 != fast:
            raise Internal(f"checksum mismatch for {key}: declared XXH3-128 {expected.xxh3_128}, stored {fast}")
    if actual != expected.sha256 or size != expected.size:
        raise Internal(f"checksum mismatch for {key}: declared {expected.sha256} ({expected.size} bytes), "
                       f"stored {actual} ({size} bytes)")
    return StoredObject(key, size, actual, fast)


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and all(c in "0123456789abcdef" for c in value)


def _hash_object(store: ObjectStore, key: str) -> tuple[str, int, str]:
    """(SHA-256, size, XXH3-128) of the object as read back."""
    digest, fast, size = hashlib.sha256(), xxhash.xxh3_128(), 0
    for chunk in store.iter_chunks(key):
        digest.update(chunk)
        fast.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size, fast.hexdigest()


async def register(db: Database, store: ObjectStore, caller: Caller, request: Registration, *,
                   heartbeat_seconds: float = HEARTBEAT_SECONDS) -> tuple[str, int]:
    """Register `request` as the next version of its model; returns (name, version), READY."""
    _validate(request, caller.tenant)
    sources = [obj for obj in await asyncio.to_thread(store.list, request.source_prefix)
               if not obj.key.endswith("/")]
    paths = {obj.key[len(request.source_prefix):]: obj for obj in sources}
    if not paths:
        raise NotFound(f"no objects under source prefix {request.source_prefix!r}")
    _check_folder(paths, request.source_prefix)

    tenant, name = caller.tenant, request.model_name
    registration_id = uuid.uuid4()
    version = await _insert_pending(db, caller, request, registration_id)
    log.info("registering", extra={"model": name, "version": version, "objects": len(paths)})

    prefix = contracts.model_version_prefix(tenant, name, version)
    heartbeat = asyncio.create_task(_heartbeat(db, registration_id, heartbeat_seconds))
    try:
        limit = asyncio.Semaphore(COPY_PARALLELISM)

        async def one(path: str) -> tuple[str, StoredObject]:
            async with limit:
                return path, await asyncio.to_thread(copy_verified, store, paths[path].key, prefix + path)

        # Every copy ends before a failure is handled: one still running would write into the prefix
        # after `_abandon` emptied it.
        outcomes = await asyncio.gather(*(one(path) for path in sorted(paths)), return_exceptions=True)
        if failed := next((item for item in outcomes if isinstance(item, BaseException)), None):
            raise failed
        copied = list(outcomes)
        heartbeat.cancel()
        digest = await _mark_ready(db, caller.tenant, name, version, registration_id, copied)
    except BaseException as error:
        heartbeat.cancel()
        await _abandon(db, store, registration_id, prefix, error)
        raise
    log.info("registered", extra={"model": name, "version": version, "digest": digest})
    return name, version


async def reserve(db: Database, caller: Caller, request: Registration,
                  lease_seconds: float = LEASE_SECONDS) -> Reservation:
    """Allocate the next version PENDING (lineage and metrics recorded now) for the caller to upload into."""
    _validate(request, caller.tenant, reserving=True)
    registration_id = uuid.uuid4()
    version = await _insert_pending(db, caller, request, registration_id)
    log.info("reserved", extra={"model": request.model_name, "version": version})
    return Reservation(request.model_name, version, registration_id,
                       contracts.model_version_prefix(caller.tenant, request.model_name, version), lease_seconds)


async def _pending_row(conn, caller: Caller, reservation_id: uuid.UUID, *, committed_ok: bool = False) -> dict:
    row = await (await conn.execute(
        "SELECT name, version, state, prefix, source_prefix FROM registry_versions "
        "WHERE tenant = %s AND registration_id = %s", (caller.tenant, reservation_id))).fetchone()
    if row is None or row["source_prefix"] != "":
        raise NotFound(f"no reservation {reservation_id}")
    if row["state"] != "PENDING" and not (committed_ok and row["state"] == "READY"):
        raise Conflict(f"reservation {reservation_id} of {row['name']} v{row['version']} is {row['state']}, "
                       "not PENDING (abandoned, or already committed)")
    return row


async def renew(db: Database, caller: Caller, reservation_id: uuid.UUID) -> Reservation:
    """Keep a reservation alive while its caller uploads (Conflict once the sweep has abandoned it)."""
    async with db.transaction() as conn:
        row = await _pending_row(conn, caller, reservation_id)
        await conn.execute("UPDATE registry_versions SET heartbeat_at = now() WHERE registration_id = %s",
                           (reservation_id,))
    return Reservation(row["name"], row["version"], reservation_id, row["prefix"], LEASE_SECONDS)


async def commit(db: Database, store: ObjectStore, caller: Caller, reservation_id: uuid.UUID,
                 declared: list[DeclaredArtifact], *, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> tuple[str, int]:
    """Verify every object under the reservation's prefix in place and mark the version READY.

    The prefix must hold exactly the declared files; each must have its declared size and SHA-256
    (`verify_in_place`). Any mismatch fails the version (FAILED, objects collected): the caller reserves again.
    Committing a reservation that is already READY (a retry) returns it as it is.
    """
    async with db.pool.connection() as conn:
        row = await _pending_row(conn, caller, reservation_id, committed_ok=True)
    name, version, prefix = row["name"], row["version"], row["prefix"]
    if row["state"] == "READY":
        return name, version
    heartbeat = asyncio.create_task(_heartbeat(db, reservation_id, heartbeat_seconds))
    try:
        wanted = {}
        for item in declared:
            if not item.path or item.path.startswith("/") or ".." in item.path.split("/") or item.path in wanted:
                raise ValidationFailed(f"artifact path {item.path!r} must be relative, unique, without '..'")
            if not _is_hex(item.sha256, 64) or item.size < 0:
                raise ValidationFailed(f"artifact {item.path!r} needs its size and hex SHA-256")
            if item.xxh3_128 and not _is_hex(item.xxh3_128, 32):
                raise ValidationFailed(f"artifact {item.path!r}: xxh3_128 must be 32 hex digits")
            if item.crc32 and not _is_hex(item.crc32, 8):
                raise ValidationFailed(f"artifact {item.path!r}: crc32 must be 8 hex digits")
            wanted[item.path] = item
        _check_folder(wanted, f"reservation of {name} v{version}")
        stored = {obj.key[len(prefix):] for obj in await asyncio.to_thread(store.list, prefix)}
        if stored != set(wanted):
            raise ValidationFailed(f"{prefix} does not hold exactly the declared files: missing "
                                   f"{sorted(set(wanted) - stored)}, undeclared {sorted(stored - set(wanted))}")
        limit = asyncio.Semaphore(COPY_PARALLELISM)

        async def one(path: str) -> tuple[str, StoredObject]:
            async with limit:
                return path, await asyncio.to_thread(verify_in_place, store, prefix + path, wanted[path])

        verified = await asyncio.gather(*(one(path) for path in sorted(wanted)))
        heartbeat.cancel()
        digest = await _mark_ready(db, caller.tenant, name, version, reservation_id, verified)
    except BaseException as error:
        heartbeat.cancel()
        await _abandon(db, store, reservation_id, prefix, error)
        raise
    log.info("committed", extra={"model": name, "version": version, "digest": digest})
    return name, version


async def _insert_pending(db: Database, caller: Caller, request: Registration, registration_id: uuid.UUID) -> int:
    """Take the model's next number (its counter row locked: gapless, no duplicates) and insert it PENDING.

    A reservation has an empty source_prefix: its objects are uploaded into the version prefix itself.
    """
    tenant, name = caller.tenant, request.model_name
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO registry_models (tenant, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                           (tenant, name))
        row = await (await conn.execute(
            "SELECT next_version FROM registry_models WHERE tenant = %s AND name = %s FOR UPDATE",
            (tenant, name))).fetchone()
        version = row["next_version"]
        await conn.execute("UPDATE registry_models SET next_version = next_version + 1 "
                           "WHERE tenant = %s AND name = %s", (tenant, name))
        lineage = request.lineage
        await conn.execute(
            """INSERT INTO registry_versions (tenant, name, version, state, registration_id, source_prefix, prefix,
                   dataset_name, dataset_version, training_job_id, code_version, environment, parent_name,
                   parent_version, metrics, description, created_by, origin)
               VALUES (%s, %s, %s, 'PENDING', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (tenant, name, version, registration_id, request.source_prefix,
             contracts.model_version_prefix(tenant, name, version), lineage.dataset_name, lineage.dataset_version,
             lineage.training_job_id, lineage.code_version, Jsonb(dict(lineage.environment)), lineage.parent_name,
             lineage.parent_version, Jsonb(dict(request.metrics)), request.description, caller.key_id,
             lineage.origin))
    return version


async def _mark_ready(db: Database, tenant: str, name: str, version: int, registration_id: uuid.UUID,
                      artifacts: list[tuple[str, StoredObject]]) -> str:
    """One transaction: READY (only if still PENDING) with its verified artifacts; returns the content digest."""
    digest = layout.content_digest((path, obj.sha256) for path, obj in artifacts)
    async with db.transaction() as conn:
        updated = await conn.execute(
            "UPDATE registry_versions SET state = 'READY', ready_at = now(), digest = %s "
            "WHERE registration_id = %s AND state = 'PENDING'", (digest, registration_id))
        if updated.rowcount != 1:
            raise Conflict(f"registration of {name} v{version} was abandoned (lease expired) before it finished")
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO registry_artifacts (tenant, name, version, path, key, size, sha256, role, xxh3_128) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(tenant, name, version, path, obj.key, obj.size, obj.sha256, layout.role_of(path), obj.xxh3_128)
                 for path, obj in artifacts])
    return digest


async def _heartbeat(db: Database, registration_id: uuid.UUID, every: float) -> None:
    """Renew the PENDING row's lease. A missed beat is only logged: if the lease runs out, the sweep fails
    the registration and the final transaction refuses to mark it READY."""
    while True:
        await asyncio.sleep(every)
        try:
            async with db.pool.connection() as conn:
                await conn.execute("UPDATE registry_versions SET heartbeat_at = now() "
                                   "WHERE registration_id = %s AND state = 'PENDING'", (registration_id,))
        except Exception as error:  # PostgreSQL briefly unreachable: try again next beat
            log.warning("registration heartbeat failed: %s", error)


async def abandon(db: Database, store: ObjectStore, caller: Caller, reservation_id: uuid.UUID,
                  error: BaseException) -> None:
    """Give up a reservation the caller cannot finish (its upload failed): FAILED with `error`, objects deleted."""
    async with db.pool.connection() as conn:
        row = await _pending_row(conn, caller, reservation_id)
    await _abandon(db, store, reservation_id, row["prefix"], error)


async def _abandon(db: Database, store: ObjectStore, registration_id: uuid.UUID, prefix: str,
                   error: BaseException) -> None:
    """Best effort after a failure we saw: mark FAILED and delete what was copied (the sweep retries)."""
    with contextlib.suppress(Exception):
        async with db.pool.connection() as conn:
            await conn.execute("UPDATE registry_versions SET state = 'FAILED', error = %s "
                               "WHERE registration_id = %s AND state = 'PENDING'",
                               (f"{type(error).__name__}: {error}"[:2000], registration_id))
            row = await (await conn.execute("SELECT state FROM registry_versions WHERE registration_id = %s",
                                            (registration_id,))).fetchone()
        if row is None or row["state"] != "FAILED":  # a concurrent commit of the same reservation won
            return
        await asyncio.to_thread(store.delete_prefix, prefix)
        async with db.pool.connection() as conn:
            await conn.execute("UPDATE registry_versions SET collected_at = now() "
                               "WHERE registration_id = %s AND state = 'FAILED'", (registration_id,))


async def sweep(db: Database, store: ObjectStore, *, lease_seconds: float = LEASE_SECONDS,
                scan_orphans: bool = True) -> SweepReport:
    """Fail abandoned registrations, collect FAILED / DELETING versions' objects, delete orphans."""
    async with db.pool.connection() as conn:
        abandoned = await (await conn.execute(
            """UPDATE registry_versions SET state = 'FAILED',
                      error = 'registration interrupted: no heartbeat for ' || %s || ' s'
               WHERE state = 'PENDING' AND heartbeat_at < now() - make_interval(secs => %s)
               RETURNING tenant, name, version""", (str(lease_seconds), lease_seconds))).fetchall()
        unsettled = await (await conn.execute(
            "SELECT tenant, name, version, state, prefix FROM registry_versions "
            "WHERE state IN ('FAILED', 'DELETING') AND collected_at IS NULL")).fetchall()
    for row in abandoned:
        log.warning("abandoned registration", extra={"model": row["name"], "version": row["version"]})
    for row in unsettled:
        await asyncio.to_thread(store.delete_prefix, row["prefix"])
        async with db.pool.connection() as conn:
            if row["state"] == "DELETING":
                await conn.execute("DELETE FROM registry_versions WHERE tenant = %s AND name = %s AND version = %s "
                                   "AND state = 'DELETING'", (row["tenant"], row["name"], row["version"]))
            else:
                await conn.execute("UPDATE registry_versions SET collected_at = now() WHERE tenant = %s AND "
                                   "name = %s AND version = %s", (row["tenant"], row["name"], row["version"]))
    orphans = await _delete_orphans(db, store) if scan_orphans else 0
    return SweepReport(abandoned=len(abandoned), collected=len(unsettled), orphan_objects=orphans)


async def _delete_orphans(db: Database, store: ObjectStore) -> int:
    """Delete objects under models/ whose version is neither PENDING nor READY (e.g. written by a zombie)."""
    objects = await asyncio.to_thread(store.list, contracts.MODELS)
    owners: dict[tuple[str, str, int], list[str]] = {}
    for obj in objects:
        owner = contracts.parse_model_version_key(obj.key)
        if owner is not None:
            owners.setdefault(owner, []).append(obj.key)
    if not owners:
        return 0
    async with db.pool.connection() as conn:
        live = await (await conn.execute(
            "SELECT tenant, name, version FROM registry_versions WHERE state IN ('PENDING', 'READY') "
            "AND (tenant, name, version) IN (SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]))",
            ([t for t, _, _ in owners], [n for _, n, _ in owners], [v for _, _, v in owners]))).fetchall()
    alive = {(row["tenant"], row["name"], row["version"]) for row in live}
    deleted = 0
    for owner, keys in owners.items():
        if owner in alive:
            continue
        for key in keys:
            await asyncio.to_thread(store.delete, key)
            deleted += 1
        log.warning("deleted orphaned objects",
                    extra={"prefix": contracts.model_version_prefix(*owner), "objects": len(keys)})
    return deleted


def sweeper(db: Database, store: ObjectStore, every: float, lease_seconds: float = LEASE_SECONDS,
            also: Callable[[], Awaitable[object]] | None = None) -> Periodic:
    """The sweep the server runs at start, then every `every` seconds; `also` runs each period too. A sweep
    in progress at shutdown is cut: what it left undone, the next one does."""

    async def round_() -> None:
        report = await sweep(db, store, lease_seconds=lease_seconds)
        if report.abandoned or report.collected or report.orphan_objects:
            log.info("sweep", extra=dataclasses.asdict(report))
        if also is not None:
            await also()

    return Periodic("registry sweep", every, round_, first_at_start=True, cancel_at_close=True)
