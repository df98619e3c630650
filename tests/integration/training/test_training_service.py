"""The training service over gRPC with the real dataset and registry services, a real Celery worker
and real torchrun, on Redis and on RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import grpc
import pytest
from llmp.common.v1 import common_pb2
from llmp.dataset.v1 import dataset_pb2, dataset_pb2_grpc
from llmp.registry.v1 import registry_pb2, registry_pb2_grpc
from llmp.training.v1 import training_pb2 as pb
from llmp.training.v1 import training_pb2_grpc

from cli import servers
from services.common.config import Settings
from services.dataset import server as dataset_server
from services.registry import server as registry_server
from services.training import server as training_server
from tests import identities

from . import workers

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request):
    if request.param == "rabbitmq":
        if not servers.port_open("127.0.0.1", 5672):
            pytest.fail("RabbitMQ is not running on 127.0.0.1:5672")
        return RABBITMQ_URL
    return request.getfixturevalue("own_broker_url")  # an empty Redis database of its own


@pytest.fixture
def env(settings_env, broker_url, tmp_path) -> dict[str, str]:
    return {**settings_env, "LLMP_BROKER_URL": broker_url, "LLMP_STATE_DIR": str(tmp_path / "state")}


@pytest.fixture
async def stack(env):
    """Dataset, registry and training services in-process on the ports `env` names."""
    settings = Settings.from_env(env)
    dataset = await dataset_server.build_app(settings, shard_tokens=20_000)
    registry = await registry_server.build(settings, sweep_seconds=3600)
    training = await training_server.build(settings)
    apps = [dataset, registry.app, training]
    for app in apps:
        await app.start()
    channels = {name: grpc.aio.insecure_channel(settings.service_addrs[name])
                for name in ("dataset", "registry", "training")}
    yield {"dataset": dataset_pb2_grpc.DatasetServiceStub(channels["dataset"]),
           "registry": registry_pb2_grpc.RegistryServiceStub(channels["registry"]),
           "training": training_pb2_grpc.TrainingServiceStub(channels["training"])}
    for channel in channels.values():
        await channel.close()
    for app in reversed(apps):
        await app.stop()


@pytest.fixture
def celery_worker(env, tmp_path):
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMP_")} | env | {"OMP_NUM_THREADS": "1"}
    with workers.celery_worker(worker_env, tmp_path / "worker.log") as process:
        yield process


def caller(tenant: str, service: str = "training") -> tuple[tuple[str, str], ...]:
    return identities.metadata(tenant, service, key_id="key-1")


def job_spec(dataset: str, max_steps: int = 16, **hyper) -> pb.JobSpec:
    return pb.JobSpec(
        dataset=common_pb2.DatasetRef(name=dataset, version=1),
        model=pb.ModelConfig(family="gpt2", n_layer=2, n_head=2, n_embd=64, block_size=32),
        hyperparameters=pb.Hyperparameters(**{"batch_size": 8, "max_steps": max_steps, "learning_rate": 3e-3,
                                              "min_learning_rate": 3e-4, "warmup_steps": 2, "eval_interval": 8,
                                              "eval_batches": 2, "log_interval": 2, "seed": 7, **hyper}),
        distributed=pb.Distributed(mode="ddp", nproc_per_node=1))


async def test_submit_watch_and_register_through_grpc(stack, celery_worker):
    tenant = f"t{uuid.uuid4().hex[:8]}"
    metadata = caller(tenant)
    options = dataset_pb2.DatasetOptions(name="shakespeare", tokenizer=dataset_pb2.TOKENIZER_KIND_CHAR, wait=True)
    corpus = SHAKESPEARE.read_bytes()[:60_000]
    created = await stack["dataset"].CreateDataset(
        iter([dataset_pb2.CreateDatasetRequest(options=options), dataset_pb2.CreateDatasetRequest(chunk=corpus)]),
        metadata=caller(tenant, "dataset"))
    assert created.version.state == dataset_pb2.VERSION_STATE_READY
    training = stack["training"]

    # Refused at submit: a broken spec (naming the field), a missing dataset.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await training.SubmitJob(pb.SubmitJobRequest(spec=job_spec("shakespeare", learning_rate=2.0)),
                                 metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hyperparameters.learning_rate" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await training.SubmitJob(pb.SubmitJobRequest(spec=job_spec("nowhere")), metadata=metadata)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in missing.value.details()

    request = pb.SubmitJobRequest(spec=job_spec("shakespeare"), idempotency_key="k1", model_name="bard")
    submitted = await training.SubmitJob(request, metadata=metadata)
    again = await training.SubmitJob(request, metadata=metadata)
    assert submitted.created and not again.created and again.job.id == submitted.job.id
    assert submitted.job.spec.hyperparameters.beta2 == 0.95  # resolved default shown
    job_id = submitted.job.id

    states, steps = [], []
    async for event in training.WatchJob(pb.WatchJobRequest(id=job_id), metadata=metadata, timeout=300):
        if event.HasField("state_changed"):
            states.append(pb.JobState.Name(event.state_changed.state))
        elif event.HasField("progress"):
            steps.append(event.progress.done)
    assert states == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"], \
        servers.log_tail(celery_worker.log_path)
    assert steps == sorted(steps) and steps[-1] == 16

    job = (await training.GetJob(pb.GetJobRequest(id=job_id), metadata=metadata)).job
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.progress.done == job.progress.total == 16
    assert job.model_version.name == "bard" and job.model_version.version == 1
    assert "train_loss" in job.latest_metrics.values and job.environment.fields["torch"].string_value
    metrics = await training.GetJobMetrics(pb.GetJobMetricsRequest(id=job_id), metadata=metadata)
    assert [point.step for point in metrics.train_loss] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [point.step for point in metrics.validation_loss] == [8, 16]
    assert "test_perplexity" in metrics.final
    version = (await stack["registry"].GetModelVersion(registry_pb2.GetModelVersionRequest(name="bard", version=1),
                                                       metadata=caller(tenant, "registry"))).version
    assert version.lineage.training_job_id == job_id and version.lineage.dataset.name == "shakespeare"
    # Uploaded once, straight into the version's prefix (reserve / upload / commit): no source to copy from.
    assert version.source_prefix == "" and version.prefix == f"models/{tenant}/bard/v1/"
    assert {artifact.path for artifact in version.artifacts} >= {"config.json", "model.safetensors", "tokenizer.json"}

    listed = await training.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_SUCCEEDED]), metadata=metadata)
    assert [j.id for j in listed.jobs] == [job_id]
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await training.GetJob(pb.GetJobRequest(id=job_id), metadata=caller("someone-else"))
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as finished:
        await training.CancelJob(pb.CancelJobRequest(id=job_id), metadata=metadata)
    assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Cancel a running job over gRPC: CANCELLED within seconds.
    long = await training.SubmitJob(pb.SubmitJobRequest(spec=job_spec("shakespeare", max_steps=100_000),
                                                        model_name="bard"), metadata=metadata)
    async for event in training.WatchJob(pb.WatchJobRequest(id=long.job.id), metadata=metadata, timeout=300):
        if event.HasField("progress"):
            break
    started = time.monotonic()
    await training.CancelJob(pb.CancelJobRequest(id=long.job.id), metadata=metadata)
    final = []
    async for event in training.WatchJob(pb.WatchJobRequest(id=long.job.id), metadata=metadata, timeout=60):
        if event.HasField("state_changed"):
            final.append(event.state_changed.state)
    assert final[-1] == pb.JOB_STATE_CANCELLED and time.monotonic() - started < 15
    await asyncio.sleep(0)
