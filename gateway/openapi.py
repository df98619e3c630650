"""`/openapi.json`: an OpenAPI 3.1 document generated from the route table and its schemas."""

from __future__ import annotations

import re

from gateway.http import Route

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
_STANDARD_ERRORS = {400: "Malformed request", 401: "Missing or unknown API key", 403: "Role not allowed",
                    422: "Invalid field", 429: "Rate limited (see Retry-After)", 503: "A backend is down"}


def document(routes: list[Route], version: str = "0.1.0") -> dict:
    paths: dict[str, dict] = {}
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
            success["304"] = {"description": "Not modified (If-None-Match matched the ETag)"}
        operation: dict = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', route.path).strip('_')}",
            "tags": [route.tag] if route.tag else [],
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
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
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.body}}}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
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
