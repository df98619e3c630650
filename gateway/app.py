"""The REST gateway: `init_app(settings)` builds the aiohttp application.

Middlewares, outermost first: request id + access metrics, errors → one JSON body, authentication
and role checks + rate limits. Resources (the key store's pool, the gRPC channels) are owned through
`cleanup_ctx`; typed `web.AppKey`s hold them.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from aiohttp import web
from prometheus_client import Counter, Histogram

from gateway import routes
from gateway.auth import KeyStore, RateLimiter, admin_key
from gateway.http import error_response
from gateway.state import CALLER, CLIENTS, DATABASE, KEYS, LIMITER, ROUTE_TABLE, SETTINGS
from gateway.views import completions
from services.common import errors, logs
from services.common.config import Settings
from services.common.db import Database
from services.common.grpc_client import ServiceClients
from services.common.metrics import LATENCY_BUCKETS

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("llmp_http_requests_total", "REST requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram("llmp_http_request_seconds", "REST latency", ["method", "route"], buckets=LATENCY_BUCKETS)

MIGRATIONS = Path(__file__).parent / "migrations"


@web.middleware
async def observe(request: web.Request, handler) -> web.StreamResponse:
    """Request id in and out (and in every log line), Prometheus counters and latency."""
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    token = logs.request_id.set(request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        return response
    finally:
        resource = request.match_info.route.resource
        name = resource.canonical if resource is not None else "unmatched"
        HTTP_REQUESTS.labels(request.method, name, str(status)).inc()
        HTTP_LATENCY.labels(request.method, name).observe(time.perf_counter() - started)
        logs.request_id.reset(token)


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
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(errors.Internal(f"internal error (request id {logs.request_id.get()})"))


def authenticate(route_roles: dict[tuple[str, str], tuple[str, ...]]):
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        roles = route_roles.get((request.method, resource.canonical)) if resource is not None else None
        if roles is None and request.method == "HEAD" and resource is not None:
            roles = route_roles.get(("GET", resource.canonical))
        if not roles:  # public route, or no route (404 / 405 answered by aiohttp)
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise errors.Unauthenticated("missing API key: send Authorization: Bearer <key>")
        who, rate = await request.app[KEYS].authenticate(key.strip())
        if rate:  # before the role check, so a key hammering forbidden routes is limited too
            request.app[LIMITER].take(who.key_id, rate)
        if who.role != "admin" and who.role not in roles:
            raise errors.PermissionDenied(f"role {who.role} may not call {request.method} {resource.canonical}")
        request[CALLER] = who
        return await handler(request)

    return middleware


async def _resources(app: web.Application):
    settings = app[SETTINGS]
    database = await Database.connect(settings.database_url, component="gateway", migrations_dir=MIGRATIONS,
                                      max_size=5)
    app[DATABASE] = database
    app[KEYS] = KeyStore(database, admin_key(settings))
    app[CLIENTS] = ServiceClients(settings)
    yield
    await app[CLIENTS].close()
    await database.close()


def init_app(settings: Settings) -> web.Application:
    table = routes.all_routes()
    route_roles = {(route.method, route.path): route.roles for route in table}
    app = web.Application(
        middlewares=[observe, error_bodies, authenticate(route_roles)],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[LIMITER] = RateLimiter(rate=50, burst=100)
    app[ROUTE_TABLE] = table
    app[completions.CACHE] = completions.ResponseCache()
    app.cleanup_ctx.append(_resources)
    for route in table:
        app.router.add_route(route.method, route.path, route.handler)
    return app

