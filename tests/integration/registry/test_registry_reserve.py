"""Reserve / upload / commit: the bytes go once into the version's own prefix and are verified in place."""

import asyncio
import dataclasses
import hashlib
import uuid

import grpc
import pytest
from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2 as pb

from services.common import s3
from services.common.model_transfer import fetch_artifact, upload_model_version
from services.registry import registration

pytestmark = pytest.mark.integration


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_upload_into_the_reserved_prefix_then_commit(client, registry, checkpoint, source, tmp_path):
    lineage = pb.Lineage(dataset=common_pb2.DatasetRef(name="corpus", version=2), training_job_id="job-9")
    version = await upload_model_version(client.stub, registry.store, "direct", checkpoint, lineage=lineage,
                                         metrics={"validation_loss": 0.5}, metadata=client.metadata)
    assert (version.ref.version, version.state) == (1, pb.VERSION_STATE_READY)
    assert version.source_prefix == "" and version.prefix == f"models/{client.tenant}/direct/v1/"
    files = {path.name: path for path in checkpoint.iterdir()}
    assert {item.path: item.object.sha256 for item in version.artifacts} == {
        name: sha256_of(path) for name, path in files.items()}
    assert all(item.object.key == version.prefix + item.path for item in version.artifacts)
    assert version.lineage.dataset.name == "corpus" and dict(version.metrics) == {"validation_loss": 0.5}
    by_dataset = await client.stub.ListModelVersionsByDataset(pb.ListModelVersionsByDatasetRequest(
        dataset=common_pb2.DatasetRef(name="corpus", version=2)), metadata=client.metadata)
    assert [(ref.name, ref.version) for ref in by_dataset.versions] == [("direct", 1)]
    weights = next(item for item in version.artifacts if item.path == "model.safetensors")
    fetch_artifact(registry.store, weights, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == files["model.safetensors"].read_bytes()
    # The copy path and reservations share one counter: numbers stay gapless and distinct.
    copied = await client.register("direct", source[0])
    assert copied.ref.version == 2


async def test_concurrent_reservations_get_distinct_gapless_numbers(client):
    replies = await asyncio.gather(*(client.stub.ReserveModelVersion(pb.ReserveModelVersionRequest(
        model_name="crowd"), metadata=client.metadata) for _ in range(6)))
    assert sorted(reply.ref.version for reply in replies) == list(range(1, 7))
    assert len({reply.reservation_id for reply in replies}) == 6
    # Readers do not see reservations.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetModelVersion(pb.GetModelVersionRequest(name="crowd", version=1), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def reserve_and_upload(client, registry, checkpoint, *, store=None, declare_crc32: bool = False,
                             ) -> tuple[pb.ReserveModelVersionResponse, list]:
    """Reserve a version of "checked" and upload the checkpoint into it (with `store`, default the registry's),
    declaring each file's size and SHA-256 (and its CRC32 when asked, as `upload_model_version` does)."""
    reply = await client.stub.ReserveModelVersion(pb.ReserveModelVersionRequest(model_name="checked"),
                                                  metadata=client.metadata)
    declared = []
    for path in sorted(checkpoint.iterdir()):
        stored = await asyncio.to_thread((store or registry.store).upload_file, reply.prefix + path.name, path)
        declared.append(pb.DeclaredArtifact(path=path.name, size=stored.size, sha256=stored.sha256,
                                            crc32=stored.crc32 if declare_crc32 else ""))
    return reply, declared


def store_checking(registry, algorithm: str) -> s3.ObjectStore:
    """An object store on the registry's bucket whose uploads have the S3 server verify `algorithm`."""
    return s3.ObjectStore(dataclasses.replace(registry.store.settings, upload_checksum=algorithm))


async def version_row(registry, tenant: str, name: str, version: int) -> dict:
    async with registry.db.pool.connection() as conn:
        return await (await conn.execute(
            "SELECT state, collected_at FROM registry_versions WHERE tenant = %s AND name = %s AND version = %s",
            (tenant, name, version))).fetchone()


async def test_commit_refuses_a_checksum_mismatch_and_collects_the_objects(client, registry, checkpoint):
    reply, declared = await reserve_and_upload(client, registry, checkpoint)
    # The stored config.json is not what was declared (overwritten after the upload).
    registry.store.put_bytes(reply.prefix + "config.json", b'{"tampered": true}')
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
            reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INTERNAL and "config.json" in caught.value.details()
    row = await version_row(registry, client.tenant, "checked", reply.ref.version)
    assert row["state"] == "FAILED" and row["collected_at"] is not None
    assert registry.store.list(reply.prefix) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
            reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.RenewModelVersionReservation(pb.RenewModelVersionReservationRequest(
            reservation_id=reply.reservation_id), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def read_back(monkeypatch) -> list[str]:
    """The keys the registry hashes by reading the object back (instead of taking S3's own SHA-256)."""
    keys: list[str] = []
    original = registration._hash_object

    def hash_object(store, key):
        keys.append(key)
        return original(store, key)

    monkeypatch.setattr(registration, "_hash_object", hash_object)
    return keys


@pytest.mark.parametrize("algorithm", sorted(s3.CHECKSUM_HEADERS))
async def test_commit_takes_the_checksum_s3_enforced_on_upload_without_reading_back(client, registry, checkpoint,
                                                                                   read_back, algorithm):
    reply, declared = await reserve_and_upload(client, registry, checkpoint, store=store_checking(registry, algorithm),
                                               declare_crc32=True)
    committed = await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
        reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert committed.version.state == pb.VERSION_STATE_READY and read_back == []
    assert {item.path: item.object.sha256 for item in committed.version.artifacts} == {
        path.name: sha256_of(path) for path in checkpoint.iterdir()}


async def test_commit_reads_back_objects_stored_without_a_server_checksum(client, registry, checkpoint, read_back,
                                                                          monkeypatch):
    monkeypatch.setattr(s3, "SINGLE_PUT_LIMIT", 4096)  # larger files go multipart: no full-object S3 checksum
    reply, declared = await reserve_and_upload(client, registry, checkpoint, declare_crc32=True)
    committed = await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
        reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert committed.version.state == pb.VERSION_STATE_READY
    assert sorted(read_back) == sorted(reply.prefix + path.name for path in checkpoint.iterdir()
                                       if path.stat().st_size > 4096)
    assert read_back  # the tiny checkpoint's weights are larger than that


async def test_commit_reads_back_objects_whose_uploader_declared_no_crc32(client, registry, checkpoint, read_back):
    # S3 attests a CRC32 but the uploader did not say which: only the bytes themselves can vouch for its SHA-256.
    reply, declared = await reserve_and_upload(client, registry, checkpoint, store=store_checking(registry, "crc32"))
    committed = await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
        reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert committed.version.state == pb.VERSION_STATE_READY
    assert sorted(read_back) == sorted(reply.prefix + path.name for path in checkpoint.iterdir())


@pytest.mark.parametrize("algorithm", sorted(s3.CHECKSUM_HEADERS))
async def test_commit_refuses_an_object_whose_server_checksum_differs(client, registry, checkpoint, read_back,
                                                                      tmp_path, algorithm):
    store = store_checking(registry, algorithm)
    reply, declared = await reserve_and_upload(client, registry, checkpoint, store=store, declare_crc32=True)
    other = tmp_path / "config.json"
    other.write_text('{"replaced": true}')
    await asyncio.to_thread(store.upload_file, reply.prefix + "config.json", other)  # S3 attests the new bytes
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
            reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INTERNAL and "config.json" in caught.value.details()
    assert ("CRC32" in caught.value.details()) == (algorithm == "crc32")
    assert read_back == []
    assert (await version_row(registry, client.tenant, "checked", reply.ref.version))["state"] == "FAILED"


async def test_commit_needs_exactly_the_declared_files(client, registry, checkpoint):
    reply, declared = await reserve_and_upload(client, registry, checkpoint)
    registry.store.put_bytes(reply.prefix + "stray.bin", b"not declared")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
            reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stray.bin" in caught.value.details()
    assert (await version_row(registry, client.tenant, "checked", reply.ref.version))["state"] == "FAILED"

    again, declared = await reserve_and_upload(client, registry, checkpoint)
    assert again.ref.version == reply.ref.version + 1
    committed = await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
        reservation_id=again.reservation_id, artifacts=declared), metadata=client.metadata)
    assert committed.version.state == pb.VERSION_STATE_READY
    # A retry answers the same version.
    retried = await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
        reservation_id=again.reservation_id, artifacts=declared), metadata=client.metadata)
    assert retried.version.ref == committed.version.ref and retried.version.digest == committed.version.digest
    stranger = type(client)(registry.stub, registry, "someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stranger.stub.RenewModelVersionReservation(pb.RenewModelVersionReservationRequest(
            reservation_id=again.reservation_id), metadata=stranger.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_abandoned_reservation_is_swept(client, registry, checkpoint):
    reply, declared = await reserve_and_upload(client, registry, checkpoint)
    renewed = await client.stub.RenewModelVersionReservation(pb.RenewModelVersionReservationRequest(
        reservation_id=reply.reservation_id), metadata=client.metadata)
    assert renewed.lease_seconds == registration.LEASE_SECONDS
    async with registry.db.pool.connection() as conn:
        await conn.execute("UPDATE registry_versions SET heartbeat_at = now() - interval '1 hour' "
                           "WHERE registration_id = %s", (uuid.UUID(reply.reservation_id),))
    report = await registration.sweep(registry.db, registry.store, lease_seconds=60, scan_orphans=False)
    assert report.abandoned >= 1 and report.collected >= 1
    assert registry.store.list(reply.prefix) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
            reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def xxh3_of(path) -> str:
    import xxhash

    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


async def test_downloads_check_the_xxh3_taken_with_the_sha256_and_catch_corruption(client, registry, checkpoint,
                                                                                  tmp_path):
    version = await upload_model_version(client.stub, registry.store, "fast", checkpoint, metadata=client.metadata)
    files = {path.name: path for path in checkpoint.iterdir()}
    assert {item.path: item.object.xxh3_128 for item in version.artifacts} == {
        name: xxh3_of(path) for name, path in files.items()}
    got = await client.stub.GetModelVersion(pb.GetModelVersionRequest(name="fast", version=version.ref.version),
                                            metadata=client.metadata)
    assert [a.object.xxh3_128 for a in got.version.artifacts] == [a.object.xxh3_128 for a in version.artifacts]
    weights = next(item for item in version.artifacts if item.path == "model.safetensors")
    stored = fetch_artifact(registry.store, weights, tmp_path / "w.safetensors")
    assert (stored.sha256, stored.xxh3_128) == (weights.object.sha256, weights.object.xxh3_128)
    # One byte changed behind the registry's back, same size: the download fails and leaves no file.
    original = files["model.safetensors"].read_bytes()
    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2] ^= 0x01
    registry.store.put_bytes(weights.object.key, bytes(corrupt))
    with pytest.raises(Exception, match="XXH3-128") as caught:
        fetch_artifact(registry.store, weights, tmp_path / "bad.safetensors")
    assert "checksum mismatch" in str(caught.value)
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "bad.safetensors.partial").exists()
    # An artifact recorded without an XXH3-128 (registered before it existed) is checked by SHA-256.
    legacy = pb.Artifact(path=weights.path, object=common_pb2.StoredObject(
        key=weights.object.key, size=weights.object.size, sha256=weights.object.sha256))
    with pytest.raises(Exception, match="SHA-256"):
        fetch_artifact(registry.store, legacy, tmp_path / "legacy.safetensors")
    registry.store.put_bytes(weights.object.key, original)
    assert fetch_artifact(registry.store, legacy, tmp_path / "legacy.safetensors").sha256 == weights.object.sha256


async def test_commit_refuses_a_malformed_or_wrong_xxh3_or_crc32(client, registry, checkpoint, monkeypatch):
    reply, declared = await reserve_and_upload(client, registry, checkpoint)
    declared[0].xxh3_128 = "not-hex"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
            reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "xxh3_128" in caught.value.details()
    reply, declared = await reserve_and_upload(client, registry, checkpoint)  # a refused commit fails the version
    declared[0].crc32 = "1234567"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
            reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "crc32" in caught.value.details()
    # Read back (no S3 SHA-256 kept for multipart uploads), the registry checks a declared XXH3-128 itself.
    monkeypatch.setattr(s3, "SINGLE_PUT_LIMIT", 4096)
    reply, declared = await reserve_and_upload(client, registry, checkpoint)
    for item in declared:
        item.xxh3_128 = "0" * 32
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CommitModelVersion(pb.CommitModelVersionRequest(
            reservation_id=reply.reservation_id, artifacts=declared), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INTERNAL and "XXH3-128" in caught.value.details()
