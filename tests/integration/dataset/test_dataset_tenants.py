"""The dataset service across tenants, against the real PostgreSQL and S3: builds take turns across tenants,
and each tenant's ingest bytes per day are bounded (shared by every replica through PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import psycopg
import pytest
from llmp.dataset.v1 import dataset_pb2 as pb
from llmp.dataset.v1 import dataset_pb2_grpc

from services.common.config import Settings
from services.dataset import server
from tests.integration.dataset.conftest import Client

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
