"""A real Celery worker process on a real broker runs real `torchrun` jobs: success, cancel, priorities.

The worker is started here (`celery -A services.training.worker worker -Q gpu -c 1`) on an empty
Redis database of its own; jobs are submitted through the coordinator with the Celery dispatcher,
and finished jobs register their model with the real registry service, in-process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from llmp.registry.v1 import registry_pb2

from cli import servers
from services.common.config import Settings
from services.common.db import Database
from services.common.grpc_client import ServiceClients
from services.common.identity import Caller, acting_as, service_principal
from services.common.queues import make_producer
from services.common.s3 import ObjectStore
from services.registry import server as registry_server
from services.training import checkpoints, events, processes
from services.training.checkpoints import JobLayout
from services.training.coordinator import Coordinator, JobState
from services.training.dispatch import CeleryDispatcher

from ...tiny_dataset import upload_dataset
from . import workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
TENANT = "acme"  # the tenant tiny_dataset.write_dataset writes under


# --- a real worker ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker_url(claim_broker) -> str:
    """An empty Redis database of its own (other tests' workers use others), flushed when the session ends."""
    return claim_broker("training-worker")


@pytest.fixture
async def registry_service(settings):
    """The registry service, built but not yet serving (a test starts it late to see the worker wait for it)."""
    registry = await registry_server.build(settings, sweep_seconds=3600)
    yield registry
    await registry.app.stop()


@pytest.fixture
async def registry(registry_service):
    """The registry service, serving where the worker's settings point."""
    await registry_service.app.start()
    return registry_service


@pytest.fixture(scope="module")
def manifest_key(settings, tiny_dataset) -> str:
    store = ObjectStore(settings.s3)
    store.ensure_bucket()
    root, manifest = tiny_dataset
    return upload_dataset(store, root, manifest)


@pytest.fixture
def worker_env(settings_env, broker_url, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMP_")} | settings_env
    env |= {"LLMP_BROKER_URL": broker_url, "LLMP_STATE_DIR": str(tmp_path / "state"), "OMP_NUM_THREADS": "1"}
    return env


@pytest.fixture
def celery_worker(worker_env, tmp_path):
    """A real worker process on the `gpu` queue; stopped (and checked gone) afterwards."""
    with workers.celery_worker(worker_env, tmp_path / "worker.log") as process:
        yield process


@pytest.fixture
async def coordinator(settings, broker_url, manifest_key):
    db = await Database.connect(settings.database_url, component="training",
                                migrations_dir=processes.MIGRATIONS, max_size=4)
    async with db.pool.connection() as conn:
        await conn.execute("TRUNCATE training_jobs CASCADE")
    producer = make_producer(Settings.from_env({**settings.raw, "LLMP_BROKER_URL": broker_url}))

    async def dataset_ready(caller, spec) -> str:
        return manifest_key

    yield Coordinator(db, CeleryDispatcher(producer), check_dataset=dataset_ready, lease_seconds=6)
    producer.close()
    await db.close()


def spec(max_steps: int) -> dict:
    return {"dataset": {"name": "shakespeare", "version": 1},
            "model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "hyperparameters": {"batch_size": 8, "max_steps": max_steps, "learning_rate": 3e-3,
                                "min_learning_rate": 3e-4, "warmup_steps": 2, "eval_interval": 8,
                                "eval_batches": 2, "log_interval": 2, "seed": 7},
            "distributed": {"mode": "ddp", "nproc_per_node": 1}}


CALLER = Caller(tenant=TENANT, key_id="key-7", role="developer")


async def wait_for(coordinator: Coordinator, job_id: str, predicate, timeout: float, worker=None):
    deadline = time.monotonic() + timeout
    while True:
        job = await coordinator.get(TENANT, job_id)
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            tail = servers.log_tail(worker.log_path) if worker is not None else ""
            raise AssertionError(f"job {job_id} still {job.state} (step {job.step}, error {job.error!r}){tail}")
        await asyncio.sleep(0.3)


def job_processes(job_id: str) -> list[psutil.Process]:
    """The job's live processes: those naming it in their command line (the guard, torchrun and its ranks) or
    holding its files open (a warm runtime, started before the job: its log and events), and a warm runtime's
    guard."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(job_id in part for part in process.info["cmdline"] or ()):
                found[process.pid] = process
            elif any(job_id in file.path for file in process.open_files()):
                found[process.pid] = process
                guard = process.parent()
                if guard is not None and "services.training.guard" in guard.cmdline():
                    found[guard.pid] = guard
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_worker_runs_torchrun_to_success_and_registers_the_model(coordinator, celery_worker, registry_service,
                                                                      settings):
    model = f"tiny-{uuid.uuid4().hex[:6]}"
    job, _ = await coordinator.submit(CALLER, spec(max_steps=16), model_name=model)
    # The registry is down when the job ends: the worker waits for it, then registers.
    deadline = time.monotonic() + 300
    while "registry unavailable; retrying" not in celery_worker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, servers.log_tail(celery_worker.log_path)
        await asyncio.sleep(0.2)
    await registry_service.app.start()
    done = await wait_for(coordinator, job.id, lambda j: j.state in {"SUCCEEDED", "FAILED", "CANCELLED"}, 120,
                          celery_worker)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.model_version == 1 and done.step == 16 and done.attempt == 1
    assert done.environment["world_size"] == 1 and "torch" in done.environment
    # A job of one process ran in the worker's warm runtime, imported before the job came (warm.py).
    assert "warm runtime started" in celery_worker.log_path.read_text(errors="replace")
    series = await coordinator.metrics(TENANT, job.id)
    steps = [step for step, _, _ in series["train_loss"]]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    assert series["train_loss"][-1][1] < series["train_loss"][0][1]  # it learned
    assert [step for step, _, _ in series["validation_loss"]] == [8, 16]
    assert "test_perplexity" in series
    # The registry has the version as the job's tenant, with the contract's lineage and metrics.
    clients = ServiceClients(settings, principal=service_principal("training"))
    try:
        with acting_as(CALLER):
            version = (await clients.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(
                name=model, version=1))).version
    finally:
        await clients.close()
    assert version.lineage.training_job_id == job.id and version.lineage.dataset.name == "shakespeare"
    assert version.lineage.dataset.version == 1 and version.lineage.code_version
    assert version.lineage.environment["spec.hyperparameters.max_steps"] == "16"
    assert "test_perplexity" in version.metrics and version.created_by == CALLER.key_id
    # Written once: uploaded straight into the version's prefix (reserve / upload / commit, no copy from
    # a source prefix), nothing under the job's own prefix but checkpoints and metrics.
    store = ObjectStore(settings.s3)
    assert version.source_prefix == "" and version.prefix == f"models/{TENANT}/{model}/v1/"
    assert store.list(JobLayout(TENANT, job.id).final) == []
    stored = {obj.key: obj for obj in store.list(version.prefix)}
    artifacts = {artifact.object.key: artifact.object for artifact in version.artifacts}
    assert stored.keys() == artifacts.keys()
    assert {key[len(version.prefix):] for key in artifacts} >= {"config.json", "model.safetensors", "tokenizer.json"}
    for key, recorded in artifacts.items():  # the digests the upload took are those of the bytes S3 holds
        assert hashlib.sha256(store.get_bytes(key)).hexdigest() == recorded.sha256
        assert stored[key].size == recorded.size
    kinds = [event.kind for event in await coordinator.events(TENANT, job.id)]
    assert kinds[:2] == ["state", "state"] and kinds[-1] == "state" and "checkpoint" in kinds


async def test_cancel_stops_the_process_group_within_seconds_and_frees_the_worker(coordinator, celery_worker):
    long_job, _ = await coordinator.submit(CALLER, spec(max_steps=100_000))
    await wait_for(coordinator, long_job.id, lambda j: j.state == "RUNNING" and j.step >= 2, 240, celery_worker)
    processes = job_processes(long_job.id)
    assert len(processes) >= 2  # the guard and the warm runtime it runs the job in
    started = time.monotonic()
    await coordinator.cancel(TENANT, long_job.id)
    cancelled = await wait_for(coordinator, long_job.id, lambda j: j.state == "CANCELLED", 30, celery_worker)
    elapsed = time.monotonic() - started
    assert cancelled.state == JobState.CANCELLED and elapsed < 15, elapsed
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert job_processes(long_job.id) == []
    # The worker is free: the next job is claimed at once.
    next_job, _ = await coordinator.submit(CALLER, spec(max_steps=2))
    await wait_for(coordinator, next_job.id, lambda j: j.state != "QUEUED", 30, celery_worker)
    await coordinator.cancel(TENANT, next_job.id)
    await wait_for(coordinator, next_job.id, lambda j: j.state in {"CANCELLED", "SUCCEEDED"}, 60, celery_worker)
    print(json.dumps({"cancel_seconds": round(elapsed, 2)}))


async def test_killed_worker_leaves_no_process_and_its_job_resumes_elsewhere(coordinator, worker_env, registry,
                                                                              tmp_path):
    """Kill a worker mid-run: its torchrun tree dies with it, the lease expires, the job is re-dispatched
    and a new worker resumes it from the last checkpoint."""
    job, _ = await coordinator.submit(CALLER, spec(max_steps=160))  # long enough to be killed mid-run, warm
    # The doomed worker runs the job in a warm runtime (what a Celery pool process does), the rescuer under
    # torchrun (what one without a spare does): both stop with their worker, and either resumes the other's.
    runner = ("import asyncio; from services.common.config import Settings; "
              "from services.training import warm; from services.training.processes import NodeRunner; "
              "print(asyncio.run(NodeRunner(Settings.from_env(), '{name}', spare={spare}).run()))")
    with open(tmp_path / "first.log", "ab") as log_file:  # one task, as a Celery pool child runs it
        first = subprocess.Popen([sys.executable, "-c", runner.format(name="doomed", spare="warm.Spare.start()")],
                                 cwd=ROOT, env=worker_env, stdout=log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(e.kind == "checkpoint" for e in await coordinator.events(TENANT, job.id)):
            assert time.monotonic() < deadline and first.poll() is None, servers.log_tail(tmp_path / "first.log")
            await asyncio.sleep(0.3)
        assert any("services.training.warm" in p.cmdline() for p in job_processes(job.id))
    finally:
        first.kill()  # the worker process dies without any cleanup of its own
        first.wait()
    deadline = time.monotonic() + 15
    while job_processes(job.id):
        assert time.monotonic() < deadline, "torchrun outlived its worker"
        await asyncio.sleep(0.2)
    assert (await coordinator.get(TENANT, job.id)).state == JobState.RUNNING
    await asyncio.sleep(6.5)  # the 6 s lease runs out
    assert await coordinator.reap() == [job.id]
    requeued = await coordinator.get(TENANT, job.id)
    assert requeued.state == JobState.QUEUED and requeued.attempt == 1
    second = await asyncio.create_subprocess_exec(  # async: this loop serves the registry meanwhile
        sys.executable, "-c", runner.format(name="rescuer", spare=None), cwd=ROOT, env=worker_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(second.communicate(), 300)
    done = await coordinator.get(TENANT, job.id)
    assert stdout.decode().strip().endswith("succeeded"), done.error + stderr.decode()[-3000:]
    assert done.state == JobState.SUCCEEDED and done.attempt == 2 and done.step == 160
    assert done.environment["resumed_from"] >= 8  # resumed from a checkpoint, not from scratch


async def test_two_node_job_joins_one_c10d_rendezvous(coordinator, worker_env, registry):
    """nnodes=2: two workers (here on one machine) each claim a node and join node 0's c10d rendezvous."""
    job, _ = await coordinator.submit(CALLER, {**spec(max_steps=8), "distributed": {"mode": "ddp", "nnodes": 2}})
    runner = ("import asyncio; from services.common.config import Settings; "
              "from services.training.processes import NodeRunner; "
              "print(asyncio.run(NodeRunner(Settings.from_env(), '{name}').run()))")
    nodes = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", runner.format(name=f"node-{i}"), cwd=ROOT, env=worker_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for i in range(2)]
    results = [await asyncio.wait_for(node.communicate(), 300) for node in nodes]
    outcomes = sorted(stdout.decode().strip().splitlines()[-1] for stdout, _ in results)
    done = await coordinator.get(TENANT, job.id)
    assert outcomes == ["released", "succeeded"], done.error + results[0][1].decode()[-2000:]
    assert done.state == JobState.SUCCEEDED and done.environment["world_size"] == 2
    assert done.rdzv_endpoint and done.step == 8


def kill_spec() -> dict:
    """Two ranks with dropout (so every rank's RNG state matters), checkpoints every 8 of 24 steps."""
    base = spec(max_steps=24)
    return {**base, "model": {**base["model"], "dropout": 0.1},
            "distributed": {"mode": "ddp", "nproc_per_node": 2}}


def exact_series(series: dict[str, list[tuple[int, float, object]]]) -> dict[str, dict[int, str]]:
    """Every metric that does not measure time, as step -> the float's exact bit pattern (float.hex)."""
    return {name: {step: float(value).hex() for step, value, _ in points}
            for name, points in series.items() if name not in {"tokens_per_second", "mfu"}}


async def test_sigkilled_node_resumes_with_losses_bitwise_equal_to_an_uninterrupted_run(coordinator, worker_env,
                                                                                      registry, settings, tmp_path):
    """SIGKILL every process of a node mid-run (worker, guard, torchrun and both training ranks), after the
    step-8 checkpoint and with logged steps past it that are lost: the job resumes elsewhere from step 8 and
    every metric it logs is bit for bit what an uninterrupted job with the same spec logs. The worker is
    stopped (SIGSTOP) at the runtime's first event, so none of the steps it logs up to the checkpoint reach
    PostgreSQL before the kill: the resumed run must record them again from the checkpoint."""
    runner = ("import asyncio; from services.common.config import Settings; "
              "from services.training.processes import NodeRunner; "
              "print(asyncio.run(NodeRunner(Settings.from_env(), '{name}').run()))")

    async def run_node(name: str) -> str:  # async: this loop serves the registry meanwhile
        node = await asyncio.create_subprocess_exec(
            sys.executable, "-c", runner.format(name=name), cwd=ROOT, env=worker_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(node.communicate(), 300)
        return stdout.decode().strip() + stderr.decode()[-3000:]

    reference, _ = await coordinator.submit(CALLER, kill_spec())
    outcome = await run_node("reference")
    assert (await coordinator.get(TENANT, reference.id)).state == JobState.SUCCEEDED, outcome
    expected = exact_series(await coordinator.metrics(TENANT, reference.id))
    assert sorted(expected["train_loss"]) == list(range(2, 25, 2))

    job, _ = await coordinator.submit(CALLER, kill_spec())
    events_path = Path(worker_env["LLMP_STATE_DIR"]) / "training" / job.id / "node-0" / "events-1.jsonl"
    with open(tmp_path / "doomed.log", "ab") as log_file:
        doomed = subprocess.Popen([sys.executable, "-c", runner.format(name="doomed")], cwd=ROOT, env=worker_env,
                                  stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, tail, seen, frozen = time.monotonic() + 240, events.EventTail(events_path), [], False
        while True:  # until a train step is logged past a checkpoint
            seen += tail.read()
            if seen and not frozen:
                os.kill(doomed.pid, signal.SIGSTOP)  # the worker forwards nothing more; its ranks train on
                frozen = True
            checkpointed = [e.step for e in seen if isinstance(e, events.Checkpoint)]
            if checkpointed and any(isinstance(e, events.Train) and e.step > checkpointed[-1] for e in seen):
                break
            assert time.monotonic() < deadline and doomed.poll() is None, servers.log_tail(tmp_path / "doomed.log")
            await asyncio.sleep(0.01)
        tree = psutil.Process(doomed.pid).children(recursive=True)
        ranks = [p for p in tree if "services.training.train" in p.cmdline() and "torch.distributed.run"
                 not in p.cmdline()]
        assert len(ranks) == 2 and len(tree) >= 4, [p.cmdline() for p in tree]  # guard, torchrun, two ranks
        for process in ranks + [p for p in tree if p not in ranks]:
            process.send_signal(signal.SIGKILL)  # the training ranks first: they cannot write another byte
    finally:
        doomed.kill()
        doomed.wait()
    deadline = time.monotonic() + 15
    while job_processes(job.id):
        assert time.monotonic() < deadline, "a process of the killed node survived"
        await asyncio.sleep(0.2)
    before_kill = [e for e in seen + tail.read() if isinstance(e, events.Train)]
    assert before_kill[-1].step < 24 and not any(isinstance(e, events.Finished) for e in seen)
    committed = checkpoints.committed_steps(ObjectStore(settings.s3), JobLayout(TENANT, job.id))
    assert committed and committed[-1] >= 8
    lost = [e.step for e in before_kill if e.step > committed[-1]]
    assert lost, "no logged step was lost: the kill came too late to test anything"
    recorded = {step for step, _, _ in (await coordinator.metrics(TENANT, job.id)).get("train_loss", [])}
    unforwarded = [e.step for e in before_kill if e.step <= committed[-1] and e.step not in recorded]
    assert unforwarded, "every step up to the checkpoint was recorded before the kill: the replay is not tested"
    # What the killed run logged is what the uninterrupted run logged, up to the kill.
    assert {e.step: float(e.loss).hex() for e in before_kill} == {
        step: value for step, value in expected["train_loss"].items() if step <= before_kill[-1].step}

    await asyncio.sleep(6.5)  # the 6 s lease runs out
    assert await coordinator.reap() == [job.id]
    outcome = await run_node("rescuer")
    done = await coordinator.get(TENANT, job.id)
    assert done.state == JobState.SUCCEEDED and done.attempt == 2 and done.step == 24, done.error + outcome
    assert done.environment["resumed_from"] == committed[-1]
    # Every step logged after the resume (the lost ones again, then the rest) and the final metrics, as bits.
    resumed = exact_series(await coordinator.metrics(TENANT, job.id))
    assert resumed["train_loss"] == expected["train_loss"]
    assert resumed == expected
    print(json.dumps({"resumed_from": committed[-1], "lost_steps": lost, "unforwarded_steps": unforwarded}))
