"""Fine-tune submissions over HTTP: a dataset tokenized otherwise than its `init_from` version is a 422
naming both, a missing version a 422 naming it, and neither leaves a job behind. The gateway, dataset,
registry and training services run in-process on real PostgreSQL and SeaweedFS; the base is a random
Llama-style GQA checkpoint registered directly into the registry with a tokenizer trained here."""

from __future__ import annotations

import grpc
import pytest
from llmp.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common import model_transfer, topology
from services.common.config import Settings
from services.common.s3 import ObjectStore
from services.registry import server as registry_server
from services.training import server as training_server
from tests import identities
from tests.tiny_checkpoints import write_checkpoint
from tests.tiny_dataset import write_dataset

pytestmark = pytest.mark.integration


@pytest.fixture
async def services(gateway, settings_env):
    settings = Settings.from_env(settings_env)
    registry = await registry_server.build(settings, sweep_seconds=3600)
    training = await training_server.build(settings)
    await registry.app.start(settings.listen_addr(topology.REGISTRY))
    await training.start(settings.listen_addr(topology.TRAINING))
    channel = grpc.aio.insecure_channel(settings.service_addrs["registry"])
    yield settings, registry_pb2_grpc.RegistryServiceStub(channel)
    await channel.close()
    await training.stop()
    await registry.app.stop()


async def test_a_dataset_tokenized_otherwise_than_the_base_is_a_422_naming_both(gateway, services, tmp_path):
    settings, registry = services
    tenant = gateway.tenants["alpha"]
    developer = gateway.auth("alpha", "developer")
    other = tmp_path / "other-corpus"
    manifest = write_dataset(other, chars=3_000)  # its own character tokenizer
    base = tmp_path / "base"
    write_checkpoint(base, "llama", other / "tokenizer", manifest["vocab_size"])
    store = ObjectStore(settings.s3)
    await model_transfer.upload_model_version(
        registry, store, "llama-base", base, metadata=identities.metadata(tenant, "registry", key_id="k"),
        lineage=registry_pb2.Lineage(environment={"source": "random weights"}))

    dataset = {"name": "contract", "version": 1}
    lora = {"type": "lora", "r": 4}
    refused = await gateway.client.post("/v1/training-jobs", headers=developer, json={
        "dataset": dataset, "model": {"init_from": {"name": "llama-base", "version": 1}, "adapter": lora}})
    body = await refused.text()
    assert refused.status == 422, body
    assert "dataset contract v1" in body and "model.init_from llama-base v1" in body and "tokenizer" in body

    missing = await gateway.client.post("/v1/training-jobs", headers=developer, json={
        "dataset": dataset, "model": {"init_from": {"name": "llama-base", "version": 2}}})
    assert missing.status == 422 and "model.init_from llama-base v2 does not exist" in await missing.text()

    misspelt = await gateway.client.post("/v1/training-jobs", headers=developer, json={
        "dataset": dataset, "model": {"init_from": {"name": "llama-base", "version": 1},
                                      "adapter": {**lora, "rank": 4}}})
    assert misspelt.status == 422 and "model.adapter" in await misspelt.text()

    jobs = await gateway.client.get("/v1/training-jobs", headers=developer)
    assert jobs.status == 200 and (await jobs.json())["jobs"] == []
