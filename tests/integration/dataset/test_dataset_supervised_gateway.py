"""Supervised datasets and a model's tokenizer, through the real gateway, dataset and registry services.

The model version whose tokenizer a dataset uses is registered directly through the registry service
(ReserveModelVersion, upload, CommitModelVersion: `model_transfer.upload_model_version`), as training does.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import grpc
import pytest
import torch
from llmp.registry.v1 import registry_pb2_grpc
from transformers import GPT2Config, GPT2LMHeadModel

from gateway.app import init_app
from services.common import contracts, topology
from services.common.config import Settings
from services.common.model_transfer import upload_model_version
from services.common.s3 import ObjectStore
from services.dataset import server as dataset_server
from services.registry import server as registry_server
from services.training import data
from tests import identities

from ...supervised_dataset import addition_chats, model_tokenizer_folder

pytestmark = pytest.mark.integration
ADMIN_KEY = "llmp_bootstrap_supervised-test-admin"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
TENANT = "default"  # the bootstrap key's tenant


@pytest.fixture
async def stack(aiohttp_client, settings_env, lineage):
    """(gateway client, registry stub, store): registry and dataset services on their configured ports."""
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY})
    registry = await registry_server.build(settings)
    await registry.app.start(settings.listen_addr(topology.REGISTRY))
    dataset = await dataset_server.build_app(settings, models_using=lineage)  # the registry's tokenizers
    await dataset.start(settings.listen_addr(topology.DATASET))
    channel = grpc.aio.insecure_channel(settings.listen_addr(topology.REGISTRY))
    client = await aiohttp_client(init_app(settings))
    yield client, registry_pb2_grpc.RegistryServiceStub(channel), ObjectStore(settings.s3)
    await channel.close()
    await dataset.stop()
    await registry.app.stop()


def chat_corpus(count: int = 200) -> bytes:
    return ("\n".join(addition_chats(count)) + "\n").encode()


async def test_a_chat_dataset_is_built_with_masks_the_training_loader_reads(stack, tmp_path):
    gateway, _, store = stack
    created = await gateway.post("/v1/datasets?name=sft-chat&format=chat&tokenizer=char&wait=true",
                                 data=chat_corpus(), headers=AUTH)
    assert created.status == 201, await created.text()
    version = await created.json()
    train = version["splits"]["train"]
    assert int(train["documents"]) > 100 and 0 < int(train["loss_tokens"]) < int(train["tokens"])
    assert len(train["loss_masks"]) == len(train["shards"]) and train["examples"].endswith("train/examples.bin")
    roles = {obj["role"] for obj in version["manifest"]["objects"]}
    assert {"train-shard", "train-loss-mask", "train-examples", "tokenizer"} <= roles
    assert len(version["tokenizer"]["sha256"]) == 64

    # What a training job downloads: the manifest, shards, masks and index, every SHA-256 verified.
    local = data.fetch_dataset(store, version["manifest"]["key"], tmp_path / "dataset")
    assert local.supervised and local.info.format == "chat"
    examples = local.stream("train")
    assert len(examples) == int(train["documents"])
    assert int(examples.masks.read(0, examples.tokens).sum()) == int(train["loss_tokens"])
    tokenizer_json = (local.tokenizer_dir / "tokenizer.json").read_bytes()
    assert hashlib.sha256(tokenizer_json).hexdigest() == version["tokenizer"]["sha256"]


@pytest.mark.parametrize("fmt, line, message", [
    ("chat", '{"messages": [{"role": "user", "content": "hi"}]}', "line 3: the conversation has no assistant"),
    ("chat", '{"messages": [{"role": "bot", "content": "hi"}]}', "line 3: messages[0]: role must be one of"),
    ("pairs", '{"prompt": "hi", "completion": null}', "line 3: field 'completion' must be a string"),
])
async def test_a_bad_line_is_422_naming_it_and_creates_nothing(stack, fmt, line, message):
    gateway, _, _ = stack
    good = (addition_chats(2) if fmt == "chat" else
            [json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"prompt": "c", "completion": "d"})])
    corpus = ("\n".join([*good, line]) + "\n").encode()
    response = await gateway.post(f"/v1/datasets?name=sft-bad-{fmt}&format={fmt}", data=io.BytesIO(corpus),
                                  headers=AUTH)
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["type"] == "validation_failed" and message in error["message"]
    assert (await gateway.get(f"/v1/datasets/sft-bad-{fmt}", headers=AUTH)).status == 404


# A template that, like Mistral's, refuses conversations whose roles do not alternate user/assistant.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
)


def model_folder(folder: Path, with_tokenizer: bool = True, template: str | None = None) -> Path:
    """A tiny GPT-2 checkpoint, with a pretrained model's kind of tokenizer (BOS, EOS, its own template)."""
    folder.mkdir(parents=True)
    if with_tokenizer:
        model_tokenizer_folder(folder, *([template] if template else []))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                               eos_token_id=1, pad_token_id=2)).save_pretrained(folder)
    return folder


async def test_a_dataset_tokenized_with_a_registered_models_tokenizer(stack, tmp_path):
    gateway, registry, store = stack
    metadata = identities.metadata(TENANT, "registry")
    base = await upload_model_version(registry, store, "sft-base", model_folder(tmp_path / "base"), metadata=metadata)
    model_sha = {artifact.path: artifact.object.sha256 for artifact in base.artifacts}
    query = "name=sft-with-model&format=chat&tokenizer=model&tokenizer_model=sft-base"

    created = await gateway.post(f"/v1/datasets?{query}&tokenizer_model_version={base.ref.version}&wait=true",
                                 data=chat_corpus(60), headers=AUTH)
    assert created.status == 201, await created.text()
    version = await created.json()
    tokenizer = version["tokenizer"]
    assert tokenizer["kind"] == "model" and tokenizer["model_name"] == "sft-base"
    assert int(tokenizer["model_version"]) == base.ref.version
    assert tokenizer["sha256"] == model_sha["tokenizer.json"]  # the same tokenizer, by its identity
    stored = {obj["key"].rsplit("/", 1)[1]: obj["sha256"] for obj in version["manifest"]["objects"]
              if obj["role"] == "tokenizer"}
    assert {name: model_sha[name] for name in stored} == stored and "chat_template.jinja" in stored
    assert version["options"]["tokenizer_model"] == "sft-base"  # the dataset's lineage names the model

    manifest = contracts.DatasetManifest.from_json(store.get_bytes(version["manifest"]["key"]))
    assert (manifest.tokenizer.model, manifest.tokenizer.model_version) == ("sft-base", base.ref.version)
    local = data.fetch_dataset(store, version["manifest"]["key"], tmp_path / "dataset")
    examples = local.stream("train")
    first, _ = examples.example(0, 1000)
    assert first[0] == 0  # the model's BOS, written by its template, as its tokenizer encodes it

    missing = await gateway.post(f"/v1/datasets?{query}&tokenizer_model_version={base.ref.version + 5}",
                                 data=chat_corpus(5), headers=AUTH)
    assert missing.status == 404, await missing.text()
    assert "tokenizer_model sft-base has no READY version" in (await missing.json())["error"]["message"]

    bare = await upload_model_version(registry, store, "sft-bare", model_folder(tmp_path / "bare", False),
                                      metadata=metadata)
    response = await gateway.post(f"/v1/datasets?name=sft-bare-ds&format=chat&tokenizer=model&tokenizer_model=sft-bare"
                                  f"&tokenizer_model_version={bare.ref.version}", data=chat_corpus(5), headers=AUTH)
    assert response.status == 422, await response.text()
    assert "has no tokenizer.json" in (await response.json())["error"]["message"]
    no_version = await gateway.post(f"/v1/datasets?{query}", data=chat_corpus(5), headers=AUTH)
    assert no_version.status == 422 and "tokenizer_model_version" in (await no_version.json())["error"]["message"]
    for name in ("sft-bare-ds",):
        assert (await gateway.get(f"/v1/datasets/{name}", headers=AUTH)).status == 404


async def test_a_conversation_the_models_template_refuses_is_422_naming_its_line(stack, tmp_path):
    gateway, registry, store = stack
    metadata = identities.metadata(TENANT, "registry")
    strict = await upload_model_version(registry, store, "sft-strict",
                                        model_folder(tmp_path / "strict", template=STRICT_TEMPLATE), metadata=metadata)
    lines = addition_chats(3)
    lines[1] = json.dumps({"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1"},
                                        {"role": "assistant", "content": "2"}]})
    response = await gateway.post(f"/v1/datasets?name=sft-strict-ds&format=chat&tokenizer=model"
                                  f"&tokenizer_model=sft-strict&tokenizer_model_version={strict.ref.version}",
                                  data=("\n".join(lines) + "\n").encode(), headers=AUTH)
    assert response.status == 422, await response.text()
    message = (await response.json())["error"]["message"]
    assert message.startswith("line 2: the chat template cannot render") and "must alternate" in message
    assert (await gateway.get("/v1/datasets/sft-strict-ds", headers=AUTH)).status == 404
    # the same template accepts the conversations that alternate
    ok = await gateway.post(f"/v1/datasets?name=sft-strict-ds&format=chat&tokenizer=model&tokenizer_model=sft-strict"
                            f"&tokenizer_model_version={strict.ref.version}&wait=true",
                            data=chat_corpus(30), headers=AUTH)
    assert ok.status == 201, await ok.text()
