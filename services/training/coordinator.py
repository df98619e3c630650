"""The job coordinator: training jobs in PostgreSQL, their state machine, priorities and leases.

How a job moves (every change is one transaction, recorded in the job's event log):

    QUEUED --claim--> RUNNING --finish--> SUCCEEDED | FAILED | CANCELLED
      |                 +--lease expired--> QUEUED (attempt + 1, resumes from its last checkpoint)
      +--cancel--> CANCELLED

Dispatch. A job of `nnodes` nodes has one row per node in `training_job_nodes`, and submitting it
sends `nnodes` Celery messages to the `gpu` queue. A message is a *slot*, not an order: the worker
that receives one claims a free node (`claim`: the tenant served least recently first, then priority
within that tenant), so the broker's FIFO never overrides fairness or priorities, and a message whose
work was taken (or cancelled) is a no-op. Every free
node always has at least one message in flight, so no job starves while workers are idle.

Leases. A claimed node holds a lease that its worker renews with `heartbeat`; the coordinator's
maintenance loop (`reap`) notices a lease that expired (the worker died or lost the network) and
puts the job back in the queue with a new attempt and new messages. The runtime resumes it from its
last complete checkpoint. A worker that lost its lease learns it at its next heartbeat and stops.

Locking. Claims are serialised by a transaction-level advisory lock; every transaction that changes
both a job and its nodes locks the job row first, so claims, cancels and reaps never deadlock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from psycopg.types.json import Jsonb

from services.common import contracts
from services.common.errors import Conflict, InvalidArgument, NotFound, ValidationFailed
from services.common.identity import Caller
from services.training.quotas import TrainingQuotas
from services.training.spec import FleetLimits, JobSpec

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 30.0  # a node's lease; its worker renews it every `RENEWAL_SHARE` of that
RENEWAL_SHARE = 1 / 3
DEFAULT_MAX_ATTEMPTS = 3  # runs a job gets when its workers keep dying; then FAILED
WATCH_POLL_SECONDS = 0.25
_CLAIM_LOCK = 7_212_052  # advisory lock serialising claims (any value unique among llmp's locks)


class JobKind(StrEnum):
    TRAINING = "training"
    EVALUATION = "evaluation"  # evaluation.py: a registered version measured on a dataset split


_NOUN = {JobKind.TRAINING: "training job", JobKind.EVALUATION: "evaluation"}


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# Allowed transitions; every UPDATE of `state` below is guarded by the matching `WHERE state = ...`.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def can_transition(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]


@dataclass(frozen=True)
class Job:
    """A job as stored."""

    id: str
    tenant: str
    state: JobState
    spec: dict[str, Any]  # resolved spec (spec.JobSpec.to_dict())
    priority: int
    idempotency_key: str | None
    model_name: str
    dataset_manifest_key: str
    nnodes: int
    max_steps: int
    step: int
    latest_metrics: dict[str, float]
    metrics_step: int
    environment: dict[str, Any]
    model_version: int | None
    error: str
    cancel_requested: bool
    attempt: int
    lease_seconds: float
    rdzv_endpoint: str | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    kind: JobKind = JobKind.TRAINING

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["id"] = str(row["id"])
        values["state"] = JobState(row["state"])
        values["kind"] = JobKind(row["kind"])
        return cls(**values)

    @property
    def output_prefix(self) -> str:
        """Everything the job writes lives under this S3 prefix (docs/CONTRACTS.md)."""
        return contracts.job_prefix(self.tenant, self.id)

    @property
    def final_prefix(self) -> str:
        return contracts.JobLayout(self.tenant, self.id).final


@dataclass(frozen=True)
class ModelReservation:
    """The registry version a job's final model is uploaded into (ReserveModelVersion's answer)."""

    id: str  # reservation id
    version: int
    prefix: str  # models/{tenant}/{name}/v{version}/
    lease_seconds: float


@dataclass(frozen=True)
class Event:
    """One entry of a job's event log."""

    sequence: int
    job_id: str
    kind: str  # state | progress | metrics | checkpoint
    payload: dict[str, Any]
    created_at: datetime

    @property
    def is_final(self) -> bool:
        return self.kind == "state" and self.payload.get("state") in TERMINAL


@dataclass(frozen=True)
class Assignment:
    """A node of a job that a worker claimed, for one attempt."""

    job: Job
    node_rank: int
    worker: str
    attempt: int

    @property
    def job_id(self) -> str:
        return self.job.id


@dataclass(frozen=True)
class Heartbeat:
    held: bool  # False: the lease is gone (expired and re-queued, or the job ended): stop now
    cancel_requested: bool


@dataclass
class Update:
    """What one runtime event tells the coordinator (see worker.translate_event)."""

    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None  # {"step", "prefix"}
    environment: dict[str, Any] | None = None
    metrics_step: int | None = None  # set: `metrics` are earlier points recorded again (a resumed run's replay)


class Dispatcher(Protocol):
    """Sends the Celery messages that make workers claim a job's nodes (worker.CeleryDispatcher)."""

    def dispatch(self, job_id: str, messages: int) -> None: ...


class KindDispatcher(Protocol):
    """A Dispatcher that also sends evaluation jobs, to their own queue (dispatch.CeleryDispatcher)."""

    def dispatch(self, job_id: str, messages: int, kind: JobKind = JobKind.TRAINING) -> None: ...


# Checks that the spec's dataset version exists, is READY and fits the spec; returns its manifest key.
DatasetCheck = Callable[[Caller, JobSpec], Awaitable[str]]


def resolve_spec(raw: dict[str, Any]) -> JobSpec:
    """Parse and validate a spec dict (ValidationFailed naming the field)."""
    return JobSpec.from_dict(raw)


def spec_digest(spec: dict[str, Any], model_name: str) -> str:
    canonical = json.dumps({"spec": spec, "model_name": model_name}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_job_id(job_id: str, kind: JobKind = JobKind.TRAINING) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except (ValueError, AttributeError, TypeError):
        raise NotFound(f"{_NOUN[kind]} {job_id!r} not found") from None


def _page_token(row: dict[str, Any]) -> str:
    raw = json.dumps([row["created_at"].isoformat(), str(row["id"])]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _parse_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise InvalidArgument("page_token is not a token this service issued") from None


_JOB_COLUMNS = ", ".join(name for name in Job.__dataclass_fields__)


class Coordinator:
    """Every read and write of training jobs; the servicer and the worker both go through it."""

    def __init__(self, db, dispatcher: Dispatcher | None = None, *, check_dataset: DatasetCheck | None = None,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 limits: FleetLimits | None = None, quotas: TrainingQuotas | None = None) -> None:
        self.db = db
        self.limits = limits or FleetLimits()
        self.quotas = quotas or TrainingQuotas()
        self.dispatcher = dispatcher
        self.check_dataset = check_dataset
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts

    # --- API side -------------------------------------------------------------------------------

    async def submit(self, caller: Caller, raw_spec: dict[str, Any], *, idempotency_key: str = "",
                     priority: int = 0, model_name: str = "") -> tuple[Job, bool]:
        """Validate and store a job, then dispatch it. Returns (job, created)."""
        spec = resolve_spec(raw_spec)
        spec.check_fleet(self.limits)
        if not contracts.MIN_PRIORITY <= priority <= contracts.MAX_PRIORITY:
            raise ValidationFailed(f"priority must be between {contracts.MIN_PRIORITY} and {contracts.MAX_PRIORITY}")
        if len(idempotency_key) > contracts.MAX_IDEMPOTENCY_KEY:
            raise ValidationFailed(f"idempotency_key is longer than {contracts.MAX_IDEMPOTENCY_KEY} characters")
        model_name = contracts.validate_name(model_name, "model_name") if model_name else spec.dataset.name
        resolved = spec.to_dict()
        digest = spec_digest(resolved, model_name)
        key = idempotency_key or None
        if key is not None:
            existing = await self._by_idempotency_key(caller.tenant, key, digest)
            if existing is not None:
                return existing, False
        manifest = contracts.dataset_manifest_key(caller.tenant, spec.dataset.name, spec.dataset.version)
        if self.check_dataset is not None:
            manifest = await self.check_dataset(caller, spec)
            resolved = spec.to_dict()  # with what the init_from version decides (architecture, adapter targets)

        job_id = uuid.uuid4()
        async with self.db.transaction() as conn:
            await self.quotas.admit(conn, caller.tenant, spec.distributed.nnodes)
            cursor = await conn.execute(
                f"""INSERT INTO training_jobs (id, tenant, spec, spec_sha256, priority, idempotency_key, model_name,
                                               dataset_manifest_key, nnodes, max_steps, lease_seconds, created_by)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (tenant, idempotency_key) DO NOTHING
                    RETURNING {_JOB_COLUMNS}""",
                (job_id, caller.tenant, Jsonb(resolved), digest, priority, key, model_name, manifest,
                 spec.distributed.nnodes, spec.hyperparameters.max_steps, self.lease_seconds, caller.key_id))
            row = await cursor.fetchone()
            if row is not None:
                await conn.execute(
                    "INSERT INTO training_job_nodes (job_id, node_rank) SELECT %s, generate_series(0, %s - 1)",
                    (job_id, spec.distributed.nnodes))
                await self._event(conn, job_id, "state", {"state": JobState.QUEUED, "reason": "submitted",
                                                          "attempt": 0})
        if row is None:  # a concurrent submit with the same key won the race
            existing = await self._by_idempotency_key(caller.tenant, key, digest)
            assert existing is not None
            return existing, False
        job = Job.from_row(row)
        log.info("job submitted", extra={"job_id": job.id, "priority": priority, "nnodes": job.nnodes})
        await self._dispatch([(job.id, job.nnodes, job.kind)])
        return job, True

    async def submit_evaluation(self, caller: Caller, request: dict[str, Any], *, model_version: int,
                                manifest_key: str, idempotency_key: str = "") -> tuple[Job, bool]:
        """Store an evaluation job (`request` already checked by the service: evaluation.EvaluationRequest)
        and dispatch it to the evaluation queue. Returns (job, created), as `submit`."""
        if len(idempotency_key) > contracts.MAX_IDEMPOTENCY_KEY:
            raise ValidationFailed(f"idempotency_key is longer than {contracts.MAX_IDEMPOTENCY_KEY} characters")
        model_name = request["model"]["name"]
        digest = spec_digest({"evaluation": request}, model_name)
        key = idempotency_key or None
        if key is not None:
            existing = await self._by_idempotency_key(caller.tenant, key, digest)
            if existing is not None:
                return existing, False
        job_id = uuid.uuid4()
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                f"""INSERT INTO training_jobs (id, tenant, kind, spec, spec_sha256, idempotency_key, model_name,
                                               model_version, dataset_manifest_key, nnodes, max_steps,
                                               lease_seconds, created_by)
                    VALUES (%s, %s, 'evaluation', %s, %s, %s, %s, %s, %s, 1, 0, %s, %s)
                    ON CONFLICT (tenant, idempotency_key) DO NOTHING
                    RETURNING {_JOB_COLUMNS}""",
                (job_id, caller.tenant, Jsonb(request), digest, key, model_name, model_version, manifest_key,
                 self.lease_seconds, caller.key_id))
            row = await cursor.fetchone()
            if row is not None:
                await conn.execute("INSERT INTO training_job_nodes (job_id, node_rank) VALUES (%s, 0)", (job_id,))
                await self._event(conn, job_id, "state", {"state": JobState.QUEUED, "reason": "submitted",
                                                          "attempt": 0})
        if row is None:
            existing = await self._by_idempotency_key(caller.tenant, key, digest)
            assert existing is not None
            return existing, False
        job = Job.from_row(row)
        log.info("evaluation submitted", extra={"job_id": job.id, "model": model_name, "version": model_version})
        await self._dispatch([(job.id, 1, job.kind)])
        return job, True

    async def evaluations(self, tenant: str, *, model_name: str = "", model_version: int = 0,
                          page_size: int = 0, page_token: str = "") -> tuple[list[Job], str]:
        """A page of the tenant's evaluations (of one model, one version), newest first."""
        return await self.list(tenant, kind=JobKind.EVALUATION, model_name=model_name, model_version=model_version,
                               page_size=page_size, page_token=page_token)

    async def _by_idempotency_key(self, tenant: str, key: str, digest: str) -> Job | None:
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_JOB_COLUMNS}, spec_sha256 FROM training_jobs WHERE tenant = %s AND idempotency_key = %s",
                (tenant, key))
            row = await cursor.fetchone()
        if row is None:
            return None
        if row["spec_sha256"] != digest:
            raise Conflict(f"idempotency key {key!r} was used for job {row['id']} with a different spec")
        return Job.from_row(row)

    async def get(self, tenant: str, job_id: str, kind: JobKind = JobKind.TRAINING) -> Job:
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM training_jobs WHERE id = %s AND tenant = %s AND kind = %s",
                (parse_job_id(job_id, kind), tenant, kind.value))
            row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"{_NOUN[kind]} {job_id!r} not found")
        return Job.from_row(row)

    async def list(self, tenant: str, *, states: Iterable[JobState] = (), page_size: int = 0,
                   page_token: str = "", kind: JobKind = JobKind.TRAINING, model_name: str = "",
                   model_version: int = 0) -> tuple[list[Job], str]:
        """A page of the tenant's jobs, newest first, and the next page's token ('' on the last)."""
        size = contracts.page_size(page_size)
        conditions, params = ["tenant = %s", "kind = %s"], [tenant, kind.value]
        if model_name:
            conditions.append("model_name = %s")
            params.append(model_name)
        if model_version:
            conditions.append("model_version = %s")
            params.append(model_version)
        wanted = [JobState(state).value for state in states]
        if wanted:
            conditions.append("state = ANY(%s)")
            params.append(wanted)
        if page_token:
            conditions.append("(created_at, id) < (%s, %s)")
            params.extend(_parse_page_token(page_token))
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM training_jobs WHERE {' AND '.join(conditions)} "
                "ORDER BY created_at DESC, id DESC LIMIT %s", (*params, size + 1))
            rows = await cursor.fetchall()
        token = _page_token(rows[size - 1]) if len(rows) > size else ""
        return [Job.from_row(row) for row in rows[:size]], token

    async def cancel(self, tenant: str, job_id: str, kind: JobKind = JobKind.TRAINING) -> Job:
        """Cancel: QUEUED (or RUNNING with no live node) at once; otherwise flag it for its workers."""
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM training_jobs WHERE id = %s AND tenant = %s AND kind = %s FOR UPDATE",
                (parse_job_id(job_id, kind), tenant, kind.value))
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"{_NOUN[kind]} {job_id!r} not found")
            job = Job.from_row(row)
            if job.state == JobState.CANCELLED:
                return job
            if job.state in TERMINAL:
                raise Conflict(f"{_NOUN[kind]} {job_id} already {job.state}; it cannot be cancelled")
            cursor = await conn.execute(
                "SELECT count(*) AS live FROM training_job_nodes WHERE job_id = %s AND worker IS NOT NULL "
                "AND NOT released AND lease_expires_at > now()", (job.id,))
            live = (await cursor.fetchone())["live"]
            if job.state == JobState.QUEUED or live == 0:
                row = await self._set_final(conn, job.id, JobState.CANCELLED, "cancelled on request", job.attempt,
                                            cancel_requested=True)
            else:
                cursor = await conn.execute(
                    f"UPDATE training_jobs SET cancel_requested = true, updated_at = now() WHERE id = %s "
                    f"RETURNING {_JOB_COLUMNS}", (job.id,))
                row = await cursor.fetchone()
        log.info("job cancel requested", extra={"job_id": job_id, "state": row["state"]})
        return Job.from_row(row)

    async def metrics(self, tenant: str, job_id: str) -> dict[str, list[tuple[int, float, datetime]]]:
        """Every metric series of the job: name -> [(step, value, recorded_at)] in step order."""
        job = await self.get(tenant, job_id)
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT name, step, value, recorded_at FROM training_job_metrics WHERE job_id = %s "
                "ORDER BY name, step", (job.id,))
            rows = await cursor.fetchall()
        series: dict[str, list[tuple[int, float, datetime]]] = {}
        for row in rows:
            series.setdefault(row["name"], []).append((row["step"], row["value"], row["recorded_at"]))
        return series

    async def events(self, tenant: str, job_id: str, after_sequence: int = 0, limit: int = 500,
                     kind: JobKind = JobKind.TRAINING) -> list[Event]:
        job = await self.get(tenant, job_id, kind)
        return await self._events_after(job.id, after_sequence, limit)

    async def _events_after(self, job_id: str, after_sequence: int, limit: int = 500) -> list[Event]:
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT sequence, job_id, kind, payload, created_at FROM training_job_events "
                "WHERE job_id = %s AND sequence > %s ORDER BY sequence LIMIT %s", (job_id, after_sequence, limit))
            rows = await cursor.fetchall()
        return [Event(row["sequence"], str(row["job_id"]), row["kind"], row["payload"], row["created_at"])
                for row in rows]

    async def watch(self, tenant: str, job_id: str, after_sequence: int = 0,
                    poll_seconds: float = WATCH_POLL_SECONDS, kind: JobKind = JobKind.TRAINING) -> AsyncIterator[Event]:
        """The job's events after `after_sequence`, then live ones; ends after the final state event."""
        job = await self.get(tenant, job_id, kind)
        cursor = after_sequence
        while True:
            batch = await self._events_after(job.id, cursor)
            for event in batch:
                cursor = event.sequence
                yield event
                if event.is_final:
                    return
            if not batch:
                await asyncio.sleep(poll_seconds)

    # --- maintenance (the server runs `reap` every third of the lease) ------------------------------

    async def reap(self) -> list[str]:
        """Re-queue jobs whose nodes' leases expired; send messages the broker never got.

        Returns the ids of the jobs re-queued (a job past its attempts fails instead; a job with a
        cancel pending is cancelled).
        """
        requeued: list[tuple[str, int, JobKind]] = []
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                f"""SELECT {_JOB_COLUMNS} FROM training_jobs j WHERE state = 'RUNNING' AND EXISTS (
                        SELECT 1 FROM training_job_nodes n WHERE n.job_id = j.id AND n.worker IS NOT NULL
                        AND NOT n.released AND n.lease_expires_at < now())
                    FOR UPDATE SKIP LOCKED""")
            for row in await cursor.fetchall():
                job = Job.from_row(row)
                if job.cancel_requested:
                    await self._set_final(conn, job.id, JobState.CANCELLED, "cancelled on request", job.attempt)
                elif job.attempt >= self.max_attempts:
                    why = f"lost its worker on each of {job.attempt} attempts"
                    await self._set_final(conn, job.id, JobState.FAILED, why, job.attempt, error=why)
                else:
                    await self._requeue(conn, job, "a worker's lease expired; resuming from the last checkpoint")
                    requeued.append((job.id, job.nnodes, job.kind))
            cursor = await conn.execute(
                "SELECT id, nnodes, kind FROM training_jobs WHERE state = 'QUEUED' AND dispatched_at IS NULL "
                "AND NOT (id = ANY(%s)) FOR UPDATE SKIP LOCKED",
                ([uuid.UUID(job_id) for job_id, _, _ in requeued],))
            undispatched = [(str(row["id"]), row["nnodes"], JobKind(row["kind"])) for row in await cursor.fetchall()]
        for job_id, _, _ in requeued:
            log.warning("lease expired, job re-queued", extra={"job_id": job_id})
        await self._dispatch(requeued + undispatched)
        return [job_id for job_id, _, _ in requeued]

    async def _requeue(self, conn, job: Job, reason: str) -> None:
        await conn.execute(
            "UPDATE training_jobs SET state = 'QUEUED', rdzv_endpoint = NULL, dispatched_at = NULL, "
            "updated_at = now() WHERE id = %s", (job.id,))
        await conn.execute(
            "UPDATE training_job_nodes SET worker = NULL, host = NULL, lease_expires_at = NULL, claimed_at = NULL, "
            "released = false WHERE job_id = %s", (job.id,))
        await self._event(conn, job.id, "state", {"state": JobState.QUEUED, "reason": reason, "attempt": job.attempt})

    async def _dispatch(self, jobs: list[tuple[str, int, JobKind]]) -> None:
        if self.dispatcher is None or not jobs:
            return
        for job_id, messages, kind in jobs:
            # A training-only Dispatcher keeps its two-argument form; evaluations name their kind.
            extra = {} if kind == JobKind.TRAINING else {"kind": kind}
            try:
                await asyncio.to_thread(self.dispatcher.dispatch, job_id, messages, **extra)
            except Exception as error:  # broker down: the maintenance loop sends it again
                log.warning("dispatch failed; will retry", extra={"job_id": job_id, "error": str(error)})
                continue
            async with self.db.pool.connection() as conn:
                await conn.execute("UPDATE training_jobs SET dispatched_at = now() WHERE id = %s AND state = 'QUEUED'",
                                   (job_id,))

    # --- worker side ----------------------------------------------------------------------------

    async def claim(self, worker: str, host: str, kind: JobKind = JobKind.TRAINING) -> Assignment | None:
        """Take a free node of a job of `kind`, or None: first the remaining nodes of a job already running (its
        claimed nodes wait for them at the rendezvous), then the tenant served least recently, so one tenant's
        long queue cannot starve another's job; within that tenant, the highest-priority job (oldest first
        among equals)."""
        async with self.db.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CLAIM_LOCK,))
            cursor = await conn.execute(
                """SELECT n.job_id, n.node_rank, j.tenant
                   FROM training_job_nodes n JOIN training_jobs j ON j.id = n.job_id
                   LEFT JOIN training_tenant_turns t ON t.tenant = j.tenant
                   WHERE n.worker IS NULL AND j.state IN ('QUEUED', 'RUNNING') AND NOT j.cancel_requested
                     AND j.kind = %s
                   ORDER BY j.state = 'RUNNING' DESC, t.last_claimed_at NULLS FIRST, j.priority DESC, j.created_at,
                            j.id, n.node_rank LIMIT 1""", (kind.value,))
            candidate = await cursor.fetchone()
            if candidate is None:
                return None
            job_id, node_rank = candidate["job_id"], candidate["node_rank"]
            await conn.execute(
                "INSERT INTO training_tenant_turns (tenant, last_claimed_at) VALUES (%s, clock_timestamp()) "
                "ON CONFLICT (tenant) DO UPDATE SET last_claimed_at = excluded.last_claimed_at", (candidate["tenant"],))
            cursor = await conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM training_jobs WHERE id = %s FOR UPDATE", (job_id,))
            job = Job.from_row(await cursor.fetchone())
            if job.state == JobState.QUEUED:
                cursor = await conn.execute(
                    f"""UPDATE training_jobs SET state = 'RUNNING', attempt = attempt + 1,
                               started_at = coalesce(started_at, now()), updated_at = now()
                        WHERE id = %s RETURNING {_JOB_COLUMNS}""", (job_id,))
                job = Job.from_row(await cursor.fetchone())
                await self._event(conn, job.id, "state", {"state": JobState.RUNNING, "reason": "claimed by a worker",
                                                          "attempt": job.attempt})
            await conn.execute(
                "UPDATE training_job_nodes SET worker = %s, host = %s, claimed_at = now(), released = false, "
                "lease_expires_at = now() + make_interval(secs => %s) WHERE job_id = %s AND node_rank = %s",
                (worker, host, job.lease_seconds, job_id, node_rank))
        log.info("node claimed", extra={"job_id": job.id, "node_rank": node_rank, "attempt": job.attempt,
                                        "worker": worker})
        return Assignment(job=job, node_rank=node_rank, worker=worker, attempt=job.attempt)

    async def heartbeat(self, assignment: Assignment) -> Heartbeat:
        """Renew the node's lease; tells the worker whether it still holds it and whether to cancel."""
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                """UPDATE training_job_nodes n SET lease_expires_at = now() + make_interval(secs => j.lease_seconds)
                   FROM training_jobs j
                   WHERE n.job_id = %s AND n.node_rank = %s AND n.worker = %s AND j.id = n.job_id
                     AND j.attempt = %s AND j.state = 'RUNNING'
                   RETURNING j.cancel_requested""",
                (assignment.job_id, assignment.node_rank, assignment.worker, assignment.attempt))
            row = await cursor.fetchone()
        if row is None:
            return Heartbeat(held=False, cancel_requested=False)
        return Heartbeat(held=True, cancel_requested=row["cancel_requested"])

    async def set_rendezvous(self, assignment: Assignment, endpoint: str) -> None:
        """Node 0 publishes the c10d rendezvous endpoint it hosts for this attempt."""
        async with self.db.pool.connection() as conn:
            await conn.execute("UPDATE training_jobs SET rdzv_endpoint = %s WHERE id = %s AND attempt = %s",
                               (endpoint, assignment.job_id, assignment.attempt))

    async def rendezvous(self, assignment: Assignment) -> str | None:
        """The attempt's rendezvous endpoint once node 0 published it (None before, or if the attempt is over)."""
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT rdzv_endpoint FROM training_jobs WHERE id = %s AND attempt = %s AND state = 'RUNNING'",
                (assignment.job_id, assignment.attempt))
            row = await cursor.fetchone()
        return row["rdzv_endpoint"] if row else None

    async def record(self, assignment: Assignment, updates: list[Update]) -> bool:
        """Store what the runtime reported: progress, metrics, checkpoints, environment.

        Returns False (and stores nothing) when the worker no longer holds the job.
        """
        if not updates:
            return True
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                "SELECT step, metrics_step FROM training_jobs WHERE id = %s AND attempt = %s AND state = 'RUNNING' "
                "FOR UPDATE", (assignment.job_id, assignment.attempt))
            row = await cursor.fetchone()
            if row is None:
                return False
            step, metrics_step, latest, environment = row["step"], row["metrics_step"], {}, None
            for update in updates:
                if update.step is not None and update.step != step:
                    step = update.step
                    await self._event(conn, assignment.job_id, "progress",
                                      {"step": step, "max_steps": assignment.job.max_steps})
                if update.metrics:
                    replayed = update.metrics_step is not None  # earlier points again: idempotent, not the latest
                    at = update.metrics_step if replayed else update.step if update.step is not None else step
                    await conn.cursor().executemany(
                        "INSERT INTO training_job_metrics (job_id, name, step, value) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (job_id, name, step) DO UPDATE SET value = EXCLUDED.value"
                        + ("" if replayed else ", recorded_at = now()"),
                        [(assignment.job_id, name, at, value) for name, value in update.metrics.items()])
                    if not replayed:
                        latest.update(update.metrics)
                        metrics_step = at
                        await self._event(conn, assignment.job_id, "metrics", {"step": at, "values": update.metrics})
                if update.checkpoint is not None:
                    await self._event(conn, assignment.job_id, "checkpoint", update.checkpoint)
                if update.environment is not None:
                    environment = update.environment
            await conn.execute(
                "UPDATE training_jobs SET step = %s, metrics_step = %s, latest_metrics = latest_metrics || %s, "
                "environment = CASE WHEN %s::jsonb IS NULL THEN environment ELSE %s::jsonb END, updated_at = now() "
                "WHERE id = %s",
                (step, metrics_step, Jsonb(latest), Jsonb(environment) if environment is not None else None,
                 Jsonb(environment) if environment is not None else None, assignment.job_id))
        return True

    async def record_reservation(self, assignment: Assignment, reservation: ModelReservation) -> bool:
        """Remember the version the job's final model goes into, before uploading (publish.py); False
        (nothing recorded) when this worker no longer holds the job."""
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE training_jobs SET model_reservation = %s, updated_at = now() "
                "WHERE id = %s AND attempt = %s AND state = 'RUNNING'",
                (Jsonb(dataclasses.asdict(reservation)), assignment.job_id, assignment.attempt))
        return cursor.rowcount == 1

    async def reservation(self, job_id: str) -> ModelReservation | None:
        """The reservation an attempt of the job recorded, if any."""
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute("SELECT model_reservation FROM training_jobs WHERE id = %s",
                                            (job_id,))).fetchone()
        return ModelReservation(**row["model_reservation"]) if row and row["model_reservation"] else None

    async def set_max_steps(self, assignment: Assignment, max_steps: int) -> None:
        """An evaluation learns its size (batches) only once its worker has the data."""
        async with self.db.pool.connection() as conn:
            await conn.execute("UPDATE training_jobs SET max_steps = %s WHERE id = %s AND attempt = %s",
                               (max_steps, assignment.job_id, assignment.attempt))

    async def last_checkpoint(self, job_id: str) -> dict[str, Any] | None:
        """The payload of the job's latest checkpoint event (what an evaluation resumes from), if any."""
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT payload FROM training_job_events WHERE job_id = %s AND kind = 'checkpoint' "
                "ORDER BY sequence DESC LIMIT 1", (job_id,))).fetchone()
        return row["payload"] if row else None

    async def release(self, assignment: Assignment) -> None:
        """This node's torchrun exited cleanly; its lease no longer needs renewing (multi-node jobs)."""
        async with self.db.pool.connection() as conn:
            await conn.execute("UPDATE training_job_nodes SET released = true WHERE job_id = %s AND node_rank = %s "
                               "AND worker = %s", (assignment.job_id, assignment.node_rank, assignment.worker))

    async def finish(self, assignment: Assignment, state: JobState, *, error: str = "",
                     model_version: int | None = None) -> Job | None:
        """Put the job in a final state, if this worker still holds it; None when it does not."""
        if state not in TERMINAL:
            raise ValueError(f"finish needs a final state, not {state}")
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                """SELECT 1 FROM training_jobs j JOIN training_job_nodes n ON n.job_id = j.id
                   WHERE j.id = %s AND j.attempt = %s AND j.state = 'RUNNING' AND n.node_rank = %s AND n.worker = %s
                   FOR UPDATE OF j""",
                (assignment.job_id, assignment.attempt, assignment.node_rank, assignment.worker))
            if await cursor.fetchone() is None:
                return None
            reason = error or {JobState.SUCCEEDED: ("trained and registered" if assignment.job.kind == JobKind.TRAINING
                                                    else "evaluated"),
                               JobState.CANCELLED: "cancelled on request"}.get(state, "")
            row = await self._set_final(conn, assignment.job_id, state, reason, assignment.attempt,
                                        error=error, model_version=model_version)
        log.info("job finished", extra={"job_id": assignment.job_id, "state": state})
        return Job.from_row(row)

    # --- helpers --------------------------------------------------------------------------------

    async def _set_final(self, conn, job_id: str, state: JobState, reason: str, attempt: int, *,
                         error: str = "", model_version: int | None = None,
                         cancel_requested: bool | None = None) -> dict[str, Any]:
        cursor = await conn.execute(
            f"""UPDATE training_jobs SET state = %s, error = %s, model_version = coalesce(%s, model_version),
                       cancel_requested = coalesce(%s, cancel_requested), finished_at = now(), updated_at = now()
                WHERE id = %s RETURNING {_JOB_COLUMNS}""",
            (state.value, error, model_version, cancel_requested, job_id))
        row = await cursor.fetchone()
        await conn.execute("UPDATE training_job_nodes SET released = true WHERE job_id = %s", (job_id,))
        await self._event(conn, job_id, "state", {"state": state, "reason": reason, "attempt": attempt})
        return row

    @staticmethod
    async def _event(conn, job_id, kind: str, payload: dict[str, Any]) -> None:
        await conn.execute("INSERT INTO training_job_events (job_id, kind, payload) VALUES (%s, %s, %s)",
                           (job_id, kind, Jsonb(payload)))


@dataclass
class Lease:
    """What the heartbeats of `kept_lease` heard."""

    lost: bool = False
    cancel_requested: bool = False


@contextlib.asynccontextmanager
async def kept_lease(coordinator: Coordinator, assignment: Assignment) -> AsyncIterator[Lease]:
    """Renews the node's lease every `RENEWAL_SHARE` of it while the block runs, for a worker's work that runs
    for minutes without a loop of its own to renew it (an evaluation fetching the model and datasets and measuring
    contamination in threads; a finished run registering its model): unrenewed, `reap` would hand the job to
    another worker meanwhile."""
    lease = Lease()

    async def beat() -> None:
        while not lease.lost:
            await asyncio.sleep(assignment.job.lease_seconds * RENEWAL_SHARE)
            try:
                heartbeat = await coordinator.heartbeat(assignment)
            except Exception as error:  # the database restarting: the next beat may get through
                log.warning("lease renewal failed", extra={"job_id": assignment.job_id, "error": str(error)})
                continue
            lease.lost, lease.cancel_requested = not heartbeat.held, heartbeat.cancel_requested

    task = asyncio.create_task(beat())
    try:
        yield lease
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
