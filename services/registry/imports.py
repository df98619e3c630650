"""Importing a Hugging Face model directory sent as a tar / tar.gz archive.

1. **Unpack while it streams**: the archive's bytes are handed (through a small bounded queue) to a
   thread that reads them with `tarfile` in stream mode and writes each member to a private work
   directory. Memory stays bounded whatever the archive's size; the bytes sent and the bytes unpacked
   are each capped (`PayloadTooLarge`: a gzip bomb stops there too). Links, devices, absolute paths and
   `..` are refused, not skipped: an archive that tries them is not one to trust.
2. **Verify**: `checkpoint_check` runs in a subprocess (torch and transformers never load in the
   registry, and never with remote code): config, weights' names and shapes against the config (meta
   device + safetensors headers, so no memory for the weights), tokenizer, and a real `from_pretrained`
   for small models. A bad archive is `ValidationFailed` with the reason; nothing was reserved or stored.
3. **Store**: only then the model's next version is reserved (PENDING, lineage origin `imported`) and
   returned to the caller, while a background task uploads the files into the version's prefix (each
   PUT hashed as sent, its checksum enforced by S3) and commits them through `registration.commit`, which
   checks every object and records each file's SHA-256 as an artifact: READY, or FAILED with the reason
   and the objects collected (`registration.abandon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from services.common import contracts
from services.common.db import Database
from services.common.errors import NotFound, PayloadTooLarge, ValidationFailed
from services.common.identity import Caller
from services.common.model_transfer import upload_folder
from services.common.s3 import ObjectStore
from services.registry import registration
from services.registry.checkpoint_check import FULL_LOAD_MAX_BYTES

log = logging.getLogger(__name__)

ORIGIN = "imported"
QUEUE_CHUNKS = 8  # archive chunks buffered between the gRPC stream and the unpacking thread
VERIFY_TIMEOUT = 600.0  # seconds the verification subprocess may take
VERIFY_PARALLELISM = 2  # verifications at once (each a Python process with torch)
MEMBER_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Unpacked:
    folder: Path  # the model directory (the archive's single top-level folder, if it had one)
    files: int
    bytes: int
    archive_sha256: str


class _QueueReader:
    """A file-like `read` over chunks put on a queue by the event loop (None ends it)."""

    def __init__(self, chunks: queue.Queue) -> None:
        self.chunks, self.buffer, self.ended = chunks, b"", False

    def read(self, size: int = -1) -> bytes:
        while not self.ended and (size < 0 or len(self.buffer) < size):
            chunk = self.chunks.get()
            if chunk is None:
                self.ended = True
            else:
                self.buffer += chunk
        if size < 0:
            size = len(self.buffer)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


def _member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's path relative to the archive root, or None for the root itself; refuses what could
    write outside the work directory or is not a plain file or folder."""
    name = member.name
    if member.issym() or member.islnk():
        raise ValidationFailed(f"archive member {name!r} is a link: links are not accepted")
    if not (member.isfile() or member.isdir()):
        raise ValidationFailed(f"archive member {name!r} is not a regular file or folder")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValidationFailed(f"archive member {name!r} leaves the model directory (absolute path or '..')")
    parts = [part for part in path.parts if part != "."]
    return PurePosixPath(*parts) if parts else None


def unpack(chunks: queue.Queue, destination: Path, limit: int) -> tuple[int, int]:
    """Unpack the tar / tar.gz stream from `chunks` into `destination`; returns (files, bytes)."""
    reader = _QueueReader(chunks)
    files = unpacked = 0
    seen: set[PurePosixPath] = set()
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as archive:
            for member in archive:
                relative = _member_path(member)
                if relative is None or member.isdir():
                    continue
                if relative in seen:
                    raise ValidationFailed(f"archive member {member.name!r} appears twice")
                seen.add(relative)
                unpacked += member.size
                if unpacked > limit:
                    raise PayloadTooLarge(f"the archive unpacks to more than the limit of {limit} bytes")
                target = destination.joinpath(*relative.parts)
                if target.parent.exists() and not target.parent.is_dir() or target.is_dir():
                    raise ValidationFailed(f"archive member {member.name!r} clashes with another member")
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                with open(target, "wb") as handle:
                    while data := source.read(MEMBER_CHUNK):
                        handle.write(data)
                files += 1
    except tarfile.TarError as error:
        raise ValidationFailed(f"the body is not a tar or tar.gz archive: {error}") from None
    except (EOFError, OSError, ValueError) as error:  # truncated gzip, a corrupt stream
        raise ValidationFailed(f"the archive is truncated or corrupt: {error}") from None
    if files == 0:
        raise ValidationFailed("the archive holds no files")
    return files, unpacked


def model_root(folder: Path) -> Path:
    """The directory holding config.json: the archive's root, or its one top-level folder."""
    entries = list(folder.iterdir())
    if not (folder / "config.json").exists() and len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


async def receive(chunks: AsyncIterator[bytes], work: Path, limit: int) -> Unpacked:
    """Unpack the streamed archive into `work` as it arrives (at most `limit` bytes sent and unpacked)."""
    pipe: queue.Queue = queue.Queue(QUEUE_CHUNKS)
    unpacking = asyncio.ensure_future(asyncio.to_thread(unpack, pipe, work, limit))
    digest, sent = hashlib.sha256(), 0

    async def feed(item: bytes | None) -> bool:
        """Put `item` on the queue unless the unpacker has stopped (it refused the archive)."""
        while not unpacking.done():
            try:
                pipe.put_nowait(item)
                return True
            except queue.Full:
                await asyncio.wait({unpacking}, timeout=0.01)
        return False

    try:
        async for chunk in chunks:
            sent += len(chunk)
            if sent > limit:
                raise PayloadTooLarge(f"the archive exceeds the import limit of {limit} bytes")
            digest.update(chunk)
            if not await feed(chunk):
                break
        else:
            await feed(None)
        files, unpacked = await unpacking
    except BaseException:
        # Unblock the reader so the thread ends: it stops at the first None it reads. The queue may be full of
        # chunks it has yet to read, so keep offering one until it is done; a single try on a full queue left
        # the thread waiting in get() forever and this call with it (an import over the limit hung).
        with contextlib.suppress(BaseException):
            while not unpacking.done():
                with contextlib.suppress(queue.Full):
                    pipe.put_nowait(None)
                await asyncio.wait({unpacking}, timeout=0.01)
            await unpacking
        raise
    return Unpacked(model_root(work), files, unpacked, digest.hexdigest())


async def verify(folder: Path, full_load_max_bytes: int = FULL_LOAD_MAX_BYTES) -> dict[str, Any]:
    """Run `checkpoint_check` on `folder` in a subprocess; ValidationFailed with its reason on a bad one."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.registry.checkpoint_check", str(folder), str(full_load_max_bytes),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(process.communicate(), VERIFY_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise ValidationFailed(f"the checkpoint could not be verified (exit {process.returncode}): "
                               f"{' | '.join(tail)}") from None
    if not result.get("ok"):
        raise ValidationFailed(f"the checkpoint was refused: {result.get('reason')}")
    return result


class Imports:
    """Imports in progress: receive and verify in the call, store in the background."""

    def __init__(self, db: Database, store: ObjectStore, max_bytes: int, *, work_root: Path | None = None,
                 full_load_max_bytes: int = FULL_LOAD_MAX_BYTES) -> None:
        self.db, self.store, self.max_bytes = db, store, max_bytes
        self.work_root = work_root
        self.full_load_max_bytes = full_load_max_bytes
        self.verifying = asyncio.Semaphore(VERIFY_PARALLELISM)
        self.tasks: set[asyncio.Task] = set()

    def remove_leftovers(self) -> int:
        """Delete the work folders a previous registry process left (it died mid-import: those imports'
        reservations lapse and the sweep fails them). The work root belongs to one registry process."""
        if self.work_root is None or not self.work_root.is_dir():
            return 0
        stale = [path for path in self.work_root.glob("llmp-import-*") if path.is_dir()]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    async def start(self, caller: Caller, model_name: str, description: str,
                    chunks: AsyncIterator[bytes]) -> registration.Reservation:
        """Receive and verify the archive, then reserve its version and store it in the background."""
        contracts.validate_name(model_name, "model name")  # before a byte is unpacked
        if self.work_root is not None:
            self.work_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="llmp-import-", dir=self.work_root))
        try:
            unpacked = await receive(chunks, work, self.max_bytes)
            async with self.verifying:
                checked = await verify(unpacked.folder, self.full_load_max_bytes)
            environment = {"architecture": checked["architecture"], "model_type": checked["model_type"],
                           "parameters": str(checked["parameters"]), "files": str(unpacked.files),
                           "bytes": str(unpacked.bytes), "archive_sha256": unpacked.archive_sha256}
            reservation = await registration.reserve(self.db, caller, registration.Registration(
                model_name, "", registration.Lineage(environment=environment, origin=ORIGIN),
                description=description))
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, work, True)
            raise
        log.info("import verified", extra={"model": model_name, "version": reservation.version, **environment})
        task = asyncio.create_task(self._store(caller, reservation, unpacked.folder, work))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return reservation

    async def _store(self, caller: Caller, reservation: registration.Reservation, folder: Path, work: Path) -> None:
        """Upload the verified files into the version's prefix and commit them (READY), else FAILED."""
        try:
            try:
                declared = await upload_folder(
                    self.store, reservation.prefix, folder,
                    renew=lambda: registration.renew(self.db, caller, reservation.reservation_id),
                    renew_every=reservation.lease_seconds / 4)
            except BaseException as error:
                await registration.abandon(self.db, self.store, caller, reservation.reservation_id, error)
                raise
            await registration.commit(self.db, self.store, caller, reservation.reservation_id, [
                registration.DeclaredArtifact(item.path, item.size, item.sha256, item.xxh3_128, item.crc32)
                for item in declared])
            log.info("imported", extra={"model": reservation.name, "version": reservation.version})
        except Exception as error:  # recorded on the version (FAILED with the reason); the task just ends
            log.warning("import failed", extra={"model": reservation.name, "version": reservation.version,
                                                "error": str(error)})
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def status(self, tenant: str, name: str, version: int) -> dict[str, Any]:
        """An imported version's row, whatever its state."""
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT name, version, state, error, environment, created_at FROM registry_versions "
                "WHERE tenant = %s AND name = %s AND version = %s AND origin = %s AND state <> 'DELETING'",
                (tenant, name, version, ORIGIN))).fetchone()
        if row is None:
            raise NotFound(f"model {name} has no import with version {version}")
        return row

    async def close(self) -> None:
        """Stop background stores; their reservations lapse and the sweep collects them."""
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
