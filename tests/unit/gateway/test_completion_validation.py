"""The completions view's quick request check agrees with the JSON Schema it stands in for."""

from __future__ import annotations

import itertools

from gateway.http import Validator
from gateway.views.completions import _FIELD_CHECKS, COMPLETION, _plainly_valid

SCHEMA = Validator(COMPLETION)  # the gateway's validator: JSON Schema with its number rule
NAN, INF = float("nan"), float("inf")
BASE = {"model": "chat", "prompt": "Hello"}
VALUES = {
    "model": ["chat", "", 3, None, "\x1f", "a\x00", "Chat Bot", "x" * 64],  # a name: it travels as gRPC metadata
    "prompt": ["Hello", "", ["a"], None],
    "max_tokens": [1, 16, 4096, 0, 4097, -1, 1.0, 2.5, True, "16", None],
    "temperature": [0, 0.7, 2, 2.01, -0.1, NAN, INF, True, "0", None],
    "top_p": [1, 0.9, 0, 1.1, NAN, -INF, False, None],
    "top_k": [0, 50, 2**31 - 1, -1, 2**31, 1.5, NAN, True],
    "seed": [0, 7, 2**63 - 1, -3, 2**63, 2**70, 1.5, INF, False, "7"],
    "stop": ["\n", ["a", "b"], [], ["a"] * 5, [1], 3, None],
    "stream": [True, False, 0, "true", None],
    "user": ["u", "x" * 200, "x" * 201, 1],
    "n": [1, 2, 1.0, True],
    "tenant": ["beta"],
}


def test_the_quick_check_covers_exactly_the_schema_fields():
    assert set(_FIELD_CHECKS) | {"model", "prompt"} == set(COMPLETION["properties"])


def test_the_quick_check_never_accepts_what_the_schema_refuses():
    bodies = [{**BASE, name: value} for name, values in VALUES.items() for value in values]
    bodies += [{**BASE, a: va, b: vb} for (a, xs), (b, ys) in itertools.combinations(VALUES.items(), 2)
               for va, vb in itertools.product(xs[:2] + xs[-1:], ys[:2] + ys[-1:])]
    bodies += [{"prompt": "x"}, {"model": "m"}, {}]
    accepted = 0
    for body in bodies:
        if _plainly_valid(body):
            accepted += 1
            assert SCHEMA.is_valid(body), body
    assert accepted > len(bodies) // 4  # and it does let the usual requests through


def test_the_usual_requests_take_the_quick_path():
    assert _plainly_valid({**BASE, "max_tokens": 32, "temperature": 0, "stream": True})
    assert _plainly_valid({**BASE, "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 1, "stop": ["\n"]})


def test_a_deployment_name_that_cannot_travel_as_metadata_is_refused():
    # The OpenAPI fuzzer's find: a model of "\x1f" reached gRPC metadata and failed there as a 500.
    for model in ("\x1f", "a\x00", "chat\n"):
        assert not _plainly_valid({**BASE, "model": model}) and not SCHEMA.is_valid({**BASE, "model": model})
