"""Deployments: canary split, sticky routing, changes under load without failures, preconditions, delete."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from llmp.inference.v1 import inference_pb2 as pb

from services.common.contracts import triton_model_name

pytestmark = pytest.mark.integration
TINY_V1 = triton_model_name("acme", "tiny", 1)  # the conftest deploys tenant acme's model tiny


async def test_canary_split_holds_within_bounds_and_is_sticky(service):
    response = await service.deploy(stable=1, canary=(2, 30))
    assert response.deployment.state == "READY" and response.deployment.canary.weight == 30
    served = [await service.generate("O", max_tokens=1, routing_key=f"user-{i}") for i in range(300)]
    canary = sum(c.canary for c in served)
    assert all(c.model_version == (2 if c.canary else 1) for c in served)
    # Binomial(300, 0.3): mean 90, sd ~7.9; 4 sd either side.
    assert 58 <= canary <= 122, canary
    again = [await service.generate("O", max_tokens=1, routing_key=f"user-{i}") for i in range(40)]
    assert [c.model_version for c in again] == [c.model_version for c in served[:40]]


async def test_change_under_load_fails_no_request(service):
    await service.deploy(stable=1)
    failures, versions, stop = [], [], asyncio.Event()

    async def client(i: int) -> None:
        while not stop.is_set():
            try:
                versions.append((await service.generate(f"ROMEO {i}:", max_tokens=4)).model_version)
            except grpc.aio.AioRpcError as error:
                failures.append(error)

    tasks = [asyncio.create_task(client(i)) for i in range(6)]
    await asyncio.sleep(1)
    changed = await service.deploy(stable=2)
    await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*tasks)
    assert changed.deployment.state == "READY" and changed.deployment.stable_version == 2
    assert failures == []
    assert 1 in versions and versions[-1] == 2


async def test_preconditions_get_list_and_delete(service):
    created = await service.deploy(name="tiny-a", stable=1, if_none_match="*")
    assert created.created
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.deploy(name="tiny-a", stable=1, if_none_match="*")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.deploy(name="tiny-a", stable=2, if_match='"stale"')
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    shown = (await service.call("GetDeployment", pb.GetDeploymentRequest(name="tiny-a"))).deployment
    assert shown.etag == created.deployment.etag and shown.triton_models == {"1": TINY_V1}
    listed = await service.call("ListDeployments", pb.ListDeploymentsRequest())
    assert [d.name for d in listed.deployments] == ["tiny-a"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="tiny-a", if_match='"stale"'),
                                            metadata=service.metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await service.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="tiny-a", if_match=shown.etag),
                                        metadata=service.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.generate("O", deployment="tiny-a")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_version_is_not_found(service):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.deploy(name="tiny-b", stable=9)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_drains_in_flight_requests_and_unloads(service, triton):
    await service.deploy(stable=1)
    count, streaming, all_streaming = 6, [], asyncio.Event()

    async def client(i: int):
        messages = []
        async for message in service.stream(f"ROMEO {i}:", max_tokens=40):
            messages.append(message)
            if len(messages) == 1:
                streaming.append(i)
                if len(streaming) == count:
                    all_streaming.set()
        return messages

    tasks = [asyncio.create_task(client(i)) for i in range(count)]
    await asyncio.wait_for(all_streaming.wait(), 60)  # every request has its first token
    in_flight = sum(not task.done() for task in tasks)
    await service.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="tiny-chat"), metadata=service.metadata)
    # Delete returned only after the requests in flight had finished; none failed, each ran to its end.
    assert in_flight > 0
    assert all(task.done() for task in tasks)
    for task in tasks:
        messages = task.result()  # raises if the request failed
        assert messages[-1].finish_reason in {"length", "stop"}
        assert messages[-1].summary.completion_tokens == sum(len(m.token_ids) for m in messages)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.generate("O")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert not await service.deployments.engine.is_ready(TINY_V1)
    assert not (triton[1] / TINY_V1).exists()


async def test_registry_marks_follow_the_versions_a_deployment_serves(service):
    marks = service.deployments.source.deployed
    await service.deploy(name="tiny-m", stable=1, canary=(2, 10))
    assert marks[("acme", "tiny", 1)] == {"tiny-m"} and marks[("acme", "tiny", 2)] == {"tiny-m"}
    current = (await service.stub.GetDeployment(pb.GetDeploymentRequest(name="tiny-m"),
                                                metadata=service.metadata)).deployment
    await service.deploy(name="tiny-m", stable=2, if_match=current.etag)
    assert marks[("acme", "tiny", 1)] == set() and marks[("acme", "tiny", 2)] == {"tiny-m"}
    with pytest.raises(grpc.aio.AioRpcError):  # a refused change marks nothing
        await service.deploy(name="tiny-m", stable=1, if_match='"stale"')
    assert marks[("acme", "tiny", 1)] == set()
    await service.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="tiny-m"), metadata=service.metadata)
    assert marks[("acme", "tiny", 2)] == set()


async def test_a_change_made_through_one_replica_reaches_the_others(service):
    """Two inference replicas (one database, one Triton): deploy, add a canary and delete through the first;
    the second routes the same within a sync, without a restart."""
    from services.inference.deployments import SYNC_INTERVAL_S, Deployments

    first = service.deployments
    replica = Deployments(first.db, first.engine, first.source, first.repository, first.batching)

    async def replica_route(key=("acme", "tiny-chat")):
        route = replica.routes.get(key)
        return None if route is None else (route.stable.version, route.canary and route.canary.version, route.weight)

    async def eventually(expected):
        deadline = asyncio.get_running_loop().time() + 4 * SYNC_INTERVAL_S + 30  # loading a model takes time
        while (now := await replica_route()) != expected:
            assert asyncio.get_running_loop().time() < deadline, (now, expected)
            await asyncio.sleep(0.2)

    try:
        await service.deploy(stable=1)
        await replica.restore()  # routes what is stored, then follows the table
        await eventually((1, None, 0))
        await service.deploy(stable=1, canary=(2, 30))
        await eventually((1, 2, 30))
        served, canary = await replica.route("acme", "tiny-chat", "user-7")
        assert served.version in (1, 2) and canary == (served.version == 2)
        await service.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="tiny-chat"), metadata=service.metadata)
        await eventually(None)
    finally:
        await replica.close()
