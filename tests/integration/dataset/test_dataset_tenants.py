"""The dataset service across tenants, against the real PostgreSQL and S3: builds take turns across tenants,
one tenant's builds hold at most its share of a replica's build slots, lapsed builds are taken over in the
same turn order, and each tenant's ingest bytes per day are bounded (shared by every replica through
PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import grpc
import psycopg
import pytest
from llmp.dataset.v1 import dataset_pb2 as pb
from llmp.dataset.v1 import dataset_pb2_grpc

from services.common.config import Settings
from services.common.contracts import dataset_corpus_key
from services.dataset import server
from services.dataset.options import DatasetOptions
from services.dataset.versions import content_digest
from tests.integration.dataset.conftest import SHAKESPEARE, Client
from tests.integration.dataset.test_dataset_resume import insert_pending

pytestmark = pytest.mark.integration


def finished(settings: Settings, tenant: str) -> list[tuple[str, object]]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute("SELECT name, finished_at FROM dataset_versions WHERE tenant = %s AND state = 'READY'",
                            (tenant,)).fetchall()


async def test_one_tenants_ten_queued_builds_do_not_starve_anothers_single_one(start_service, dataset_settings,
                                                                             shakespeare):
    _, stub = await start_service()
    busy, quiet = Client(stub, f"t{uuid.uuid4().hex[:10]}"), Client(stub, f"t{uuid.uuid4().hex[:10]}")
    for index in range(10):  # accepted at once, built one at a time in the background
        await busy.create(shakespeare[index:], name=f"queued-{index}", vocab_size=300, wait=False)
    ready_before = len(finished(dataset_settings, busy.tenant))
    assert ready_before <= 5, "the builds ran too fast for a queue to form; the test proves nothing"
    single = await quiet.create(shakespeare, name="single", vocab_size=300)  # waits for its build
    assert single.version.state == pb.VERSION_STATE_READY, single.version.error
    [(_, single_at)] = finished(dataset_settings, quiet.tenant)
    busy_before = sum(1 for _, at in finished(dataset_settings, busy.tenant) if at < single_at)
    # Served right after the build that was running: in arrival order it would have come after all ten.
    assert busy_before <= ready_before + 1, (ready_before, busy_before)
    for _ in range(600):  # the busy tenant's queue still drains
        if len(finished(dataset_settings, busy.tenant)) == 10:
            break
        await asyncio.sleep(0.1)
    assert len(finished(dataset_settings, busy.tenant)) == 10


async def test_one_tenants_large_builds_do_not_hold_up_anothers_small_one(start_service, dataset_settings):
    # The default slots: two builds at once per replica, one of them per tenant.
    assert (dataset_settings.dataset_build_slots, dataset_settings.tenant_dataset_build_slots) == (2, 1)
    _, stub = await start_service()
    busy, quiet = Client(stub, f"t{uuid.uuid4().hex[:10]}"), Client(stub, f"t{uuid.uuid4().hex[:10]}")
    corpus = SHAKESPEARE.read_bytes()  # the whole file: a BPE build of it takes many seconds
    for index in range(3):
        await busy.create(corpus[index:], name=f"large-{index}", vocab_size=512, wait=False)
    assert not finished(dataset_settings, busy.tenant), "a large build ended before the small one was sent"
    small = await quiet.create(corpus[:20_000], name="small", vocab_size=300)  # waits for its build
    assert small.version.state == pb.VERSION_STATE_READY, small.version.error
    # With one build slot per replica the small build would wait for the large one running, then take its
    # turn before the other two: it must not wait for any of them.
    assert not finished(dataset_settings, busy.tenant), "the small build waited for a large one to finish"
    for _ in range(1800):  # the busy tenant's queue still drains, one build at a time
        if len(finished(dataset_settings, busy.tenant)) == 3:
            break
        await asyncio.sleep(0.1)
    assert len(finished(dataset_settings, busy.tenant)) == 3


def owners(settings: Settings, tenant: str) -> dict[str, tuple[str, str, int]]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT name, state, owner, attempts FROM dataset_versions WHERE tenant = %s",
                            (tenant,)).fetchall()
    return {name: (state, owner, attempts) for name, state, owner, attempts in rows}


async def test_a_build_with_no_slot_on_its_replica_is_built_by_another_with_one(start_service, dataset_settings):
    """The replica that accepts a tenant's second build, its slot for that tenant taken, queues it in PostgreSQL
    rather than behind its own build; the idle replica takes it."""
    _, first = await start_service(lease_seconds=3.0, heartbeat_seconds=0.3)
    await start_service(lease_seconds=3.0, heartbeat_seconds=0.3)  # idle, looking for queued builds
    busy = Client(first, f"t{uuid.uuid4().hex[:10]}")
    corpus = SHAKESPEARE.read_bytes()
    for index in range(2):
        await busy.create(corpus[index:], name=f"large-{index}", vocab_size=512, wait=False)
    builders: set[str] = set()
    for _ in range(600):
        rows = owners(dataset_settings, busy.tenant)
        builders |= {owner for state, owner, _ in rows.values() if state == "PENDING" and owner}
        if all(state != "PENDING" for state, _, _ in rows.values()):
            break
        await asyncio.sleep(0.1)
    rows = owners(dataset_settings, busy.tenant)
    assert [state for state, _, _ in rows.values()] == ["READY", "READY"], rows
    assert len(builders) == 2, f"one replica built both while the other was idle: {builders}"
    assert [attempts for _, _, attempts in rows.values()] == [1, 1]  # waiting in the queue is no attempt


async def test_lapsed_builds_are_taken_over_tenant_by_tenant_not_oldest_first(settings_env, lineage, store,
                                                                            tmp_path, shakespeare):
    """Builds left PENDING by a replica that died: three of one tenant's, reserved before one of another's. A
    replica with one build slot takes the other tenant's over second, not fourth."""
    busy, quiet = f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}"
    settings = Settings.from_env({**settings_env, "LLMP_DATASET_BUILD_SLOTS": "1"})
    store.ensure_bucket()
    for tenant, name in [(busy, "lapsed-0"), (busy, "lapsed-1"), (busy, "lapsed-2"), (quiet, "lapsed-0")]:
        options = DatasetOptions(name=name, tokenizer="char").validated()
        data = shakespeare[:30_000]
        path = tmp_path / "corpus.txt"
        path.write_bytes(data)
        store.upload_file(dataset_corpus_key(tenant, name, 1), path)
        insert_pending(settings, tenant, name, options, content_digest(hashlib.sha256(data).hexdigest(), options),
                       len(data), "dead-replica", "now() - interval '1 second'")
    app = await server.build_app(settings, models_using=lineage, shard_tokens=20_000, lease_seconds=3.0,
                                 heartbeat_seconds=0.3)
    await app.start("127.0.0.1:0")
    try:
        for _ in range(1200):
            if len(finished(settings, busy)) == 3 and finished(settings, quiet):
                break
            await asyncio.sleep(0.1)
    finally:
        await app.stop()
    order = sorted([(at, tenant, name) for tenant in (busy, quiet) for name, at in finished(settings, tenant)])
    assert [(tenant, name) for _, tenant, name in order] == \
        [(busy, "lapsed-0"), (quiet, "lapsed-0"), (busy, "lapsed-1"), (busy, "lapsed-2")]


@pytest.fixture
async def quota_stub(settings_env, lineage):
    settings = Settings.from_env({**settings_env, "LLMP_TENANT_INGEST_BYTES_PER_DAY": "50000"})
    app = await server.build_app(settings, models_using=lineage, shard_tokens=20_000)
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield dataset_pb2_grpc.DatasetServiceStub(channel)
    await channel.close()
    await app.stop()


async def test_ingest_bytes_per_day_refuses_the_corpus_that_passes_it(quota_stub, shakespeare):
    client = Client(quota_stub, f"t{uuid.uuid4().hex[:10]}")
    first = await client.create(shakespeare[:30_000], name="first", tokenizer=pb.TOKENIZER_KIND_CHAR)
    assert first.version.state == pb.VERSION_STATE_READY
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.create(shakespeare[30_000:60_000], name="second", tokenizer=pb.TOKENIZER_KIND_CHAR)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "LLMP_TENANT_INGEST_BYTES_PER_DAY=50000" in refused.value.details()
    assert "30000 bytes in the last 24 hours" in refused.value.details()
    retry_after = dict(refused.value.trailing_metadata() or ())
    assert any("retry-after" in key for key in retry_after), retry_after
    # nothing was created, the same corpus again costs nothing, and another tenant has its own budget
    listed = await quota_stub.ListDatasets(pb.ListDatasetsRequest(), metadata=client.metadata)
    assert [dataset.name for dataset in listed.datasets] == ["first"]
    again = await client.create(shakespeare[:30_000], name="first", tokenizer=pb.TOKENIZER_KIND_CHAR)
    assert again.version.version == first.version.version
    other = Client(quota_stub, f"t{uuid.uuid4().hex[:10]}")
    assert (await other.create(shakespeare[30_000:60_000], name="second",
                               tokenizer=pb.TOKENIZER_KIND_CHAR)).version.state == pb.VERSION_STATE_READY


async def test_a_queued_build_that_fails_answers_its_reason_to_a_waiting_create(start_service, dataset_settings):
    """`wait` answers READY or the build's error, also for a build queued behind its tenant's slot: never a
    FAILED version passed off as a success."""
    _, stub = await start_service()
    busy = Client(stub, f"t{uuid.uuid4().hex[:10]}")
    corpus = SHAKESPEARE.read_bytes()
    await busy.create(corpus, name="large", vocab_size=512, wait=False)  # holds the tenant's one slot
    with pytest.raises(grpc.aio.AioRpcError) as failed:  # queued, then no document is long enough
        await busy.create(corpus[:20_000], name="too-short", vocab_size=300, min_doc_chars=5_000)
    assert failed.value.code() != grpc.StatusCode.OK
    assert "no training documents left" in failed.value.details(), failed.value.details()
    with psycopg.connect(dataset_settings.database_url) as conn:
        ends = dict(conn.execute("SELECT name, finished_at FROM dataset_versions WHERE tenant = %s",
                                 (busy.tenant,)).fetchall())
    assert ends["large"] is not None and ends["too-short"] > ends["large"], ends  # it waited for the slot
