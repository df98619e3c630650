"""Issue 15, finding 7: one number rule for every request body and query (gateway/http.py): integral
numbers are integers however they are written, NaN and Infinity are no numbers, and every integer is
bounded by the protobuf field it travels in, with /openapi.json declaring the bounds enforced."""

from __future__ import annotations

import copy
import json
import math

import pytest
from google.protobuf import json_format
from llmp.inference.v1 import inference_pb2
from llmp.training.v1 import training_pb2

from gateway import openapi, routes
from gateway.http import INT32_MAX, INT64_MAX, parse_json, validate
from gateway.views.completions import COMPLETION, _plainly_valid
from gateway.views.deployments import PUT_DEPLOYMENT
from gateway.views.training_jobs import SUBMIT_JOB
from services.common import errors
from services.training.spec import JobSpec


def test_an_integral_number_is_an_int_however_it_is_written():
    body = parse_json(b'{"a": 53.0, "b": 5.3e1, "c": 1.5, "d": 9007199254740993.0, "e": -0.0, "f": 1e2}')
    assert body == {"a": 53, "b": 53, "c": 1.5, "d": 9007199254740993, "e": 0, "f": 100}
    assert [type(body[k]) for k in "abcdef"] == [int, int, float, int, int, int]


def test_a_number_too_long_to_read_is_a_400_not_a_crash():
    with pytest.raises(errors.InvalidArgument):
        parse_json(b'{"seed": ' + b"9" * 5000 + b"}")


def _integer_schemas(schema, where=""):
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            yield where, schema
        for key, value in schema.items():
            yield from _integer_schemas(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from _integer_schemas(value, f"{where}/{index}")


def test_every_integer_the_document_declares_is_bounded_as_an_int64_or_narrower():
    document = openapi.document(routes.all_routes())
    requests = [{"parameters": operation["parameters"], "body": operation.get("requestBody")}
                for item in document["paths"].values() for operation in item.values()]  # what clients send
    found = list(_integer_schemas(requests))
    assert len(found) > 40
    unbounded = [where for where, schema in found
                 if not -INT64_MAX - 1 <= schema.get("minimum", -math.inf) <= schema.get("maximum", math.inf)
                 <= INT64_MAX]
    assert not unbounded, unbounded
    versions = [parameter["schema"] for item in document["paths"].values() for operation in item.values()
                for parameter in operation["parameters"] if parameter["name"] == "version"]
    assert versions and all(schema == {"type": "integer", "minimum": 1, "maximum": INT64_MAX} for schema in versions)


NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e400"]
JOB = {"dataset": {"name": "d", "version": 1}, "model": {"family": "gpt2"}, "hyperparameters": {},
       "distributed": {"mode": "ddp"}}
LORA_JOB = {"dataset": {"name": "d", "version": 1},
            "model": {"init_from": {"name": "base", "version": 1}, "adapter": {"type": "lora"}}}
# Every number field of the bodies, with a valid body to put it in.
NUMBER_FIELDS = [
    (COMPLETION, {"model": "m", "prompt": "p"}, path) for path in
    ("temperature", "top_p", "top_k", "seed", "max_tokens")
] + [
    (PUT_DEPLOYMENT, {"model": "m", "stable": 1, "canary": {"version": 2, "rollout": {}}}, f"canary.rollout.{name}")
    for name in ("interval_s", "min_requests", "max_error_rate_delta", "max_latency_ratio")
] + [(PUT_DEPLOYMENT, {"model": "m", "stable": 1, "canary": {"version": 2, "weight": 10}}, path)
     for path in ("canary.weight", "canary.version", "stable")] + [
    (SUBMIT_JOB, JOB, f"{group}.{name}") for group in ("model", "hyperparameters", "distributed")
    for name, field in SUBMIT_JOB["properties"][group]["properties"].items()
    if field.get("type") in {"integer", "number"}
] + [(SUBMIT_JOB, JOB, "dataset.version"), (SUBMIT_JOB, JOB, "priority")] + [
    (SUBMIT_JOB, LORA_JOB, f"model.adapter.{name}") for name in ("r", "alpha", "dropout")
]
IDS = [path for _, _, path in NUMBER_FIELDS]


def _put(body: dict, path: str, value) -> dict:
    body = copy.deepcopy(body)
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node[part]
    node[last] = value
    return body


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize("schema, base, path", NUMBER_FIELDS, ids=IDS)
def test_nan_and_infinity_are_refused_naming_the_field(schema, base, path, literal):
    validate(base, schema)  # the body around the field is valid
    parsed = parse_json(json.dumps(_put(base, path, "HOLE")).replace('"HOLE"', literal.decode()).encode())
    with pytest.raises(errors.ValidationFailed) as refused:
        validate(parsed, schema)
    assert refused.value.message.startswith(f"{path}:"), refused.value.message
    if schema is COMPLETION:
        assert not _plainly_valid(parsed)


@pytest.mark.parametrize("schema, base, path", NUMBER_FIELDS, ids=IDS)
def test_a_number_past_its_protobuf_field_is_refused_naming_the_field(schema, base, path):
    for value in (2**31, 2**32, 2**63, -(2**31) - 1, -(2**63) - 1, 10**30):
        body = _put(base, path, value)
        try:
            validate(body, schema)
        except errors.ValidationFailed as refused:
            assert refused.message.startswith(f"{path}:"), refused.message
        else:  # accepted: then it fits the field the gateway sends it in
            _convert(schema, body)


def _convert(schema: dict, body: dict) -> None:
    """Build the messages the views build from `body` (what raised ValueError or TypeError: a 500)."""
    if schema is COMPLETION:
        inference_pb2.SamplingParameters(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                                         top_k=body.get("top_k", 0), seed=body.get("seed", 0))
        inference_pb2.GenerateRequest(max_tokens=body.get("max_tokens", 16))
    elif schema is PUT_DEPLOYMENT:
        canary = body["canary"]
        inference_pb2.PutDeploymentRequest(stable_version=body["stable"], canary=inference_pb2.Canary(
            version=canary["version"], weight=canary.get("weight", 0),
            rollout=inference_pb2.CanaryRollout(**canary.get("rollout", {}))))
    else:
        json_format.ParseDict({k: v for k, v in body.items() if k != "priority"}, training_pb2.JobSpec())
        training_pb2.SubmitJobRequest(priority=body.get("priority", 0))


def test_integral_floats_reach_protobuf_as_integers():
    body = parse_json(b'{"model": "m", "stable": 3.0, "canary": {"version": 4.0, "weight": 1e1,'
                      b' "rollout": {"steps": [50.0, 100.0], "min_requests": 5.0}}}')
    validate(body, PUT_DEPLOYMENT)
    _convert(PUT_DEPLOYMENT, body)
    assert body["canary"] == {"version": 4, "weight": 10, "rollout": {"steps": [50, 100], "min_requests": 5}}


# The gateway's bounds of a training job are the training service's own (services/training/spec.py): at
# each bound the spec is valid, one step past it is not. Companions make the cross-field rules hold.
COMPANIONS = {
    "model.n_embd": {"model.n_head": 1},
    "hyperparameters.max_steps": {"hyperparameters.warmup_steps": 0},
    "hyperparameters.warmup_steps": {"hyperparameters.max_steps": 10**7},
    "hyperparameters.learning_rate": {"hyperparameters.min_learning_rate": 0},
    "hyperparameters.min_learning_rate": {"hyperparameters.learning_rate": 1},
}
# keyword -> (offset from the bound of a value inside, of a value outside), in units of the type's step
OFFSETS = {"minimum": (0, -1), "exclusiveMinimum": (1, 0), "maximum": (0, 1), "exclusiveMaximum": (-1, 0)}


@pytest.mark.parametrize("path", [path for schema, _, path in NUMBER_FIELDS if schema is SUBMIT_JOB
                                  and path != "priority"])
def test_the_training_bounds_are_the_training_services(path):
    *groups, name = path.split(".")
    node = SUBMIT_JOB
    for group in groups:
        node = node["properties"][group]
    schema = node["properties"][name]
    base = LORA_JOB if path.startswith("model.adapter.") else JOB
    for companion, value in COMPANIONS.get(path, {}).items():
        base = _put(base, companion, value)
    step = 1 if schema["type"] == "integer" else 1e-9
    checked = 0
    for keyword, (inside, outside) in OFFSETS.items():
        bound = schema.get(keyword)
        if bound is None or bound in {INT32_MAX, INT64_MAX}:  # the protobuf type's bound, no rule of the service
            continue
        JobSpec.from_dict(_put(base, path, bound + inside * step))
        with pytest.raises(errors.ValidationFailed):
            JobSpec.from_dict(_put(base, path, bound + outside * step))
        checked += 1
    assert checked >= 1
