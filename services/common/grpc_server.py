"""The async gRPC server every llmp service runs on.

`GrpcApp` wires what each service would otherwise repeat: the interceptor chain (the shutdown gate,
the trace span, then request ids, logging, Prometheus metrics and the one exception → status mapping), the standard
`grpc.health.v1` service driven by honest readiness checks, server reflection, a Prometheus
endpoint, and the shutdown order SIGTERM → NOT_SERVING → drain in-flight calls → stop → close pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import errors, identity, logs, metrics, tracing
from services.common.config import Settings
from services.common.periodic import Periodic
from services.common.topology import GrpcService

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

READINESS_INTERVAL = 2.0  # seconds between readiness probes of the backends
FINAL_GRACE = 0.5  # seconds the transport gets to send what is left once the application's calls drained
# A grpc.health.v1 name that is SERVING from start until shutdown begins, whatever the readiness checks
# say: what llmp's own clients health-check each replica with (`grpc_client.SERVICE_CONFIGS['client']`), so they
# stop sending to a draining replica at once, yet keep calling one whose backend is down (its calls
# then answer 503 with the reason, rather than failing as "no healthy backend").
ACCEPTING_HEALTH_NAME = "llmp.accepting"


def _method_parts(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Innermost (inside the shutdown gate and the trace span): verify who the call acts for (`verifier`:
    signed metadata only, docs/CONTRACTS.md "Identity"), set the request id, map domain errors to status
    codes, count and time every call, log its outcome."""

    # Open without a signed identity: health (orchestrators' probes, the clients' per-replica health
    # watch) and reflection (it describes the protos, which are public, and no tenant's data).
    UNSIGNED = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, verifier: identity.CallVerifier) -> None:
        self.verifier = verifier

    def _identify(self, metadata, method: str) -> identity.Caller | errors.LlmpError | None:
        if method.startswith(self.UNSIGNED):
            return None
        try:
            return self.verifier.caller(metadata, method)
        except errors.LlmpError as refused:  # raised inside the call's scope: answered, counted, logged
            return refused

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _method_parts(handler_call_details.method)
        metadata = handler_call_details.invocation_metadata or ()
        incoming_id = dict(metadata).get(identity.REQUEST_ID_KEY) or uuid.uuid4().hex
        caller = self._identify(metadata, handler_call_details.method)

        def observe(code: str, started: float) -> None:
            elapsed = time.perf_counter() - started
            metrics.GRPC_REQUESTS.labels(service, method, code).inc()
            metrics.GRPC_LATENCY.labels(service, method).observe(elapsed)
            log.info("rpc", extra={"rpc": f"{service}/{method}", "code": code, "ms": round(elapsed * 1000, 1)})

        return _wrap(handler, lambda context: _call_scope(context, incoming_id, caller, observe))


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


@asynccontextmanager
async def _call_scope(context: grpc.aio.ServicerContext, request_id: str,
                      caller: identity.Caller | errors.LlmpError | None, observe) -> AsyncIterator[None]:
    """Scope one call: its request id in every log line, its verified caller the current one (so the calls
    the handler makes carry both on; a refused identity is raised before the handler runs), domain errors
    mapped to status codes."""
    token = logs.request_id.set(request_id)
    caller_token = identity.current.set(None if isinstance(caller, errors.LlmpError) else caller)
    started = time.perf_counter()
    code = "OK"
    try:
        if isinstance(caller, errors.LlmpError):
            raise caller
        yield
    except errors.LlmpError as error:
        mapping = errors.mapping_for(error)
        code = mapping.grpc_code.name
        context.set_trailing_metadata(errors.to_grpc_metadata(error))
        await _abort(context, mapping.grpc_code, error.message)
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except grpc.aio.AbortError:  # the handler aborted on purpose: keep its status
        code = _code_of(context)
        raise
    except Exception as error:
        translated = errors.from_exception(error)
        if translated is not None:  # a backend down, or input the database refuses: not a bug
            mapping = errors.mapping_for(translated)
            code = mapping.grpc_code.name
            log.warning("rpc failed: %s", translated.message)
            context.set_trailing_metadata(errors.to_grpc_metadata(translated))
            await _abort(context, mapping.grpc_code, translated.message)
        code = "INTERNAL"
        log.exception("unhandled error")
        context.set_trailing_metadata(errors.to_grpc_metadata(errors.Internal("internal error")))
        await _abort(context, grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
    finally:
        observe(code if code != "OK" else _code_of(context), started)
        identity.current.reset(caller_token)
        logs.request_id.reset(token)


async def _responses(result) -> AsyncIterator[Any]:
    """A streaming handler's responses: it is an async generator, or a coroutine that sends them itself
    with `context.write()` (as grpc's own health servicer's Watch does) and yields nothing here."""
    if inspect.isawaitable(result):
        await result
        return
    async for item in result:
        yield item


DRAIN_SECONDS = 60.0  # the most a refused upload's remaining requests are read for before the refusal is sent


class _Requests:
    """A client stream's requests that remembers whether they were read to their end. Only reads through this
    object count: a handler of a client stream iterates it (none calls `context.read()`)."""

    def __init__(self, requests) -> None:
        self._requests = aiter(requests)
        self.ended = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await anext(self._requests)
        except StopAsyncIteration:
            self.ended = True
            raise


# The client stream of the call being handled, set by the outermost `_wrap` (each wrapper runs in the call's task).
_upload: contextvars.ContextVar[_Requests | None] = contextvars.ContextVar("llmp_upload", default=None)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """`context.abort`, after reading (and dropping) what is left of a client stream. Answering while the client
    still writes makes grpc.aio fail the client's pending write and report "Internal error from Core" in place
    of the status sent (a 500 at the gateway for a 409, a 422 or a shutdown's ABORTED)."""
    upload = _upload.get()
    if upload is not None and not upload.ended:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(DRAIN_SECONDS):
                async for _ in upload:
                    pass
    await context.abort(code, details)


def _wrap(handler: grpc.RpcMethodHandler, scope: Callable[[grpc.aio.ServicerContext], Any]) -> grpc.RpcMethodHandler:
    """Run any kind of handler (unary or streaming either way) inside `scope(context)`, an async context
    manager entered before the handler starts and left after its last response."""
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def single_response(request, context):
            token = None
            if handler.stream_unary and _upload.get() is None:
                request = _Requests(request)
                token = _upload.set(request)
            try:
                async with scope(context):
                    return await inner(request, context)
            finally:
                if token is not None:
                    _upload.reset(token)

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(single_response, handler.request_deserializer, handler.response_serializer)

    streaming = handler.unary_stream or handler.stream_stream

    async def streamed_response(request, context):
        async with scope(context):
            async for item in _responses(streaming(request, context)):
                yield item

    factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return factory(streamed_response, handler.request_deserializer, handler.response_serializer)


class ShutdownGate(grpc.aio.ServerInterceptor):
    """Outermost: counts the calls in flight and, once closed, refuses new ones with ABORTED
    before any handler runs (health and reflection stay open, so balancers can read NOT_SERVING).

    Why not only `server.stop(grace)`: grpc core cancels the calls it has received but not yet handed
    to the application with CANCELLED (grpc/grpc#41785), a status a client cannot tell from a call cut
    off mid-work. Refusing here first, while the transport still hands calls over, gives every call a
    clean answer: its handler's, or ABORTED, which a client may retry on another instance."""

    OPEN_DURING_DRAIN = ("/grpc.health.v1.Health/", "/grpc.reflection.")
    QUIET = 0.3  # seconds without a new call (after the calls in flight end) before the transport stops

    def __init__(self) -> None:
        self.closed = False
        self.in_flight = 0
        self.last_arrival = 0.0

    def close(self) -> None:
        self.closed = True

    async def drain(self, timeout: float) -> bool:
        """Until no admitted call runs and none has arrived for QUIET seconds (True: the calls grpc had
        queued have all been answered), or `timeout` seconds (False)."""
        deadline = time.monotonic() + timeout
        while self.in_flight or time.monotonic() - self.last_arrival < self.QUIET:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def admit(self) -> bool:
        if self.closed:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    @asynccontextmanager
    async def admitted(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """One call counted in flight while it runs; refused (ABORTED) before it starts once closed."""
        if not self.admit():
            await _refuse(context)
        try:
            yield
        finally:
            self.release()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.OPEN_DURING_DRAIN):
            return handler  # probes and health watches do not hold the drain open
        self.last_arrival = time.monotonic()
        return _wrap(handler, self.admitted)


async def _refuse(context: grpc.aio.ServicerContext) -> None:
    # ABORTED, which no domain error maps to: llmp's clients retry it on every method (the call never ran),
    # and turn it into 503 when every replica refused (errors.from_grpc).
    await _abort(context, grpc.StatusCode.ABORTED, "server shutting down: the call did not run; retry on another "
                        "instance")


ReadinessCheck = Callable[[], Awaitable[None]]


class GrpcApp:
    """One service's gRPC server and its lifecycle."""

    def __init__(self, settings: Settings, service: GrpcService, *, max_message_bytes: int = 64 * 1024 * 1024,
                 tracer_provider: TracerProvider | None = None):
        self.settings = settings
        self.service = service
        provider = tracer_provider or tracing.process_provider()
        self.gate = ShutdownGate()  # outermost: a call refused while draining runs nothing else
        self.server = grpc.aio.server(
            # The span next, so the request-id scope, the logs and the handler run inside it.
            interceptors=[self.gate, *tracing.server_interceptors(provider),
                          ObservabilityInterceptor(identity.CallVerifier(identity.signer_for(settings), service.name))],
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes),
                     ("grpc.so_reuseport", 0),
                     # llmp's clients ping every 30 s (grpc_client.channel_options) and keep a health Watch open
                     # on every replica; by default a server allows a ping only every 5 min on a connection
                     # sending no data and answers the third with GOAWAY too_many_pings, failing its calls.
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.min_ping_interval_without_data_ms", 10_000)],
        )
        self.health = health.aio.HealthServicer()
        self.service_names: list[str] = []
        self.readiness: dict[str, ReadinessCheck] = {}
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self.failing: dict[str, str] = {}  # readiness check -> why it fails, empty when ready
        self.port: int | None = None
        self._stopping = asyncio.Event()
        # A probe still waiting on a backend at shutdown is cut: nothing it would report matters any more.
        self._readiness_loop = Periodic("readiness probe", READINESS_INTERVAL, self.probe, cancel_at_close=True)

    def add_servicer(self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any,
                     full_service_name: str) -> None:
        add_to_server(servicer, self.server)
        self.service_names.append(full_service_name)

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        self.readiness[name] = check

    def on_shutdown(self, hook: Callable[[], Awaitable[None]]) -> None:
        self.shutdown_hooks.append(hook)

    async def _set_all(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def probe(self) -> dict[str, str]:
        """Run every readiness check once; update the health status; return what fails."""
        failing: dict[str, str] = {}
        for name, check in self.readiness.items():
            try:
                await asyncio.wait_for(check(), timeout=5)
            except Exception as error:  # any failure means not ready; the reason is reported
                failing[name] = str(error) or type(error).__name__
        if failing != self.failing:
            log.warning("readiness changed", extra={"failing": failing}) if failing else log.info("ready")
        self.failing = failing
        if not self._stopping.is_set():
            serving = health_pb2.HealthCheckResponse.SERVING
            await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING if failing else serving)
        return failing

    async def start(self, listen_addr: str | None = None) -> int:
        """Bind and start serving; returns the bound port (useful with port 0 in tests)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        address = listen_addr or self.settings.listen_addr(self.service)
        if self.settings.grpc_tls is None:
            self.port = self.server.add_insecure_port(address)
        else:  # mutual TLS: a caller without a certificate from our CA never reaches a servicer
            cert, key, ca = self.settings.grpc_tls.read()
            credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                      require_client_auth=True)
            self.port = self.server.add_secure_port(address, credentials)
        if not self.port:
            raise errors.Unavailable(f"cannot listen on {address}")
        await self.server.start()
        await self.health.set(ACCEPTING_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.probe()
        self._readiness_loop.start()  # the next probes every READINESS_INTERVAL
        log.info("serving", extra={"service": self.service.name, "address": address})
        return self.port

    async def stop(self) -> None:
        """NOT_SERVING first (so balancers stop sending) and new calls refused with ABORTED, then
        drain the calls in flight (up to `shutdown_grace`), then stop the transport, then close."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self.health.enter_graceful_shutdown()
        self.gate.close()
        log.info("draining", extra={"grace_s": self.settings.shutdown_grace, "in_flight": self.gate.in_flight})
        if not await self.gate.drain(self.settings.shutdown_grace):
            log.warning("grace over: cancelling calls still running", extra={"in_flight": self.gate.in_flight})
        # Left now: the gate's refusals of calls that came in the last instant, and the clients' health
        # Watch streams, which never end by themselves (waiting on them would spend the whole grace).
        await self.server.stop(FINAL_GRACE)
        await self._readiness_loop.close()
        for hook in reversed(self.shutdown_hooks):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        log.info("stopped")

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down in order."""
        metrics.serve(self.service.metrics_port, self.settings.bind_host)
        await self.start()
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await stop_requested.wait()
        log.info("signal received, shutting down")
        await self.stop()


def run_main(main: Callable[[Settings], Awaitable[None]], component: str) -> None:
    """Process entry for a service: settings once, logging, then the async main."""
    settings = Settings.from_env()
    logs.configure(settings, component)
    tracing.configure_process(settings, component)
    try:
        asyncio.run(main(settings))
    except errors.LlmpError as error:
        log.error("startup failed: %s", error.message)
        raise SystemExit(1) from None
    finally:
        tracing.shutdown_process()
