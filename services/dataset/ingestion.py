"""Run ingests: spool and check the corpus, reserve the version, build and publish it in the background.

The corpus is streamed to a spool file (never held in memory) and parsed once while the caller waits,
so a bad line or an empty corpus fails the request itself and nothing is created. Then the version is
reserved PENDING and built in a worker thread (one build at a time: it is CPU-bound); watchers follow
its progress. A failure at any point after the reservation removes the uploaded objects and marks the
version FAILED.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from services.common.config import S3Settings
from services.common.errors import LlmpError, NotFound, PayloadTooLarge
from services.common.s3 import ObjectStore
from services.dataset import ingest, pipeline
from services.dataset.options import DatasetOptions, parse_s3_uri
from services.dataset.versions import VersionRow, VersionStore, content_digest

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between state checks of a version built by another process


@dataclass(frozen=True)
class ProgressEvent:
    """Where an ingest is."""

    phase: str  # receive | clean | tokenizer | pack | upload | done | failed
    bytes_done: int
    bytes_total: int
    documents_done: int
    state: str  # PENDING | READY | FAILED
    version: VersionRow | None = None  # set on the last event only


class _Running:
    """An ingest in progress in this process: its task and its latest progress."""

    def __init__(self, total_bytes: int) -> None:
        self.progress = ProgressEvent("clean", 0, total_bytes, 0, "PENDING")
        self.changed = asyncio.Condition()
        self.task: asyncio.Task | None = None

    async def update(self, event: ProgressEvent) -> None:
        async with self.changed:
            self.progress = event
            self.changed.notify_all()


class Ingestor:
    """Creates dataset versions and reports their progress."""

    def __init__(self, versions: VersionStore, s3: S3Settings, work_dir: Path, max_upload_bytes: int,
                 shard_tokens: int | None = None) -> None:
        self.versions = versions
        self.store = versions.store
        self.s3 = s3
        self.work_dir = work_dir
        self.max_upload_bytes = max_upload_bytes
        self.shard_tokens = shard_tokens
        self._running: dict[int, _Running] = {}
        self._builds = asyncio.Semaphore(1)

    async def create(self, tenant: str, options: DatasetOptions, chunks: AsyncIterator[bytes],
                     wait: bool = False) -> tuple[VersionRow, bool]:
        """Create (or find) the version for this corpus and options; see the module docstring."""
        options = options.validated()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        spool = Path(tempfile.mkstemp(prefix="corpus-", dir=self.work_dir)[1])
        handed_over = False
        try:
            received = await self._receive(options, chunks, spool)
            with open(spool, "rb") as handle:
                await asyncio.to_thread(ingest.validate, handle, options)
            digest = content_digest(received.sha256, options)
            # A version is only reserved when it can be built: with S3 away, refuse now (503) rather than
            # accept and fail later.
            await asyncio.to_thread(self.store.check)
            row, created = await self.versions.reserve(tenant, options, digest, received.size)
            if created:
                running = _Running(received.size)
                self._running[row.id] = running
                running.task = asyncio.create_task(self._build(row, spool, running), name=f"ingest-{row.id}")
                handed_over = True
            elif row.state == "PENDING" and row.id in self._running:
                running = self._running[row.id]
            else:
                return row, created
            if not wait:
                return row, created
            return await asyncio.shield(running.task), created  # a caller going away does not stop the build
        finally:
            if not handed_over:
                spool.unlink(missing_ok=True)

    async def _receive(self, options: DatasetOptions, chunks: AsyncIterator[bytes], spool: Path) -> ingest.Received:
        if options.source_uri:
            bucket, key = parse_s3_uri(options.source_uri)
            return await asyncio.to_thread(self._fetch, bucket, key, spool)
        hasher = _StreamHasher(self.max_upload_bytes)
        with open(spool, "wb") as handle:
            async for chunk in chunks:
                hasher.add(chunk)
                handle.write(chunk)
        return hasher.result()

    def _fetch(self, bucket: str, key: str, spool: Path) -> ingest.Received:
        """Copy an S3 object of the configured server into the spool."""
        source = self.store if bucket == self.store.bucket else ObjectStore(replace(self.s3, bucket=bucket))
        try:
            size = source.stat(key).size
        except NotFound:
            raise NotFound(f"source s3://{bucket}/{key} not found") from None
        if size > self.max_upload_bytes:
            raise PayloadTooLarge(f"source s3://{bucket}/{key} is {size} bytes, over the limit of "
                                  f"{self.max_upload_bytes} bytes")
        with open(spool, "wb") as handle:
            return ingest.receive(source.iter_chunks(key), handle, self.max_upload_bytes)

    async def _build(self, row: VersionRow, spool: Path, running: _Running) -> VersionRow:
        loop = asyncio.get_running_loop()
        work = Path(tempfile.mkdtemp(prefix=f"build-{row.id}-", dir=self.work_dir))
        last_report = 0.0

        def report(phase: str, bytes_done: int, documents_done: int) -> None:
            nonlocal last_report
            now = time.monotonic()
            if now - last_report < 0.1 and phase == running.progress.phase:
                return
            last_report = now
            event = ProgressEvent(phase, bytes_done, row.source_bytes, documents_done, "PENDING")
            asyncio.run_coroutine_threadsafe(running.update(event), loop)

        try:
            async with self._builds:
                options = {"shard_tokens": self.shard_tokens} if self.shard_tokens else {}
                built = await asyncio.to_thread(pipeline.build, spool, row.options, work, report, **options)
                await running.update(replace(running.progress, phase="upload"))
                ready = await self.versions.publish(row, built)
            await running.update(ProgressEvent("done", row.source_bytes, row.source_bytes,
                                               built.cleaning.documents_in, "READY", ready))
            return ready
        except BaseException as error:
            if isinstance(error, LlmpError):
                reason = error.message
            elif isinstance(error, asyncio.CancelledError):
                reason = "ingest cancelled: the dataset service stopped"
            else:
                reason = f"internal error: {type(error).__name__}"
            if not isinstance(error, (LlmpError, asyncio.CancelledError)):
                log.exception("ingest failed", extra={"dataset": row.name, "version": row.version})
            await asyncio.shield(self.versions.fail(row, reason))
            failed = await self.versions.get(row.tenant, row.name, row.version)
            await running.update(replace(running.progress, phase="failed", state="FAILED", version=failed))
            raise
        finally:
            spool.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            self._running.pop(row.id, None)

    async def watch(self, tenant: str, name: str, version: int) -> AsyncIterator[ProgressEvent]:
        """Progress events of a version until it is READY or FAILED (the last event carries it)."""
        row = await self.versions.get(tenant, name, version)
        running = self._running.get(row.id)
        if row.state == "PENDING" and running is not None:
            last = None
            while True:
                async with running.changed:
                    if running.progress is last:
                        await running.changed.wait()
                    event = running.progress
                last = event
                if event.version is not None:
                    yield event
                    return
                yield event
        while row.state == "PENDING":  # built by another replica: follow its row
            yield ProgressEvent("pending", 0, row.source_bytes, 0, row.state)
            await asyncio.sleep(POLL_INTERVAL)
            row = await self.versions.get(tenant, name, version)
        yield _final_event(row)

    async def close(self) -> None:
        """Stop in-flight builds; their versions are failed (objects removed) before this returns."""
        tasks = [running.task for running in self._running.values() if running.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _final_event(row: VersionRow) -> ProgressEvent:
    done = row.stats.get("cleaning", {}).get("documents_in", 0)
    phase = "done" if row.state == "READY" else "failed"
    return ProgressEvent(phase, row.source_bytes, row.source_bytes, done, row.state, row)


class _StreamHasher:
    """Counts and hashes streamed chunks, refusing more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.digest = hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise PayloadTooLarge(f"corpus exceeds the upload limit of {self.limit} bytes")
        self.digest.update(chunk)

    def result(self) -> ingest.Received:
        return ingest.Received(self.size, self.digest.hexdigest())
