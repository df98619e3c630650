"""The REST gateway: `init_app(settings)` builds the aiohttp application.

Every route's view is registered wrapped in one pipeline (`pipeline`): request id + access metrics +
access log + default Cache-Control, errors → one JSON body, authentication, rate limit, role check and
query parameter names, ending in the conditional-GET fast path (`ValidatorCache`: a 304 for an
immutable representation without a service call); a catch-all route gives 404/405 the same pipeline.
No aiohttp middleware (but the OpenTelemetry server span, only when tracing is on), because this is the
hot path `bench/gateway.py` measures; for the same reason paths resolve through `TableRouter`
(gateway/router.py), a segment tree that answers what aiohttp's router would and remembers its answer
per target; each route likewise remembers the targets that passed its checks (`_Plan.check_target`).
Every GET route also answers HEAD. Resources (the key store's pool, the gRPC channels, the tracer
provider) are owned through `cleanup_ctx`; typed `web.AppKey`s hold them.

Tracing: with `LLMP_OTEL_ENDPOINT` set (an OTLP/gRPC collector, e.g. `http://otel-collector:4317`),
every request gets a server span (with `llmp.request_id`) and every gRPC call a client span that
propagates the trace to the service; with it unset, no exporter and no instrumentation at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import istr
from opentelemetry import trace

from gateway import routes
from gateway.auth import KeyStore, RateLimiter, admin_key
from gateway.http import (
    NOSNIFF,
    VALIDATORS,
    Route,
    ValidatorCache,
    error_response,
    none_match,
    path_checks,
    validate_path,
    validate_query,
)
from gateway.quotas import TenantQuotas, slot_kind
from gateway.router import REMEMBERED_TARGET_CHARS, TableRouter
from gateway.state import (
    CALLER,
    CLIENTS,
    DATABASE,
    DRAINING,
    IP_LIMITER,
    KEYS,
    LIMITER,
    OBJECT_STORE,
    QUOTAS,
    ROUTE_TABLE,
    SETTINGS,
)
from gateway.views import completions, openai_compat
from services.common import errors, identity, logs, tracing
from services.common.bounded import Bounded
from services.common.config import Settings
from services.common.db import Database
from services.common.grpc_client import ServiceClients
from services.common.identity import Caller
from services.common.metrics import LoopCounter, LoopHistogram
from services.common.s3 import ObjectStore

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

# The hot path counts with plain adds on cached children (`LoopCounter`), not `Counter.labels().inc()`.
HTTP_REQUESTS = LoopCounter("llmp_http_requests_total", "REST requests", ("method", "route", "status"))
HTTP_LATENCY = LoopHistogram("llmp_http_request_seconds", "REST latency", ("method", "route"))
REVALIDATED = LoopCounter("llmp_http_revalidated_total", "Conditional GETs answered 304 by the gateway itself")
_REVALIDATED = REVALIDATED.child()
UNSAFE = frozenset({"PUT", "PATCH", "DELETE"})
CHECKED_TARGETS = 256  # targets (of at most REMEMBERED_TARGET_CHARS) a route remembers as checked, then starts over
REQUEST_ID = istr("X-Request-Id")  # header names as `istr`: a case-insensitive lookup without folding them again
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as OTHER

MIGRATIONS = Path(__file__).parent / "migrations"
access_log = logging.getLogger("llmp.access")


class _Observed:
    """What one (method, route, status) needs per request, looked up once: its counter and latency children."""

    __slots__ = ("count", "latency")

    def __init__(self, method: str, route: str, status: int) -> None:
        self.count = HTTP_REQUESTS.child(method, route, str(status))
        self.latency = HTTP_LATENCY.child(method, route)


_observed: dict[tuple[str, str, int], _Observed] = {}


def _observed_for(method: str, route: str, status: int) -> _Observed:
    found = _observed.get((method, route, status))
    if found is None:
        found = _observed[(method, route, status)] = _Observed(method, route, status)
    return found


class _Plan:
    """Everything about one aiohttp route the middleware needs per request, worked out once at start-up
    from its `Route` (roles, query and path checks, concurrency slot, conditional GET) rather than per
    request: the 304 path does a dict lookup here instead of string tests and table lookups."""

    __slots__ = ("method", "name", "route", "roles", "required_query", "path_checks", "slot", "unsafe",
                 "conditional", "observed", "checked")

    def __init__(self, method: str, name: str, route: Route | None) -> None:
        self.method, self.name, self.route = method, name, route
        protected = route is not None and bool(route.roles)
        # None: public (or no route: aiohttp's 404/405); else the roles allowed, admin always among them.
        self.roles = frozenset((*route.roles, "admin")) if protected else None
        self.required_query = bool(route.required_query) if protected else False
        self.path_checks = path_checks(route) if protected else []
        self.slot = slot_kind(method, name)
        self.unsafe = method in UNSAFE
        self.conditional = method in ("GET", "HEAD")
        self.observed: dict[int, _Observed] = {}
        self.checked: Bounded[str, None] = Bounded(CHECKED_TARGETS)  # targets that passed `check_target`

    def check_target(self, request: web.Request) -> None:
        """The query and path checks (422 naming what breaks them). They depend on the target as sent alone, so
        one that passed is remembered (bounded) and a repeated target, the 304 path's revalidations, is not
        parsed and matched against the patterns again."""
        target = request.raw_path  # no URL object made: a query is there if and only if it has a "?"
        if target in self.checked:
            return
        if self.required_query or "?" in target:
            validate_query(self.route, request.query)
        if self.path_checks:
            validate_path(self.path_checks, request.match_info)
        if len(target) <= REMEMBERED_TARGET_CHARS:
            self.checked.remember(target, None)

    def observed_for(self, status: int) -> _Observed:
        found = self.observed.get(status)
        if found is None:
            found = self.observed[status] = _observed_for(self.method, self.name, status)
        return found


class _Hot:
    """The app's objects the middleware uses on every request, bound once the app has started (its
    resources come from `cleanup_ctx`), so a request reads attributes instead of `request.app[...]`."""

    __slots__ = ("app", "keys", "quotas", "limiter", "ip_limiter", "validators", "trusted_hops")

    def __init__(self) -> None:
        self.app = None

    def bind(self, app: web.Application) -> None:
        self.app, self.keys, self.quotas, self.limiter = app, app[KEYS], app[QUOTAS], app[LIMITER]
        self.ip_limiter, self.validators = app[IP_LIMITER], app[VALIDATORS]
        self.trusted_hops = app[SETTINGS].trusted_proxy_hops


def _request_id_source() -> Iterator[str]:
    """Unique request ids without a system call each: a random per-process prefix and a counter (formatted
    by a C-level `map`, not a generator's Python frame: a third of the cost on the 304 path)."""
    return map(f"{uuid.uuid4().hex[:16]}%016x".__mod__, itertools.count(1))


_request_ids = _request_id_source()


_HTTP_ERRORS: dict[int, type[errors.LlmpError]] = {
    400: errors.InvalidArgument, 404: errors.NotFound, 405: errors.InvalidArgument,
    413: errors.PayloadTooLarge, 415: errors.UnsupportedMediaType,
}


def error_body(request: web.Request, error: Exception) -> web.Response:
    """Every failure leaves as `{"error": {"type", "message"}}` with the mapped status; never a bare 500.
    (An HTTPException below 400, a redirect, is re-raised: it is an answer, not a failure.) Under
    `/openai/v1` the body has OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`)."""
    render = openai_compat.error_response if request.path.startswith(openai_compat.PREFIX) else error_response
    if isinstance(error, errors.LlmpError):
        return render(error)
    if isinstance(error, web.HTTPException):
        if error.status < 400:
            raise error
        fallback = errors.InvalidArgument if error.status < 500 else errors.Internal
        cls = _HTTP_ERRORS.get(error.status, fallback)
        message = error.text if error.status == 413 and error.text else error.reason
        response = render(cls(message))
        response.set_status(error.status)
        if error.status == 405:
            response.headers["Allow"] = error.headers.get("Allow", "")
        return response
    if isinstance(error, HttpProcessingError) and 400 <= (error.code or 0) < 500:  # e.g. a bad multipart header
        return error_response(errors.InvalidArgument(f"malformed request: {error.message}"[:300]))
    if isinstance(error, ConnectionResetError):  # the client went away mid-body: its fault, nobody is listening
        return render(errors.InvalidArgument("request body cut short: the connection was reset"))
    known = errors.from_exception(error)
    if known is not None:
        return render(known)
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
    return render(errors.Internal(f"internal error (request id {logs.request_id.get()})"))


def pipeline(plan: _Plan | None, handler, hot: _Hot, *, tracing: bool):
    """`handler` (a route's view) wrapped in the whole per-request pipeline, in this order:

    1. request id in and out (every log line, the trace span, `X-Request-Id`), Prometheus count and
       latency, an access log line (only when `llmp.access` logs at INFO), `X-Content-Type-Options:
       nosniff`, and `Cache-Control: no-store` on any response that did not choose its own;
    2. errors → one JSON body (`error_body`);
    3. API key → caller (`KeyStore`, verified keys cached for `auth.CACHE_SECONDS`, unknown ones too); a key
       not already known first passes the per-address limiter (`IP_LIMITER`), so a flood of bogus keys
       cannot each cost a query; then the tenant's request quota (`quotas.TenantQuotas`, shared by every
       replica), per-key rate limit, role check, query parameter names and path patterns (a target that passed
       them is remembered: they depend on it alone); the handler runs acting as that
       caller (`identity.acting_as`), so every service call it makes carries it, holding one of the
       tenant's generation or stream slots when the route is one (`quotas.slot_kind`);
    4. the conditional-GET fast path: If-None-Match for a representation known immutable
       (`ValidatorCache`, keyed by the caller's tenant) is answered 304 here, with the ETag,
       Cache-Control and Vary the 200 carries, without calling a service. Unsafe requests forget their
       path there.

    Each route is registered already wrapped, with what it needs worked out once (`_Plan`), rather than
    through an aiohttp middleware: any middleware costs every request aiohttp's middleware chain (a
    cached build, partials, its own current-app middleware), about a fifth of the gateway's own time on
    the 304 path (bench/RESULTS.md). `plan` None: the catch-all route that answers 404/405 (`_no_route`).
    The app's objects are read from `hot`, not `request.app[...]`.
    """
    unmatched: dict[str, _Plan] = {}  # by method label (at most len(_METHODS) + 1 entries)

    async def routed(request: web.Request) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID) or next(_request_ids)
        token = logs.request_id.set(request_id)
        if tracing:
            trace.get_current_span().set_attribute("llmp.request_id", request_id)
        started = time.perf_counter()
        current = plan
        if current is None:
            label = request.method if request.method in _METHODS else "OTHER"
            current = unmatched.get(label)
            if current is None:
                current = unmatched[label] = _Plan(label, "unmatched", None)
        status = 500
        try:
            try:
                if current.roles is None:  # public route, or no route (404/405)
                    response = await handler(request)
                else:
                    if hot.app is None:  # before on_startup bound it (an app driven by hand)
                        hot.bind(request.app)
                    key = _bearer(request)
                    keys = hot.keys
                    now = time.monotonic()  # one clock reading for the caches and buckets below
                    known = keys.cached(key, now)
                    if known is None:
                        hot.ip_limiter.take(client_address(request, hot.trusted_hops))
                        known = await keys.authenticate(key)
                        now = time.monotonic()
                    who, rate = known
                    quotas = hot.quotas
                    if not quotas.take_local(who.tenant, now):  # a batch in hand: no await (the 304 path)
                        await quotas.take(who.tenant)
                        now = time.monotonic()
                    response = _admit(request, current, who, rate, hot, now)
                    if response is None:
                        request[CALLER] = who
                        acting = identity.current.set(who)  # `identity.acting_as` without its generator: hot path
                        try:
                            if current.slot is not None:
                                async with quotas.slot(who.tenant, current.slot):
                                    response = await handler(request)
                            elif current.unsafe:
                                response = await _forgetting(request, handler, hot.validators, who.tenant)
                            else:
                                response = await handler(request)
                        finally:
                            identity.current.reset(acting)
            except Exception as error:
                response = error_body(request, error)
            status = response.status
            if not response.prepared:  # streams set their own headers before the first byte
                headers = response.headers
                headers[REQUEST_ID] = request_id
                headers[NOSNIFF[0]] = NOSNIFF[1]
                if hdrs.CACHE_CONTROL not in headers:
                    headers[hdrs.CACHE_CONTROL] = "no-store"
            return response
        except web.HTTPException as redirect:
            status = redirect.status
            raise
        finally:
            elapsed = time.perf_counter() - started
            observed = current.observed_for(status)
            observed.count.value += 1
            observed.latency.observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s %d %.1fms", request.method, request.path_qs, status, elapsed * 1000,
                                extra={"method": request.method, "route": current.name, "status": status,
                                       "duration_ms": round(elapsed * 1000, 3)})
            logs.request_id.reset(token)

    return routed


def _candidates(request: web.Request):
    """The resources aiohttp's router tried for this path: those indexed under each of its prefixes (its
    own walk, `UrlDispatcher.resolve`), so a 404 costs what it did without the catch-all rather than a
    try of every route; every resource where that index is not there."""
    index = getattr(request.app.router, "_resource_index", None)
    if index is None:
        yield from request.app.router.resources()
        return
    url_part = request.rel_url.path_safe
    while url_part:
        yield from index.get(url_part, ())
        if url_part == "/":
            break
        url_part = url_part.rpartition("/")[0] or "/"


# The catch-all route, registered last: aiohttp tries it after every other route (its index is "/", the
# last prefix it walks), so it sees exactly the requests no route takes.
NO_ROUTE = "/{tail:.*}"
_NO_ROUTE_CANONICAL = "/{tail}"  # how aiohttp names that resource (its regex dropped)


async def _no_route(request: web.Request) -> web.StreamResponse:
    """404, or 405 with Allow when another method has a route there (what aiohttp answers without a
    catch-all; the pipeline gives it the one error shape)."""
    allowed: set[str] = set()
    here = request.match_info.route.resource
    for resource in _candidates(request):
        if resource is not here:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def client_address(request: web.Request, trusted_hops: int) -> str:
    """The client's address: the connection's peer, or behind `trusted_hops` proxies that each append the
    address they saw to X-Forwarded-For, the entry that many from the right (what the client itself wrote
    in the header, further left, is not believed)."""
    if trusted_hops:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",") if part.strip()]
        if len(forwarded) >= trusted_hops:
            return forwarded[-trusted_hops]
    return request.remote or ""


def _bearer(request: web.Request) -> str:
    scheme, _, key = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise errors.Unauthenticated("missing API key: send Authorization: Bearer <key>")
    return key


def _admit(request: web.Request, plan: _Plan, who: Caller, rate: float, hot: _Hot, now: float
           ) -> web.StreamResponse | None:
    """Rate limit, role and query check for an authenticated caller; then the conditional-GET fast path:
    the 304 to send without calling the handler, or None to call it. Raises the error that refuses it.
    `now`: `time.monotonic()`."""
    if rate:  # before the role check, so a key hammering forbidden routes is limited too
        hot.limiter.take(who.key_id, rate, now)
    if who.role not in plan.roles:
        raise errors.PermissionDenied(f"role {who.role} may not call {plan.method} {plan.name}")
    plan.check_target(request)
    if plan.conditional:
        condition = request.headers.get(hdrs.IF_NONE_MATCH)
        if condition is not None:
            # The target as sent is the path and query `json_response` remembered (`path_qs`, which aiohttp
            # rebuilds from the parsed URL per request); an absolute-form target just misses the fast path.
            headers = hot.validators.lookup(who.tenant, request.raw_path, now)
            if headers is not None and none_match(condition, headers[hdrs.ETAG]):
                _REVALIDATED.value += 1
                # No body, so not `web.Response` (its body and length handling cost ~1 µs here).
                return web.StreamResponse(status=304, headers=headers)
    return None


async def _forgetting(request: web.Request, handler, validators: ValidatorCache, tenant: str) -> web.StreamResponse:
    validators.forget(tenant, request.path)
    try:
        return await handler(request)
    finally:  # a GET that raced the change must not leave the old validators behind
        validators.forget(tenant, request.path)


# Held (a session-level PostgreSQL advisory lock) by the one gateway whose admin key is its own, not
# LLMP_ADMIN_KEY: another replica would generate a different key. Any constant works; this spells "llmp".
OWN_ADMIN_KEY_LOCK = 0x6C6C6D70


async def _sole_gateway_with_its_own_key(settings: Settings):
    """The connection holding OWN_ADMIN_KEY_LOCK, or None when LLMP_ADMIN_KEY is set (every replica shares it).

    Refuses to start while another gateway on this database holds it: several replicas would each make
    their own admin key (lost with their state), so replicas must share LLMP_ADMIN_KEY from a Secret."""
    if settings.admin_key:
        return None
    import psycopg

    connection = await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True)
    held = await (await connection.execute("SELECT pg_try_advisory_lock(%s)", (OWN_ADMIN_KEY_LOCK,))).fetchone()
    if not held[0]:
        await connection.close()
        raise errors.PreconditionFailed(
            "another gateway on this database runs with its own generated admin key: set LLMP_ADMIN_KEY, the same "
            "for every replica (on Kubernetes the llmp-admin-key Secret), instead of generating one per replica")
    return connection


def _resources(provider: TracerProvider | None):
    async def context(app: web.Application):
        settings = app[SETTINGS]
        own_key_lock = await _sole_gateway_with_its_own_key(settings)
        database = await Database.connect(settings.database_url, component="gateway", migrations_dir=MIGRATIONS,
                                          max_size=5)
        app[DATABASE] = database
        app[KEYS] = KeyStore(database, admin_key(settings))
        app[CLIENTS] = ServiceClients(  # client spans when tracing is on
            settings, principal=identity.GATEWAY, tracer_provider=provider)
        app[OBJECT_STORE] = ObjectStore(settings.s3, timeout=3)
        app[QUOTAS] = TenantQuotas(settings)
        yield
        await app[QUOTAS].close()
        await app[CLIENTS].close()
        await database.close()
        if own_key_lock is not None:
            await own_key_lock.close()  # releases the lock
        if provider is not None:
            provider.shutdown()  # flushes what the batch processor holds

    return context


async def _draining(app: web.Application) -> None:
    app[DRAINING].set()


def _with_head(table: list[Route]) -> list[Route]:
    """The table plus HEAD for every GET route that does not declare its own (aiohttp then sends the
    GET's headers, Content-Length included, without the body)."""
    declared = {(route.method, route.path) for route in table}
    heads = [dataclasses.replace(route, method="HEAD") for route in table
             if route.method == "GET" and ("HEAD", route.path) not in declared]
    return table + heads


def server_spans(provider: TracerProvider):
    """One SERVER span per request, continuing the caller's trace (W3C `traceparent`), named for the
    route template, with the HTTP semantic-convention attributes; 5xx marks the span as an error."""
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode

    tracer = provider.get_tracer("llmp.gateway")

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        # The catch-all that answers 404/405 is no route of the API: its spans say so, as before it existed.
        route = resource.canonical if resource is not None and resource.canonical != _NO_ROUTE_CANONICAL \
            else "unmatched"
        attributes = {"http.request.method": request.method, "url.path": request.path, "http.route": route}
        with tracer.start_as_current_span(f"{request.method} {route}", kind=SpanKind.SERVER,
                                          context=propagate.extract(request.headers), attributes=attributes) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return middleware


def init_app(settings: Settings, *, span_exporter: SpanExporter | None = None) -> web.Application:
    table = routes.all_routes()
    served = _with_head(table)
    provider = tracing.tracer_provider(settings, "llmp-gateway", span_exporter)
    with warnings.catch_warnings():
        # aiohttp deprecates passing a router (its 4.0 drops it); `TableRouter` only makes resolution cheaper,
        # answering exactly what the default router would (gateway/router.py).
        warnings.simplefilter("ignore", DeprecationWarning)
        app = web.Application(middlewares=[server_spans(provider)] if provider is not None else [],
                              client_max_size=settings.max_body_bytes, router=TableRouter())
    app[SETTINGS] = settings
    app[LIMITER] = RateLimiter(rate=50, burst=100)
    app[IP_LIMITER] = RateLimiter(rate=settings.ip_rate_limit, burst=int(2 * settings.ip_rate_limit),
                                  subject="this client address while its key is unknown")
    app[ROUTE_TABLE] = table
    app[VALIDATORS] = ValidatorCache()
    app[completions.CACHE] = completions.ResponseCache()
    app[DRAINING] = asyncio.Event()
    app.on_shutdown.append(_draining)
    app.cleanup_ctx.append(_resources(provider))
    hot = _Hot()

    async def bind(app: web.Application) -> None:  # after cleanup_ctx's start (it runs first): KEYS, QUOTAS
        hot.bind(app)

    app.on_startup.append(bind)
    for route in served:
        plan = _Plan(route.method, route.path, route)
        app.router.add_route(route.method, route.path, pipeline(plan, route.handler, hot, tracing=provider is not None))
    app.router.add_route("*", NO_ROUTE, pipeline(None, _no_route, hot, tracing=provider is not None))
    return app
