"""Issue 15, finding 5: a training job is refused at submit (422 naming the field and the setting) when it asks
more than this deployment's fleet runs: more nodes than it has workers, a model or a run larger than it allows."""

from __future__ import annotations

import pytest

from services.common.config import Settings
from services.common.errors import ValidationFailed
from services.common.identity import Caller
from services.training.coordinator import Coordinator
from services.training.spec import FleetLimits

CALLER = Caller(tenant="acme", key_id="k", role="developer")
SETTINGS = Settings.from_env({"LLMP_TRAINING_WORKERS": "2", "LLMP_TRAINING_MAX_N_EMBD": "256",
                              "LLMP_TRAINING_MAX_N_LAYER": "6", "LLMP_TRAINING_MAX_STEPS": "5000"})


def job(**changes) -> dict:
    spec = {"dataset": {"name": "wiki", "version": 1}, "model": {"family": "gpt2", "n_layer": 2, "n_head": 2,
                                                                 "n_embd": 64},
            "hyperparameters": {"max_steps": 100}, "distributed": {"nnodes": 1}}
    for path, value in changes.items():
        section, name = path.split("__")
        spec[section][name] = value
    return spec


async def _submit(spec: dict) -> None:
    """Submit to a coordinator without a database: validation passed when it reaches the first query."""
    try:
        await Coordinator(None, limits=FleetLimits.from_settings(SETTINGS)).submit(CALLER, spec)
    except AttributeError:
        return


@pytest.mark.parametrize("change, allowed, refused, field, setting", [
    ("distributed__nnodes", 2, 3, "distributed.nnodes", "LLMP_TRAINING_WORKERS"),
    ("model__n_embd", 256, 258, "model.n_embd", "LLMP_TRAINING_MAX_N_EMBD"),
    ("model__n_layer", 6, 7, "model.n_layer", "LLMP_TRAINING_MAX_N_LAYER"),
    ("hyperparameters__max_steps", 5000, 5001, "hyperparameters.max_steps", "LLMP_TRAINING_MAX_STEPS"),
])
async def test_a_job_larger_than_the_fleet_is_refused_naming_the_field(change, allowed, refused, field, setting):
    await _submit(job(**{change: allowed}))  # the edge itself is accepted
    with pytest.raises(ValidationFailed) as error:
        await _submit(job(**{change: refused}))
    assert field in error.value.message and setting in error.value.message


def test_the_defaults_bound_what_any_spec_allows():
    limits = FleetLimits.from_settings(Settings.from_env({}))
    assert limits == FleetLimits()  # the dataclass's defaults are the settings' defaults
    assert limits.max_nnodes < 64 and limits.max_n_embd < 16384 and limits.max_steps < 10_000_000
