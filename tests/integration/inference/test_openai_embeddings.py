"""`client.embeddings.create` of the official `openai` SDK against the real gateway, the inference service
and Triton, serving a small random BERT built here (a WordPiece tokenizer trained here, [CLS] ... [SEP]
added as `transformers` does): the vectors are the masked mean of HF's last hidden states, a list is
embedded in one request, base64 decodes to the same floats, and the errors name the field at fault.

The first tests deploy from a local model tree (the export made by the registry's exporter, its parity
gate included); the last takes the user's whole way: registry version, ONNX export, S3, REST deployment.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import torch
from llmp.common.v1 import common_pb2
from llmp.inference.v1 import inference_pb2 as pb
from llmp.registry.v1 import registry_pb2, registry_pb2_grpc
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from gateway.app import init_app
from services.common import topology
from services.common.config import Settings
from services.inference.model_source import publish_local_version
from services.registry import exporters
from tests import identities

from .conftest import SHAKESPEARE, TENANT

pytestmark = pytest.mark.integration

ADMIN_KEY = "llmp_bootstrap_openai-embeddings-admin"
ENCODER = "bert-tiny"
CONTEXT = 48  # the BERT's max_position_embeddings: [CLS] + 46 tokens + [SEP]
TEXTS = ["to be or not to be", "the king", "what light through yonder window breaks, it is the east"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator([SHAKESPEARE.read_text()[:20_000]],
                                  trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    return fast


@dataclass
class Encoder:
    folder: Path  # save_pretrained: config, weights, tokenizer

    def reference(self, texts: list[str]) -> np.ndarray:
        """What a user computes with transformers: padded batch, last hidden state, masked mean."""
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        model = AutoModel.from_pretrained(self.folder).eval()
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()

    def tokens(self, text: str) -> int:
        return len(AutoTokenizer.from_pretrained(self.folder)(text)["input_ids"])


@pytest.fixture(scope="session")
def encoder(model_root) -> Encoder:
    """A random 2-layer BERT (masked-LM head, as llmp's `bert` family trains it), published as version 1 of
    `bert-tiny` in the local tree after the registry's exporter and parity gate passed it."""
    root = model_root[0]
    folder = root / "bert-checkpoint"
    tokenizer = bert_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=CONTEXT, pad_token_id=tokenizer.pad_token_id)
    BertForMaskedLM(config).save_pretrained(folder)
    held_out = np.random.default_rng(0).integers(0, len(tokenizer), (3, 20), dtype=np.int64)
    out = root / "export-bert"
    outcome = exporters.export("onnx", folder, out, exporters.EvalData(held_out=held_out))
    assert outcome.passed and outcome.report["kind"] == "encoder", outcome.report
    assert outcome.report["embeddings"]["max_abs_embedding_diff"] < 1e-4
    publish_local_version(root, TENANT, ENCODER, 1, out, folder)
    return Encoder(folder)


async def _key(client, tenant: str = TENANT, role: str = "inference") -> str:
    created = await client.post("/v1/api-keys", json={"tenant": tenant, "role": role, "rate_limit": 1000},
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert created.status == 201, await created.text()
    return (await created.json())["key"]


@pytest.fixture
async def gateway(service, encoder, settings_env, aiohttp_client):
    """The real gateway (aiohttp's TestClient, on a port); deployment `embed` serves the BERT, `tiny-chat` a
    decoder."""
    deployed = await service.call("PutDeployment", pb.PutDeploymentRequest(name="embed", model=ENCODER,
                                                                           stable_version=1, wait=True))
    assert deployed.deployment.state == "READY", deployed.deployment.message
    assert (await service.deploy(name="tiny-chat")).deployment.state == "READY"
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_INFERENCE_ADDR": service.address})
    return await aiohttp_client(init_app(settings))


@pytest.fixture
async def sdk(gateway):
    """The official SDK given only the gateway's base URL and an inference key."""
    async with openai.AsyncOpenAI(base_url=str(gateway.make_url("/openai/v1")), api_key=await _key(gateway),
                                  max_retries=0) as sdk:
        yield sdk


async def test_llmp_embed_prints_the_vectors_or_a_summary(gateway, encoder, capsys):
    from cli.main import main

    where = ["--url", str(gateway.make_url("/")).rstrip("/"), "--key", await _key(gateway)]
    # The CLI's client is synchronous: it runs in a thread while this loop serves the gateway.
    assert await asyncio.to_thread(main, ["embed", "embed", *TEXTS[:2], "--json", *where]) == 0
    printed = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(np.array([item["embedding"] for item in printed["data"]]),
                               encoder.reference(TEXTS[:2]), atol=1e-4, rtol=0)
    assert await asyncio.to_thread(main, ["embed", "embed", TEXTS[0], *where]) == 0
    summary = capsys.readouterr().out.splitlines()
    norm = float(np.linalg.norm(encoder.reference(TEXTS[:1])[0]))
    assert summary[0].startswith("1 embeddings from embed") and f"norm={norm:.4f}" in summary[1]
    assert await asyncio.to_thread(main, ["embed", "tiny-chat", "hello", *where]) == 1
    assert "decoder" in capsys.readouterr().err


async def test_embeddings_are_hfs_masked_mean_for_one_text_and_a_list(sdk, encoder):
    expected = encoder.reference(TEXTS)
    one = await sdk.embeddings.create(model="embed", input=TEXTS[0])
    assert one.object == "list" and one.model == "embed" and len(one.data) == 1
    assert one.data[0].object == "embedding" and one.data[0].index == 0 and len(one.data[0].embedding) == 32
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-4, rtol=0)
    assert one.usage.prompt_tokens == one.usage.total_tokens == encoder.tokens(TEXTS[0])

    # A list of texts of different lengths in one request: padded in one ORT call, padding masked out.
    many = await sdk.embeddings.create(model="embed", input=TEXTS)
    assert [item.index for item in many.data] == [0, 1, 2]
    np.testing.assert_allclose(np.array([item.embedding for item in many.data]), expected, atol=1e-4, rtol=0)
    assert many.usage.prompt_tokens == sum(encoder.tokens(text) for text in TEXTS)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # different texts: the comparison above means something


async def test_base64_is_little_endian_float32_of_the_same_vectors(sdk, encoder):
    floats = await sdk.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    # The SDK decodes base64 itself when it asked for it; the raw body shows what travels.
    raw = await sdk.embeddings.with_raw_response.create(model="embed", input=TEXTS, encoding_format="base64")
    body = raw.http_response.json()
    decoded = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in body["data"]]
    np.testing.assert_array_equal(np.array(decoded), np.array([item.embedding for item in floats.data],
                                                              dtype=np.float32))
    np.testing.assert_allclose(np.array(decoded), encoder.reference(TEXTS), atol=1e-4, rtol=0)


async def test_concurrent_requests_each_get_their_own_vectors(sdk, encoder):
    texts = [f"{TEXTS[index % 3]} {'and ' * (index % 5)}more" for index in range(24)]
    answers = await asyncio.gather(*(sdk.embeddings.create(model="embed", input=text) for text in texts))
    np.testing.assert_allclose(np.array([answer.data[0].embedding for answer in answers]),
                               encoder.reference(texts), atol=1e-4, rtol=0)


async def test_a_text_gets_the_same_vector_batched_with_others_as_alone(sdk, encoder):
    # Lengths from 3 to ~30 tokens, shuffled: the encoder model sorts a batch's rows by length and runs
    # like lengths together (encoder_model.length_groups), so each vector must find its way back to its text.
    words = " ".join(TEXTS).split()
    texts = [" ".join(words[:1 + (index * 7) % len(words)]) for index in range(16)]  # 16 distinct lengths
    together = await sdk.embeddings.create(model="embed", input=texts)
    alone = await asyncio.gather(*(sdk.embeddings.create(model="embed", input=[text]) for text in texts[:6]))
    batched = np.array([item.embedding for item in together.data])
    np.testing.assert_allclose(batched[:6], np.array([answer.data[0].embedding for answer in alone]),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched, encoder.reference(texts), atol=1e-4, rtol=0)
    assert len({round(float(vector[0]), 6) for vector in batched}) > 10  # distinct texts, distinct vectors


async def test_errors_name_the_field(sdk, encoder):
    too_long = " ".join(["king"] * CONTEXT)  # CONTEXT words + [CLS] + [SEP] tokens
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.embeddings.create(model="embed", input=[TEXTS[0], too_long])
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == "input[1]", error
    assert f"context of {CONTEXT} tokens" in error["message"]

    with pytest.raises(openai.BadRequestError) as decoder:
        await sdk.embeddings.create(model="tiny-chat", input="hello")
    assert decoder.value.body["param"] == "model" and "decoder" in decoder.value.body["message"]

    with pytest.raises(openai.BadRequestError) as generate:  # and the encoder generates nothing
        await sdk.completions.create(model="embed", prompt="hello", max_tokens=2)
    assert "encoder" in generate.value.body["message"]

    with pytest.raises(openai.NotFoundError) as unknown:
        await sdk.embeddings.create(model="nope", input="hello")
    assert unknown.value.body["code"] == "model_not_found"

    for bad, param in (({"input": ""}, "input"), ({"input": []}, "input"), ({"input": "a", "dimensions": 8},
                                                                             "dimensions"),
                       ({"input": "a", "encoding_format": "int8"}, "encoding_format")):
        with pytest.raises(openai.UnprocessableEntityError) as invalid:
            await sdk.embeddings.create(model="embed", **bad)
        assert invalid.value.body["param"] == param, invalid.value.body


async def test_a_registered_bert_embeds_through_the_registry_export(encoder, settings_env, triton, aiohttp_client):
    """The whole way: `save_pretrained` BERT → registry version → ONNX export (the encoder graph, its parity
    report) → deployment through the REST API (fetched from S3) → the SDK's embeddings."""
    from services.common.s3 import ObjectStore
    from services.inference import server as inference_server
    from services.registry import server as registry_server

    url, repository = triton
    settings = Settings.from_env({**settings_env, "LLMP_TRITON_GRPC_URL": url, "LLMP_ADMIN_KEY": ADMIN_KEY,
                                  "LLMP_TRITON_MODEL_REPOSITORY": str(repository)})
    registry = await registry_server.build(settings)
    await registry.app.start(settings.listen_addr(topology.REGISTRY))
    inference, deployments = await inference_server.build(settings)
    address = f"127.0.0.1:{await inference.start('127.0.0.1:0')}"
    name = f"bert-{uuid.uuid4().hex[:6]}"
    try:
        store = ObjectStore(settings.s3)
        prefix = f"jobs/{TENANT}/{uuid.uuid4().hex[:8]}/final/"
        for path in sorted(encoder.folder.iterdir()):
            store.put_file(prefix + path.name, path)
        metadata = identities.metadata(TENANT, "registry")
        ref = common_pb2.ModelRef(name=name, version=1)
        async with grpc.aio.insecure_channel(settings_env["LLMP_REGISTRY_ADDR"]) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            await stub.RegisterModelVersion(registry_pb2.RegisterModelVersionRequest(
                model_name=name, source_prefix=prefix, metrics={"validation_loss": 2.0},
                lineage=registry_pb2.Lineage(training_job_id="job-bert", code_version="test")), metadata=metadata)

        gateway = await aiohttp_client(init_app(Settings.from_env(
            {**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_INFERENCE_ADDR": address})))
        developer = {"Authorization": f"Bearer {await _key(gateway, role='developer')}"}
        # Deploy in one step: the deployment asks the registry for the ONNX export it lacks.
        deployed = await gateway.put(f"/v1/deployments/{name}", json={"model": name, "stable": 1},
                                     headers={**developer, "If-None-Match": "*"})
        assert deployed.status in (200, 201), await deployed.text()
        for _ in range(480):
            state = (await (await gateway.get(f"/v1/deployments/{name}", headers=developer)).json())["state"]
            if state not in ("LOADING", "EXPORTING"):
                break
            await asyncio.sleep(0.5)
        assert state == "READY"
        async with grpc.aio.insecure_channel(settings_env["LLMP_REGISTRY_ADDR"]) as channel:
            export = (await registry_pb2_grpc.RegistryServiceStub(channel).GetExport(
                registry_pb2.GetExportRequest(model=ref, format="onnx"), metadata=metadata)).export
        assert "encoder.json" in {a.path.rsplit("/", 1)[-1] for a in export.artifacts}
        async with openai.AsyncOpenAI(base_url=str(gateway.make_url("/openai/v1")),
                                      api_key=await _key(gateway), max_retries=0) as sdk:
            answer = await sdk.embeddings.create(model=name, input=TEXTS)
        np.testing.assert_allclose(np.array([item.embedding for item in answer.data]), encoder.reference(TEXTS),
                                   atol=1e-4, rtol=0)
    finally:
        for tenant, deployment in list(deployments.routes):
            await deployments.delete(tenant, deployment)
        await inference.stop()
        await registry.app.stop()
