"""A finished job's model registered by reserve / upload / commit against the real registry service:
the bytes go once into the version's prefix, and a job registers one version however its workers die."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from pathlib import Path

import pytest
from llmp.registry.v1 import registry_pb2 as pb

from services.common.db import Database
from services.common.errors import NotFound
from services.common.grpc_client import ServiceClients
from services.common.identity import GATEWAY, Caller, acting_as
from services.common.s3 import ObjectStore
from services.registry import registration
from services.registry import server as registry_server
from services.training import events, processes, publish
from services.training.coordinator import Coordinator, JobState

pytestmark = pytest.mark.integration
SPEC = {"dataset": {"name": "shakespeare", "version": 1},
        "model": {"family": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8},
        "hyperparameters": {"max_steps": 4, "warmup_steps": 0},
        "distributed": {"mode": "ddp", "nproc_per_node": 1}}


@pytest.fixture
async def registry(settings):
    service = await registry_server.build(settings, sweep_seconds=3600)
    await service.app.start()
    yield service
    await service.app.stop()


@pytest.fixture
async def coordinator(settings):
    """The coordinator on the training schema, with one-second leases (a dead worker is noticed at once)."""
    db = await Database.connect(settings.database_url, component="training", migrations_dir=processes.MIGRATIONS,
                                max_size=4)
    async with db.pool.connection() as conn:  # reap() re-queues any job: only this test's may exist
        await conn.execute("TRUNCATE training_jobs CASCADE")

    async def dataset_ready(caller, spec) -> str:
        return "datasets/acme/shakespeare/v1/manifest.json"

    yield Coordinator(db, check_dataset=dataset_ready, lease_seconds=1)
    await db.close()


@pytest.fixture
def caller() -> Caller:
    return Caller(tenant=f"t{uuid.uuid4().hex[:8]}", key_id="key-7", role="developer")


@pytest.fixture
def finished(tmp_path) -> events.Finished:
    """What the runtime reports at the end: a save_pretrained folder (with its tokenizer) on the node's disk."""
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "model.safetensors").write_bytes(uuid.uuid4().bytes * 4096)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    return events.Finished(step=4, final_dir=str(folder), metrics={"test_loss": 1.5, "stopped_early": False})


async def registry_call(settings, caller: Caller, method: str, request):
    """A registry call as `caller` makes it through the gateway (the test looking, or preparing a state)."""
    clients = ServiceClients(settings, principal=GATEWAY)
    try:
        with acting_as(caller):
            return await getattr(clients.registry, method)(request)
    finally:
        await clients.close()


async def versions_of(settings, caller: Caller, model: str) -> list[int]:
    reply = await registry_call(settings, caller, "ListModelVersions", pb.ListModelVersionsRequest(name=model))
    return [version.ref.version for version in reply.versions]


async def next_number(settings, caller: Caller, model: str) -> int:
    """The number the model's next reservation gets (proves which numbers registration consumed)."""
    reply = await registry_call(settings, caller, "ReserveModelVersion", pb.ReserveModelVersionRequest(
        model_name=model))
    return reply.ref.version


async def retried(coordinator: Coordinator, job_id: str):
    """The job's worker died: its lease runs out, the job is re-queued and another worker claims it."""
    await asyncio.sleep(1.5)
    assert await coordinator.reap() == [job_id]
    assignment = await coordinator.claim("rescuer", "host-b")
    assert assignment is not None and assignment.job_id == job_id
    return assignment


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_registration_writes_the_files_once_into_the_version(settings, registry, coordinator, caller, finished):
    model = f"m{uuid.uuid4().hex[:6]}"
    job, _ = await coordinator.submit(caller, SPEC, model_name=model)
    assignment = await coordinator.claim("worker", "host-a")
    assert await publish.register_model(settings, coordinator, assignment, finished) == 1
    version = (await registry_call(settings, caller, "GetModelVersion", pb.GetModelVersionRequest(
        name=model, version=1))).version
    assert version.source_prefix == "" and version.prefix == f"models/{caller.tenant}/{model}/v1/"
    folder = Path(finished.final_dir)
    assert {item.path: item.object.sha256 for item in version.artifacts} == {
        path.name: sha256_of(path) for path in folder.iterdir()}
    store = ObjectStore(settings.s3)
    assert sorted(obj.key for obj in store.list(version.prefix)) == sorted(
        item.object.key for item in version.artifacts)
    assert store.list(f"jobs/{caller.tenant}/") == []  # no copy anywhere else
    assert version.lineage.training_job_id == job.id and version.lineage.dataset.name == "shakespeare"
    assert dict(version.metrics) == {"test_loss": 1.5} and version.description == f"trained by job {job.id}"


async def test_a_worker_dying_mid_upload_leaves_a_reservation_its_retry_completes(
        settings, registry, coordinator, caller, finished, monkeypatch):
    model = f"m{uuid.uuid4().hex[:6]}"
    job, _ = await coordinator.submit(caller, SPEC, model_name=model)
    first = await coordinator.claim("doomed", "host-a")
    upload_file = ObjectStore.upload_file

    def dies_at_the_weights(store, key, path, *args, **kwargs):
        if key.endswith("model.safetensors"):
            raise OSError("the worker died")
        return upload_file(store, key, path, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "upload_file", dies_at_the_weights)
    with pytest.raises(OSError, match="the worker died"):
        await publish.register_model(settings, coordinator, first, finished)
    monkeypatch.undo()
    reservation = await coordinator.reservation(job.id)
    assert reservation is not None and reservation.version == 1
    with pytest.raises(NotFound):  # nothing READY yet
        await registry_call(settings, caller, "GetModelVersion", pb.GetModelVersionRequest(name=model, version=1))

    second = await retried(coordinator, job.id)
    assert second.attempt == 2
    assert await publish.register_model(settings, coordinator, second, finished) == 1
    assert await versions_of(settings, caller, model) == [1]
    assert await next_number(settings, caller, model) == 2  # the retry reserved no other number
    version = (await registry_call(settings, caller, "GetModelVersion", pb.GetModelVersionRequest(
        name=model, version=1))).version
    assert {item.path: item.object.sha256 for item in version.artifacts} == {
        path.name: sha256_of(path) for path in Path(finished.final_dir).iterdir()}


async def test_a_worker_dying_after_the_commit_does_not_register_a_second_version(
        settings, registry, coordinator, caller, finished):
    model = f"m{uuid.uuid4().hex[:6]}"
    job, _ = await coordinator.submit(caller, SPEC, model_name=model)
    first = await coordinator.claim("doomed", "host-a")
    assert await publish.register_model(settings, coordinator, first, finished) == 1
    # ... and the worker dies before it marks the job SUCCEEDED.
    second = await retried(coordinator, job.id)
    assert await publish.register_model(settings, coordinator, second, finished) == 1
    assert await versions_of(settings, caller, model) == [1]
    assert await next_number(settings, caller, model) == 2
    done = await coordinator.finish(second, JobState.SUCCEEDED, model_version=1)
    assert done.state == JobState.SUCCEEDED and done.model_version == 1


async def test_a_reservation_the_registry_gave_up_is_replaced(settings, registry, coordinator, caller, finished,
                                                              monkeypatch):
    model = f"m{uuid.uuid4().hex[:6]}"
    job, _ = await coordinator.submit(caller, SPEC, model_name=model)
    first = await coordinator.claim("doomed", "host-a")
    monkeypatch.setattr(ObjectStore, "upload_file", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("died")))
    with pytest.raises(OSError):
        await publish.register_model(settings, coordinator, first, finished)
    monkeypatch.undo()
    # Nobody renewed it: the registry's sweep fails the reservation (and deletes what it holds).
    assert (await registration.sweep(registry.db, registry.store, lease_seconds=0)).abandoned >= 1

    second = await retried(coordinator, job.id)
    assert await publish.register_model(settings, coordinator, second, finished) == 2
    assert await versions_of(settings, caller, model) == [2]
    assert (await coordinator.reservation(job.id)).version == 2
