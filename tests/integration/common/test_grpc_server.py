"""The shared gRPC bootstrap: health, reflection, error mapping, readiness and graceful shutdown."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import errors, topology
from services.common.grpc_client import domain_error
from services.common.grpc_server import GrpcApp
from services.common.identity import caller_from_context
from tests import identities

pytestmark = pytest.mark.integration
SERVICE = "llmp.test.v1.Probe"
def signed() -> tuple[tuple[str, str], ...]:
    """A caller of the app below (it runs as the dataset service), signed now: a token signed at import
    time expires before the suite reaches these tests (300 s)."""
    return identities.metadata("acme", topology.DATASET.name)


def _identity(data: bytes) -> bytes:
    return data


class Probe:
    """A raw-bytes service: the payload names what the handler should do."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()

    async def call(self, request: bytes, context) -> bytes:
        if request == b"missing":
            raise errors.NotFound("dataset shakespeare not found")
        if request == b"precondition":
            raise errors.PreconditionRequired("needs If-Match")
        if request == b"crash":
            raise ZeroDivisionError("bug")
        if request == b"slow":
            self.slow_started.set()
            await asyncio.sleep(1.0)
            return b"finished"
        if request == b"whoami":
            return caller_from_context(context).tenant.encode()
        return b"ok:" + request

    async def stream(self, request: bytes, context):
        for index in range(3):
            yield str(index).encode()
        raise errors.Conflict("stream ended by a domain error")

    def add_to(self, _servicer, server: grpc.aio.Server) -> None:
        handlers = {
            "Call": grpc.unary_unary_rpc_method_handler(self.call, _identity, _identity),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream, _identity, _identity),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])


@pytest.fixture
async def running(settings):
    probe = Probe()
    app = GrpcApp(settings, topology.DATASET)
    app.add_servicer(probe.add_to, probe, SERVICE)
    ready = {"ok": True}

    async def backend_check():
        if not ready["ok"]:
            raise errors.Unavailable("PostgreSQL unreachable")

    app.add_readiness_check("postgresql", backend_check)
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield app, probe, channel, ready
    await channel.close()
    await app.stop()


async def test_health_reflection_and_a_call(running):
    app, _, channel, _ = running
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for answer in stub.ServerReflectionInfo(requests()):
        names = {service.name for service in answer.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
        break
    call = channel.unary_unary(f"/{SERVICE}/Call")
    assert await call(b"x", metadata=signed()) == b"ok:x"
    assert await call(b"whoami", metadata=signed()) == b"acme"


@pytest.mark.parametrize("payload, expected, http", [
    (b"missing", errors.NotFound, 404),
    (b"precondition", errors.PreconditionRequired, 428),
    (b"crash", errors.Internal, 500),
    (b"whoami", errors.Unauthenticated, 401),  # sent unsigned (below): refused before the handler
])
async def test_errors_cross_the_wire_as_domain_errors(running, payload, expected, http):
    _, _, channel, _ = running
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/Call")(payload, metadata=None if payload == b"whoami" else signed())
    rebuilt = domain_error(raised.value)
    assert type(rebuilt) is expected
    assert errors.mapping_for(rebuilt).http_status == http
    if payload == b"crash":
        assert "bug" not in rebuilt.message  # internals are logged, not leaked


async def test_streams_map_errors_after_items(running):
    _, _, channel, _ = running
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for item in channel.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=signed()):
            received.append(item)
    assert received == [b"0", b"1", b"2"]
    assert isinstance(domain_error(raised.value), errors.Conflict)


async def test_readiness_follows_the_backends(running):
    app, _, channel, ready = running
    health = health_pb2_grpc.HealthStub(channel)
    ready["ok"] = False
    assert await app.probe() == {"postgresql": "PostgreSQL unreachable"}
    response = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
    ready["ok"] = True
    await app.probe()
    response = await health.Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_shutdown_drains_in_flight_calls(running):
    app, probe, channel, _ = running
    async def slow_call():
        return await channel.unary_unary(f"/{SERVICE}/Call")(b"slow", metadata=signed())

    in_flight = asyncio.create_task(slow_call())
    await probe.slow_started.wait()
    closed = {"db": False}

    async def close_pool():
        closed["db"] = True

    app.on_shutdown(close_pool)
    await app.stop()
    assert await in_flight == b"finished"  # accepted before SIGTERM: answered, not dropped
    assert closed["db"]
    with pytest.raises(grpc.aio.AioRpcError):
        await channel.unary_unary(f"/{SERVICE}/Call")(b"late", timeout=2)


async def test_a_call_continues_the_callers_trace(settings):
    """The server span joins the trace in the caller's `traceparent`, so a gateway request and the
    service calls it makes are one trace."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.common import tracing

    exporter = InMemorySpanExporter()
    provider = tracing.tracer_provider(settings, "llmp-test", exporter)
    probe = Probe()
    app = GrpcApp(settings, topology.DATASET, tracer_provider=provider)
    app.add_servicer(probe.add_to, probe, SERVICE)
    port = await app.start("127.0.0.1:0")
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Call")
            assert await call(b"x", metadata=(*signed(), ("traceparent", f"00-{trace_id}-{parent_id}-01"))) == b"ok:x"
    finally:
        await app.stop()
        provider.shutdown()
    spans = [span for span in exporter.get_finished_spans() if span.name == f"/{SERVICE}/Call"]
    assert len(spans) == 1
    assert format(spans[0].context.trace_id, "032x") == trace_id
    assert format(spans[0].parent.span_id, "016x") == parent_id


async def test_an_open_health_watch_does_not_hold_the_shutdown_for_the_whole_grace(settings):
    """llmp's clients keep a grpc.health.v1 Watch open on every replica; it never ends by itself, so a
    stop that waited for every stream would always take the full LLMP_SHUTDOWN_GRACE."""
    import dataclasses
    import time

    settings = dataclasses.replace(settings, shutdown_grace=10.0)
    app = GrpcApp(settings, topology.DATASET)
    port = await app.start("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        await app.stop()
        assert time.monotonic() - started < 5  # the old stop took the whole 10 s here
        watch.cancel()
