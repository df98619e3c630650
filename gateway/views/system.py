"""Liveness, readiness, the OpenAPI document and Prometheus metrics (public); backend status (authenticated)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import openapi
from gateway.http import ALL_ROLES, Route, json_response
from gateway.state import CLIENTS, DATABASE, DRAINING, OBJECT_STORE, ROUTE_TABLE
from services.common import errors
from services.common.topology import GRPC_SERVICES

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return json_response(request, {"status": "ok"}, cache_control="no-store")


async def readyz(request: web.Request) -> web.Response:
    """Ready when this process can serve: its resources are set up, its pool open, and it is not draining.

    Backends are not asked (that is `/v1/status`): one backend down must not take every replica out of
    the load balancer, since requests that do not need it still work and those that do get 503. Cheap
    (no query, no S3 call, no channel) and it names no internal error, since it is public.
    """
    app = request.app
    reasons = []
    if app[DRAINING].is_set():
        reasons.append("shutting down")
    if DATABASE not in app or app[DATABASE].pool.closed:
        reasons.append("database pool closed")
    if CLIENTS not in app or OBJECT_STORE not in app:
        reasons.append("service clients not set up")
    if reasons:
        return json_response(request, {"status": "not ready", "reasons": reasons,
                                       "error": {"type": "unavailable", "message": "not ready: " + ", ".join(reasons)}},
                             status=503, cache_control="no-store", headers={"Retry-After": "2"})
    return json_response(request, {"status": "ready"}, cache_control="no-store")


async def status(request: web.Request) -> web.Response:
    """Every backend the gateway calls, named, with its health: PostgreSQL, S3 and each gRPC service.

    503 (with Retry-After) while any is down. The gRPC services are asked on the gateway's own channels;
    errors are logged here, and the body carries status names only."""
    app = request.app

    async def database() -> str:
        try:
            await app[DATABASE].check()
        except Exception as error:
            log.warning("status: PostgreSQL check failed", extra={"error": str(error)})
            return "DOWN"
        return "SERVING"

    async def object_store() -> str:
        try:
            await asyncio.wait_for(asyncio.to_thread(app[OBJECT_STORE].check), timeout=3)
        except Exception as error:
            log.warning("status: S3 check failed", extra={"error": str(error) or "timeout"})
            return "DOWN"
        return "SERVING"

    async def service(name: str) -> str:
        try:
            response = await health_pb2_grpc.HealthStub(app[CLIENTS].channel(name)).Check(
                health_pb2.HealthCheckRequest(), timeout=2)
        except errors.Unavailable:  # the channel's policy turns every failed call into the domain error
            return "UNREACHABLE"
        except errors.LlmpError as error:
            return errors.mapping_for(error).grpc_code.name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    names = ["postgresql", "s3", *(grpc_service.name for grpc_service in GRPC_SERVICES)]
    statuses = await asyncio.gather(database(), object_store(),
                                    *(service(grpc_service.name) for grpc_service in GRPC_SERVICES))
    backends = dict(zip(names, statuses, strict=True))
    failing = sorted(name for name, state in backends.items() if state != "SERVING")
    body = {"status": "ok" if not failing else "degraded", "backends": backends, "failing": failing}
    if failing:
        body["error"] = {"type": "unavailable", "message": f"backends down: {', '.join(failing)}"}
        return json_response(request, body, status=503, cache_control="no-store", headers={"Retry-After": "2"})
    return json_response(request, body, cache_control="no-store")


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(request, openapi.document(request.app[ROUTE_TABLE]), cache_control="public, max-age=60")


async def prometheus(request: web.Request) -> web.Response:
    # The exposition format's own media type, its version included (what /openapi.json declares).
    return web.Response(body=generate_latest(),
                        headers={"Cache-Control": "no-store", "Content-Type": CONTENT_TYPE_LATEST})


_STATE = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
STATUS = {"type": "object", "required": ["status", "backends", "failing"],
          "properties": {"status": {"enum": ["ok", "degraded"]},
                         "backends": {"type": "object", "additionalProperties": {"type": "string"}},
                         "failing": {"type": "array", "items": {"type": "string"}}}}


ROUTES = [
    Route("GET", "/healthz", healthz, "Liveness", roles=(), tag="system", returns=_STATE),
    Route("GET", "/readyz", readyz, "Readiness of this process to serve (not of its backends: see /v1/status)",
          roles=(), responses={503: "Not ready (starting or draining)"}, tag="system", returns=_STATE),
    Route("GET", "/v1/status", status, "Health of every backend, named", roles=ALL_ROLES,
          responses={503: "A backend is down"}, tag="system", returns=STATUS),
    Route("GET", "/openapi.json", openapi_json, "This API as OpenAPI 3.1", roles=(), tag="system",
          returns={"type": "object", "required": ["openapi", "paths"]}),
    Route("GET", "/metrics", prometheus, "Prometheus metrics", roles=(), tag="system", media_type=CONTENT_TYPE_LATEST),
]
