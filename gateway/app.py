"""The REST gateway: `init_app(settings)` builds the aiohttp application.

Middlewares, outermost first: (OpenTelemetry server span, only when tracing is on), request id +
access metrics + default Cache-Control, errors → one JSON body, then authentication, rate limit, role
check and query parameter names, ending in the conditional-GET fast path (`ValidatorCache`: a 304 for
an immutable representation without a service call; one middleware, not two, because this is the
hot path `bench/gateway.py` measures). Every GET route also answers HEAD. Resources (the key store's
pool, the gRPC channels, the tracer provider) are owned through `cleanup_ctx`; typed `web.AppKey`s
hold them.

Tracing: with `LLMP_OTEL_ENDPOINT` set (an OTLP/gRPC collector, e.g. `http://otel-collector:4317`),
every request gets a server span (with `llmp.request_id`) and every gRPC call a client span that
propagates the trace to the service; with it unset, no exporter and no instrumentation at all.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from gateway import routes
from gateway.auth import KeyStore, RateLimiter, admin_key
from gateway.http import VALIDATORS, Route, ValidatorCache, error_response, none_match
from gateway.state import CALLER, CLIENTS, DATABASE, KEYS, LIMITER, OBJECT_STORE, ROUTE_TABLE, SETTINGS
from gateway.views import completions
from services.common import errors, logs
from services.common.config import Settings
from services.common.db import Database
from services.common.grpc_client import ServiceClients
from services.common.metrics import LATENCY_BUCKETS
from services.common.s3 import ObjectStore

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("llmp_http_requests_total", "REST requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram("llmp_http_request_seconds", "REST latency", ["method", "route"], buckets=LATENCY_BUCKETS)
REVALIDATED = Counter("llmp_http_revalidated_total", "Conditional GETs answered 304 by the gateway itself")
UNSAFE = frozenset({"PUT", "PATCH", "DELETE"})

MIGRATIONS = Path(__file__).parent / "migrations"


_metric_children: dict[tuple[str, str, int], tuple] = {}


def _metrics_for(method: str, route: str, status: int) -> tuple:
    """The labelled counter and histogram children, looked up once per (method, route, status)."""
    children = _metric_children.get((method, route, status))
    if children is None:
        children = (HTTP_REQUESTS.labels(method, route, str(status)), HTTP_LATENCY.labels(method, route))
        _metric_children[(method, route, status)] = children
    return children


def observe(*, tracing: bool):
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        """Request id in and out (in every log line and on the trace span), Prometheus counters and latency,
        and `Cache-Control: no-store` on any response that did not choose its own."""
        request_id = request.headers.get("X-Request-Id") or next(_request_ids)
        token = logs.request_id.set(request_id)
        if tracing:
            trace.get_current_span().set_attribute("llmp.request_id", request_id)
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared:  # streams set their own headers before the first byte
                response.headers["X-Request-Id"] = request_id
                if "Cache-Control" not in response.headers:
                    response.headers["Cache-Control"] = "no-store"
            return response
        finally:
            resource = request.match_info.route.resource
            name = resource.canonical if resource is not None else "unmatched"
            count, latency = _metrics_for(request.method, name, status)
            count.inc()
            latency.observe(time.perf_counter() - started)
            logs.request_id.reset(token)

    return middleware


def _request_id_source() -> Iterator[str]:
    """Unique request ids without a system call each: a random per-process prefix and a counter."""
    prefix = uuid.uuid4().hex[:16]
    return (f"{prefix}{n:016x}" for n in itertools.count(1))


_request_ids = _request_id_source()


_HTTP_ERRORS: dict[int, type[errors.LlmpError]] = {
    400: errors.InvalidArgument, 404: errors.NotFound, 405: errors.InvalidArgument,
    413: errors.PayloadTooLarge, 415: errors.InvalidArgument,
}


@web.middleware
async def error_bodies(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as `{"error": {"type", "message"}}` with the mapped status; never a bare 500."""
    try:
        return await handler(request)
    except errors.LlmpError as error:
        return error_response(error)
    except web.HTTPException as http_error:
        if http_error.status < 400:
            raise
        fallback = errors.InvalidArgument if http_error.status < 500 else errors.Internal
        cls = _HTTP_ERRORS.get(http_error.status, fallback)
        message = http_error.text if http_error.status == 413 and http_error.text else http_error.reason
        response = error_response(cls(message))
        response.set_status(http_error.status)
        if http_error.status == 405:
            response.headers["Allow"] = http_error.headers.get("Allow", "")
        return response
    except ConnectionResetError:  # the client went away mid-body: its fault, and nobody is listening
        return error_response(errors.InvalidArgument("request body cut short: the connection was reset"))
    except Exception as error:
        known = errors.from_exception(error)
        if known is not None:
            return error_response(known)
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(errors.Internal(f"internal error (request id {logs.request_id.get()})"))


def authenticate(table: dict[tuple[str, str], Route]):
    """API key → caller, rate limit, role check and query parameter names; then the conditional-GET fast
    path: If-None-Match for a representation known immutable (`ValidatorCache`, keyed by the caller's
    tenant) is answered 304 here, without calling a service. Unsafe requests forget their path there."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        method = request.method
        resource = request.match_info.route.resource
        route = table.get((method, resource.canonical)) if resource is not None else None
        if route is None or not route.roles:  # public route, or no route (404 / 405 answered by aiohttp)
            return await handler(request)
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise errors.Unauthenticated("missing API key: send Authorization: Bearer <key>")
        app = request.app
        known = app[KEYS].cached(key)
        who, rate = known if known is not None else await app[KEYS].authenticate(key)
        if rate:  # before the role check, so a key hammering forbidden routes is limited too
            app[LIMITER].take(who.key_id, rate)
        if who.role != "admin" and who.role not in route.roles:
            raise errors.PermissionDenied(f"role {who.role} may not call {method} {resource.canonical}")
        if request.query_string:
            unknown = sorted(set(request.query) - route.query.keys())
            if unknown:  # a field the caller may not set (?state=READY, ?tenant=…) is refused, not ignored
                raise errors.ValidationFailed(f"unknown query parameter(s): {', '.join(unknown)}")
        request[CALLER] = who
        if method == "GET" or method == "HEAD":
            condition = request.headers.get("If-None-Match")
            if condition is not None:
                headers = app[VALIDATORS].lookup(who.tenant, request.path_qs)
                if headers is not None and none_match(condition, headers["ETag"]):
                    REVALIDATED.inc()
                    return web.Response(status=304, headers=headers)
            return await handler(request)
        if method in UNSAFE:
            app[VALIDATORS].forget(who.tenant, request.path)
            try:
                return await handler(request)
            finally:  # a GET that raced the change must not leave the old validators behind
                app[VALIDATORS].forget(who.tenant, request.path)
        return await handler(request)

    return middleware


async def _resources(app: web.Application):
    settings = app[SETTINGS]
    database = await Database.connect(settings.database_url, component="gateway", migrations_dir=MIGRATIONS,
                                      max_size=5)
    app[DATABASE] = database
    app[KEYS] = KeyStore(database, admin_key(settings))
    app[CLIENTS] = ServiceClients(settings)
    app[OBJECT_STORE] = ObjectStore(settings.s3, timeout=3)
    yield
    await app[CLIENTS].close()
    await database.close()


def _with_head(table: list[Route]) -> list[Route]:
    """The table plus HEAD for every GET route that does not declare its own (aiohttp then sends the
    GET's headers, Content-Length included, without the body)."""
    declared = {(route.method, route.path) for route in table}
    heads = [dataclasses.replace(route, method="HEAD") for route in table
             if route.method == "GET" and ("HEAD", route.path) not in declared]
    return table + heads


def tracer_provider(settings: Settings, exporter: SpanExporter | None = None) -> TracerProvider | None:
    """A tracer provider exporting over OTLP/gRPC to LLMP_OTEL_ENDPOINT (or to `exporter`, for tests);
    None, and so no tracing at all, when neither is given."""
    endpoint = settings.raw.get("LLMP_OTEL_ENDPOINT", "")
    if not endpoint and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "llmp-gateway"}))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def server_spans(provider: TracerProvider):
    """One SERVER span per request, continuing the caller's trace (W3C `traceparent`), named for the
    route template, with the HTTP semantic-convention attributes; 5xx marks the span as an error."""
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode

    tracer = provider.get_tracer("llmp.gateway")

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        attributes = {"http.request.method": request.method, "url.path": request.path, "http.route": route}
        with tracer.start_as_current_span(f"{request.method} {route}", kind=SpanKind.SERVER,
                                          context=propagate.extract(request.headers), attributes=attributes) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return middleware


def _tracing(provider: TracerProvider):
    async def context(app: web.Application):
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient

        instrumentor = GrpcAioInstrumentorClient()  # client spans + trace context in every call's metadata
        instrumentor.instrument(tracer_provider=provider)
        yield
        instrumentor.uninstrument()
        provider.shutdown()  # flushes what the batch processor holds

    return context


def init_app(settings: Settings, *, span_exporter: SpanExporter | None = None) -> web.Application:
    table = routes.all_routes()
    served = _with_head(table)
    provider = tracer_provider(settings, span_exporter)
    middlewares = [observe(tracing=provider is not None), error_bodies,
                   authenticate({(route.method, route.path): route for route in served})]
    if provider is not None:
        middlewares.insert(0, server_spans(provider))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[LIMITER] = RateLimiter(rate=50, burst=100)
    app[ROUTE_TABLE] = table
    app[VALIDATORS] = ValidatorCache()
    app[completions.CACHE] = completions.ResponseCache()
    app.cleanup_ctx.append(_resources)
    if provider is not None:
        app.cleanup_ctx.append(_tracing(provider))
    for route in served:
        app.router.add_route(route.method, route.path, route.handler)
    return app
