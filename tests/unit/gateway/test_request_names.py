"""Issue 15, hygiene: a training job's dataset and init_from names follow the name rule at the gateway too
(init_from.name was any string), so /openapi.json declares the rule and a bad name is 422 naming it."""

from __future__ import annotations

import copy

import pytest

from gateway.http import validate
from gateway.views.training_jobs import SUBMIT_JOB
from services.common.errors import ValidationFailed
from tests.unit.training.test_training_spec import BAD_NAMES

JOB = {"dataset": {"name": "d", "version": 1}, "model": {"family": "gpt2", "init_from": {"name": "base", "version": 2}}}


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("path", [("dataset",), ("model", "init_from")])
def test_names_in_a_training_job_follow_the_name_rule(path, name):
    validate(JOB, SUBMIT_JOB)
    body = copy.deepcopy(JOB)
    node = body
    for part in path:
        node = node[part]
    node["name"] = name
    with pytest.raises(ValidationFailed) as refused:
        validate(body, SUBMIT_JOB)
    assert refused.value.message.startswith(".".join(path) + ".name:"), refused.value.message
