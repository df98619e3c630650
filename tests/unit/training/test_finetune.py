"""Fine-tuning a pretrained checkpoint in one process, without S3: each supported architecture, full and LoRA.

The base is a random checkpoint built here (tests/tiny_checkpoints.py) with the dataset's own tokenizer; the run
loads it the way the runtime loads an `init_from` version (the folder `_fetch_init` would download).
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from services.common.errors import ValidationFailed
from services.training import adapters, data, distributed, events, train
from services.training.spec import JobSpec
from tests.tiny_checkpoints import ARCHITECTURES, write_checkpoint

SINGLE = distributed.Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
DATASET = {"name": "shakespeare", "version": 1}
BASE = {"name": "base", "version": 1}


def fine_tune_spec(adapter: dict | None, **hyper) -> JobSpec:
    model = {"init_from": BASE, "block_size": 32}
    if adapter is not None:
        model["adapter"] = adapter
    hp = {"batch_size": 8, "max_steps": 30, "learning_rate": 1e-2, "min_learning_rate": 1e-3, "warmup_steps": 2,
          "eval_interval": 10, "eval_batches": 4, "log_interval": 10, "seed": 5, **hyper}
    return JobSpec.from_dict({"dataset": DATASET, "model": model, "hyperparameters": hp})


@pytest.fixture(scope="module")
def bases(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    root, manifest = tiny_dataset
    folders = {}
    for architecture in ARCHITECTURES:
        folder = tmp_path_factory.mktemp(architecture)
        write_checkpoint(folder, architecture, root / "tokenizer", manifest["vocab_size"])
        folders[architecture] = folder
    return folders


def set_up(spec: JobSpec, base: Path, tiny_dataset, tmp_path: Path, monkeypatch) -> tuple[train.Run, io.StringIO]:
    job = train.Job(tenant="acme", job_id=uuid.uuid4().hex, spec=spec, init_from_prefix="models/acme/base/v1/")
    sink = io.StringIO()
    run = train.Run(job, SINGLE, data.LocalDataset.open(tiny_dataset[0]), work_dir=tmp_path,
                    writer=events.EventWriter(sink))
    monkeypatch.setattr(run, "_fetch_init", lambda: base)  # the folder the runtime downloads from S3
    run.setup()
    return run, sink


def optimizer_state_elements(optimizer: torch.optim.Optimizer) -> int:
    return sum(value.numel() for state in optimizer.state.values() for key, value in state.items()
               if key in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_trains_only_the_adapter_and_beats_the_base(architecture, bases, tiny_dataset, tmp_path, monkeypatch):
    run, _ = set_up(fine_tune_spec({"type": "lora", "r": 8, "alpha": 32}), bases[architecture], tiny_dataset,
                    tmp_path, monkeypatch)
    assert run.family == architecture
    assert run.spec.model.adapter.target_modules == (["c_attn", "c_proj"] if architecture == "gpt2"
                                                     else ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    before = run.evaluate(run.validation_stream)  # B starts at zero: the base itself, on the run's batches
    base = AutoModelForCausalLM.from_pretrained(bases[architecture])
    ids = torch.randint(0, run.vocab.size, (2, 16))
    run.model.eval()
    with torch.no_grad():
        assert torch.allclose(run.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
    run.model.train()

    frozen = {name: p.detach().clone() for name, p in run.model.named_parameters() if not p.requires_grad}
    run.run()
    after = run.progress.metrics["validation_loss"]
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(p, frozen[name]) for name, p in run.model.named_parameters() if not p.requires_grad)
    # AdamW's moments cover the adapter alone.
    adapter_elements = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert optimizer_state_elements(run.optimizer) == 2 * adapter_elements
    assert adapter_elements < 0.2 * sum(p.numel() for p in run.model.parameters())


def test_full_fine_tune_of_a_gqa_llama_beats_the_base(bases, tiny_dataset, tmp_path, monkeypatch):
    run, sink = set_up(fine_tune_spec(None), bases["llama"], tiny_dataset, tmp_path, monkeypatch)
    assert run.model.config.num_key_value_heads < run.model.config.num_attention_heads  # grouped-query attention
    before = run.evaluate(run.validation_stream)
    run.run()
    assert run.progress.metrics["validation_loss"] < before - 0.3
    assert optimizer_state_elements(run.optimizer) == 2 * sum(p.numel() for p in run.model.parameters())
    started = [json.loads(line) for line in sink.getvalue().splitlines() if '"started"' in line][0]
    assert started["trainable_parameters"] == started["parameters"] == sum(p.numel() for p in run.model.parameters())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on this Transformers
def test_the_final_folder_holds_merged_weights_and_an_adapter_peft_loads(bases, tiny_dataset, tmp_path,
                                                                        monkeypatch):
    run, _ = set_up(fine_tune_spec({"type": "lora", "r": 4, "dropout": 0.1}, max_steps=10), bases["llama"],
                    tiny_dataset, tmp_path, monkeypatch)
    run.run()
    ids = torch.randint(0, run.vocab.size, (2, 24))
    run.model.eval()
    with torch.no_grad():
        trained = run.model(input_ids=ids).logits
    final = tmp_path / "final"
    adapters.write_final(run.model, final, "base/v1")
    assert {"config.json", "model.safetensors", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= {p.relative_to(final).as_posix() for p in final.rglob("*")}

    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in name for name in merged.state_dict())  # a plain model, deployable as any other
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["llama"]), final / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trained, atol=1e-5)
        assert torch.allclose(restored.eval()(input_ids=ids).logits, trained, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(bases["llama"])(input_ids=ids).logits,
                                  trained, atol=1e-3)


def test_a_base_too_short_for_the_block_is_named(bases, tiny_dataset, tmp_path, monkeypatch):
    with pytest.raises(ValidationFailed, match=r"^model\.block_size is 512 .* at most 256 positions"):
        set_up(JobSpec.from_dict({"dataset": DATASET, "model": {"init_from": BASE, "block_size": 512}}),
               bases["llama"], tiny_dataset, tmp_path, monkeypatch)


# -- the spec ---------------------------------------------------------------------------------------
def test_a_fine_tune_takes_its_family_and_adapter_targets_from_the_version():
    spec = fine_tune_spec({"type": "lora"})
    assert spec.model.family == "" and spec.model.adapter.r == 8 and spec.model.adapter.target_modules == []
    spec.model.resolve_base("qwen2")
    resolved = spec.to_dict()["model"]
    assert resolved["family"] == "qwen2"
    assert resolved["adapter"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert JobSpec.from_dict(spec.to_dict()) == spec  # the resolved spec round-trips


@pytest.mark.parametrize(("model", "field"), [
    ({"family": "llama"}, "model.family"),  # only from a version
    ({"init_from": BASE, "family": "gpt-j"}, "model.family"),
    ({"adapter": {"type": "lora"}}, "model.adapter"),  # nothing to adapt
    ({"init_from": BASE, "adapter": {"type": "prefix"}}, "model.adapter.type"),
    ({"init_from": BASE, "adapter": {"type": "lora", "r": 0}}, "model.adapter.r"),
    ({"init_from": BASE, "adapter": {"type": "lora", "alpha": 0}}, "model.adapter.alpha"),
    ({"init_from": BASE, "adapter": {"type": "lora", "dropout": 1.0}}, "model.adapter.dropout"),
    ({"init_from": BASE, "adapter": {"type": "lora", "target_modules": "q_proj"}}, "model.adapter.target_modules"),
    ({"init_from": BASE, "adapter": {"type": "lora", "target_modules": ["q_proj", "q_proj"]}},
     "model.adapter.target_modules"),
    ({"init_from": BASE, "adapter": {"type": "lora", "target_modules": ["../x"]}}, "model.adapter.target_modules"),
    ({"init_from": BASE, "adapter": {"type": "lora", "rank": 4}}, "model.adapter.rank"),
])
def test_each_bad_fine_tune_field_is_named(model, field):
    with pytest.raises(ValidationFailed) as error:
        JobSpec.from_dict({"dataset": DATASET, "model": model})
    assert error.value.message.startswith(field + " "), error.value.message


@pytest.mark.parametrize(("family", "adapter", "field", "words"), [
    ("llama", {"target_modules": ["c_attn"]}, "model.adapter.target_modules", "not a linear layer of llama"),
    ("bert", {}, "model.adapter.target_modules", "no default for bert"),
    ("gpt_neox", None, "model.init_from", "fine-tuning supports"),
])
def test_what_the_version_rules_out_is_named(family, adapter, field, words):
    spec = fine_tune_spec(None if adapter is None else {"type": "lora", **adapter})
    with pytest.raises(ValidationFailed) as error:
        spec.model.resolve_base(family)
    assert error.value.message.startswith(field + " ") and words in error.value.message, error.value.message


def test_a_family_that_contradicts_the_version_is_named():
    spec = JobSpec.from_dict({"dataset": DATASET, "model": {"init_from": BASE, "family": "gpt2"}})
    with pytest.raises(ValidationFailed, match=r"^model\.family is gpt2 but model\.init_from base v1 is a llama"):
        spec.model.resolve_base("llama")


# -- the gateway's schema ---------------------------------------------------------------------------
def test_the_gateway_takes_a_fine_tune_by_version_alone_and_names_bad_adapter_fields():
    from gateway.http import validate
    from gateway.views.training_jobs import SUBMIT_JOB

    validate({"dataset": DATASET, "model": {"init_from": BASE, "adapter": {"type": "lora"}}}, SUBMIT_JOB)
    validate({"dataset": DATASET, "model": {"init_from": BASE, "family": "mistral"}}, SUBMIT_JOB)
    for adapter, field in (({"type": "lora", "r": 0}, "model.adapter.r"),
                           ({"type": "ia3"}, "model.adapter.type"),
                           ({"type": "lora", "target_modules": ["q_proj", 3]}, "model.adapter.target_modules.1"),
                           ({"type": "lora", "target_modules": ["a/b"]}, "model.adapter.target_modules.0"),
                           ({"type": "lora", "bias": "all"}, "model.adapter")):
        with pytest.raises(ValidationFailed) as refused:
            validate({"dataset": DATASET, "model": {"init_from": BASE, "adapter": adapter}}, SUBMIT_JOB)
        assert refused.value.message.startswith(field + ":"), refused.value.message
