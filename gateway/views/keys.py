"""`/v1/api-keys`: API key management (admin only)."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import key_scope
from gateway.http import ADMIN, Link, Route, caller, json_response, read_json
from gateway.state import KEYS
from services.common import contracts, errors

CREATE_KEY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["tenant", "role"],
    "properties": {
        "tenant": {"type": "string", "pattern": contracts.TENANT_PATTERN},
        "role": {"enum": ["admin", "developer", "inference"]},
        "name": {"type": "string", "maxLength": 200, "pattern": contracts.TEXT_PATTERN},
        "rate_limit": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000},
    },
}


_KEY_PROPERTIES = {"id": {"type": "string"}, "tenant": {"type": "string"}, "role": CREATE_KEY["properties"]["role"],
                   "name": {"type": "string"}, "rate_limit": {"type": "number"}, "created_at": {"type": "string"}}
CREATED_KEY = {"type": "object", "required": ["id", "tenant", "role", "key"],
               "properties": {**_KEY_PROPERTIES, "key": {"type": "string", "description": "the secret, shown once"}}}
KEY_LIST = {"type": "object", "required": ["api_keys"],
        "properties": {"api_keys": {"type": "array", "items": {"type": "object", "properties": _KEY_PROPERTIES}}}}


async def create_key(request: web.Request) -> web.Response:
    body = await read_json(request, CREATE_KEY)
    scope = key_scope(caller(request))
    if scope is not None and body["tenant"] != scope:
        raise errors.PermissionDenied(f"an admin of tenant {scope} creates keys for tenant {scope} only")
    created = await request.app[KEYS].create(tenant=body["tenant"], role=body["role"], name=body.get("name", ""),
                                             rate_limit=body.get("rate_limit", 50.0), created_by=caller(request).key_id)
    return json_response(request, created, status=201, cache_control="no-store")


async def list_keys(request: web.Request) -> web.Response:
    return json_response(request, {"api_keys": await request.app[KEYS].list(key_scope(caller(request)))})


async def revoke_key(request: web.Request) -> web.Response:
    await request.app[KEYS].revoke(request.match_info["key_id"], key_scope(caller(request)))
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


KEY = "/v1/api-keys/{key_id}"
ROUTES = [
    Route("POST", "/v1/api-keys", create_key, "Create an API key (the secret is shown once)", roles=(ADMIN,),
          body=CREATE_KEY, tag="api-keys", responses={201: "Created"}, returns=CREATED_KEY,
          links={"RevokeKey": Link("DELETE", KEY, {"key_id": "$response.body#/id"})}),
    Route("GET", "/v1/api-keys", list_keys, "List API keys", roles=(ADMIN,), tag="api-keys", returns=KEY_LIST),
    Route("DELETE", KEY, revoke_key, "Revoke an API key", roles=(ADMIN,), tag="api-keys",
          responses={204: "Revoked"}),
]
