"""Run ingests: spool and check the corpus, reserve the version, build and publish it in the background.

The corpus is streamed to a spool file (never held in memory) and parsed once while the caller waits,
so a bad line or an empty corpus fails the request itself and nothing is created. Then the version is
reserved PENDING (leased to this replica), the corpus stored in S3 beside it, and only then is the
ingest accepted; it is built in a worker thread while watchers follow its progress. A failure of the build
removes the uploaded objects and marks the version FAILED. A new version's corpus counts against its
tenant's ingest bytes per day (`VersionStore.reserve`), shared by every replica through PostgreSQL.

Fair share: a replica runs up to `build_slots` builds at once (they are CPU-bound), at most
`tenant_build_slots` of them one tenant's, so one tenant's many or huge builds never hold every slot. A
version accepted when its tenant has no slot here is queued in PostgreSQL (PENDING, no owner): the first
replica with a slot for that tenant claims it, the tenant whose builds started least recently first
(`VersionStore.claim_expired`), so builds of different tenants interleave across every replica. A replica
looks for queued work when a slot frees, when it queues a version, and at every heartbeat.

Accepted ingests survive the replica: it renews the leases of its builds every `heartbeat_seconds`,
and in the same loop, while it has a free build slot, claims a PENDING version queued or whose lease has
lapsed (its owner stopped or died) and builds it from the stored corpus — same corpus, same options, so the
same content-addressed version. At shutdown a build gets until the grace runs out to finish; one that cannot
is stopped and released, still PENDING, for the next replica. A version whose corpus is not in S3 (reserved by
an older release, or its owner died before storing it) is FAILED with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from services.common import contracts
from services.common.errors import Internal, LlmpError, NotFound, PayloadTooLarge, Unavailable, ValidationFailed
from services.common.periodic import Periodic
from services.dataset import conversations, ingest, model_tokenizers, pipeline
from services.dataset import tokenizer as tokenizers
from services.dataset.options import DatasetOptions, parse_s3_uri
from services.dataset.turns import TenantTurns
from services.dataset.versions import LeaseLost, VersionRow, VersionStore, content_digest

# (version, corpus bytes) -> how to fan its build out over the workers, or None to build it in-process
FanOutFactory = Callable[[VersionRow, int], "pipeline.FanOut | None"]

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between state checks of a version built by another process
LEASE_SECONDS = 60.0  # a PENDING version whose owner has not renewed it for this long is taken over
HEARTBEAT_SECONDS = 10.0  # how often leases are renewed and lapsed versions looked for
MAX_ATTEMPTS = 5  # builds of one version before it is FAILED (a corpus that kills its builder must not loop)
# What a build writes in its work folder, per byte of its corpus, at the peak: split spools, dedup rows, the
# signatures of candidate pairs' records, packed shards (the corpus itself is beside it). Worst case measured:
# one-line documents of ~45 bytes, whose per-document state is largest per byte (an in-process build of 200,000 of
# them, 9.2 MB, peaked at 14.4x, its disk blocks polled every 10 ms; 21.5x when the scan kept every record's
# signature; a fan-out coordinator holds the same merged scan plus one range's archive). Real documents need less.
BUILD_WORK_PER_CORPUS_BYTE = 16.0


def work_dir_bytes(build_slots: int, max_upload_bytes: int) -> int:
    """Disk the dataset service's work folder needs at most: each build slot's corpus and work at the largest upload,
    and one more upload being received. Deployments size the service's volume from it (tests/unit/deploy)."""
    per_build = math.ceil((1 + BUILD_WORK_PER_CORPUS_BYTE) * max_upload_bytes)
    return build_slots * per_build + max_upload_bytes


@dataclass(frozen=True)
class ProgressEvent:
    """Where an ingest is."""

    phase: str  # receive | clean | tokenizer | pack | upload | done | failed | pending (built elsewhere)
    bytes_done: int
    bytes_total: int
    documents_done: int
    state: str  # PENDING | READY | FAILED
    version: VersionRow | None = None  # set on the last event only


class _Stopped(Exception):
    """Raised in the build thread when the build was asked to stop."""


class _Running:
    """An ingest in progress in this process: its task and its latest progress."""

    def __init__(self, tenant: str, total_bytes: int) -> None:
        self.tenant = tenant
        self.progress = ProgressEvent("clean", 0, total_bytes, 0, "PENDING")
        self.changed = asyncio.Condition()
        self.task: asyncio.Task | None = None
        self.stop = threading.Event()  # checked by the build thread at every progress report
        self.released = False  # stopped before the end: the version stays PENDING for another replica

    async def update(self, event: ProgressEvent) -> None:
        async with self.changed:
            self.progress = event
            self.changed.notify_all()

    def cancel(self) -> None:
        self.stop.set()
        if self.task is not None:
            self.task.cancel()


class Ingestor:
    """Creates dataset versions, builds them (its own and those whose owner went away), reports progress."""

    def __init__(self, versions: VersionStore, work_dir: Path, max_upload_bytes: int,
                 shard_tokens: int | None = None, *, lease_seconds: float = LEASE_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 tokenizer_source: model_tokenizers.ResolveTokenizer | None = None,
                 ingest_bytes_per_day: int | None = None, build_slots: int = 1,
                 tenant_build_slots: int | None = None, fanout: FanOutFactory | None = None) -> None:
        self.versions = versions
        self.ingest_bytes_per_day = ingest_bytes_per_day  # LLMP_TENANT_INGEST_BYTES_PER_DAY; None: unbounded
        self.store = versions.store
        self.work_dir = work_dir
        self.max_upload_bytes = max_upload_bytes
        self.shard_tokens = shard_tokens
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.tokenizer_source = tokenizer_source  # tokenizer=model: the registry's answer
        self.fanout = fanout  # (version, corpus bytes) -> the fan-out for a corpus that large, or None: in-process
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"  # this replica, in leases
        self._running: dict[int, _Running] = {}
        # LLMP_DATASET_BUILD_SLOTS builds at once, LLMP_TENANT_DATASET_BUILD_SLOTS of one tenant's, tenants in turn
        self._builds = TenantTurns(build_slots, tenant_build_slots)
        # A round in progress at close is cut: close() itself settles the builds whose leases it renews.
        self._upkeep = Periodic("dataset lease upkeep", heartbeat_seconds, self._keep_leases, first_at_start=True,
                                cancel_at_close=True)
        self._closing = False
        self._resuming = asyncio.Lock()
        self._wakes: set[asyncio.Task] = set()

    def start(self) -> None:
        """Start renewing leases and resuming lapsed versions (the first look is immediate)."""
        self._upkeep.start()

    async def create(self, tenant: str, options: DatasetOptions, chunks: AsyncIterator[bytes],
                     wait: bool = False) -> tuple[VersionRow, bool]:
        """Create (or find) the version for this corpus and options; see the module docstring."""
        options = options.validated()
        artifacts = await self._tokenizer_files(tenant, options)  # a missing model or tokenizer fails now
        self.work_dir.mkdir(parents=True, exist_ok=True)
        spool = Path(tempfile.mkstemp(prefix="corpus-", dir=self.work_dir)[1])
        handed_over = False
        try:
            received = await self._receive(tenant, options, chunks, spool)
            check = await asyncio.to_thread(self._template_check, artifacts, options)
            with open(spool, "rb") as handle:
                await asyncio.to_thread(ingest.validate, handle, options, check)
            digest = content_digest(received.sha256, options)
            # A version is only reserved when it can be built: with S3 away, refuse now (503) rather than
            # accept and fail later.
            await asyncio.to_thread(self.store.check)
            row, created = await self.versions.reserve(tenant, options, digest, received.size, self.owner,
                                                       self.lease_seconds, bytes_per_day=self.ingest_bytes_per_day)
            if created:
                running = _Running(tenant, received.size)
                running.progress = replace(running.progress, phase="receive")
                self._running[row.id] = running  # its lease is renewed from now on
                await self._store_source(row, spool, running)  # accepted only once any replica can rebuild it
                if not self._slot_free(tenant, row.id):
                    # No slot here for it now: queue it in PostgreSQL, where the first replica with a slot for
                    # its tenant takes it in turn, rather than hold it behind this replica's builds.
                    self._running.pop(row.id, None)
                    row = await self.versions.queue(row, self.owner)
                    self._wake()
                    return (await self._follow(row) if wait else row), created
                self._launch(row, running, spool)
                handed_over = True
            elif row.state == "PENDING" and row.id in self._running:
                running = self._running[row.id]
            elif row.state == "PENDING" and wait:  # queued, or built by another replica: follow it there
                return await self._follow(row), created
            else:
                return row, created
            if not wait or running.task is None:
                return row, created
            return await asyncio.shield(running.task), created  # a caller going away does not stop the build
        finally:
            if not handed_over:
                spool.unlink(missing_ok=True)

    def _slot_free(self, tenant: str, version_id: int) -> bool:
        """Whether a build of `tenant` would find a slot here now (the builds this replica holds counted, not
        `version_id`'s own)."""
        counts: dict[str, int] = {}
        for other_id, running in self._running.items():
            if other_id != version_id:
                counts[running.tenant] = counts.get(running.tenant, 0) + 1
        bound = self._builds.per_tenant
        used = sum(min(count, bound) for count in counts.values())
        return used < self._builds.capacity and counts.get(tenant, 0) < bound

    async def _follow(self, row: VersionRow) -> VersionRow:
        """The version once built, by whichever replica takes it; a failed build raises its reason, as a build
        run here does (`wait` answers READY or the build's error, never a FAILED version)."""
        while row.state == "PENDING":
            await asyncio.sleep(POLL_INTERVAL)
            row = await self.versions.get(row.tenant, row.name, row.version)
        if row.state == "FAILED":
            reason = row.error or "the build failed"
            raise (Internal if reason.startswith("internal error") else ValidationFailed)(
                f"dataset {row.name} version {row.version}: {reason}")
        return row

    async def _tokenizer_files(self, tenant: str, options: DatasetOptions) -> list:
        """tokenizer=model: the model version's tokenizer artifacts (none for the other kinds)."""
        if options.tokenizer != "model":
            return []
        if self.tokenizer_source is None:
            raise Unavailable("this dataset service cannot reach the registry for a model's tokenizer")
        return await self.tokenizer_source(tenant, options.tokenizer_model, options.tokenizer_model_version)

    def _template_check(self, artifacts: list, options: DatasetOptions):
        """For conversations and a model's tokenizer: a check that its chat template renders a conversation
        and tells its answers apart (a template may refuse some, e.g. roles that do not alternate), so such a
        line fails the request rather than the build. None otherwise (llmp's own template renders any)."""
        if not (artifacts and options.supervised):
            return None
        folder = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=self.work_dir))
        try:
            loaded = tokenizers.load_model_tokenizer(model_tokenizers.download(self.store, artifacts, folder),
                                                     options.tokenizer_model, options.tokenizer_model_version)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        renderer = conversations.Renderer(loaded.chat_template, loaded.special_tokens)
        return lambda document: renderer.render(conversations.normalised(document.messages))

    async def _store_source(self, row: VersionRow, spool: Path, running: _Running) -> None:
        try:
            await asyncio.to_thread(self.store.upload_file, row.source_key, spool)
        except BaseException as error:
            reason = error.message if isinstance(error, LlmpError) else f"could not store the corpus: {error!r}"
            self._running.pop(row.id, None)
            await asyncio.shield(self.versions.fail(row, reason, self.owner))
            failed = await asyncio.shield(self.versions.get(row.tenant, row.name, row.version))
            await running.update(replace(running.progress, phase="failed", state="FAILED", version=failed))
            raise

    def _launch(self, row: VersionRow, running: _Running, spool: Path | None) -> None:
        running.task = asyncio.create_task(self._build(row, running, spool), name=f"ingest-{row.id}")
        running.task.add_done_callback(_retrieve)

    async def _receive(self, tenant: str, options: DatasetOptions, chunks: AsyncIterator[bytes], spool: Path
                       ) -> ingest.Received:
        if options.source_uri:
            return await asyncio.to_thread(self._fetch, tenant, options.source_uri, spool)
        hasher = _StreamHasher(self.max_upload_bytes)
        with open(spool, "wb") as handle:
            async for chunk in chunks:
                hasher.add(chunk)
                handle.write(chunk)
        return hasher.result()

    def _fetch(self, tenant: str, uri: str, spool: Path) -> ingest.Received:
        """Copy a source object into the spool. Only the tenant's own import prefix of the platform's bucket
        may be read; any other object, present or not, is the same NotFound, before anything about it
        (existence, size) is looked up, so the answer tells nothing about objects the tenant may not read."""
        bucket, key = parse_s3_uri(uri)
        allowed = contracts.import_prefix(tenant)
        missing = NotFound(f"source {uri} not found: a source is an object under s3://{self.store.bucket}/{allowed}")
        if bucket != self.store.bucket or not key.startswith(allowed):
            raise missing
        try:
            size = self.store.stat(key).size
        except NotFound:
            raise missing from None
        if size > self.max_upload_bytes:
            raise PayloadTooLarge(f"source {uri} is {size} bytes, over the limit of {self.max_upload_bytes} bytes")
        with open(spool, "wb") as handle:
            return ingest.receive(self.store.iter_chunks(key), handle, self.max_upload_bytes)

    async def _load_source(self, row: VersionRow) -> Path:
        """The stored corpus of a version taken over from another replica, checked against its digest."""
        if row.attempts > MAX_ATTEMPTS:
            raise Internal(f"ingest abandoned: {MAX_ATTEMPTS} builds of this version were interrupted")
        spool = Path(tempfile.mkstemp(prefix="corpus-", dir=self.work_dir)[1])
        try:
            try:
                stored = await asyncio.to_thread(self.store.download, row.source_key, spool)
            except NotFound:
                raise NotFound(f"ingest interrupted and its corpus is not stored (no s3 object {row.source_key}: "
                               "accepted by an older release, or its replica stopped before storing it); "
                               "create the version again") from None
            if content_digest(stored.sha256, row.options) != row.digest:
                raise Internal(f"the stored corpus {row.source_key} does not match the version's content address")
            # what an interrupted build uploaded goes: the rebuild writes the version's files afresh
            await asyncio.to_thread(self.store.delete_prefix, row.prefix)
        except BaseException:
            spool.unlink(missing_ok=True)
            raise
        return spool

    async def _build(self, row: VersionRow, running: _Running, spool: Path | None) -> VersionRow:
        loop = asyncio.get_running_loop()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"build-{row.id}-", dir=self.work_dir))
        last_report = 0.0

        def report(phase: str, bytes_done: int, documents_done: int) -> None:
            nonlocal last_report
            if running.stop.is_set():
                raise _Stopped
            now = time.monotonic()
            if now - last_report < 0.1 and phase == running.progress.phase:
                return
            last_report = now
            event = ProgressEvent(phase, bytes_done, row.source_bytes, documents_done, "PENDING")
            asyncio.run_coroutine_threadsafe(running.update(event), loop)

        try:
            async with self._builds.held(row.tenant):
                await self._record_turn(row.tenant)
                if spool is None:
                    spool = await self._load_source(row)
                options = {"shard_tokens": self.shard_tokens} if self.shard_tokens else {}
                artifacts = await self._tokenizer_files(row.tenant, row.options)
                if artifacts:
                    options["model_tokenizer"] = await asyncio.to_thread(
                        model_tokenizers.download, self.store, artifacts, work / "model-tokenizer")
                if self.fanout is not None:
                    # in a thread: choosing asks the broker whether any worker consumes the data queue
                    options["fanout"] = await asyncio.to_thread(self.fanout, row, spool.stat().st_size)
                built = await asyncio.to_thread(pipeline.build, spool, row.options, work, report, **options)
                if running.stop.is_set():
                    raise _Stopped
                await running.update(replace(running.progress, phase="upload"))
                ready = await self.versions.publish(row, built, self.owner)
            await running.update(ProgressEvent("done", row.source_bytes, row.source_bytes,
                                               built.cleaning.documents_in, "READY", ready))
            return ready
        except (asyncio.CancelledError, _Stopped, LeaseLost) as error:
            # Not failed: the version stays PENDING and the replica that holds it next builds it.
            running.released = True
            if not isinstance(error, LeaseLost):
                await asyncio.shield(self.versions.release(row, self.owner))
            await running.update(replace(running.progress, phase="pending"))
            raise Unavailable(f"the build of dataset {row.name} version {row.version} stopped on this replica "
                              "before it finished; the version stays PENDING and another replica resumes it",
                              retry_after=int(self.lease_seconds)) from None
        except BaseException as error:
            if isinstance(error, LlmpError):
                reason = error.message
            else:
                reason = f"internal error: {type(error).__name__}"
                log.exception("ingest failed", extra={"dataset": row.name, "version": row.version})
            await asyncio.shield(self.versions.fail(row, reason, self.owner))
            failed = await self.versions.get(row.tenant, row.name, row.version)
            await running.update(replace(running.progress, phase="failed", state="FAILED", version=failed))
            raise
        finally:
            if spool is not None:
                spool.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            self._running.pop(row.id, None)
            self._wake()  # a slot is free: the next queued build need not wait for the heartbeat

    async def _record_turn(self, tenant: str) -> None:
        """Tell every replica this tenant was just served (the order lapsed builds are taken over in). Only an
        ordering hint: a database error here is logged, not a reason to fail the build."""
        try:
            await self.versions.record_turn(tenant)
        except Exception as error:
            log.warning("could not record a dataset build turn: %s", error, extra={"tenant": tenant})

    # -- leases -----------------------------------------------------------------------------------
    async def _keep_leases(self) -> None:
        await self.renew()
        await self._resume_all()

    async def _resume_all(self) -> None:
        async with self._resuming:  # one claimer at a time, so two cannot both count the same free slot
            while await self.resume_one() is not None:  # as many as this replica has free slots for
                pass

    def _wake(self) -> None:
        """Look for queued or lapsed builds now (a slot freed or a build was queued), not at the next beat."""
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._resume_all(), name="dataset resume")
        self._wakes.add(task)
        task.add_done_callback(self._woken)

    def _woken(self, task: asyncio.Task) -> None:
        self._wakes.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the heartbeat tries again
            log.warning("could not look for queued dataset builds: %r", task.exception())

    async def renew(self) -> None:
        """Extend the leases of this replica's builds; stop any build whose version another replica took."""
        ids = list(self._running)
        held = await self.versions.renew(ids, self.owner, self.lease_seconds)
        for version_id in ids:
            running = self._running.get(version_id)
            if version_id not in held and running is not None and not running.stop.is_set():
                log.warning("lost the lease of a dataset build; stopping it", extra={"version_id": version_id})
                running.stop.set()  # the build stops at its next report; `publish` refuses it in any case

    def free_slots(self) -> tuple[int, list[str]]:
        """Build slots a version taken over now would find free here, and the tenants that could not use one
        (at their bound). Counts the builds this replica accepted, started or still waiting for a slot."""
        per_tenant: dict[str, int] = {}
        for running in self._running.values():
            per_tenant[running.tenant] = per_tenant.get(running.tenant, 0) + 1
        bound = self._builds.per_tenant
        used = sum(min(count, bound) for count in per_tenant.values())
        return self._builds.capacity - used, sorted(name for name, count in per_tenant.items() if count >= bound)

    async def resume_one(self) -> VersionRow | None:
        """When this replica has a build slot free, take over one PENDING version whose lease has lapsed, of a
        tenant that can use that slot (the least recently served such tenant: `VersionStore.claim_expired`)."""
        if self._closing:
            return None
        free, full = self.free_slots()
        if free <= 0:
            return None
        row = await self.versions.claim_expired(self.owner, self.lease_seconds, skip_tenants=full)
        if row is None:
            return None
        what = "starting a queued dataset build" if row.attempts == 1 else "resuming an interrupted dataset build"
        log.info(what, extra={"dataset": row.name, "version": row.version, "attempt": row.attempts})
        running = _Running(row.tenant, row.source_bytes)
        self._running[row.id] = running
        self._launch(row, running, None)
        return row

    # -- progress ---------------------------------------------------------------------------------
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
                if running.released:  # stopped here: another replica takes it over
                    break
                yield event
            row = await self.versions.get(tenant, name, version)
        while row.state == "PENDING":  # built by another replica: follow its row
            yield ProgressEvent("pending", 0, row.source_bytes, 0, row.state)
            await asyncio.sleep(POLL_INTERVAL)
            row = await self.versions.get(tenant, name, version)
        yield _final_event(row)

    async def close(self, timeout: float = 0.0) -> None:
        """Stop: builds in flight get `timeout` seconds to finish; those still running then are stopped and
        released, PENDING, for another replica (none is failed for the shutdown)."""
        self._closing = True
        await self._upkeep.close()
        for task in list(self._wakes):
            task.cancel()
        await asyncio.gather(*self._wakes, return_exceptions=True)
        runs = [running for running in self._running.values() if running.task is not None]
        tasks = [running.task for running in runs]
        if tasks and timeout > 0:
            log.info("waiting for dataset builds", extra={"builds": len(tasks), "timeout_s": timeout})
            await asyncio.wait(tasks, timeout=timeout)
        for running in runs:
            if not running.task.done():
                running.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve(task: asyncio.Task) -> None:
    """Done callback: a background build's outcome is in its version row; do not warn about it again."""
    if not task.cancelled():
        task.exception()


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
