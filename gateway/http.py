"""HTTP semantics every view shares: the route table entry, JSON bodies validated against schemas,
strong ETags with conditional requests (RFC 9110 §8.8, §13), Cache-Control, and calls to services.

A view module (`gateway/views/<resource>.py`) exports `ROUTES: list[Route]`; `gateway/routes.py`
gathers them into the one table the app and `/openapi.json` are built from.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import grpc
import jsonschema
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from llmp.common.v1 import common_pb2
from multidict import CIMultiDict, istr

from gateway.state import CALLER, CLIENTS
from services.common import contracts, errors
from services.common.grpc_client import ServiceClients
from services.common.identity import Caller

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Roles allowed to call a route; admin may call everything.
ADMIN, DEVELOPER, INFERENCE = "admin", "developer", "inference"
ALL_ROLES = (ADMIN, DEVELOPER, INFERENCE)
BUILDERS = (ADMIN, DEVELOPER)


@dataclass(frozen=True)
class Link:
    """An OpenAPI link from a route's success answer to another operation (`method path`): where each of that
    operation's parameters comes from, as OpenAPI runtime expressions (`$response.body#/id`,
    `$request.path.name`). Tools (and the fuzz test) follow it to chain a create to its reads."""

    method: str
    path: str
    parameters: dict[str, str]


@dataclass(frozen=True)
class Route:
    """One REST route: how it is served, who may call it, and how it is documented.

    `gateway/openapi.py` derives the rest of the route's contract from these fields, so a new route declares
    only what is particular to it: every authenticated route may answer 401/403/422/429/503, a route with a
    path parameter 404, one with a body 400/413/415, a GET 304, a route with `If-Match`/`If-None-Match`
    among its `headers` 412 (and 428 when it says so in `responses`).
    """

    method: str
    path: str
    handler: Handler
    summary: str
    roles: tuple[str, ...] = BUILDERS  # empty tuple: public, no API key needed
    body: dict | None = None  # JSON Schema of the request body (JSON routes)
    query: dict[str, dict] = field(default_factory=dict)  # query parameter -> JSON Schema
    # Statuses particular to the route -> meaning. Its 2xx are the route's successes (200 when none is listed),
    # its 4xx/5xx are added to (or reword) the ones derived from the other fields.
    responses: dict[int, str] = field(default_factory=dict)
    tag: str = ""
    required_query: tuple[str, ...] = ()  # query parameters the route refuses to run without (422)
    headers: dict[str, dict] = field(default_factory=dict)  # request headers it reads -> JSON Schema
    path_parameters: dict[str, dict] = field(default_factory=dict)  # beyond PATH_PARAMETERS, by name
    returns: dict | None = None  # JSON Schema of a success's body (None: a JSON object)
    media_type: str | tuple[str, ...] = "application/json"  # of a success's body (several: the request chooses)
    uploads: dict[str, dict] = field(default_factory=dict)  # media type -> schema of a non-JSON request body
    links: dict[str, Link] = field(default_factory=dict)  # name -> where a success leads


# -- request side -------------------------------------------------------------------------------

def caller(request: web.Request) -> Caller:
    """The authenticated caller (set by the auth middleware)."""
    return request[CALLER]


# -- numbers ------------------------------------------------------------------------------------
# One rule for every number a request carries, applied where bodies are parsed and validated (here):
# - JSON has one number type and JSON Schema calls 53.0 an integer, so the parser reads an integral
#   number as an int however it is written (53.0, 5.3e1): a protobuf integer field never sees a float;
# - NaN and ±Infinity (Python's json accepts them, and 1e400 overflows to Infinity) are not JSON numbers:
#   the validator's "number" and "integer" refuse them, naming the field;
# - every integer schema is bounded by the protobuf field it travels in (`int32`, `int64` below), or by
#   the service's tighter rule, so a value past it is a 422 naming the field, never protobuf's
#   ValueError (a 500), and /openapi.json declares the same bounds the server enforces.
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
_DOUBLE_MAX = sys.float_info.max


def int32(minimum: int = INT32_MIN, maximum: int = INT32_MAX, **extra: Any) -> dict:
    """The schema of an integer sent in a protobuf `int32` field, within [minimum, maximum]."""
    assert INT32_MIN <= minimum <= maximum <= INT32_MAX
    return {"type": "integer", "minimum": minimum, "maximum": maximum, **extra}


def int64(minimum: int = INT64_MIN, maximum: int = INT64_MAX, **extra: Any) -> dict:
    """The schema of an integer sent in a protobuf `int64` field, within [minimum, maximum]."""
    assert INT64_MIN <= minimum <= maximum <= INT64_MAX
    return {"type": "integer", "minimum": minimum, "maximum": maximum, **extra}


def _parse_float(text: str) -> int | float:
    value = float(text)
    if value.is_integer():  # False for inf: an overflow stays a float, for the validator to refuse
        return int(Decimal(text))  # exact, where int(value) would round 9007199254740993.0
    return value


def _is_number(checker, value: Any) -> bool:
    """A JSON number: an int or a finite float (not a bool), one a double can hold."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -_DOUBLE_MAX <= value <= _DOUBLE_MAX


def _is_integer(checker, value: Any) -> bool:
    return type(value) is int  # the parser made integral floats ints; what is left is not an integer


_ecma_pattern = functools.cache(contracts.ecma_regex)  # a name with a final "\n" reached gRPC metadata


def _pattern(validator, pattern: str, instance: Any, schema: dict):
    if validator.is_type(instance, "string") and not _ecma_pattern(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    validators={"pattern": _pattern},
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"number": _is_number, "integer": _is_integer}))


def parse_json(raw: bytes) -> Any:
    """A JSON document as the rule above reads it (integral numbers as ints); 400 when it is not JSON."""
    try:
        return json.loads(raw, parse_float=_parse_float)
    except UnicodeDecodeError as error:
        raise errors.InvalidArgument(f"request body is not UTF-8: {error.reason} at byte {error.start}") from None
    except json.JSONDecodeError as error:
        raise errors.InvalidArgument(f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}") \
            from None
    except ValueError:  # the one other failure: an integer longer than Python converts
        raise errors.InvalidArgument(f"malformed JSON: a number of more than {sys.get_int_max_str_digits()} "
                                     "digits") from None


# What a JSON body may be labelled (aiohttp's `content_type` is the media type alone, lowercase); any other
# label is 415, as /openapi.json declares. A body sent without a Content-Type is read as JSON.
JSON_MEDIA_TYPES = frozenset({"application/json"})


async def read_json(request: web.Request, schema: dict | None = None) -> dict:
    """The request's JSON object, validated against `schema` (422 naming the field on failure)."""
    if "Content-Type" in request.headers and request.content_type not in JSON_MEDIA_TYPES:
        raise errors.UnsupportedMediaType(f"request body must be application/json, not {request.content_type!r}")
    raw = await request.read()
    if not raw:
        raise errors.InvalidArgument("request body is empty; a JSON object is required")
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise errors.InvalidArgument("request body must be a JSON object")
    if schema is not None:
        validate(body, schema)
    return body


_VALIDATORS: dict[int, jsonschema.protocols.Validator] = {}


def schema_problem(value: Any, schema: dict) -> tuple[str, str] | None:
    """(where, what) of the first field that breaks `schema` (with the number rule above), None when
    nothing does. `where` is the field's dotted path ("messages.0.role"), "body" for the whole body.
    Validators are built once per schema (the schemas are module constants), not per request."""
    validator = _VALIDATORS.get(id(schema))
    if validator is None or validator.schema is not schema:
        validator = _VALIDATORS[id(schema)] = Validator(schema)
    problems = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if not problems:
        return None
    first = problems[0]
    return ".".join(str(part) for part in first.absolute_path) or "body", first.message


def validate(value: Any, schema: dict) -> None:
    """422 naming the first field that breaks `schema`."""
    problem = schema_problem(value, schema)
    if problem is not None:
        raise errors.ValidationFailed(f"{problem[0]}: {problem[1]}")


def query_int(request: web.Request, name: str, default: int, schema: dict) -> int:
    """The integer query parameter `name`, within the bounds of `schema` (the route's schema of it, so
    /openapi.json declares the bounds enforced here); `default` when absent."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.ValidationFailed(f"query parameter {name} must be an integer, not {raw[:40]!r}") from None
    minimum, maximum = schema["minimum"], schema["maximum"]
    if not minimum <= value <= maximum:
        raise errors.ValidationFailed(f"query parameter {name} must be within [{minimum}, {maximum}]")
    return value


_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no"})


def query_value(raw: str, schema: dict) -> Any:
    """A query string value read as `schema`'s type (integers and booleans from their spelling), else the
    string itself, for `validate` to judge."""
    kind = schema.get("type")
    if kind == "integer":
        try:
            return int(raw) if raw.strip() == raw else raw
        except ValueError:
            return raw
    if kind == "boolean":
        lowered = raw.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else raw
    return raw


def validate_query(route: Route, query) -> None:
    """422 naming the first query parameter that breaks the route's declaration: an unknown name (a field the
    caller may not set, like ?tenant=, is refused, not ignored), a missing required one, or a value outside its
    schema. Every route gets it from its `query` and `required_query`, as /openapi.json declares them."""
    unknown = sorted(set(query) - route.query.keys())
    if unknown:
        raise errors.ValidationFailed(f"unknown query parameter(s): {', '.join(unknown)}")
    for name in route.required_query:
        if not query.get(name):
            raise errors.ValidationFailed(f"{name}: required (query parameter)")
    for name, schema in route.query.items():
        values = query.getall(name, [])
        if not values:
            continue
        if schema.get("type") == "array":
            value, item = [query_value(raw, schema.get("items", {})) for raw in values], schema
        elif len(values) > 1:
            raise errors.ValidationFailed(f"query parameter {name} given {len(values)} times; once at most")
        else:
            value, item = query_value(values[0], schema), schema
        try:
            validate(value, item)
        except errors.ValidationFailed as error:
            raise errors.ValidationFailed(f"{name}: {error.message.removeprefix('body: ')} (query parameter)") \
                from None


# The query of every list route: `?page_size` (services' default when absent) and `?page_token`, the
# `next_page_token` of the page before (the services issue them as URL-safe base64; any other is 400).
PAGE_SIZE = int32(1, contracts.MAX_PAGE_SIZE, default=contracts.DEFAULT_PAGE_SIZE)
PAGE_TOKEN = {"type": "string", "pattern": contracts.PAGE_TOKEN_PATTERN,
              "description": "the next_page_token of the page before; absent for the first page"}
PAGING = {"page_size": PAGE_SIZE, "page_token": PAGE_TOKEN}


def page(request: web.Request) -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_size=query_int(request, "page_size", contracts.DEFAULT_PAGE_SIZE, PAGE_SIZE),
                                  page_token=request.query.get("page_token", ""))


def idempotency_key(request: web.Request) -> str:
    """The request's Idempotency-Key ("" without one), at most MAX_IDEMPOTENCY_KEY characters."""
    key = request.headers.get("Idempotency-Key", "")
    if len(key) > contracts.MAX_IDEMPOTENCY_KEY:
        raise errors.ValidationFailed(f"Idempotency-Key: at most {contracts.MAX_IDEMPOTENCY_KEY} characters")
    return key


# The schema of each path parameter, by name, as the views read it: a route with `{name}` in its path gets the
# name rule, one with `{version}` what `path_version` accepts, whatever view declares it.
NAME = {"type": "string", "pattern": contracts.NAME_PATTERN}
PATH_PARAMETERS = {
    "name": NAME,
    "alias": NAME,
    "version": int64(1, contracts.MAX_VERSION),
    "id": {"type": "string", "format": "uuid"},
}


def path_checks(route: Route) -> list[tuple[str, re.Pattern]]:
    """(segment name, pattern) for each `{name}` of the route whose schema is a string with a pattern: what
    `validate_path` tests, worked out once per route."""
    return [(name, _ecma_pattern(schema["pattern"])) for name in re.findall(r"{(\w+)}", route.path)
            for schema in [route.path_parameters.get(name) or PATH_PARAMETERS.get(name, {})]
            if schema.get("type") == "string" and "pattern" in schema]


def validate_path(checks: list[tuple[str, re.Pattern]], match_info) -> None:
    """422 naming the first path segment that breaks its declared pattern (a `{name}` outside the name rule;
    `checks` from `path_checks`), before the view reads a header or calls a service: the answer to a bad name
    never depends on the rest of the request. Integers (`{version}`) are read and judged by `path_version`."""
    for name, pattern in checks:
        value = match_info.get(name, "")
        if not pattern.search(value):
            raise errors.ValidationFailed(f"{name}: {value[:80]!r} does not match {pattern.pattern!r} (path)")


def path_version(request: web.Request) -> int:
    """The `{version}` path parameter: a positive int64, else 400 naming it."""
    raw = request.match_info["version"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and 1 <= int(raw) <= contracts.MAX_VERSION):
        raise errors.InvalidArgument(f"version must be an integer from 1 to {contracts.MAX_VERSION}, not {raw[:40]!r}")
    return int(raw)


# -- calling services ---------------------------------------------------------------------------

def clients(request: web.Request) -> ServiceClients:
    """The services' typed stubs (`clients(request).registry.GetModel(message)`). A call made while
    handling a request acts as its caller and carries its request id; a peer's error raises as the
    domain error, which the error middleware answers."""
    return request.app[CLIENTS]


@contextmanager
def responses(call: grpc.aio.UnaryStreamCall) -> Iterator[AsyncIterator[Any]]:
    """A server-streaming call's responses (for `anext`); leaving the block cancels the call, so a client
    that went away mid-stream stops the work at once rather than when the call is collected."""
    try:
        yield aiter(call)
    finally:
        call.cancel()


def to_dict(message: Message) -> dict:
    """A protobuf message as the JSON object the REST API shows: proto field names, defaults included,
    64-bit integers as JSON numbers (proto3 JSON would quote them) and enum values without their
    proto prefix (`VERSION_STATE_READY` → `READY`)."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    return _restyle(as_dict, message.DESCRIPTOR)


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _enum_name(value: str, enum_type) -> str:
    names = [item.name for item in enum_type.values]
    prefix = os.path.commonprefix(names)
    prefix = prefix[:prefix.rfind("_") + 1]
    return value[len(prefix):] if value.startswith(prefix) else value


def _restyle_value(value: Any, field_descriptor) -> Any:
    if field_descriptor.type in _INT64 and isinstance(value, str):
        return int(value)
    if field_descriptor.enum_type is not None and isinstance(value, str):
        return _enum_name(value, field_descriptor.enum_type)
    message_type = field_descriptor.message_type
    well_known = message_type is not None and message_type.full_name.startswith("google.protobuf")
    if message_type is not None and isinstance(value, dict) and not well_known:
        return _restyle(value, message_type)
    return value


def _restyle(value: dict, descriptor) -> dict:
    for field_descriptor in descriptor.fields:
        name = field_descriptor.name
        if name not in value:
            continue
        item = value[name]
        message_type = field_descriptor.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            value_field = message_type.fields_by_name["value"]
            value[name] = {key: _restyle_value(entry, value_field) for key, entry in item.items()}
        elif isinstance(item, list):
            value[name] = [_restyle_value(entry, field_descriptor) for entry in item]
        else:
            value[name] = _restyle_value(item, field_descriptor)
    return value


_SCALAR_SCHEMAS = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"}, FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"}, FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string"},
}
# Well-known types as proto3 JSON writes them (Timestamp and Duration as strings, Struct as an object).
_WELL_KNOWN_SCHEMAS = {"google.protobuf.Timestamp": {"type": "string"}, "google.protobuf.Duration": {"type": "string"},
                       "google.protobuf.Struct": {"type": "object"}, "google.protobuf.Value": {}}


def message_schema(descriptor, *, nullable: tuple[str, ...] = (), **replaced: dict) -> dict:
    """The JSON Schema of what `to_dict` makes of a message of `descriptor`: its views declare it as their
    answer (`Route.returns`), so /openapi.json describes the body the gateway really sends. `replaced`: fields
    the view presents otherwise (`present_*`); `nullable`: fields it sets to null when unset."""
    properties = {field.name: _field_schema(field) for field in descriptor.fields}
    properties.update(replaced)
    for name in nullable:
        properties[name] = {"anyOf": [properties[name], {"type": "null"}]}
    return {"type": "object", "properties": properties}


def _field_schema(field_descriptor) -> dict:
    message_type = field_descriptor.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": _field_schema(message_type.fields_by_name["value"])}
    if field_descriptor.enum_type is not None:
        enum_type = field_descriptor.enum_type
        one = {"enum": [_enum_name(value.name, enum_type) for value in enum_type.values]}
    elif message_type is not None:
        one = _WELL_KNOWN_SCHEMAS.get(message_type.full_name) or message_schema(message_type)
    elif field_descriptor.type in _INT64 or field_descriptor.cpp_type in (FieldDescriptor.CPPTYPE_INT32,
                                                                          FieldDescriptor.CPPTYPE_UINT32):
        one = {"type": "integer"}
    else:
        one = _SCALAR_SCHEMAS[field_descriptor.type]
    if field_descriptor.label == FieldDescriptor.LABEL_REPEATED:
        return {"type": "array", "items": one}
    return one


# -- response side: ETags and conditional requests ------------------------------------------------

def etag_of(payload: Any) -> str:
    """A strong ETag derived from the canonical JSON of the representation."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return '"' + hashlib.sha256(canonical).hexdigest()[:32] + '"'


def _tags(header: str) -> list[str]:
    """Entity tags of an If-Match / If-None-Match header ('*' stays '*')."""
    return [part.strip() for part in header.split(",") if part.strip()]


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def none_match(header: str | None, current: str | None) -> bool:
    """True when If-None-Match matches the current representation (weak comparison, RFC 9110 §13.1.2)."""
    if header is None or current is None:
        return False
    if header == current:  # the common case: a client sending back the one ETag it was given
        return True
    tags = _tags(header)
    return "*" in tags or _opaque(current) in {_opaque(tag) for tag in tags}


def check_if_match(request: web.Request, current: str | None, *, required: bool) -> None:
    """Enforce If-Match (strong comparison) and If-None-Match: * on a state-changing request.

    `current` is the resource's ETag, None when it does not exist. `required`: a missing precondition
    is 428 rather than allowed.
    """
    if_match = request.headers.get("If-Match")
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        if _tags(if_none_match) == ["*"]:
            if current is not None:
                raise errors.PreconditionFailed("the resource already exists (If-None-Match: *)")
            return
        if none_match(if_none_match, current):
            raise errors.PreconditionFailed("If-None-Match matched the current representation")
    if if_match is None:
        if required and current is not None and if_none_match is None:
            raise errors.PreconditionRequired(
                "this change needs If-Match with the resource's current ETag (GET it first)")
        if required and current is None and if_none_match is None:
            raise errors.PreconditionRequired("creating this resource needs If-None-Match: *")
        return
    tags = _tags(if_match)
    if current is None:
        raise errors.PreconditionFailed("If-Match given but the resource does not exist")
    if "*" in tags:
        return
    if current.startswith("W/") or current not in tags:  # strong comparison: weak tags never match
        raise errors.PreconditionFailed(f"If-Match does not match the current ETag {current}")


# Every representation behind an API key depends on the key's tenant and role.
VARY = "Authorization"
# On every response (the gateway middleware adds it to the others): browsers must not guess another
# content type than the one declared, e.g. render an error body that echoes input as HTML.
NOSNIFF = (istr("X-Content-Type-Options"), "nosniff")  # an `istr`: set on every response without folding it
# Server-Sent Events responses, which send their headers before the middleware sees them.
EVENT_STREAM = "text/event-stream"
EVENT_STREAM_HEADERS = {"Content-Type": EVENT_STREAM, "Cache-Control": "no-store", "X-Accel-Buffering": "no",
                        NOSNIFF[0]: NOSNIFF[1]}


class EventStream(web.StreamResponse):
    """An SSE response whose headers leave with the first event (aiohttp's `Response` does the same): the
    first token reaches the client in one write and one wake-up instead of two."""

    _send_headers_immediately = False


class ValidatorCache:
    """The validators (ETag, Cache-Control, Vary) of representations known not to change for a while,
    per tenant and path, so that a conditional GET of one is answered 304 without a service round trip.

    Only views that know a representation is immutable (a READY dataset version) put entries here, each
    for at most the `max-age` they already grant clients, so the gateway never answers anything a
    client's own cache would not. Any unsafe request (PUT, POST, DELETE…) through this gateway forgets
    its path and everything under it; the TTL bounds what another replica's change can leave behind.
    Keys include the tenant: another tenant's request for the same path never sees an entry.
    """

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], tuple[float, CIMultiDict[str]]] = OrderedDict()

    def lookup(self, tenant: str, path: str, now: float | None = None) -> CIMultiDict[str] | None:
        """The validators remembered for `path` (a request's target, path and query as sent), as the headers
        a 304 copies (a `CIMultiDict` made once: a response copies one faster than a dict); None if none.
        `now`: `time.monotonic()`, if the caller has it."""
        item = self._items.get((tenant, path))
        if item is None:
            return None
        if item[0] <= (time.monotonic() if now is None else now):
            del self._items[(tenant, path)]
            return None
        return item[1]

    def remember(self, tenant: str, path: str, headers: dict[str, str], ttl: float) -> None:
        self._items[(tenant, path)] = (time.monotonic() + ttl, CIMultiDict(headers))
        self._items.move_to_end((tenant, path))
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def forget(self, tenant: str, path: str) -> None:
        """Forget `path` and every path under it (a DELETE of a dataset forgets its versions)."""
        below = path.rstrip("/") + "/"
        for key in [key for key in self._items if key[0] == tenant and (key[1] == path or key[1].startswith(below)
                                                                        or key[1].startswith(path + "?"))]:
            del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


VALIDATORS: web.AppKey[ValidatorCache] = web.AppKey("validators", ValidatorCache)


def json_response(request: web.Request, payload: Any, *, status: int = 200,
                  cache_control: str = "private, no-cache", etag: str | None = None,
                  headers: dict[str, str] | None = None, immutable_for: float = 0.0) -> web.Response:
    """A JSON response; GETs carry a strong ETag and honour If-None-Match with 304.

    A 304 carries the same ETag, Cache-Control and Vary the 200 would (RFC 9110 §15.4.5).
    `immutable_for`: seconds this representation is known not to change; the gateway then answers
    If-None-Match for it itself (`ValidatorCache`). Give it only for representations that cannot change.
    """
    all_headers = {"Cache-Control": cache_control, "Vary": VARY, **(headers or {})}
    if request.method in {"GET", "HEAD"} and status == 200:
        tag = etag or etag_of(payload)
        all_headers["ETag"] = tag
        who = request.get(CALLER)
        if immutable_for > 0 and who is not None and VALIDATORS in request.app:
            request.app[VALIDATORS].remember(who.tenant, request.path_qs, dict(all_headers), immutable_for)
        if none_match(request.headers.get("If-None-Match"), tag):
            return web.Response(status=304, headers=all_headers)
    elif etag:
        all_headers["ETag"] = etag
    body = json.dumps(payload, separators=(",", ":"), default=str)
    return web.Response(status=status, text=body, content_type="application/json", headers=all_headers)


def error_response(error: errors.LlmpError) -> web.Response:
    mapping = errors.mapping_for(error)
    headers = {"Cache-Control": "no-store", "Vary": VARY}
    if error.retry_after is not None or mapping.http_status in {429, 503}:
        headers["Retry-After"] = str(max(1, round(error.retry_after or 1)))
    return web.Response(status=mapping.http_status, text=json.dumps(errors.http_body(error)),
                        content_type="application/json", headers=headers)
