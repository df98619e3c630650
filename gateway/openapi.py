"""`/openapi.json`: an OpenAPI 3.1 document generated from the route table and its schemas.

Nothing here is written per route: each route's `Route` entry (gateway/http.py) declares what is particular
to it, and the rest of its contract is derived here from what the gateway does with any route so declared —
the error statuses its middleware and helpers answer, the schemas of its path parameters by name, the 304 of
a GET served by `json_response`. `tests/e2e/test_openapi_fuzz.py` drives the running stack from this
document alone and fails on any answer the document does not describe.
"""

from __future__ import annotations

import re

from gateway.http import PATH_PARAMETERS, Route
from services.common import contracts

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}

# What a GET answered by `json_response` (and so its HEAD) carries beside the body.
_GET_HEADERS = {
    "ETag": {"description": "Strong validator of the representation", "schema": {"type": "string"}},
    "Cache-Control": {"description": "How long and by whom the representation may be cached",
                      "schema": {"type": "string"}},
}
# One Server-Sent Event as the gateway writes them (`id:`, `event:`, then `data:`, JSON or the final [DONE]).
_EVENT = {"type": "object", "required": ["data"], "properties": {
    "id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"}}}
_SCHEMA_OF_MEDIA = {"text/event-stream": _EVENT, "application/x-tar": {"type": "string", "format": "binary"}}
# Request headers of conditional requests: a route that reads either may answer 412.
_PRECONDITIONS = {"If-Match", "If-None-Match"}
_MEANING = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "Done (no body)",
    304: "Not modified (If-None-Match matched the ETag)",
    400: "Malformed request (not JSON, a path or query value that is not one the server issued)",
    401: "Missing or unknown API key", 403: "Role not allowed", 404: "No such resource (or another tenant's)",
    412: "A precondition (If-Match / If-None-Match) did not hold", 413: "Body too large",
    415: "Body in a media type the operation does not read", 422: "Invalid field (the message names it)",
    428: "Precondition required", 429: "Rate limited (see Retry-After)", 503: "A backend is down (see Retry-After)",
}


def success_statuses(route: Route) -> list[int]:
    """The 2xx the route answers: those its `responses` list, else 200."""
    return sorted(status for status in route.responses if 200 <= status < 300) or [200]


def error_statuses(route: Route) -> dict[int, str]:
    """Every 4xx/5xx the route answers, each with its meaning: derived from what the route declares (the
    gateway middleware's answers for an authenticated route, a path parameter's 404, a body's 400/413/415/422,
    a precondition header's 412), plus the route's own `responses`."""
    found: set[int] = {429}  # the rate limiter answers any request
    if route.roles:  # authentication, role, unknown query names, then the services behind
        found |= {400, 401, 403, 422, 503}
    if "{" in route.path:
        found |= {400, 404}
    if route.body is not None:  # `read_json`: not JSON, too large, labelled otherwise, breaking the schema
        found |= {400, 413, 415, 422}
    if route.uploads:
        found |= {400, 413}
    if route.query:
        found |= {400, 422}
    if _PRECONDITIONS & set(route.headers):
        found.add(412)
    found |= {status for status in route.responses if status >= 300}
    return {status: route.responses.get(status, _MEANING.get(status, "")) for status in sorted(found)
            if status != 304}


def operation_id(method: str, path: str) -> str:
    return f"{method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', path).strip('_')}"


def _parameters(route: Route) -> list[dict]:
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": route.path_parameters.get(name) or PATH_PARAMETERS.get(name, {"type": "string"})}
                  for name in re.findall(r"{(\w+)}", route.path)]
    for name, schema in route.query.items():
        parameter = {"name": name, "in": "query", "required": name in route.required_query, "schema": schema}
        if schema.get("type") == "array":  # ?state=a&state=b
            parameter.update(style="form", explode=True)
        parameters.append(parameter)
    parameters += [{"name": name, "in": "header", "required": False, "schema": schema}
                   for name, schema in route.headers.items()]
    return parameters


def _links(route: Route) -> dict:
    return {name: {"operationId": operation_id(link.method, link.path), "parameters": link.parameters}
            for name, link in route.links.items()}


def _responses(route: Route) -> dict:
    media_types = (route.media_type,) if isinstance(route.media_type, str) else route.media_type
    json_get = route.method == "GET" and "application/json" in media_types  # served by `json_response`
    answers: dict[str, dict] = {}
    for status in success_statuses(route):
        answer: dict = {"description": route.responses.get(status, _MEANING[status])}
        if status != 204:
            answer["content"] = {media: {"schema": (route.returns or {"type": "object"}) if media == "application/json"
                                         else _SCHEMA_OF_MEDIA.get(media, {"type": "string"})}
                                 for media in media_types}
        if json_get:
            answer["headers"] = _GET_HEADERS
        if route.links:
            answer["links"] = _links(route)
        answers[str(status)] = answer
    if json_get:
        answers["304"] = {"description": _MEANING[304], "headers": _GET_HEADERS}
    for status, text in error_statuses(route).items():
        answers[str(status)] = {"description": text, "content": _ERROR_CONTENT}
        if status in (429, 503):
            answers[str(status)]["headers"] = _RETRY_AFTER
    return answers


def _head(get: dict) -> dict:
    """The HEAD operation the gateway serves for a GET route: the same parameters and statuses, each
    answer with the GET's headers and no body (RFC 9110 §9.3.2), and no links (nothing to read them from)."""
    return {
        **get,
        "summary": f"{get['summary']} (headers only)",
        "operationId": "head" + get["operationId"].removeprefix("get"),
        "responses": {status: {key: value for key, value in answer.items() if key not in ("content", "links")}
                      for status, answer in get["responses"].items()},
    }


def _request_body(route: Route) -> dict | None:
    content = {}
    if route.body is not None:
        content["application/json"] = {"schema": route.body}
    content.update({media: {"schema": schema} for media, schema in route.uploads.items()})
    if not content:
        return None
    # An upload route may read its corpus from elsewhere (?source=…), so its body is optional.
    return {"required": not route.uploads, "content": content}


def document(routes: list[Route], version: str = "0.1.0") -> dict:
    paths: dict[str, dict] = {}
    declared = {(route.method, route.path) for route in routes}
    for route in routes:
        if route.tag == "console":  # HTML and static files for browsers, not part of the JSON API
            continue
        operation: dict = {
            "summary": route.summary,
            "operationId": operation_id(route.method, route.path),
            "tags": [route.tag] if route.tag else [],
            "parameters": _parameters(route),
            "responses": _responses(route),
            "security": [{"apiKey": []}] if route.roles else [],
            "x-roles": list(route.roles),  # the API key roles that may call it (OpenAPI has no field for it)
        }
        body = _request_body(route)
        if body is not None:
            operation["requestBody"] = body
        paths.setdefault(route.path, {})[route.method.lower()] = operation
        if route.method == "GET" and ("HEAD", route.path) not in declared:  # served by the app (`_with_head`)
            paths[route.path]["head"] = _head(operation)
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmp", "version": version,
                 "description": "Datasets, training jobs, model registry, deployments and completions."},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        # The name rule every `{name}` follows, for readers; the schemas carry it as a pattern.
        "x-name-rule": contracts.NAME_RULE,
    }
