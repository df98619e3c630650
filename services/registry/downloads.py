"""Streaming a version's artifact out of S3, with its SHA-256 checked as the bytes go by.

A reader thread pulls chunks from S3 ahead of the gRPC stream (bounded by a small queue), so S3 reads
overlap with sending. The digest of what was streamed is compared with the recorded one at the end:
a mismatch fails the call instead of ending it cleanly, so a client never mistakes corrupt bytes for
a complete download (clients verify the SHA-256 of the first message too).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

from services.common import contracts
from services.common.db import Database
from services.common.errors import Internal, NotFound, ValidationFailed
from services.common.s3 import ObjectStore

CHUNK_BYTES = 2 * 1024 * 1024  # per gRPC message (the default client limit is 4 MiB)
PREFETCH = 8  # chunks read ahead of the stream


async def find_artifact(db: Database, tenant: str, name: str, version: int, path: str) -> dict[str, Any]:
    """The stored object for `path` of a READY version: an artifact, or a READY export's file."""
    if not path or path.startswith("/") or ".." in path.split("/"):
        raise ValidationFailed(f"artifact path {path!r} must be relative, without '..'")
    async with db.pool.connection() as conn:
        row = await (await conn.execute(
            """SELECT a.key, a.size, a.sha256 FROM registry_artifacts a JOIN registry_versions v
               USING (tenant, name, version)
               WHERE a.tenant = %s AND a.name = %s AND a.version = %s AND a.path = %s AND v.state = 'READY'""",
            (tenant, name, version, path))).fetchone()
        if row is None and path.startswith(contracts.EXPORTS):
            row = await (await conn.execute(
                """SELECT item->>'key' AS key, (item->>'size')::bigint AS size, item->>'sha256' AS sha256
                   FROM registry_exports e JOIN registry_versions v USING (tenant, name, version),
                        jsonb_array_elements(e.artifacts) AS item
                   WHERE e.tenant = %s AND e.name = %s AND e.version = %s AND e.state = 'READY'
                     AND v.state = 'READY' AND item->>'path' = %s""",
                (tenant, name, version, path))).fetchone()
    if row is None:
        raise NotFound(f"model {name} version {version} has no artifact {path!r}")
    return row


async def stream(store: ObjectStore, key: str, size: int, sha256: str,
                 chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[tuple[int, bytes]]:
    """(offset, bytes) chunks of the object; raises Internal at the end if the bytes do not match."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(PREFETCH)
    stop = False

    def produce() -> None:
        try:
            for chunk in store.iter_chunks(key, chunk_bytes):
                if stop:
                    return
                asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()
        except BaseException as error:  # handed to the consumer, which re-raises it
            if not stop:
                asyncio.run_coroutine_threadsafe(queue.put(error), loop).result()

    loop.run_in_executor(None, produce)
    digest, offset = hashlib.sha256(), 0
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            digest.update(item)
            yield offset, item
            offset += len(item)
    finally:
        stop = True
        while not queue.empty():  # unblock a producer waiting on a full queue; it then sees `stop`
            queue.get_nowait()
    if offset != size or digest.hexdigest() != sha256:
        raise Internal(f"artifact {key} failed verification: streamed {offset} bytes with SHA-256 "
                       f"{digest.hexdigest()}, expected {size} bytes with {sha256}")
