"""`POST /v1/completions`: OpenAI-compatible text completion, streamed as Server-Sent Events on request.

Deterministic requests (temperature 0) are answered from a response cache keyed by the deployment's
ETag (which changes whenever its versions or weights change) and the request, so a change of
deployment invalidates every cached answer at once.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import OrderedDict

from aiohttp import web
from llmp.inference.v1 import inference_pb2
from prometheus_client import Counter

from gateway.http import (
    ALL_ROLES,
    EVENT_STREAM,
    EVENT_STREAM_HEADERS,
    INT32_MAX,
    INT64_MAX,
    EventStream,
    Route,
    clients,
    int32,
    int64,
    json_response,
    read_json,
    responses,
    validate,
)
from gateway.state import CALLER
from services.common import contracts, errors
from services.common.grpc_client import deployment_metadata

_STOP = {"type": "string", "minLength": 1, "maxLength": contracts.MAX_STOP_LENGTH}
COMPLETION = {
    "type": "object", "additionalProperties": False, "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string", "pattern": contracts.NAME_PATTERN, "description": "deployment name"},
        "prompt": {"type": "string", "minLength": 1, "maxLength": contracts.MAX_PROMPT_CHARS,
                   "description": "at most what the deployment's context can hold (400 naming the limit)"},
        "max_tokens": int32(1, 4096),
        "temperature": {"type": "number", "minimum": 0, "maximum": contracts.MAX_TEMPERATURE},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": int32(0),
        "seed": int64(0, description="makes sampling reproducible"),
        "stop": {"oneOf": [_STOP, {"type": "array", "items": _STOP, "maxItems": contracts.MAX_STOP_SEQUENCES}]},
        "stream": {"type": "boolean"},
        "user": {"type": "string", "maxLength": 200},
        "n": {"const": 1},
    },
}
_NUMBER = (int, float)


def _stop(value) -> bool:
    return type(value) is str and 1 <= len(value) <= contracts.MAX_STOP_LENGTH


# The quick check of each optional field (see _plainly_valid); `type(...) is int` keeps booleans out, as JSON does,
# and a range check is False for NaN (the parser reads 53.0 as 53; gateway/http.py has the number rule).
_FIELD_CHECKS = {
    "max_tokens": lambda v: type(v) is int and 1 <= v <= 4096,
    "temperature": lambda v: type(v) in _NUMBER and 0 <= v <= contracts.MAX_TEMPERATURE,
    "top_p": lambda v: type(v) in _NUMBER and 0 < v <= 1,
    "top_k": lambda v: type(v) is int and 0 <= v <= INT32_MAX,
    "seed": lambda v: type(v) is int and 0 <= v <= INT64_MAX,
    "stop": lambda v: _stop(v) or (type(v) is list and len(v) <= contracts.MAX_STOP_SEQUENCES and all(map(_stop, v))),
    "stream": lambda v: type(v) is bool,
    "user": lambda v: type(v) is str and len(v) <= 200,
    "n": lambda v: type(v) is int and v == 1,
}
CACHE_HITS = Counter("llmp_completion_cache_total", "Deterministic completion cache lookups", ["result"])
_HIT, _MISS = CACHE_HITS.labels("hit"), CACHE_HITS.labels("miss")  # looked up once, not per request
# All tenants together, on purpose: /metrics is public (scrapers carry no key), so no label may carry a name
# a tenant chose. A deployment's own figures are GET /v1/deployments/{name}/metrics, for its tenant only.
TOKENS = Counter("llmp_completion_tokens_total", "Tokens the gateway served, all tenants together", ["kind"])


class ResponseCache:
    """A bounded LRU of deterministic completions."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, dict] = OrderedDict()

    def get(self, key: str) -> dict | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: str, value: dict) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


CACHE: web.AppKey[ResponseCache] = web.AppKey("completion_cache", ResponseCache)


def _plainly_valid(body: dict) -> bool:
    """A quick check that `body` is a valid completion request, for the hot path: JSON Schema validation
    costs more than the rest of the gateway's work on a request. It may refuse a valid body (then the
    schema decides, and names the problem when there is one) but never accepts an invalid one."""
    model, prompt = body.get("model"), body.get("prompt")
    if type(model) is not str or not contracts.NAME.match(model) or type(prompt) is not str \
            or not 0 < len(prompt) <= contracts.MAX_PROMPT_CHARS:
        return False  # the deployment name also travels as gRPC metadata, which refuses control characters
    for name, value in body.items():
        check = _FIELD_CHECKS.get(name)
        if check is None:
            if name not in ("model", "prompt"):  # unknown fields are refused by the schema
                return False
        elif not check(value):
            return False
    return True


def _generate_request(body: dict, routing_key: str) -> inference_pb2.GenerateRequest:
    stop = body.get("stop") or []
    sampling = inference_pb2.SamplingParameters(
        temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0), top_k=body.get("top_k", 0),
        stop=[stop] if isinstance(stop, str) else stop)
    if "seed" in body:
        sampling.seed = body["seed"]
    return inference_pb2.GenerateRequest(deployment=body["model"], prompt=body["prompt"],
                                         max_tokens=body.get("max_tokens", 16), sampling=sampling,
                                         routing_key=routing_key)


def _deployment_metadata(request: web.Request, body: dict) -> tuple[tuple[str, str], ...]:
    """Names the deployment for the mesh: on Kubernetes it splits the deployment's calls by its canary weight."""
    caller = request.get(CALLER)
    return deployment_metadata(caller.tenant, body["model"]) if caller is not None else ()


def _openai_body(completion_id: str, created: int, deployment: str, completion: inference_pb2.Completion) -> dict:
    return {
        "id": completion_id, "object": "text_completion", "created": created, "model": deployment,
        "choices": [{"text": completion.text, "index": 0, "logprobs": None,
                     "finish_reason": completion.finish_reason or "stop"}],
        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                  "total_tokens": completion.prompt_tokens + completion.completion_tokens},
        "system_fingerprint": f"{completion.model}-v{completion.model_version}",
    }


async def complete(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if not _plainly_valid(body):
        validate(body, COMPLETION)
    routing_key = body.get("user") or request.headers.get("X-Request-Id", "")
    if body.get("stream"):
        return await _stream(request, body, _generate_request(body, routing_key))
    cache_key = None
    if body.get("temperature", 1.0) == 0:
        deployment = await clients(request).inference.GetDeployment(
            inference_pb2.GetDeploymentRequest(name=body["model"]))
        canonical = json.dumps({k: v for k, v in body.items() if k not in {"user", "stream"}}, sort_keys=True)
        tenant = request[CALLER].tenant
        cache_key = hashlib.sha256(f"{tenant}|{deployment.deployment.etag}|{canonical}".encode()).hexdigest()
        cached = request.app[CACHE].get(cache_key)
        if cached is not None:
            _HIT.inc()
            return json_response(request, cached, cache_control="no-store", headers={"X-Cache": "hit"})
        _MISS.inc()
    message = _generate_request(body, routing_key)  # only on a miss: a hit sends nothing to generate
    response = await clients(request).inference.Generate(message, timeout=120,
                                                          metadata=_deployment_metadata(request, body))
    completion = response.completion
    TOKENS.labels("prompt").inc(completion.prompt_tokens)
    TOKENS.labels("completion").inc(completion.completion_tokens)
    answer = _openai_body(f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body["model"], completion)
    if cache_key is not None:
        request.app[CACHE].put(cache_key, answer)
    return json_response(request, answer, cache_control="no-store",
                         headers={"X-Cache": "miss"} if cache_key else None)


async def _stream(request: web.Request, body: dict, message: inference_pb2.GenerateRequest) -> web.StreamResponse:
    """OpenAI-style SSE: one `text_completion` chunk per piece of text, then `data: [DONE]`."""
    call = clients(request).inference.GenerateStream(inference_pb2.GenerateStreamRequest(request=message),
                                                     timeout=120, metadata=_deployment_metadata(request, body))
    with responses(call) as stream:
        first = await anext(stream, None)  # errors before the first chunk still get a proper status
        completion_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        response = EventStream(headers=EVENT_STREAM_HEADERS)
        await response.prepare(request)
        chunk = first
        try:
            while chunk is not None:
                payload = {"id": completion_id, "object": "text_completion", "created": created,
                           "model": body["model"], "choices": [{"text": chunk.text, "index": 0, "logprobs": None,
                                                                "finish_reason": chunk.finish_reason or None}]}
                if chunk.HasField("summary"):
                    summary = chunk.summary
                    payload["usage"] = {"prompt_tokens": summary.prompt_tokens,
                                        "completion_tokens": summary.completion_tokens,
                                        "total_tokens": summary.prompt_tokens + summary.completion_tokens}
                    TOKENS.labels("completion").inc(summary.completion_tokens)
                await response.write(f"data: {json.dumps(payload)}\n\n".encode())
                chunk = await anext(stream, None)
        except errors.LlmpError as error:  # headers are sent: report in-band, as OpenAI does
            await response.write(f"data: {json.dumps(errors.http_body(error))}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response

_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {name: {"type": "integer", "minimum": 0}
                         for name in ("prompt_tokens", "completion_tokens", "total_tokens")}}
# The OpenAI `text_completion` object `_openai_body` answers (a stream sends chunks of it as events instead).
COMPLETION_BODY = {
    "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "system_fingerprint": {"type": "string"}, "usage": _USAGE,
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["text", "index", "finish_reason"],
            "properties": {"text": {"type": "string"}, "index": {"type": "integer"}, "logprobs": {"type": "null"},
                           "finish_reason": {"type": "string"}}}},
    },
}
ROUTES = [
    Route("POST", "/v1/completions", complete, "OpenAI-compatible text completion (stream: true for SSE)",
          roles=ALL_ROLES, body=COMPLETION, tag="completions", returns=COMPLETION_BODY,
          media_type=("application/json", EVENT_STREAM),
          responses={404: "Unknown deployment", 400: "Prompt longer than the model's context"}),
]
