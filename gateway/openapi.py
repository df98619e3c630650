"""`/openapi.json`: an OpenAPI 3.1 document generated from the route table and its schemas."""

from __future__ import annotations

import re

from gateway.http import Route, int64
from services.common import contracts

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
_STANDARD_ERRORS = {400: "Malformed request", 401: "Missing or unknown API key", 403: "Role not allowed",
                    422: "Invalid field", 429: "Rate limited (see Retry-After)", 503: "A backend is down"}


# Path parameters that are not plain strings: `{version}` is what `gateway.http.path_version` accepts.
_PATH_PARAMETERS = {"version": int64(1, contracts.MAX_VERSION)}

# What a GET (and so its HEAD) answers with beside the body.
_GET_HEADERS = {
    "ETag": {"description": "Strong validator of the representation", "schema": {"type": "string"}},
    "Cache-Control": {"description": "How long and by whom the representation may be cached",
                      "schema": {"type": "string"}},
}


def _head(get: dict) -> dict:
    """The HEAD operation the gateway serves for a GET route: the same parameters and statuses, each
    answer with the GET's headers and no body (RFC 9110 §9.3.2)."""
    return {
        **get,
        "summary": f"{get['summary']} (headers only)",
        "operationId": "head" + get["operationId"].removeprefix("get"),
        "responses": {status: {key: value for key, value in answer.items() if key != "content"}
                      for status, answer in get["responses"].items()},
    }


def document(routes: list[Route], version: str = "0.1.0") -> dict:
    paths: dict[str, dict] = {}
    declared = {(route.method, route.path) for route in routes}
    for route in routes:
        if route.tag == "console":  # HTML and static files for browsers, not part of the JSON API
            continue
        errors = dict(_STANDARD_ERRORS)
        if "{" in route.path:
            errors[404] = "No such resource (or another tenant's)"
        if route.body is not None:
            errors[413] = "Body too large"
        errors.update(route.responses)
        success = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
        if route.method == "GET":
            success["200"]["headers"] = _GET_HEADERS
            success["304"] = {"description": "Not modified (If-None-Match matched the ETag)", "headers": _GET_HEADERS}
        operation: dict = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', route.path).strip('_')}",
            "tags": [route.tag] if route.tag else [],
            "parameters": [
                {"name": name, "in": "path", "required": True,
                 "schema": _PATH_PARAMETERS.get(name, {"type": "string"})}
                for name in re.findall(r"{(\w+)}", route.path)
            ] + [
                {"name": name, "in": "query", "required": False, "schema": schema}
                for name, schema in route.query.items()
            ],
            "responses": {
                **success,
                **{str(status): {"description": text,
                                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                   for status, text in errors.items()},
            },
        }
        if route.roles:
            operation["security"] = [{"apiKey": []}]
        else:
            operation["security"] = []
        operation["x-roles"] = list(route.roles)  # the API key roles that may call it (OpenAPI has no field for it)
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.body}}}
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
    }
