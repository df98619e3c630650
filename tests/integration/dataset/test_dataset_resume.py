"""Accepted ingests survive their replica: builds are leased, their corpus is stored in S3, and a replica
resumes a PENDING version whose owner went away (real PostgreSQL, real S3, several service instances)."""

import asyncio
import hashlib
import json
import uuid

import psycopg
import pytest
from llmp.dataset.v1 import dataset_pb2 as pb
from psycopg.types.json import Jsonb

from services.common.contracts import dataset_corpus_key
from services.dataset.options import DatasetOptions
from services.dataset.versions import content_digest

from .conftest import SHAKESPEARE, Client

pytestmark = pytest.mark.integration
FAST = {"lease_seconds": 3.0, "heartbeat_seconds": 0.3}  # short leases so that a take-over happens in seconds


@pytest.fixture(scope="module")
def corpus() -> bytes:
    return SHAKESPEARE.read_bytes()  # the whole file: its BPE build takes long enough to be interrupted


def row_of(settings, tenant: str, name: str, version: int = 1) -> dict:
    with psycopg.connect(settings.database_url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT state, owner, attempts, lease_expires_at, error FROM dataset_versions "
                            "WHERE tenant = %s AND name = %s AND version = %s", (tenant, name, version)).fetchone()


async def watch_to_the_end(client: Client, name: str, version: int = 1) -> list[pb.WatchIngestResponse]:
    request = pb.WatchIngestRequest(name=name, version=version)
    return [event async for event in client.stub.WatchIngest(request, metadata=client.metadata)]


def normalised(manifest: dict, tenant: str) -> dict:
    """The manifest with the tenant taken out of it (the content must be the same in every tenant)."""
    return json.loads(json.dumps(manifest).replace(tenant, "TENANT"))


async def test_an_interrupted_build_is_resumed_by_another_replica_with_the_same_content(
        start_service, store, dataset_settings, corpus):
    tenant = f"t{uuid.uuid4().hex[:10]}"
    first_app, first = await start_service(build_grace=0, **FAST)  # stops its build at once on shutdown
    client = Client(first, tenant)
    accepted = await client.create(corpus, name="resumed", vocab_size=512, wait=False)
    assert accepted.created and accepted.version.state == pb.VERSION_STATE_PENDING
    assert store.exists(dataset_corpus_key(tenant, "resumed", 1))  # accepted only once the corpus is stored
    progress = client.stub.WatchIngest(pb.WatchIngestRequest(name="resumed", version=1), metadata=client.metadata)
    async for event in progress:
        if event.bytes_done > 0:  # the build is under way
            break
    progress.cancel()
    await first_app.stop()

    stopped = row_of(dataset_settings, tenant, "resumed")
    assert stopped["state"] == "PENDING", f"the build was not interrupted (or was failed): {stopped}"
    assert stopped["owner"] == "" and stopped["attempts"] == 1  # released for the next replica, not failed

    _, second = await start_service(**FAST)
    events = await watch_to_the_end(Client(second, tenant), "resumed")
    resumed = events[-1].version
    assert resumed.state == pb.VERSION_STATE_READY, resumed.error
    assert all(event.state == pb.VERSION_STATE_PENDING for event in events[:-1])
    finished = row_of(dataset_settings, tenant, "resumed")
    assert finished["attempts"] == 2 and finished["owner"] == ""
    assert not store.exists(dataset_corpus_key(tenant, "resumed", 1))  # the stored corpus goes once READY
    prefix = f"datasets/{tenant}/resumed/v1/"
    assert {obj.key: obj.size for obj in store.list(prefix)} == {obj.key: obj.size for obj in resumed.objects}

    # the same corpus built in one go, in another tenant, is the same content
    other = f"t{uuid.uuid4().hex[:10]}"
    direct = (await Client(second, other).create(corpus, name="resumed", vocab_size=512)).version
    assert direct.state == pb.VERSION_STATE_READY and direct.digest == resumed.digest
    assert [(o.key.replace(other, tenant), o.size, o.sha256) for o in direct.objects if o.role != "manifest"] == \
        [(o.key, o.size, o.sha256) for o in resumed.objects if o.role != "manifest"]
    assert normalised(json.loads(store.get_bytes(direct.manifest_key)), other) == \
        normalised(json.loads(store.get_bytes(resumed.manifest_key)), tenant)


async def test_a_replica_starting_during_a_build_leaves_it_alone(start_service, dataset_settings, corpus):
    tenant = f"t{uuid.uuid4().hex[:10]}"
    _, first = await start_service(**FAST)
    accepted = await Client(first, tenant).create(corpus, name="busy", vocab_size=512, wait=False)
    assert accepted.version.state == pb.VERSION_STATE_PENDING
    _, second = await start_service(**FAST)  # looks for lapsed leases at once, then every 0.3 s
    # the second replica does not build it: it follows the row until the first has finished
    events = await watch_to_the_end(Client(second, tenant), "busy")
    assert {event.progress.phase for event in events[:-1]} <= {"pending"}
    assert events[-1].version.state == pb.VERSION_STATE_READY, events[-1].version.error
    row = row_of(dataset_settings, tenant, "busy")
    assert row["attempts"] == 1, "the second replica took the build over while its owner was building it"


def insert_pending(settings, tenant: str, name: str, options: DatasetOptions, digest: str, size: int,
                   owner: str, lease: str | None) -> None:
    """A PENDING version as another process left it (`lease`: an SQL expression, or NULL)."""
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("INSERT INTO datasets (tenant, name, last_version) VALUES (%s, %s, 1)", (tenant, name))
        conn.execute(
            "INSERT INTO dataset_versions (tenant, name, version, state, digest, options, source_bytes, owner, "
            f"lease_expires_at, attempts, created_at) VALUES (%s, %s, 1, 'PENDING', %s, %s, %s, %s, {lease or 'NULL'}, "
            "1, now() - interval '1 hour')", (tenant, name, digest, Jsonb(options.as_dict()), size, owner))


async def wait_finished(client: Client, name: str) -> pb.DatasetVersion:
    request = pb.GetDatasetVersionRequest(name=name, version=1)
    for _ in range(600):
        version = (await client.stub.GetDatasetVersion(request, metadata=client.metadata)).version
        if version.state != pb.VERSION_STATE_PENDING:
            return version
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} still PENDING after 60 s")


async def test_a_pending_version_without_a_stored_corpus_is_failed_with_the_reason(
        start_service, store, dataset_settings):
    tenant = f"t{uuid.uuid4().hex[:10]}"
    options = DatasetOptions(name="legacy", tokenizer="char").validated()
    # as an older release left it: no lease, no corpus in S3 (it kept it on its local disk)
    insert_pending(dataset_settings, tenant, "legacy", options, "0" * 64, 100, "", None)
    _, stub = await start_service(**FAST)
    failed = await wait_finished(Client(stub, tenant), "legacy")
    assert failed.state == pb.VERSION_STATE_FAILED
    assert "corpus is not stored" in failed.error and dataset_corpus_key(tenant, "legacy", 1) in failed.error


async def test_a_build_whose_owner_died_is_taken_over_when_its_lease_lapses(
        start_service, store, dataset_settings, shakespeare, tmp_path):
    tenant = f"t{uuid.uuid4().hex[:10]}"
    options = DatasetOptions(name="orphan", tokenizer="char").validated()
    data = shakespeare[:50_000]
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    store.upload_file(dataset_corpus_key(tenant, "orphan", 1), path)
    digest = content_digest(hashlib.sha256(data).hexdigest(), options)
    # a replica that died mid-build: its lease runs out 2 s from now and nobody renews it
    insert_pending(dataset_settings, tenant, "orphan", options, digest, len(data), "dead-replica",
                   "now() + interval '2 seconds'")
    _, stub = await start_service(**FAST)
    await asyncio.sleep(1)
    assert row_of(dataset_settings, tenant, "orphan")["owner"] == "dead-replica"  # not taken before the lease lapses
    ready = await wait_finished(Client(stub, tenant), "orphan")
    assert ready.state == pb.VERSION_STATE_READY, ready.error
    assert ready.digest == digest and ready.source_bytes == len(data)
    assert row_of(dataset_settings, tenant, "orphan")["attempts"] == 2
    assert not store.exists(dataset_corpus_key(tenant, "orphan", 1))
    # a create of the same content now finds that version
    again = await Client(stub, tenant).create(data, name="orphan", tokenizer=pb.TOKENIZER_KIND_CHAR)
    assert not again.created and again.version.version == 1
