"""Chat with a model fine-tuned through llmp, as a user does it, on a real stack (`llmp up`):
a format=chat dataset uploaded through the gateway → a small GPT-2 trained on it (Celery, torchrun) →
deployed in one step (`PUT /v1/deployments`, which exports it) → the official `openai` SDK, given only
the base URL `/openai/v1` and an llmp key.

The task: "<name>: capital of <country>?" → "<capital>", 16 countries asked by 24 people, so the 384
conversations are distinct (datasets dedup by conversation) while the answer depends on the country
alone: a 2-layer char-level model learns it in about a hundred steps (the validation loss went 0.60,
0.022, 0.0009 at steps 50, 100, 150 here), and must answer better than an untrained one of its shape.
Embeddings are tested elsewhere (an encoder model).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cli.client import Client
from cli.model_archive import extract
from services.common.contracts import END_OF_TURN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAPITALS = {"france": "paris", "japan": "tokyo", "peru": "lima", "egypt": "cairo", "kenya": "nairobi",
            "chile": "santiago", "spain": "madrid", "italy": "rome", "cuba": "havana", "ghana": "accra",
            "iran": "tehran", "oman": "muscat", "mali": "bamako", "laos": "vientiane", "fiji": "suva",
            "nepal": "kathmandu"}
# Names of one length put every country at the same place in its conversation, and no two countries begin
# with the same two letters: the task takes attention to two fixed positions, learnt in a few hundred steps.
PEOPLE = ["ann", "bob", "cyd", "dee", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou", "max", "ned",
          "oli", "pam", "qin", "ray", "sue", "tom", "uma", "vic", "wes", "zoe"]
DATASET = MODEL = DEPLOYMENT = "capitals"
SEED = 1234
JOB = {
    "model": {"family": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128, "dropout": 0.0},
    "hyperparameters": {"batch_size": 16, "max_steps": 150, "learning_rate": 5e-3, "min_learning_rate": 5e-4,
                        "warmup_steps": 20, "eval_interval": 50, "eval_batches": 4, "log_interval": 20,
                        "seed": SEED, "precision": "fp32"},
    "distributed": {"mode": "ddp", "nproc_per_node": 1, "nnodes": 1},
    "model_name": MODEL,
}


def question(person: str, country: str) -> list[dict]:
    return [{"role": "user", "content": f"{person}: capital of {country}?"}]


def conversations() -> bytes:
    pairs = [(person, country) for person in PEOPLE for country in CAPITALS]
    random.Random(SEED).shuffle(pairs)
    lines = [json.dumps({"messages": [*question(p, c), {"role": "assistant", "content": CAPITALS[c]}]})
             for p, c in pairs]
    return ("\n".join(lines) + "\n").encode()


def greedy_answers(folder: Path, model: torch.nn.Module) -> dict[str, str]:
    """What `model` (with the tokenizer in `folder`) answers each country at temperature 0, asked by ann."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stop = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    answers = {}
    for country in CAPITALS:
        ids = tokenizer.apply_chat_template(question("ann", country), add_generation_prompt=True, return_dict=False,
                                            return_tensors="pt")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=stop, pad_token_id=stop)
        answers[country] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return answers


def score(answers: dict[str, str]) -> int:
    return sum(answers[country] == capital for country, capital in CAPITALS.items())


def test_a_model_fine_tuned_on_chat_data_answers_through_the_openai_sdk(stack, tmp_path):
    client = stack.client()
    created = client.upload("/v1/datasets", conversations(), query={"name": DATASET, "format": "chat",
                                                                    "tokenizer": "char"})
    dataset = client.wait_until(f"/v1/datasets/{DATASET}/versions/{created['version']}",
                                lambda v: v["state"] not in {"PENDING", "RUNNING"}, 300)
    assert dataset["state"] == "READY", dataset

    job = client.call("POST", "/v1/training-jobs", {"dataset": {"name": DATASET, "version": dataset["version"]},
                                                    **JOB}, headers={"Idempotency-Key": "capitals-e2e"})
    finished = Client(client.base_url, client.key, timeout=600).wait_until(
        f"/v1/training-jobs/{job['id']}", lambda j: j["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}, 600)
    assert finished["state"] == "SUCCEEDED", finished
    # The loss is on the assistant's tokens only (the masks: tests/unit/training/test_training_supervised.py),
    # so a falling validation loss is the answers being learnt, not the template's fixed characters.
    curves = client.call("GET", f"/v1/training-jobs/{job['id']}/metrics")
    validation = [point["value"] for point in sorted(curves["validation_loss"], key=lambda p: p["step"])]
    assert len(validation) == 3 and validation[-1] < 0.5 * validation[0], validation
    version = finished["model_version"]["version"]

    deployed = client.put_conditionally(f"/v1/deployments/{DEPLOYMENT}", {"model": MODEL, "stable": version})
    assert deployed["state"] in {"EXPORTING", "LOADING", "READY"}, deployed  # deploying exports it first
    client.wait_until(f"/v1/deployments/{DEPLOYMENT}", lambda d: d["state"] in {"READY", "FAILED"}, 600)
    assert client.call("GET", f"/v1/deployments/{DEPLOYMENT}")["state"] == "READY"

    key = client.call("POST", "/v1/api-keys", {"tenant": "default", "role": "inference"})["key"]
    port = stack.env["LLMP_GATEWAY_PORT"]
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key=key, max_retries=0)
    assert DEPLOYMENT in [model.id for model in sdk.models.list().data]

    served = {}
    for country in CAPITALS:
        plain = sdk.chat.completions.create(model=DEPLOYMENT, messages=question("ann", country), temperature=0,
                                            max_tokens=16)
        stream = sdk.chat.completions.create(model=DEPLOYMENT, messages=question("ann", country), temperature=0,
                                             max_tokens=16, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == plain.choices[0].message.content, country
        served[country] = plain.choices[0].message.content

    # Better than the untrained base: the same shape and tokenizer, freshly initialised. And what is served
    # is what the registered weights answer in transformers (ONNX on Triton agrees with PyTorch).
    folder = tmp_path / "model"
    extract(client.download(f"/v1/models/{MODEL}/versions/{version}/download"), folder)
    torch.manual_seed(SEED)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).eval()
    base = score(greedy_answers(folder, untrained))
    tuned = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert greedy_answers(folder, tuned) == served
    assert score(served) >= 12 and score(served) > base, (served, base)

    two = sdk.chat.completions.create(model=DEPLOYMENT, messages=question("bob", "peru"), n=2, temperature=1.0,
                                      seed=7, max_tokens=8, logprobs=True, top_logprobs=3)
    assert [choice.index for choice in two.choices] == [0, 1]
    for choice in two.choices:
        entries = choice.logprobs.content
        assert "".join(entry.token for entry in entries) == choice.message.content
        assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 3 for entry in entries)
        tops = [[top.logprob for top in entry.top_logprobs] for entry in entries]
        assert all(top == sorted(top, reverse=True) for top in tops)
