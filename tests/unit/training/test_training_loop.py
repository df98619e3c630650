"""The training loop in one process, without S3: objectives, schedule, evaluation, early stopping."""

from __future__ import annotations

import io
import json
import math
import uuid

import pytest
import torch

from services.training import data, distributed, events, train
from services.training.spec import HyperParameters, JobSpec

SINGLE = distributed.Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def make_run(tiny_dataset, tmp_path, *, family="gpt2", **hyper) -> tuple[train.Run, io.StringIO]:
    hp = {"batch_size": 8, "max_steps": 20, "learning_rate": 3e-3, "min_learning_rate": 3e-4, "warmup_steps": 2,
          "eval_interval": 5, "eval_batches": 2, "log_interval": 5, "seed": 11, **hyper}
    spec = JobSpec.from_dict({
        "dataset": {"name": "shakespeare", "version": 1},
        "model": {"family": family, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
        "hyperparameters": hp,
    })
    job = train.Job(tenant="acme", job_id=uuid.uuid4().hex, spec=spec)
    sink = io.StringIO()
    run = train.Run(job, SINGLE, data.LocalDataset.open(tiny_dataset[0]), work_dir=tmp_path,
                    writer=events.EventWriter(sink))
    run.setup()
    return run, sink


def logged(sink: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in sink.getvalue().splitlines()]


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_each_family_trains_and_reports(family, tiny_dataset, tmp_path):
    run, sink = make_run(tiny_dataset, tmp_path, family=family)
    assert run.run() == 0
    log = logged(sink)
    kinds = [e["event"] for e in log]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    train_events = [e for e in log if e["event"] == "train"]
    assert [e["step"] for e in train_events] == [5, 10, 15, 20]
    assert train_events[-1]["loss"] < train_events[0]["loss"], train_events
    evals = [e for e in log if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [5, 10, 15, 20]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["validation_loss"]))
    metrics = log[-1]["metrics"]
    assert metrics["steps"] == 20 and metrics["tokens"] == 20 * 8 * 32 and "test_loss" in metrics
    assert log[0]["environment"]["torch"] == torch.__version__


def test_bf16_autocast_trains(tiny_dataset, tmp_path):
    run, sink = make_run(tiny_dataset, tmp_path, precision="bf16", max_steps=10)
    assert run.run() == 0
    assert next(run.model.parameters()).dtype == torch.float32  # master weights stay fp32
    losses = [e["loss"] for e in logged(sink) if e["event"] == "train"]
    assert losses[-1] < losses[0]


def test_gradient_accumulation_counts_tokens_per_optimizer_step(tiny_dataset, tmp_path):
    run, sink = make_run(tiny_dataset, tmp_path, grad_accum=3, max_steps=5)
    assert run.run() == 0
    assert run.batches.position == 5 * 3 * 8
    assert logged(sink)[-1]["metrics"]["tokens"] == 5 * 3 * 8 * 32


def test_early_stopping_ends_the_run_when_validation_stops_improving(tiny_dataset, tmp_path):
    # A learning rate this large makes the model diverge after the first evaluation.
    run, sink = make_run(tiny_dataset, tmp_path, learning_rate=0.5, min_learning_rate=0.5, grad_clip=0,
                         eval_interval=2, early_stopping_patience=2, max_steps=40, warmup_steps=0)
    assert run.run() == 0
    log = logged(sink)
    stop = [e for e in log if e["event"] == "early_stop"]
    assert len(stop) == 1 and stop[0]["step"] < 40
    assert log[-1]["metrics"]["stopped_early"] is True and log[-1]["step"] == stop[0]["step"]
    evals = [e["validation_loss"] for e in log if e["event"] == "eval"]
    assert min(evals[-2:]) >= stop[0]["best_validation_loss"]


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    hp = HyperParameters(learning_rate=1.0, min_learning_rate=0.1, warmup_steps=4, max_steps=14)
    factors = [train.lr_factor(step, hp) for step in range(15)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = train.make_optimizer(model, HyperParameters(weight_decay=0.3, beta2=0.99))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and [p.dim() for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert decay["betas"] == (0.9, 0.99)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_training_forwards_build_no_kv_cache_yet_the_saved_config_keeps_it(family, tiny_dataset, tmp_path):
    run, _ = make_run(tiny_dataset, tmp_path, family=family, max_steps=2)
    seen = []
    run.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("use_cache")),
                                        with_kwargs=True)
    loss = run.train_step()
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and math.isfinite(float(loss))
    assert math.isfinite(run.evaluate(run.validation_stream))
    assert seen == [False, False, False]  # one training forward, two evaluation batches
    assert run.model.config.use_cache is True  # inference (ONNX with past key values) still gets a cache
