"""Job-spec parsing and validation: every bad field is refused with its name."""

from __future__ import annotations

import copy

import pytest

from services.common.errors import ValidationFailed
from services.training.spec import JobSpec

BODY = {
    "dataset": {"name": "shakespeare", "version": 3},
    "model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.1},
    "hyperparameters": {"batch_size": 8, "max_steps": 100, "learning_rate": 1e-3, "min_learning_rate": 1e-4,
                        "warmup_steps": 10, "weight_decay": 0.1, "beta2": 0.99, "grad_clip": 1.0, "grad_accum": 2,
                        "eval_interval": 20, "early_stopping_patience": 3, "precision": "bf16", "seed": 42},
    "distributed": {"mode": "local-sgd", "nproc_per_node": 2, "nnodes": 1},
}


def with_field(path: str, value):
    body = copy.deepcopy(BODY)
    *parents, leaf = path.split(".")
    node = body
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return body


def test_the_spec_md_body_parses_and_keeps_every_value():
    spec = JobSpec.from_dict(BODY)
    assert spec.model.family == "gpt2" and spec.model.block_size == 64 and spec.model.init_from is None
    assert spec.hyperparameters.beta2 == 0.99 and spec.hyperparameters.precision == "bf16"
    assert spec.distributed.mode == "local-sgd" and spec.distributed.world_size == 2
    assert JobSpec.from_dict(spec.to_dict()) == spec  # the resolved spec round-trips


def test_defaults_are_valid_and_filled_in():
    spec = JobSpec.from_dict({"dataset": {"name": "d", "version": 1}})
    assert spec.hyperparameters.effective_checkpoint_interval == spec.hyperparameters.eval_interval
    assert spec.to_dict()["hyperparameters"]["beta1"] == 0.9


@pytest.mark.parametrize(("field", "value"), [
    ("dataset.name", ""),
    ("dataset.version", 0),
    ("model.family", "llama"),
    ("model.n_layer", 0),
    ("model.n_head", 0),
    ("model.n_embd", 65),  # not a multiple of n_head
    ("model.block_size", 1),
    ("model.dropout", 1.0),
    ("model.init_from.version", 0),
    ("hyperparameters.batch_size", 0),
    ("hyperparameters.max_steps", 0),
    ("hyperparameters.learning_rate", 0),
    ("hyperparameters.min_learning_rate", 0.5),  # above learning_rate
    ("hyperparameters.warmup_steps", 101),  # above max_steps
    ("hyperparameters.weight_decay", -0.1),
    ("hyperparameters.beta1", 1.0),
    ("hyperparameters.beta2", 1.5),
    ("hyperparameters.grad_clip", -1),
    ("hyperparameters.grad_accum", 0),
    ("hyperparameters.eval_interval", 0),
    ("hyperparameters.early_stopping_patience", -1),
    ("hyperparameters.checkpoint_interval", -5),
    ("hyperparameters.precision", "fp16"),
    ("hyperparameters.seed", -1),
    ("distributed.mode", "zero"),
    ("distributed.nproc_per_node", 0),
    ("distributed.nnodes", 0),
    ("distributed.sync_interval", 0),
])
def test_each_bad_value_is_refused_naming_its_field(field, value):
    body = with_field(field, value)
    if field.startswith("model.init_from"):
        body["model"]["init_from"] = {"name": "m", "version": value}
    with pytest.raises(ValidationFailed) as error:
        JobSpec.from_dict(body)
    assert error.value.message.startswith(field + " "), error.value.message


BAD_NAMES = ["", " ", "../other-tenant", "a/b", "Base", "-x", "a" * 64, "x\x00", "名前"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("field", ["dataset.name", "model.init_from.name"])
def test_names_follow_the_name_rule(field, name):
    body = with_field(field, name) if field == "dataset.name" else with_field("model.init_from",
                                                                              {"name": name, "version": 1})
    with pytest.raises(ValidationFailed) as error:
        JobSpec.from_dict(body)
    assert error.value.message.startswith(field + " "), error.value.message


@pytest.mark.parametrize(("field", "value"), [
    ("model.n_layer", "2"), ("model.n_layer", 2.5), ("model.n_layer", True), ("hyperparameters.learning_rate", "x"),
    ("model.family", 3), ("distributed", []), ("hyperparameters.seed", None),
])
def test_wrong_types_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationFailed) as error:
        JobSpec.from_dict(with_field(field, value))
    assert error.value.message.startswith(field + " must be"), error.value.message


def test_unknown_fields_are_named():
    with pytest.raises(ValidationFailed, match=r"^hyperparameters\.lr is not a known field"):
        JobSpec.from_dict(with_field("hyperparameters.lr", 0.1))
    with pytest.raises(ValidationFailed, match=r"^optimizer is not a known field"):
        JobSpec.from_dict(with_field("optimizer", {}))


def test_init_from_is_parsed():
    spec = JobSpec.from_dict(with_field("model.init_from", {"name": "base", "version": 2}))
    assert spec.model.init_from.name == "base" and spec.model.init_from.version == 2


def test_dataset_too_small_for_the_block_is_named():
    spec = JobSpec.from_dict(BODY)
    spec.check_dataset(vocab_size=100, train_tokens=1000, validation_tokens=65)
    with pytest.raises(ValidationFailed, match=r"^model\.block_size .* validation split has only 64 tokens"):
        spec.check_dataset(vocab_size=100, train_tokens=1000, validation_tokens=64)
