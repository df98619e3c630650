"""The coordinator against a real PostgreSQL: idempotent submit, the state machine, priorities, leases."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from services.common.db import Database
from services.common.errors import Conflict, InvalidArgument, NotFound, ValidationFailed
from services.common.identity import Caller
from services.training import coordinator as coord
from services.training.coordinator import Coordinator, JobState, Update

pytestmark = pytest.mark.integration
MIGRATIONS = Path(coord.__file__).parent / "migrations"


class RecordingDispatcher:
    """Records what would be sent to the broker (the worker tests use a real broker)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.fail = False

    def dispatch(self, job_id: str, messages: int) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((job_id, messages))


async def refuse_missing_dataset(caller: Caller, spec) -> str:
    if spec.dataset.name == "missing":
        raise ValidationFailed("dataset missing v1 does not exist")
    return f"datasets/{caller.tenant}/{spec.dataset.name}/v{spec.dataset.version}/manifest.json"


@pytest.fixture
async def db(database_url):
    database = await Database.connect(database_url, component="training", migrations_dir=MIGRATIONS, max_size=4)
    # Claims look at every tenant's jobs: start each test from an empty queue.
    async with database.pool.connection() as conn:
        await conn.execute("TRUNCATE training_jobs CASCADE")
    yield database
    await database.close()


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
def coordinator(db, dispatcher) -> Coordinator:
    return Coordinator(db, dispatcher, check_dataset=refuse_missing_dataset, lease_seconds=30)


@pytest.fixture
def caller() -> Caller:
    return Caller(tenant=f"t-{uuid.uuid4().hex[:8]}", key_id="key-1", role="developer")


def spec(**hyperparameters) -> dict:
    return {"dataset": {"name": "shakespeare", "version": 1},
            "model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "hyperparameters": {"max_steps": 20, "warmup_steps": 2, **hyperparameters}}


async def test_submit_stores_resolved_spec_and_dispatches(coordinator, dispatcher, caller):
    job, created = await coordinator.submit(caller, spec(), priority=5)
    assert created and job.state == JobState.QUEUED and job.priority == 5
    assert job.spec["hyperparameters"]["learning_rate"] == 6e-4  # default filled in
    assert job.model_name == "shakespeare" and job.max_steps == 20 and job.nnodes == 1
    assert job.output_prefix == f"jobs/{caller.tenant}/{job.id}/"
    assert job.dataset_manifest_key == f"datasets/{caller.tenant}/shakespeare/v1/manifest.json"
    assert dispatcher.sent == [(job.id, 1)]
    events = await coordinator.events(caller.tenant, job.id)
    assert [(e.kind, e.payload["state"]) for e in events] == [("state", "QUEUED")]


async def test_invalid_spec_is_refused_naming_the_field(coordinator, dispatcher, caller):
    with pytest.raises(ValidationFailed, match="hyperparameters.learning_rate"):
        await coordinator.submit(caller, spec(learning_rate=-1))
    with pytest.raises(ValidationFailed, match="dataset missing"):
        await coordinator.submit(caller, {**spec(), "dataset": {"name": "missing", "version": 1}})
    with pytest.raises(ValidationFailed, match="priority"):
        await coordinator.submit(caller, spec(), priority=5000)
    assert dispatcher.sent == []
    jobs, _ = await coordinator.list(caller.tenant)
    assert jobs == []


async def test_idempotency_key_same_spec_same_job_different_spec_conflict(coordinator, dispatcher, caller):
    first, created = await coordinator.submit(caller, spec(), idempotency_key="abc")
    again, created_again = await coordinator.submit(caller, spec(), idempotency_key="abc")
    assert created and not created_again and again.id == first.id
    with pytest.raises(Conflict, match="different spec"):
        await coordinator.submit(caller, spec(max_steps=21), idempotency_key="abc")
    other_tenant = Caller(tenant=caller.tenant + "-b", key_id="k", role="developer")
    theirs, created_theirs = await coordinator.submit(other_tenant, spec(), idempotency_key="abc")
    assert created_theirs and theirs.id != first.id
    assert dispatcher.sent == [(first.id, 1), (theirs.id, 1)]


async def test_concurrent_submits_with_one_key_make_one_job(coordinator, caller):
    results = await asyncio.gather(*(coordinator.submit(caller, spec(), idempotency_key="race") for _ in range(4)))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_tenants_do_not_see_each_other(coordinator, caller):
    job, _ = await coordinator.submit(caller, spec())
    with pytest.raises(NotFound):
        await coordinator.get("someone-else", job.id)
    with pytest.raises(NotFound):
        await coordinator.cancel("someone-else", job.id)
    with pytest.raises(NotFound):
        await coordinator.get(caller.tenant, "not-a-uuid")


async def test_list_pages_newest_first_and_filters_by_state(coordinator, caller):
    ids = [(await coordinator.submit(caller, spec()))[0].id for _ in range(5)]
    page, token = await coordinator.list(caller.tenant, page_size=2)
    seen = [job.id for job in page]
    while token:
        page, token = await coordinator.list(caller.tenant, page_size=2, page_token=token)
        seen += [job.id for job in page]
    assert seen == ids[::-1]
    await coordinator.cancel(caller.tenant, ids[0])
    cancelled, _ = await coordinator.list(caller.tenant, states=[JobState.CANCELLED])
    assert [job.id for job in cancelled] == [ids[0]]
    with pytest.raises(InvalidArgument):
        await coordinator.list(caller.tenant, page_token="garbage")


async def test_claims_follow_priority_then_submission_order(coordinator, caller):
    low, _ = await coordinator.submit(caller, spec(), priority=-1)
    first, _ = await coordinator.submit(caller, spec(), priority=0)
    high, _ = await coordinator.submit(caller, spec(), priority=10)
    second, _ = await coordinator.submit(caller, spec(), priority=0)
    order = [(await coordinator.claim(f"w{i}", "host")).job_id for i in range(4)]
    assert order == [high.id, first.id, second.id, low.id]
    assert await coordinator.claim("w5", "host") is None  # every node taken: a message is a no-op


async def test_run_to_success_records_progress_metrics_and_events(coordinator, caller):
    job, _ = await coordinator.submit(caller, spec())
    assignment = await coordinator.claim("w", "host")
    assert assignment.attempt == 1 and assignment.job.state == JobState.RUNNING
    assert await coordinator.record(assignment, [
        Update(environment={"device": "cpu", "torch": "2.x"}),
        Update(step=10, metrics={"train_loss": 3.5, "learning_rate": 1e-4}),
        Update(step=20, metrics={"train_loss": 2.5, "validation_loss": 2.7}),
        Update(checkpoint={"step": 20, "prefix": "jobs/x/checkpoints/step-20/"}),
    ])
    done = await coordinator.finish(assignment, JobState.SUCCEEDED, model_version=3)
    assert done.state == JobState.SUCCEEDED and done.model_version == 3 and done.finished_at is not None
    assert done.step == 20 and done.latest_metrics == {"train_loss": 2.5, "learning_rate": 1e-4,
                                                        "validation_loss": 2.7}
    assert done.environment == {"device": "cpu", "torch": "2.x"}
    series = await coordinator.metrics(caller.tenant, job.id)
    assert [(step, value) for step, value, _ in series["train_loss"]] == [(10, 3.5), (20, 2.5)]
    kinds = [(e.kind, e.payload.get("state")) for e in await coordinator.events(caller.tenant, job.id)]
    assert kinds == [("state", "QUEUED"), ("state", "RUNNING"), ("progress", None), ("metrics", None),
                     ("progress", None), ("metrics", None), ("checkpoint", None), ("state", "SUCCEEDED")]
    # A final job takes no more transitions.
    assert await coordinator.finish(assignment, JobState.FAILED, error="late") is None
    with pytest.raises(Conflict):
        await coordinator.cancel(caller.tenant, job.id)


async def test_cancel_queued_is_immediate_and_its_message_becomes_a_no_op(coordinator, caller):
    job, _ = await coordinator.submit(caller, spec())
    cancelled = await coordinator.cancel(caller.tenant, job.id)
    assert cancelled.state == JobState.CANCELLED and cancelled.cancel_requested
    assert await coordinator.claim("w", "host") is None
    assert (await coordinator.cancel(caller.tenant, job.id)).state == JobState.CANCELLED  # idempotent


async def test_cancel_running_flags_the_worker_which_then_finishes(coordinator, caller):
    job, _ = await coordinator.submit(caller, spec())
    assignment = await coordinator.claim("w", "host")
    flagged = await coordinator.cancel(caller.tenant, job.id)
    assert flagged.state == JobState.RUNNING and flagged.cancel_requested
    beat = await coordinator.heartbeat(assignment)
    assert beat.held and beat.cancel_requested
    final = await coordinator.finish(assignment, JobState.CANCELLED)
    assert final.state == JobState.CANCELLED


async def test_expired_lease_requeues_with_a_new_attempt_and_fences_the_old_worker(db, dispatcher, caller):
    coordinator = Coordinator(db, dispatcher, lease_seconds=0.5)
    job, _ = await coordinator.submit(caller, spec())
    old = await coordinator.claim("dead-worker", "host")
    assert (await coordinator.heartbeat(old)).held
    await asyncio.sleep(0.8)
    dispatcher.sent.clear()
    assert await coordinator.reap() == [job.id]
    assert (await coordinator.get(caller.tenant, job.id)).state == JobState.QUEUED
    assert dispatcher.sent == [(job.id, 1)]  # dispatched again
    new = await coordinator.claim("new-worker", "host")
    assert new.job_id == job.id and new.attempt == 2
    # The old worker is fenced: it cannot renew, record or finish.
    assert not (await coordinator.heartbeat(old)).held
    assert not await coordinator.record(old, [Update(step=5)])
    assert await coordinator.finish(old, JobState.SUCCEEDED) is None
    assert (await coordinator.heartbeat(new)).held
    reasons = [e.payload["reason"] for e in await coordinator.events(caller.tenant, job.id) if e.kind == "state"]
    assert any("lease expired" in reason for reason in reasons)


async def test_renewed_lease_is_not_reaped(db, dispatcher, caller):
    coordinator = Coordinator(db, dispatcher, lease_seconds=0.6)
    await coordinator.submit(caller, spec())
    assignment = await coordinator.claim("w", "host")
    for _ in range(4):
        await asyncio.sleep(0.25)
        assert (await coordinator.heartbeat(assignment)).held
    assert await coordinator.reap() == []


async def test_job_fails_after_max_attempts_of_lost_workers(db, dispatcher, caller):
    coordinator = Coordinator(db, dispatcher, lease_seconds=0.2, max_attempts=2)
    job, _ = await coordinator.submit(caller, spec())
    for _ in range(2):
        assert await coordinator.claim("w", "host") is not None
        await asyncio.sleep(0.35)
        await coordinator.reap()
    final = await coordinator.get(caller.tenant, job.id)
    assert final.state == JobState.FAILED and "2 attempts" in final.error


async def test_undispatched_job_is_sent_by_the_maintenance_pass(coordinator, dispatcher, caller):
    dispatcher.fail = True
    job, _ = await coordinator.submit(caller, spec())  # broker down: stored, not lost
    dispatcher.fail = False
    assert await coordinator.reap() == []
    assert dispatcher.sent == [(job.id, 1)]
    await coordinator.reap()
    assert dispatcher.sent == [(job.id, 1)]  # sent once, not on every pass


async def test_multi_node_job_has_one_claimable_node_per_message(coordinator, dispatcher, caller):
    job, _ = await coordinator.submit(caller, {**spec(), "distributed": {"nnodes": 2}})
    assert dispatcher.sent == [(job.id, 2)]
    zero, one = await coordinator.claim("a", "h1"), await coordinator.claim("b", "h2")
    assert {zero.node_rank, one.node_rank} == {0, 1} and zero.attempt == one.attempt == 1
    assert await coordinator.rendezvous(one) is None
    await coordinator.set_rendezvous(zero, "h1:29400")
    assert await coordinator.rendezvous(one) == "h1:29400"


async def test_watch_streams_events_until_the_final_state(coordinator, caller):
    job, _ = await coordinator.submit(caller, spec())
    assignment = await coordinator.claim("w", "host")

    async def drive():
        await asyncio.sleep(0.3)
        await coordinator.record(assignment, [Update(step=5, metrics={"train_loss": 4.0})])
        await coordinator.finish(assignment, JobState.FAILED, error="boom")

    driver = asyncio.create_task(drive())
    seen = [event async for event in coordinator.watch(caller.tenant, job.id, poll_seconds=0.05)]
    await driver
    assert [e.kind for e in seen] == ["state", "state", "progress", "metrics", "state"]
    assert seen[-1].payload == {"state": "FAILED", "reason": "boom", "attempt": 1}
    resumed = [e async for e in coordinator.watch(caller.tenant, job.id, after_sequence=seen[2].sequence)]
    assert [e.sequence for e in resumed] == [e.sequence for e in seen[3:]]
