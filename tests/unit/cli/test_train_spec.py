"""`llmp train`: the POST /v1/training-jobs body its flags build, from scratch and fine-tuning (--init-from,
--lora-*), as the gateway's schema (gateway/views/training_jobs.py) accepts it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest

from cli import main, resources
from gateway.views.training_jobs import SUBMIT_JOB


def _body(*flags: str) -> dict:
    args = main.build_parser().parse_args(["train", "--dataset", "corpus", *flags])
    body = resources.job_spec(args)
    jsonschema.validate(body, SUBMIT_JOB)
    return body


def test_from_scratch_is_a_gpt2_of_the_flags_sizes():
    body = _body("--n-layer", "3", "--max-steps", "40")
    assert body["model"] == {"family": "gpt2", "n_layer": 3, "n_head": 4, "n_embd": 128, "block_size": 128}
    assert body["hyperparameters"]["max_steps"] == 40 and body["dataset"] == {"name": "corpus", "version": 1}
    assert "warmup_steps" not in body["hyperparameters"] and "model_name" not in body  # the service's defaults


def test_init_from_fine_tunes_every_weight_of_that_version_and_sends_no_shape():
    body = _body("--init-from", "my-llama:2", "--block-size", "32", "--warmup-steps", "0", "--model-name", "tuned")
    assert body["model"] == {"init_from": {"name": "my-llama", "version": 2}, "block_size": 32}
    assert body["hyperparameters"]["warmup_steps"] == 0 and body["model_name"] == "tuned"


def test_lora_flags_make_an_adapter_with_only_what_was_given():
    body = _body("--init-from", "my-llama:1", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.05",
                 "--lora-targets", "q_proj,v_proj,o_proj")
    assert body["model"]["adapter"] == {"type": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05,
                                        "target_modules": ["q_proj", "v_proj", "o_proj"]}
    assert _body("--init-from", "my-llama:1", "--lora")["model"]["adapter"] == {"type": "lora"}
    assert "adapter" not in _body("--init-from", "my-llama:1")["model"]


def test_an_adapter_without_init_from_is_still_sent_for_the_gateway_to_refuse():
    assert _body("--lora-r", "4")["model"]["adapter"] == {"type": "lora", "r": 4}


@pytest.mark.parametrize("bad", ["my-llama", "my-llama:", ":1", "my-llama:0", "my-llama:v1"])
def test_init_from_that_is_not_name_colon_version_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.build_parser().parse_args(["train", "--init-from", bad])
    assert exit_info.value.code == 2 and "NAME:VERSION" in capsys.readouterr().err


def test_spec_file_is_sent_as_written(tmp_path):
    spec = {"dataset": {"name": "corpus", "version": 1}, "model": {"init_from": {"name": "m", "version": 1}}}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    assert _body("--spec", str(tmp_path / "job.json")) == spec


def test_the_readme_walkthrough_is_commands_llmp_accepts():
    """README's "Bring your own model" (the e2e test's steps): every `llmp` line parses, and its train line
    sends the LoRA fine-tune of the imported version."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("### Bring your own model", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line) for line in section.replace("\\\n", " ").splitlines() if line.startswith("llmp ")]
    assert [line[1] for line in lines] == ["models", "dataset", "train", "models", "models", "deploy", "complete"]
    parser = main.build_parser()
    parsed = [parser.parse_args(line[1:]) for line in lines]
    model = resources.job_spec(parsed[2])["model"]
    assert model["init_from"] == {"name": "my-llama", "version": 1} and model["adapter"]["type"] == "lora"
