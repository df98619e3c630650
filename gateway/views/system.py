"""Liveness, readiness, the OpenAPI document and Prometheus metrics: public routes."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import openapi
from gateway.http import Route, json_response
from gateway.state import DATABASE, OBJECT_STORE, ROUTE_TABLE, SETTINGS
from services.common.grpc_client import health_check
from services.common.topology import GRPC_SERVICES


async def healthz(request: web.Request) -> web.Response:
    return json_response(request, {"status": "ok"}, cache_control="no-store")


async def readyz(request: web.Request) -> web.Response:
    """Ready when PostgreSQL and S3 answer and every gRPC service reports SERVING; else 503 naming the rest."""
    settings = request.app[SETTINGS]

    async def database() -> str:
        try:
            await request.app[DATABASE].check()
        except Exception as error:
            return f"DOWN: {error}"
        return "SERVING"

    async def object_store() -> str:
        try:
            await asyncio.wait_for(asyncio.to_thread(request.app[OBJECT_STORE].check), timeout=3)
        except Exception as error:
            return f"DOWN: {error or 'timeout'}"
        return "SERVING"

    names = ["postgresql", "s3", *(service.name for service in GRPC_SERVICES)]
    statuses = await asyncio.gather(
        database(), object_store(),
        *(health_check(settings.service_addrs[service.name], timeout=2) for service in GRPC_SERVICES))
    backends = dict(zip(names, statuses, strict=True))
    failing = sorted(name for name, status in backends.items() if status != "SERVING")
    body = {"status": "ready" if not failing else "not ready", "backends": backends, "failing": failing}
    if failing:
        body["error"] = {"type": "unavailable", "message": f"not ready: {', '.join(failing)}"}
        return json_response(request, body, status=503, cache_control="no-store", headers={"Retry-After": "2"})
    return json_response(request, body, cache_control="no-store")


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(request, openapi.document(request.app[ROUTE_TABLE]), cache_control="public, max-age=60")


async def prometheus(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(), headers={"Cache-Control": "no-store"})
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


ROUTES = [
    Route("GET", "/healthz", healthz, "Liveness", roles=(), tag="system"),
    Route("GET", "/readyz", readyz, "Readiness of every backend", roles=(), responses={503: "Not ready"},
          tag="system"),
    Route("GET", "/openapi.json", openapi_json, "This API as OpenAPI 3.1", roles=(), tag="system"),
    Route("GET", "/metrics", prometheus, "Prometheus metrics", roles=(), tag="system"),
]
