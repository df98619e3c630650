"""The gateway refuses exactly what the services behind it refuse: both read the bounds from the contracts.

Each check probes the edge on both sides (the last value allowed, the first refused), so a bound copied
into the gateway or a service and then changed on one side only fails here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from llmp.inference.v1 import inference_pb2 as pb

from gateway.http import validate
from gateway.views.completions import COMPLETION
from gateway.views.deployments import PUT_DEPLOYMENT
from gateway.views.openai_compat import CHAT_COMPLETIONS, COMPLETIONS
from gateway.views.training_jobs import SUBMIT_JOB
from services.common import contracts
from services.common.errors import ValidationFailed
from services.common.identity import Caller
from services.dataset.options import DatasetOptions
from services.inference.deployments import DeploymentSpec
from services.inference.sampling import SamplingParams
from services.inference.servicer import choice_count
from services.training.coordinator import Coordinator

JOB = {"dataset": {"name": "wiki", "version": 1}, "model": {"family": "gpt2"}}


def _refused(check: Callable[[], object]) -> bool:
    try:
        check()
    except ValidationFailed:
        return True
    return False


def _gateway_refuses(schema: dict, body: dict) -> bool:
    return _refused(lambda: validate(body, schema))


async def _training_refuses(spec: dict = JOB, **submit) -> bool:
    """Whether the coordinator refuses the submit before it needs PostgreSQL (db=None fails at the first query)."""
    try:
        await Coordinator(None).submit(Caller(tenant="acme", key_id="k", role="developer"), spec, **submit)
    except ValidationFailed:
        return True
    except AttributeError:  # validation passed: it reached the database
        return False
    raise AssertionError("submit without a database cannot succeed")


@pytest.mark.parametrize("priority, refused", [(contracts.MAX_PRIORITY, False), (contracts.MAX_PRIORITY + 1, True),
                                               (contracts.MIN_PRIORITY, False), (contracts.MIN_PRIORITY - 1, True)])
async def test_job_priority(priority, refused):
    assert _gateway_refuses(SUBMIT_JOB, {**JOB, "priority": priority}) is refused
    assert await _training_refuses(priority=priority) is refused


@pytest.mark.parametrize("length, refused", [(contracts.MAX_IDEMPOTENCY_KEY, False),
                                             (contracts.MAX_IDEMPOTENCY_KEY + 1, True)])
async def test_idempotency_key(length, refused):
    # The gateway passes the header on after the same length check (training_jobs.submit_job).
    assert await _training_refuses(idempotency_key="k" * length) is refused


@pytest.mark.parametrize("name, refused", [("chat-v2.1_x", False), ("x" * 63, False), ("x" * 64, True),
                                           ("Chat", True), ("-chat", True)])
async def test_names(name, refused):
    assert _gateway_refuses(SUBMIT_JOB, {**JOB, "model_name": name}) is refused
    assert await _training_refuses(model_name=name) is refused
    assert _gateway_refuses(SUBMIT_JOB, {**JOB, "dataset": {"name": name, "version": 1}}) is refused
    assert await _training_refuses({**JOB, "dataset": {"name": name, "version": 1}}) is refused
    assert _gateway_refuses(PUT_DEPLOYMENT, {"model": name, "stable": 1}) is refused
    assert _refused(lambda: DeploymentSpec(name="chat", model=name, stable_version=1).validate()) is refused
    assert _refused(lambda: DatasetOptions(name=name).validated()) is refused


@pytest.mark.parametrize("stop, refused", [
    (["s" * contracts.MAX_STOP_LENGTH] * contracts.MAX_STOP_SEQUENCES, False),
    (["s"] * (contracts.MAX_STOP_SEQUENCES + 1), True),
    (["s" * (contracts.MAX_STOP_LENGTH + 1)], True),
    ([""], True),
])
def test_stop_sequences(stop, refused):
    assert _gateway_refuses(COMPLETION, {"model": "chat", "prompt": "hi", "stop": stop}) is refused
    assert _refused(lambda: SamplingParams(stop=tuple(stop)).validate()) is refused


@pytest.mark.parametrize("temperature, refused", [(contracts.MAX_TEMPERATURE, False),
                                                  (contracts.MAX_TEMPERATURE + 0.01, True)])
def test_temperature(temperature, refused):
    assert _gateway_refuses(COMPLETION, {"model": "chat", "prompt": "hi", "temperature": temperature}) is refused
    assert _refused(lambda: SamplingParams(temperature=temperature).validate()) is refused


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("penalty, refused", [(contracts.MAX_PENALTY, False), (contracts.MAX_PENALTY + 0.01, True),
                                              (-contracts.MAX_PENALTY, False), (-contracts.MAX_PENALTY - 0.01, True)])
def test_penalties(penalty, refused):
    for name in ("presence_penalty", "frequency_penalty"):
        assert _gateway_refuses(CHAT_COMPLETIONS, {**CHAT, name: penalty}) is refused
        assert _gateway_refuses(COMPLETIONS, {"model": "chat", "prompt": "hi", name: penalty}) is refused
        assert _refused(lambda name=name: SamplingParams(**{name: penalty}).validate()) is refused


@pytest.mark.parametrize("n, refused", [(contracts.MAX_CHOICES, False), (contracts.MAX_CHOICES + 1, True),
                                        (0, True)])
def test_choices(n, refused):
    assert _gateway_refuses(CHAT_COMPLETIONS, {**CHAT, "n": n}) is refused
    if n:  # 0 on the wire is proto3's "unset", read as 1
        assert _refused(lambda: choice_count(pb.GenerateRequest(n=n))) is refused


@pytest.mark.parametrize("top, refused", [(contracts.MAX_TOP_LOGPROBS, False), (contracts.MAX_TOP_LOGPROBS + 1, True)])
def test_top_logprobs(top, refused):
    assert _gateway_refuses(CHAT_COMPLETIONS, {**CHAT, "logprobs": True, "top_logprobs": top}) is refused
    assert _refused(lambda: choice_count(pb.GenerateRequest(logprobs=True, top_logprobs=top))) is refused
