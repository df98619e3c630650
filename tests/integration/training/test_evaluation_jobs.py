"""Evaluation jobs in the coordinator against a real PostgreSQL: their own kind and queue, kept apart from
training jobs, idempotent, resumed from their recorded sums after their worker is lost, and kept by a worker
whose preparation outlasts the lease."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from services.common.db import Database
from services.common.errors import Conflict, NotFound
from services.common.identity import Caller
from services.training import coordinator as coord
from services.training.coordinator import Coordinator, JobKind, JobState, Update, kept_lease
from services.training.evaluation import Sums

pytestmark = pytest.mark.integration
MIGRATIONS = Path(coord.__file__).parent / "migrations"


class KindRecorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, str]] = []

    def dispatch(self, job_id: str, messages: int, kind: str = "training") -> None:
        self.sent.append((job_id, messages, kind))


@pytest.fixture
async def db(database_url):
    database = await Database.connect(database_url, component="training", migrations_dir=MIGRATIONS, max_size=4)
    async with database.pool.connection() as conn:
        await conn.execute("TRUNCATE training_jobs CASCADE")
    yield database
    await database.close()


@pytest.fixture
def caller() -> Caller:
    return Caller(tenant=f"t-{uuid.uuid4().hex[:8]}", key_id="key-1", role="developer")


REQUEST = {"model": {"name": "m", "version": 2}, "dataset": {"name": "external", "version": 1}, "split": "test"}


async def submit(coordinator: Coordinator, caller: Caller, key: str = "", request: dict = REQUEST):
    return await coordinator.submit_evaluation(caller, request, model_version=request["model"]["version"],
                                               manifest_key="datasets/x/external/v1/manifest.json",
                                               idempotency_key=key)


async def test_evaluations_have_their_own_kind_queue_and_listing(db, caller):
    dispatcher = KindRecorder()
    coordinator = Coordinator(db, dispatcher)
    job, created = await submit(coordinator, caller, key="k")
    again, created_again = await submit(coordinator, caller, key="k")
    assert created and not created_again and again.id == job.id
    with pytest.raises(Conflict):
        await submit(coordinator, caller, key="k", request={**REQUEST, "split": "all"})
    assert dispatcher.sent == [(job.id, 1, JobKind.EVALUATION)]
    assert job.kind == JobKind.EVALUATION and job.model_name == "m" and job.model_version == 2

    # Invisible as a training job, and never claimed by a training worker.
    with pytest.raises(NotFound):
        await coordinator.get(caller.tenant, job.id)
    assert (await coordinator.list(caller.tenant))[0] == []
    assert await coordinator.claim("gpu-worker", "host") is None
    listed, _ = await coordinator.evaluations(caller.tenant, model_name="m", model_version=2)
    assert [e.id for e in listed] == [job.id]
    assert (await coordinator.evaluations(caller.tenant, model_name="m", model_version=1))[0] == []
    assert (await coordinator.claim("eval-worker", "host", JobKind.EVALUATION)).job_id == job.id


async def test_a_lost_evaluation_is_dispatched_again_and_resumes_from_its_sums(db, caller):
    dispatcher = KindRecorder()
    coordinator = Coordinator(db, dispatcher, lease_seconds=0.5)
    job, _ = await submit(coordinator, caller)
    old = await coordinator.claim("dead", "host", JobKind.EVALUATION)
    sums = Sums(batches=3, tokens=10, loss=12.5, correct=4)
    assert await coordinator.record(old, [Update(step=3, checkpoint={"step": 3, "sums": sums.as_dict()})])
    await asyncio.sleep(0.8)
    dispatcher.sent.clear()
    assert await coordinator.reap() == [job.id]
    assert dispatcher.sent == [(job.id, 1, JobKind.EVALUATION)]  # back on the eval queue
    new = await coordinator.claim("alive", "host", JobKind.EVALUATION)
    assert new.attempt == 2 and Sums.from_dict((await coordinator.last_checkpoint(job.id))["sums"]) == sums
    assert await coordinator.record(new, [Update(step=5, metrics={"loss": 1.0})])
    done = await coordinator.finish(new, JobState.SUCCEEDED, model_version=2)
    assert done.state == JobState.SUCCEEDED and done.latest_metrics == {"loss": 1.0}
    cancelled, _ = await submit(coordinator, caller, request={**REQUEST, "split": "validation"})
    assert (await coordinator.cancel(caller.tenant, cancelled.id, JobKind.EVALUATION)).state == JobState.CANCELLED


async def test_a_preparation_longer_than_the_lease_keeps_the_job_and_hears_a_cancel(db, caller):
    coordinator = Coordinator(db, KindRecorder(), lease_seconds=1.2)
    reaped: list[str] = []

    async def reaper() -> None:  # what the training server runs every third of the lease
        while True:
            reaped.extend(await coordinator.reap())
            await asyncio.sleep(0.1)

    task = asyncio.create_task(reaper())
    try:
        job, _ = await submit(coordinator, caller)
        slow = await coordinator.claim("slow", "host", JobKind.EVALUATION)
        async with kept_lease(coordinator, slow) as lease:
            await asyncio.to_thread(time.sleep, 4.0)  # fetching and measuring in a thread: over three leases
        assert reaped == [] and not lease.lost and not lease.cancel_requested
        await coordinator.cancel(caller.tenant, job.id, JobKind.EVALUATION)
        async with kept_lease(coordinator, slow) as lease:
            await asyncio.to_thread(time.sleep, 1.0)
        assert lease.cancel_requested and not lease.lost

        # The same wait unrenewed: the reaper hands the job back to the queue, and the worker hears it lost.
        other, _ = await submit(coordinator, caller, request={**REQUEST, "split": "validation"})
        unrenewed = await coordinator.claim("slow", "host", JobKind.EVALUATION)
        assert unrenewed.job_id == other.id
        await asyncio.to_thread(time.sleep, 3.0)
        assert reaped == [other.id]
        async with kept_lease(coordinator, unrenewed) as lease:
            await asyncio.sleep(1.0)
        assert lease.lost
    finally:
        task.cancel()
