"""The servicer's conversions between the wire and the coordinator's spec and states."""

from __future__ import annotations

import pytest
from llmp.common.v1 import common_pb2
from llmp.training.v1 import training_pb2 as pb

from services.common.errors import InvalidArgument
from services.training.coordinator import JobState, resolve_spec
from services.training.servicer import message_to_dict, spec_to_proto, state_from_proto, state_to_proto


def test_only_fields_the_client_set_reach_the_spec_so_defaults_apply():
    message = pb.JobSpec(dataset=common_pb2.DatasetRef(name="d", version=2),
                         model=pb.ModelConfig(family="gpt2", n_layer=2),
                         hyperparameters=pb.Hyperparameters(warmup_steps=0, max_steps=10),
                         distributed=pb.Distributed(mode="local-sgd"))
    raw = message_to_dict(message)
    assert raw == {"dataset": {"name": "d", "version": 2}, "model": {"family": "gpt2", "n_layer": 2},
                   "hyperparameters": {"max_steps": 10, "warmup_steps": 0},  # an explicit 0 is kept
                   "distributed": {"mode": "local-sgd"}}
    assert isinstance(raw["dataset"]["version"], int)
    resolved = resolve_spec(raw)
    assert resolved.hyperparameters.warmup_steps == 0 and resolved.hyperparameters.learning_rate == 6e-4


def test_init_from_travels_only_when_set():
    plain = pb.JobSpec(model=pb.ModelConfig(family="gpt2"))
    assert "init_from" not in message_to_dict(plain)["model"]
    tuned = pb.JobSpec(model=pb.ModelConfig(family="gpt2", init_from=common_pb2.ModelRef(name="m", version=3)))
    assert message_to_dict(tuned)["model"]["init_from"] == {"name": "m", "version": 3}


def test_resolved_spec_round_trips_to_the_wire():
    resolved = resolve_spec({"dataset": {"name": "d", "version": 1}, "hyperparameters": {"warmup_steps": 5}})
    message = spec_to_proto(resolved.to_dict())
    assert not message.model.HasField("init_from")
    assert message.hyperparameters.beta2 == 0.95 and message.hyperparameters.warmup_steps == 5
    assert resolve_spec(message_to_dict(message)).to_dict() == resolved.to_dict()


def test_states_map_both_ways_and_unspecified_is_refused():
    for state in JobState:
        assert state_from_proto(state_to_proto(state)) == state
    with pytest.raises(InvalidArgument):
        state_from_proto(pb.JOB_STATE_UNSPECIFIED)
    with pytest.raises(InvalidArgument):
        state_from_proto(99)
