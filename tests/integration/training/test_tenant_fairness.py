"""Training across tenants against a real PostgreSQL: fair claims (one tenant's long queue does not starve
another's job) and the per-tenant quotas on nodes and node-hours, shared by every coordinator replica."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.common.db import Database
from services.common.errors import RateLimited
from services.common.identity import Caller
from services.training import coordinator as coord
from services.training.coordinator import Coordinator, JobState
from services.training.quotas import TrainingQuotas

pytestmark = pytest.mark.integration
MIGRATIONS = Path(coord.__file__).parent / "migrations"


@pytest.fixture
async def db(database_url):
    database = await Database.connect(database_url, component="training", migrations_dir=MIGRATIONS, max_size=4)
    async with database.pool.connection() as conn:  # claims look at every tenant's jobs: an empty queue
        await conn.execute("TRUNCATE training_jobs, training_tenant_turns CASCADE")
    yield database
    await database.close()


def tenant() -> Caller:
    return Caller(tenant=f"t-{uuid.uuid4().hex[:8]}", key_id="key-1", role="developer")


def spec(nnodes: int = 1, nproc_per_node: int = 1) -> dict:
    return {"dataset": {"name": "shakespeare", "version": 1},
            "model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "hyperparameters": {"max_steps": 20, "warmup_steps": 2},
            "distributed": {"nnodes": nnodes, "nproc_per_node": nproc_per_node}}


async def test_one_tenants_ten_jobs_do_not_starve_anothers_single_job(db):
    coordinator = Coordinator(db, quotas=TrainingQuotas(max_nodes=100))
    busy, quiet = tenant(), tenant()
    for _ in range(10):  # queued first, and at a higher priority than the other tenant's job
        await coordinator.submit(busy, spec(), priority=9)
    single, _ = await coordinator.submit(quiet, spec(), priority=0)
    claimed = [await coordinator.claim(f"w{index}", "host") for index in range(3)]
    tenants = [assignment.job.tenant for assignment in claimed]
    # Without fairness the priority-9 queue takes every worker until all ten ran.
    assert quiet.tenant in tenants[:2], tenants
    assert any(assignment.job_id == single.id for assignment in claimed)
    # Within a tenant, priority still decides: the busy tenant's highest-priority, oldest job went first.
    busy_jobs = await coordinator.list(busy.tenant, page_size=20)
    oldest = min(busy_jobs[0], key=lambda job: job.created_at)
    assert oldest.state == JobState.RUNNING


async def test_turns_alternate_between_tenants_with_queues(db):
    coordinator = Coordinator(db, quotas=TrainingQuotas(max_nodes=100))
    first, second = tenant(), tenant()
    for _ in range(3):
        await coordinator.submit(first, spec())
    for _ in range(3):
        await coordinator.submit(second, spec())
    order = [(await coordinator.claim(f"w{index}", "host")).job.tenant for index in range(6)]
    assert order[0::2] == [order[0]] * 3 and order[1::2] == [order[1]] * 3 and order[0] != order[1], order


async def test_a_gang_jobs_remaining_nodes_come_before_other_tenants(db):
    coordinator = Coordinator(db, quotas=TrainingQuotas(max_nodes=100))
    gang, other = tenant(), tenant()
    job, _ = await coordinator.submit(gang, spec(nnodes=2))
    await coordinator.submit(other, spec())
    assert (await coordinator.claim("w0", "host")).job_id == job.id
    assert (await coordinator.claim("w1", "host")).job_id == job.id  # its node 0 waits at the rendezvous


async def test_training_nodes_quota_refuses_past_its_setting_and_frees_when_jobs_end(db):
    quotas = TrainingQuotas(max_nodes=3)
    replicas = Coordinator(db, quotas=quotas), Coordinator(db, quotas=quotas)  # shared through PostgreSQL
    caller, other = tenant(), tenant()
    await replicas[0].submit(caller, spec(nnodes=2))
    with pytest.raises(RateLimited, match="LLMP_TENANT_MAX_TRAINING_NODES=3") as refused:
        await replicas[1].submit(caller, spec(nnodes=2))
    assert refused.value.retry_after and "training nodes quota" in refused.value.message
    await replicas[1].submit(caller, spec(nnodes=1))  # exactly at the limit
    await replicas[1].submit(other, spec(nnodes=3))  # another tenant has its own
    running = await replicas[0].claim("w0", "host")
    await replicas[0].finish(running, JobState.SUCCEEDED)
    await replicas[1].submit(caller, spec(nnodes=1))


async def test_node_hours_quota_counts_wall_time_times_nodes_times_processes(db):
    coordinator = Coordinator(db, quotas=TrainingQuotas(max_nodes=100, node_hours_per_day=10))
    caller = tenant()
    job, _ = await coordinator.submit(caller, spec(nnodes=2, nproc_per_node=2))
    async with db.pool.connection() as conn:  # ran 2 h: 2 h x 2 nodes x 2 processes = 8 node-hours
        await conn.execute("UPDATE training_jobs SET state = 'SUCCEEDED', started_at = now() - interval '3 hours', "
                           "finished_at = now() - interval '1 hour' WHERE id = %s", (job.id,))
    await coordinator.submit(caller, spec())  # 8 < 10
    async with db.pool.connection() as conn:  # ran from 26 h to 21 h ago: only its 3 h inside the window count
        await conn.execute(
            "UPDATE training_jobs SET state = 'FAILED', started_at = now() - interval '26 hours', "
            "finished_at = now() - interval '21 hours' WHERE tenant = %s AND id <> %s", (caller.tenant, job.id))
    with pytest.raises(RateLimited, match="LLMP_TENANT_NODE_HOURS_PER_DAY=10") as refused:
        await coordinator.submit(caller, spec())
    assert "11.0 node-hours" in refused.value.message
