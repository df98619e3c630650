import asyncio
import hashlib
import uuid

import grpc
import pytest
from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2 as pb
from minio.commonconfig import CopySource

from services.common.model_transfer import download_artifact
from services.registry import registration

pytestmark = pytest.mark.integration


async def test_register_copies_verified_artifacts_with_lineage(client, source):
    prefix, digests = source
    version = await client.register("tiny", prefix, dataset="corpus", dataset_version=3)
    assert (version.ref.name, version.ref.version) == ("tiny", 1)
    assert version.state == pb.VERSION_STATE_READY
    stored = {item.path: item.object for item in version.artifacts}
    assert {path: obj.sha256 for path, obj in stored.items()} == digests
    assert stored["model.safetensors"].role == "weights" and stored["tokenizer.json"].role == "tokenizer"
    for path, obj in stored.items():
        assert obj.key == f"models/{client.tenant}/tiny/v1/{path}"
        data = client.registry.store.get_bytes(obj.key)
        assert hashlib.sha256(data).hexdigest() == obj.sha256 and len(data) == obj.size
    assert version.lineage.dataset.name == "corpus" and version.lineage.training_job_id == "job-1"
    assert dict(version.lineage.environment) == {"torch": "2.13"} and dict(version.metrics) == {"validation_loss": 1.25}
    assert len(version.digest) == 64

    by_dataset = await client.stub.ListModelVersionsByDataset(pb.ListModelVersionsByDatasetRequest(
        dataset=common_pb2.DatasetRef(name="corpus", version=3)), metadata=client.metadata)
    assert [(ref.name, ref.version) for ref in by_dataset.versions] == [("tiny", 1)]
    other = await client.stub.ListModelVersionsByDataset(pb.ListModelVersionsByDatasetRequest(
        dataset=common_pb2.DatasetRef(name="corpus", version=4)), metadata=client.metadata)
    assert list(other.versions) == []
    model = (await client.stub.GetModel(pb.GetModelRequest(name="tiny"), metadata=client.metadata)).model
    assert (model.latest_version, model.version_count) == (1, 1)


async def test_other_tenants_see_nothing(client, source, registry):
    prefix, _ = source
    await client.register("private", prefix)
    stranger = type(client)(registry.stub, registry, "someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stranger.stub.GetModelVersion(pb.GetModelVersionRequest(name="private", version=1),
                                            metadata=stranger.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert list((await stranger.stub.ListModels(pb.ListModelsRequest(), metadata=stranger.metadata)).models) == []


async def test_a_prefix_without_a_checkpoint_is_refused(client, registry):
    registry.store.put_bytes(f"jobs/{client.tenant}/x/final/notes.txt", b"not a model")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.register("broken", f"jobs/{client.tenant}/x/final/")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.trailing_metadata())["llmp-error-type"] == "validation_failed"


async def test_concurrent_registrations_get_gapless_distinct_versions(client, source):
    prefix, _ = source
    versions = await asyncio.gather(*(client.register("busy", prefix) for _ in range(8)))
    assert sorted(v.ref.version for v in versions) == list(range(1, 9))
    listed = await client.stub.ListModelVersions(pb.ListModelVersionsRequest(
        name="busy", page=common_pb2.PageRequest(page_size=5)), metadata=client.metadata)
    assert [v.ref.version for v in listed.versions] == [8, 7, 6, 5, 4]
    rest = await client.stub.ListModelVersions(pb.ListModelVersionsRequest(
        name="busy", page=common_pb2.PageRequest(page_size=5, page_token=listed.page.next_page_token)),
        metadata=client.metadata)
    assert [v.ref.version for v in rest.versions] == [3, 2, 1] and rest.page.next_page_token == ""


async def test_a_registration_whose_copy_fails_is_never_ready(client, source, registry):
    prefix, _ = source
    registry.store.put_bytes(prefix + "zz-extra.bin", b"x" * 1000)
    # Corrupt the recorded digest: the read-back check must refuse the copy.
    key = prefix + "zz-extra.bin"
    registry.store.client.copy_object(registry.store.bucket, key, CopySource(registry.store.bucket, key),
                                      metadata={"sha256": "0" * 64}, metadata_directive="REPLACE")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.register("mismatch", prefix)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    async with registry.db.pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT state, collected_at FROM registry_versions WHERE tenant = %s AND name = 'mismatch'",
            (client.tenant,))).fetchall()
    assert [row["state"] for row in rows] == ["FAILED"] and rows[0]["collected_at"] is not None
    assert registry.store.list(f"models/{client.tenant}/mismatch/") == []


async def test_sweep_fails_abandoned_registrations_and_deletes_orphans(client, source, registry):
    prefix, _ = source
    await client.register("swept", prefix)
    tenant = client.tenant
    # A registration that died mid-copy: PENDING row, some objects, no heartbeat.
    async with registry.db.pool.connection() as conn:
        await conn.execute("UPDATE registry_models SET next_version = 3 WHERE tenant = %s AND name = 'swept'",
                           (tenant,))
        await conn.execute(
            "INSERT INTO registry_versions (tenant, name, version, state, registration_id, source_prefix, prefix, "
            "heartbeat_at) VALUES (%s, 'swept', 2, 'PENDING', %s, %s, %s, now() - interval '1 hour')",
            (tenant, uuid.uuid4(), prefix, f"models/{tenant}/swept/v2/"))
    registry.store.put_bytes(f"models/{tenant}/swept/v2/model.safetensors", b"half")
    # Readers never see the PENDING version.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetModelVersion(pb.GetModelVersionRequest(name="swept", version=2), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await client.stub.ListModelVersions(pb.ListModelVersionsRequest(name="swept"), metadata=client.metadata)
    assert [v.ref.version for v in listed.versions] == [1]
    registry.store.put_bytes(f"models/{tenant}/swept/v7/config.json", b"{}")  # no row at all
    report = await registration.sweep(registry.db, registry.store, lease_seconds=60)
    assert report.abandoned >= 1 and report.collected >= 1 and report.orphan_objects >= 1
    assert registry.store.list(f"models/{tenant}/swept/v2/") == []
    assert registry.store.list(f"models/{tenant}/swept/v7/") == []
    assert len(registry.store.list(f"models/{tenant}/swept/v1/")) >= 5  # the READY version is untouched
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetModelVersion(pb.GetModelVersionRequest(name="swept", version=2), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_download_streams_verified_bytes_and_refuses_corruption(client, source, registry, tmp_path, checkpoint):
    prefix, digests = source
    await client.register("fetch", prefix)
    got = await download_artifact(client.stub, "fetch", 1, "model.safetensors", tmp_path / "w.safetensors",
                                  metadata=client.metadata)
    assert got.sha256 == digests["model.safetensors"]
    assert (tmp_path / "w.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    # Bytes changed behind the registry's back: the stream must fail, and no file is left.
    registry.store.put_bytes(f"models/{client.tenant}/fetch/v1/config.json", b'{"tampered": true}')
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await download_artifact(client.stub, "fetch", 1, "config.json", tmp_path / "c.json", metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "c.json.partial").exists()


async def test_models_page_by_name_and_the_service_reports_serving(client, source, registry):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    prefix, _ = source
    for name in ("c-model", "a-model", "b-model"):
        await client.register(name, prefix)
    first = await client.stub.ListModels(pb.ListModelsRequest(page=common_pb2.PageRequest(page_size=2)),
                                         metadata=client.metadata)
    assert [m.name for m in first.models] == ["a-model", "b-model"] and first.page.next_page_token
    rest = await client.stub.ListModels(pb.ListModelsRequest(
        page=common_pb2.PageRequest(page_size=2, page_token=first.page.next_page_token)), metadata=client.metadata)
    assert [m.name for m in rest.models] == ["c-model"] and rest.page.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.ListModels(pb.ListModelsRequest(page=common_pb2.PageRequest(page_token="%%%")),
                                     metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    health = health_pb2_grpc.HealthStub(registry.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service="llmp.registry.v1.RegistryService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
