import asyncio

import grpc
import pytest
from llmp.registry.v1 import registry_pb2 as pb

pytestmark = pytest.mark.integration


def error_type(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata())["llmp-error-type"]


async def set_alias(client, version: int, **options):
    request = pb.SetAliasRequest(model_name="aliased", alias="production", version=version, **options)
    return (await client.stub.SetAlias(request, metadata=client.metadata)).alias


@pytest.fixture
async def three_versions(client, source):
    prefix, _ = source
    for _ in range(3):
        await client.register("aliased", prefix)


async def test_alias_create_move_preconditions_and_history(client, three_versions):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_alias(client, 1)  # neither If-None-Match nor If-Match
    assert error_type(caught.value) == "precondition_required"

    created = await set_alias(client, 1, must_not_exist=True, reason="first release")
    assert created.version == 1 and created.etag and created.updated_by == "key-test"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_alias(client, 2, must_not_exist=True)
    assert error_type(caught.value) == "precondition_failed"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_alias(client, 2, expected_etag="not-the-etag")
    assert error_type(caught.value) == "precondition_failed"

    moved = await set_alias(client, 2, expected_etag=created.etag, actor="alice", reason="better loss")
    back = await set_alias(client, 1, expected_etag=moved.etag, actor="bob", reason="rollback")
    assert len({created.etag, moved.etag, back.etag}) == 3  # back at v1, yet a new validator
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_alias(client, 3, expected_etag=created.etag)  # a stale etag
    assert error_type(caught.value) == "precondition_failed"

    resolved = await client.stub.ResolveAlias(pb.ResolveAliasRequest(model_name="aliased", alias="production"),
                                              metadata=client.metadata)
    assert resolved.version.ref.version == 1 and resolved.alias.etag == back.etag
    assert list(resolved.version.aliases) == ["production"]
    history = (await client.stub.ListAliasHistory(pb.ListAliasHistoryRequest(
        model_name="aliased", alias="production"), metadata=client.metadata)).entries
    assert [(e.sequence, e.from_version, e.to_version, e.actor, e.reason) for e in history] == [
        (1, 0, 1, "key-test", "first release"), (2, 1, 2, "alice", "better loss"), (3, 2, 1, "bob", "rollback")]
    assert history[0].at.ToDatetime() <= history[2].at.ToDatetime()


async def test_history_is_append_only(client, three_versions, registry):
    await set_alias(client, 1, must_not_exist=True)
    async with registry.db.pool.connection() as conn:
        with pytest.raises(Exception, match="append-only"):
            await conn.execute("DELETE FROM registry_alias_history WHERE tenant = %s", (client.tenant,))


async def test_concurrent_moves_with_one_etag_exactly_one_wins(client, three_versions):
    created = await set_alias(client, 1, must_not_exist=True)
    results = await asyncio.gather(*(set_alias(client, 2 + i % 2, expected_etag=created.etag, actor=f"mover-{i}")
                                     for i in range(8)), return_exceptions=True)
    winners = [r for r in results if isinstance(r, pb.Alias)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 7
    assert {error_type(e) for e in losers} == {"precondition_failed"}
    history = (await client.stub.ListAliasHistory(pb.ListAliasHistoryRequest(
        model_name="aliased", alias="production"), metadata=client.metadata)).entries
    assert len(history) == 2 and history[1].actor == winners[0].updated_by


async def test_concurrent_creates_exactly_one_wins(client, three_versions):
    results = await asyncio.gather(*(set_alias(client, 1 + i % 3, must_not_exist=True) for i in range(6)),
                                   return_exceptions=True)
    assert sum(isinstance(r, pb.Alias) for r in results) == 1


async def test_an_alias_cannot_point_at_a_missing_version(client, three_versions):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_alias(client, 9, must_not_exist=True)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
