"""llmp's client channels against a real grpc.aio server (`GrpcApp`) on a unix socket: the caller and the
request id travel, unary calls get the default deadline and streams none, and a peer's error arrives as
the domain error it was raised as, for unary, server-streaming and client-streaming calls alike."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest
from llmp.dataset.v1 import dataset_pb2 as pb
from llmp.dataset.v1 import dataset_pb2_grpc

from services.common import errors, identity, logs, topology, tracing
from services.common.config import Settings
from services.common.grpc_client import ServiceClients
from services.common.grpc_server import GrpcApp

ACME = identity.Caller(tenant="acme", key_id="key-1", role="developer")
SLOW = 0.5  # seconds a "slow" handler takes; the test clients' default deadline is shorter


def _seen() -> str:
    """What the handler sees: the server's current caller (verified from the signed metadata) and the request id."""
    caller = identity.current.get()
    who = "-" if caller is None else f"{caller.tenant}/{caller.key_id}/{caller.role}"
    return f"{who}|{logs.request_id.get()}"


class Datasets(dataset_pb2_grpc.DatasetServiceServicer):
    """A dataset service whose request names what it does."""

    async def GetDatasetVersion(self, request, context):  # noqa: N802 (gRPC method names)
        identity.caller_from_context(context)  # no tenant: Unauthenticated, as every real handler does
        if request.name == "missing":
            raise errors.NotFound("dataset missing not found")
        if request.name == "unset":
            raise errors.PreconditionRequired("needs If-Match")  # FAILED_PRECONDITION, told apart by its type
        if request.name == "slow":
            await asyncio.sleep(SLOW)
        return pb.GetDatasetVersionResponse(version=pb.DatasetVersion(name=_seen()))

    async def WatchIngest(self, request, context):  # noqa: N802
        if request.name == "missing":
            raise errors.NotFound("no such version")
        for done in range(3):
            if request.name == "slow":
                await asyncio.sleep(SLOW / 2)
            yield pb.WatchIngestResponse(bytes_done=done, version=pb.DatasetVersion(name=_seen()))
        if request.name == "conflict":
            raise errors.Conflict("ingest interrupted")

    async def CreateDataset(self, request_iterator, context):  # noqa: N802
        first = await anext(aiter(request_iterator))
        if first.options.name == "taken":  # refused on its first message, as a name conflict is
            raise errors.Conflict("dataset taken exists with other options")
        chunks = [message.chunk async for message in request_iterator if message.WhichOneof("payload") == "chunk"]
        if sum(map(len, chunks)) > 8:
            raise errors.PayloadTooLarge("more than 8 bytes")
        return pb.CreateDatasetResponse(version=pb.DatasetVersion(name=_seen()), created=True)


@pytest.fixture
async def server():
    """The settings that reach a running dataset service."""
    socket = f"unix:/tmp/llmp-test-{uuid.uuid4().hex[:12]}.sock"  # short: a socket path has ~100 bytes
    settings = Settings.from_env({"LLMP_DATASET_ADDR": socket, "LLMP_SERVICE_SECRET": "unit-test-service-secret"})
    app = GrpcApp(settings, topology.DATASET)
    app.add_servicer(dataset_pb2_grpc.add_DatasetServiceServicer_to_server, Datasets(),
                     "llmp.dataset.v1.DatasetService")
    await app.start(socket)
    yield settings
    await app.stop()
    Path(socket.removeprefix("unix:")).unlink(missing_ok=True)


@pytest.fixture
async def clients(server):
    clients = ServiceClients(server, principal=identity.GATEWAY, default_timeout=SLOW / 5)
    yield clients
    await clients.close()


async def test_the_current_caller_and_request_id_reach_the_handler(clients):
    token = logs.request_id.set("req-42")
    try:
        with identity.acting_as(ACME):
            response = await clients.dataset.GetDatasetVersion(pb.GetDatasetVersionRequest(name="x"))
    finally:
        logs.request_id.reset(token)
    assert response.version.name == "acme/key-1/developer|req-42"
    with identity.acting_as(identity.Caller("other", "key-2", "admin")):  # a call's own metadata wins
        response = await clients.dataset.GetDatasetVersion(
            pb.GetDatasetVersionRequest(name="x"), metadata=((identity.REQUEST_ID_KEY, "mine"),))
    assert response.version.name == "other/key-2/admin|mine"


async def test_a_call_made_as_no_one_is_refused_as_unauthenticated(clients):
    assert identity.current.get() is None
    with pytest.raises(errors.Unauthenticated, match="no signed identity"):
        await clients.dataset.GetDatasetVersion(pb.GetDatasetVersionRequest(name="x"))


async def test_unary_errors_arrive_as_the_domain_error_raised(clients):
    with identity.acting_as(ACME):
        with pytest.raises(errors.NotFound, match="dataset missing not found"):
            await clients.dataset.GetDatasetVersion(pb.GetDatasetVersionRequest(name="missing"))
        with pytest.raises(errors.PreconditionRequired):
            await clients.dataset.GetDatasetVersion(pb.GetDatasetVersionRequest(name="unset"))


async def test_unary_calls_get_the_default_deadline_unless_they_name_one(clients):
    with identity.acting_as(ACME):
        with pytest.raises(errors.DeadlineExceeded):
            await clients.dataset.GetDatasetVersion(pb.GetDatasetVersionRequest(name="slow"))
        response = await clients.dataset.GetDatasetVersion(pb.GetDatasetVersionRequest(name="slow"), timeout=10)
    assert response.version.name.startswith("acme/")


async def test_stream_errors_arrive_as_the_domain_error_raised(clients):
    with identity.acting_as(ACME):
        call = clients.dataset.WatchIngest(pb.WatchIngestRequest(name="conflict"))
    received = []
    with pytest.raises(errors.Conflict, match="ingest interrupted"):
        async for event in call:  # iterated outside the block: the caller is the one current at the call
            received.append(event)
    assert [event.bytes_done for event in received] == [0, 1, 2]
    assert received[0].version.name.startswith("acme/key-1/developer|")
    with identity.acting_as(ACME), pytest.raises(errors.NotFound):
        await anext(aiter(clients.dataset.WatchIngest(pb.WatchIngestRequest(name="missing"))))


async def test_streams_get_no_default_deadline(clients):
    with identity.acting_as(ACME):
        events = [event async for event in clients.dataset.WatchIngest(pb.WatchIngestRequest(name="slow"))]
    assert len(events) == 3  # took longer than the default deadline of a unary call


async def test_client_streaming_carries_the_caller_and_maps_errors(clients):
    def upload(*chunks: bytes):
        return iter([pb.CreateDatasetRequest(options=pb.DatasetOptions(name="x")),
                     *(pb.CreateDatasetRequest(chunk=chunk) for chunk in chunks)])

    with identity.acting_as(ACME):
        response = await clients.dataset.CreateDataset(upload(b"abc"))
        assert response.version.name.startswith("acme/key-1/developer|")
        with pytest.raises(errors.PayloadTooLarge):
            await clients.dataset.CreateDataset(upload(b"12345", b"67890"))


async def test_an_upload_refused_before_its_end_arrives_as_the_refusal(clients):
    """A handler that refuses an upload on its first message ends the call while the client still writes.
    grpc.aio then fails the client's pending write and reports "Internal error from Core" (INTERNAL, a 500 at
    the gateway) instead of the status the server sent, in some of such calls; the server reads a refused
    upload to its end first, so the caller always gets the refusal, the handler's or the interceptor's."""
    async def upload():
        yield pb.CreateDatasetRequest(options=pb.DatasetOptions(name="taken"))
        for _ in range(20):
            await asyncio.sleep(0)
            yield pb.CreateDatasetRequest(chunk=b"x" * 4096)

    async def outcomes() -> list[str]:
        names = []
        for _ in range(100):
            try:
                await clients.dataset.CreateDataset(upload())
            except errors.LlmpError as refused:
                names.append(type(refused).__name__)
        return names

    with identity.acting_as(ACME):
        refused = await outcomes()
    assert refused == ["Conflict"] * 100, {name: refused.count(name) for name in set(refused)}
    refused = await outcomes()  # as no one: refused by the server's interceptor, before the handler runs
    assert refused == ["Unauthenticated"] * 100, {name: refused.count(name) for name in set(refused)}



async def test_an_upload_whose_requests_fail_ends_as_cancelled_not_as_a_cancelled_task(clients):
    """grpc.aio cancels a call whose request iterator raised; the caller gets `errors.Cancelled` (and can
    report why its iterator failed), not `asyncio.CancelledError`, which would read as its own task being
    cancelled."""
    async def failing():
        yield pb.CreateDatasetRequest(options=pb.DatasetOptions(name="x"))
        raise errors.PayloadTooLarge("over the gateway's limit")

    with identity.acting_as(ACME), pytest.raises(errors.Cancelled):
        await clients.dataset.CreateDataset(failing())


async def test_with_tracing_a_failed_call_still_ends_its_span_with_the_peers_status(server):
    """The tracing interceptors sit inside the policy: they see the call's own status and end the span
    before its error becomes a domain error (outside them, an error they do not expect left it open)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = tracing.tracer_provider(server, "llmp-test", exporter)
    clients = ServiceClients(server, principal=identity.GATEWAY, tracer_provider=provider)
    try:
        with identity.acting_as(ACME), pytest.raises(errors.NotFound):
            await clients.dataset.GetDatasetVersion(pb.GetDatasetVersionRequest(name="missing"))
        with identity.acting_as(ACME), pytest.raises(errors.Conflict):
            async for _ in clients.dataset.WatchIngest(pb.WatchIngestRequest(name="conflict")):
                pass
    finally:
        await clients.close()
        provider.shutdown()
    spans = {span.name: span for span in exporter.get_finished_spans() if span.kind.name == "CLIENT"}
    assert set(spans) == {"/llmp.dataset.v1.DatasetService/GetDatasetVersion",
                          "/llmp.dataset.v1.DatasetService/WatchIngest"}
    assert all(span.status.status_code.name == "ERROR" for span in spans.values())
    assert spans["/llmp.dataset.v1.DatasetService/GetDatasetVersion"].attributes["rpc.grpc.status_code"] == \
        grpc.StatusCode.NOT_FOUND.value[0]
