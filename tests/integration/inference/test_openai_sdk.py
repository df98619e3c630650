"""The official `openai` SDK, given only a base URL and an llmp key, against the real gateway, the inference
service and Triton, serving a tiny ChatML model built here (from a local model tree; the last test takes
the user's whole way instead: registry version, ONNX export, S3, deployment through the REST API).

The model: a byte-level BPE tokenizer with `<|im_start|>`/`<|im_end|>` as special tokens and llmp's default
chat template, and a 2-layer GPT-2 trained for a few hundred steps on three short conversations rendered
with that template, so it answers them and ends its turn with `<|im_end|>`. Every figure the API reports
is checked against the same PyTorch model: greedy tokens, log-probabilities (log-softmax of its logits) and
penalised greedy decoding.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
import torch
import tritonclient.grpc.aio as triton_client
from llmp.common.v1 import common_pb2
from llmp.inference.v1 import inference_pb2 as pb
from llmp.registry.v1 import registry_pb2, registry_pb2_grpc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gateway.app import init_app
from services.common import topology
from services.common.config import Settings
from services.common.contracts import CHAT_SPECIAL_TOKENS, DEFAULT_CHAT_TEMPLATE, END_OF_TURN, triton_model_name
from services.inference.model_source import publish_local_version
from services.registry.onnx_export import export_model_onnx
from tests import identities

from .conftest import SHAKESPEARE, TENANT

pytestmark = pytest.mark.integration

ADMIN_KEY = "llmp_bootstrap_openai-sdk-admin"
MODEL = "chatml"
EOS = "<|endoftext|>"
CONVERSATIONS = [("say hi", "hello there"), ("count to three", "one two three"), ("name a king", "king lear")]


@dataclass
class ChatModel:
    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerFast

    @property
    def stops(self) -> set[int]:
        return {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids(END_OF_TURN)}

    def chat_ids(self, question: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def greedy(self, ids: list[int], max_tokens: int, stops: set[int], presence: float = 0.0,
               frequency: float = 0.0) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy decoding with OpenAI's penalties on the generated tokens; (tokens, log-softmax per step)."""
        ids, generated, logprobs = list(ids), [], []
        counts = torch.zeros(self.model.config.vocab_size)
        with torch.no_grad():
            for _ in range(max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1] - frequency * counts - presence * (counts > 0)
                token = int(torch.argmax(logits))
                if token in stops:
                    break
                logprobs.append(torch.log_softmax(logits.double(), -1))
                generated.append(token)
                ids.append(token)
                counts[token] += 1
        return generated, logprobs

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def chat_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS, *CHAT_SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [SHAKESPEARE.read_text()[:10_000]] + [f"user\n{q}\nassistant\n{a}\n" for q, a in CONVERSATIONS] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, chat_template=DEFAULT_CHAT_TEMPLATE)
    fast.save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)  # as the inference service reads it


@pytest.fixture(scope="session")
def chat_model(model_root) -> ChatModel:
    """Version 1 of model `chatml` in the local source tree the inference service deploys from."""
    root = model_root[0]
    tokenizer = chat_tokenizer(root / "chatml-tokenizer")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(tokenizer), n_positions=128,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                          tokenize=False) for q, a in CONVERSATIONS]
    encoded = [tokenizer.encode(row, add_special_tokens=False) for row in rows]
    width = max(map(len, encoded))
    batch = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids in encoded])
    labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in encoded])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.1, f"the tiny chat model did not learn its conversations (loss {loss.item():.3f})"
    export_model_onnx(model, root / "export-chatml" / "model.onnx")
    publish_local_version(root, TENANT, MODEL, 1, root / "export-chatml", root / "chatml-tokenizer")
    return ChatModel(model, tokenizer)


@dataclass
class Gateway:
    client: object  # aiohttp's TestClient of the real gateway, on a port
    base_url: str  # the gateway's /openai/v1

    async def key(self, tenant: str = TENANT, role: str = "inference") -> str:
        created = await self.client.post("/v1/api-keys", json={"tenant": tenant, "role": role, "rate_limit": 1000},
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert created.status == 201, await created.text()
        return (await created.json())["key"]


@pytest.fixture
async def gateway(service, chat_model, settings_env, aiohttp_client) -> Gateway:
    """The real gateway in front of the inference service; deployment `chat` serves model `chatml` v1."""
    deployed = await service.call("PutDeployment", pb.PutDeploymentRequest(name="chat", model=MODEL,
                                                                           stable_version=1, wait=True))
    assert deployed.deployment.state == "READY", deployed.deployment.message
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_INFERENCE_ADDR": service.address})
    client = await aiohttp_client(init_app(settings))
    return Gateway(client, str(client.make_url("/openai/v1")))


@pytest.fixture
async def sdk(gateway):
    """An `openai.AsyncOpenAI` client given only the base URL and an inference key of tenant acme."""
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=await gateway.key(), max_retries=0) as client:
        yield client


def user(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


async def test_lists_the_deployments_the_key_may_call(sdk, service, gateway):
    await service.deploy(name="tiny-chat", stable=1)  # a second deployment of the tenant
    listed = await sdk.models.list()
    names = [model.id for model in listed.data]
    assert {"chat", "tiny-chat"} <= set(names)
    assert all(model.object == "model" and model.owned_by == TENANT and model.created > 0 for model in listed.data)
    retrieved = await sdk.models.retrieve("tiny-chat")
    assert retrieved == next(model for model in listed.data if model.id == "tiny-chat")
    with pytest.raises(openai.NotFoundError) as unknown:
        await sdk.models.retrieve("no-such-deployment")
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"
    assert unknown.value.body["type"] == "invalid_request_error"

    stranger = f"other-{uuid.uuid4().hex[:6]}"
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=await gateway.key(stranger),
                                  max_retries=0) as theirs:
        assert (await theirs.models.list()).data == []  # another tenant's deployments are not theirs to call
        with pytest.raises(openai.NotFoundError):
            await theirs.models.retrieve("chat")
        with pytest.raises(openai.NotFoundError):
            await theirs.chat.completions.create(model="chat", messages=user("say hi"))


async def test_chat_answers_with_the_template_and_stops_at_end_of_turn_streamed_or_not(sdk, chat_model):
    for question, answer in CONVERSATIONS:
        expected, _ = chat_model.greedy(chat_model.chat_ids(question), 40, chat_model.stops)
        assert chat_model.text(expected) == answer  # the model learnt it: the check below is not vacuous
        plain = await sdk.chat.completions.create(model="chat", messages=user(question), temperature=0)
        choice = plain.choices[0]
        assert choice.message.content == answer and choice.message.role == "assistant"
        assert choice.finish_reason == "stop"  # at <|im_end|>, long before the context is full
        assert plain.usage.prompt_tokens == len(chat_model.chat_ids(question))
        assert plain.usage.completion_tokens == len(expected) and plain.object == "chat.completion"

        stream = await sdk.chat.completions.create(model="chat", messages=user(question), temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == choice.message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        assert len([c for c in chunks if c.choices]) > 2  # really streamed


async def test_n_choices_come_from_one_request_and_reproduce_with_a_seed(sdk):
    asked = {"model": "chat", "messages": user("say hi"), "temperature": 1.5, "seed": 11, "max_tokens": 12,
             "logprobs": True}
    two = await sdk.chat.completions.create(n=2, **asked)
    assert [c.index for c in two.choices] == [0, 1]
    again = await sdk.chat.completions.create(n=2, **asked)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    alone = await sdk.chat.completions.create(**asked)
    assert alone.choices[0].message.content == two.choices[0].message.content  # choice 0 samples as n=1 does
    assert two.usage.completion_tokens == sum(len(c.logprobs.content) for c in two.choices)
    assert two.usage.prompt_tokens == alone.usage.prompt_tokens  # one prompt, counted once
    many = await sdk.chat.completions.create(n=6, **asked)
    assert len({c.message.content for c in many.choices}) > 1  # the choices sample independently

    stream = await sdk.chat.completions.create(n=2, stream=True, **asked)
    texts = {0: "", 1: ""}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in two.choices]


async def test_n_choices_share_each_triton_step(sdk, triton):
    client = triton_client.InferenceServerClient(triton[0])
    name = triton_model_name(TENANT, MODEL, 1)
    before = (await client.get_inference_statistics(name)).model_stats[0]
    answer = await sdk.completions.create(model="chat", prompt="ROMEO:", n=4, max_tokens=8, temperature=1.0, seed=3)
    after = (await client.get_inference_statistics(name)).model_stats[0]
    await client.close()
    rows = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert len(answer.choices) == 4 and rows >= answer.usage.completion_tokens
    assert executions <= rows / 3, f"{rows} rows ran in {executions} executions: the choices were not batched"


async def test_logprobs_are_the_models_log_softmax(sdk, chat_model):
    ids = chat_model.chat_ids("count to three")
    expected, logprobs = chat_model.greedy(ids, 40, chat_model.stops)
    answer = await sdk.chat.completions.create(model="chat", messages=user("count to three"), temperature=0,
                                               logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == len(expected) > 2
    for entry, token, reference in zip(content, expected, logprobs, strict=True):
        assert entry.token == chat_model.tokenizer.decode([token])
        assert entry.logprob == pytest.approx(reference[token].item(), abs=2e-4)
        assert entry.bytes == list(entry.token.encode())
        top = torch.topk(reference, 3)
        assert [t.token for t in entry.top_logprobs] == [chat_model.tokenizer.decode([int(i)]) for i in top.indices]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-4)

    stream = await sdk.chat.completions.create(model="chat", messages=user("count to three"), temperature=0,
                                               logprobs=True, top_logprobs=3, stream=True)
    streamed = [entry async for chunk in stream for choice in chunk.choices if choice.logprobs
                for entry in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    legacy = await sdk.completions.create(model="chat", prompt="ROMEO:", max_tokens=6, temperature=0, logprobs=2)
    prompt = chat_model.tokenizer.encode("ROMEO:", add_special_tokens=False)
    tokens, references = chat_model.greedy(prompt, 6, {chat_model.tokenizer.eos_token_id})
    shown = legacy.choices[0].logprobs
    reference = [r[t].item() for t, r in zip(tokens, references, strict=True)]
    assert shown.token_logprobs == pytest.approx(reference, abs=2e-4)
    assert all(len(top) == 2 for top in shown.top_logprobs)
    assert shown.tokens == [chat_model.tokenizer.decode([t]) for t in tokens] and shown.text_offset[0] == 0


async def test_penalties_change_greedy_decoding_as_the_reference_does(sdk, chat_model):
    prompt = "ROMEO: O"
    ids = chat_model.tokenizer.encode(prompt, add_special_tokens=False)
    eos = {chat_model.tokenizer.eos_token_id}
    plain_ids, _ = chat_model.greedy(ids, 30, eos)
    penalized_ids, _ = chat_model.greedy(ids, 30, eos, presence=0.5, frequency=1.5)
    assert len(set(penalized_ids)) > len(set(plain_ids))  # the reference itself repeats less

    plain = await sdk.completions.create(model="chat", prompt=prompt, max_tokens=30, temperature=0)
    penalized = await sdk.completions.create(model="chat", prompt=prompt, max_tokens=30, temperature=0,
                                             presence_penalty=0.5, frequency_penalty=1.5)
    assert plain.choices[0].text == chat_model.text(plain_ids)
    assert penalized.choices[0].text == chat_model.text(penalized_ids) != plain.choices[0].text


async def test_prompt_lists_with_n_and_echo(sdk, chat_model):
    prompts = ["ROMEO:", "JULIET: my"]
    answer = await sdk.completions.create(model="chat", prompt=prompts, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    eos = {chat_model.tokenizer.eos_token_id}
    for index, choice in enumerate(answer.choices):
        ids = chat_model.tokenizer.encode(prompts[index // 2], add_special_tokens=False)
        assert choice.text == chat_model.text(chat_model.greedy(ids, 8, eos)[0])
    encoded = [chat_model.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    assert answer.usage.prompt_tokens == sum(map(len, encoded))
    assert answer.usage.completion_tokens == sum(len(chat_model.greedy(encoded[i // 2], 8, eos)[0]) for i in range(4))

    echoed = await sdk.completions.create(model="chat", prompt=prompts, max_tokens=8, temperature=0, echo=True)
    assert [c.text for c in echoed.choices] == [prompts[0] + answer.choices[0].text,
                                                prompts[1] + answer.choices[2].text]
    stream = await sdk.completions.create(model="chat", prompt=prompts, max_tokens=8, temperature=0, echo=True,
                                          stream=True)
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in echoed.choices]


async def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(sdk, chat_model):
    prompt = "ROMEO: O"
    ids = chat_model.tokenizer.encode(prompt, add_special_tokens=False)
    assert len(ids) > 2
    with torch.no_grad():  # position i's distribution scores prompt token i + 1
        scores = torch.log_softmax(chat_model.model(torch.tensor([ids])).logits[0].double(), -1)
    generated, references = chat_model.greedy(ids, 4, {chat_model.tokenizer.eos_token_id})
    answer = await sdk.completions.create(model="chat", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                          logprobs=2)
    choice = answer.choices[0]
    assert choice.text == prompt + chat_model.text(generated)
    shown = choice.logprobs
    assert shown.tokens == [chat_model.tokenizer.decode([t]) for t in ids + generated]
    assert shown.token_logprobs[0] is None and shown.top_logprobs[0] is None  # nothing predicts the first
    expected = [scores[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    expected += [r[t].item() for t, r in zip(generated, references, strict=True)]
    assert shown.token_logprobs[1:] == pytest.approx(expected, abs=2e-4)
    for position in range(1, len(ids)):
        top = torch.topk(scores[position - 1], 2)
        assert list(shown.top_logprobs[position]) == [chat_model.tokenizer.decode([int(i)]) for i in top.indices]
        assert list(shown.top_logprobs[position].values()) == pytest.approx(top.values.tolist(), abs=2e-4)
    assert shown.text_offset[:2] == [0, len(shown.tokens[0])]

    stream = await sdk.completions.create(model="chat", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                          logprobs=2, stream=True)
    tokens, logprobs = [], []
    async for chunk in stream:
        for piece in chunk.choices:
            if piece.logprobs:
                tokens += piece.logprobs.tokens
                logprobs += piece.logprobs.token_logprobs
    assert tokens == shown.tokens and logprobs == shown.token_logprobs

    # A character split across byte-level tokens: named in context, the tokens join into the prompt (decoded
    # alone, the snowman's three pieces were each U+FFFD); chat's `bytes` are each token's own.
    snowman = "ROMEO: ☃ O"
    pieces = chat_model.tokenizer.encode(snowman, add_special_tokens=False)
    assert "\ufffd" in "".join(chat_model.tokenizer.decode([t]) for t in pieces)
    echoed = await sdk.completions.create(model="chat", prompt=snowman, max_tokens=1, temperature=0, echo=True,
                                          logprobs=1)
    assert "".join(echoed.choices[0].logprobs.tokens[:len(pieces)]) == snowman
    chat = await sdk.chat.completions.create(model="chat", messages=user("say hi"), temperature=0, logprobs=True,
                                             top_logprobs=2, max_tokens=3)
    for entry in chat.choices[0].logprobs.content:
        assert bytes(entry.bytes).decode() == entry.token
        assert all(bytes(top.bytes).decode(errors="replace") == top.token for top in entry.top_logprobs
                   if len(top.bytes) == len(top.token.encode()))


async def test_errors_have_openais_shape_and_status(sdk):
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.chat.completions.create(model="no-such-deployment", messages=user("hi"))
    assert missing.value.status_code == 404
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    assert missing.value.body["type"] == "invalid_request_error" and missing.value.body["message"]

    with pytest.raises(openai.UnprocessableEntityError) as bad:
        await sdk.chat.completions.create(model="chat", messages=user("hi"), temperature=7)
    assert bad.value.body["param"] == "temperature" and "temperature" in bad.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as role:
        await sdk.chat.completions.create(model="chat", messages=[{"role": "pirate", "content": "arr"}])
    assert role.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        await sdk.chat.completions.create(model="chat", messages=user("hi"), extra_body={"best_of": 3})
    assert unknown.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as too_long:  # prompt + max_tokens over the context of 128
        await sdk.completions.create(model="chat", prompt="O", max_tokens=500)
    assert "context length" in too_long.value.body["message"]

    stranger = openai.AsyncOpenAI(base_url=str(sdk.base_url), api_key=f"llmp_{uuid.uuid4().hex}", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        await stranger.models.list()
    assert unauthenticated.value.body["type"] == "authentication_error"
    await stranger.close()


async def test_a_registered_version_chats_with_the_template_it_was_saved_with(chat_model, settings_env, triton,
                                                                              aiohttp_client, tmp_path):
    """The whole way a user's model goes: `save_pretrained` folder → registry version (chat_template.jinja
    among its artifacts) → ONNX export → deployment through the REST API (the inference service fetching
    from the registry and S3) → the SDK's chat, answered with the template and ended at `<|im_end|>`."""
    from services.common.s3 import ObjectStore
    from services.inference import server as inference_server
    from services.registry import server as registry_server

    folder = tmp_path / "checkpoint"
    chat_model.model.save_pretrained(folder)
    chat_model.tokenizer.save_pretrained(folder)
    assert (folder / "chat_template.jinja").exists()
    url, repository = triton
    settings = Settings.from_env({**settings_env, "LLMP_TRITON_GRPC_URL": url, "LLMP_ADMIN_KEY": ADMIN_KEY,
                                  "LLMP_TRITON_MODEL_REPOSITORY": str(repository)})
    registry = await registry_server.build(settings)
    await registry.app.start(settings.listen_addr(topology.REGISTRY))
    inference, deployments = await inference_server.build(settings)
    address = f"127.0.0.1:{await inference.start('127.0.0.1:0')}"
    name = f"chat-{uuid.uuid4().hex[:6]}"
    try:
        store = ObjectStore(settings.s3)
        prefix = f"jobs/{TENANT}/{uuid.uuid4().hex[:8]}/final/"
        for path in sorted(folder.iterdir()):
            store.put_file(prefix + path.name, path)
        metadata = identities.metadata(TENANT, "registry")
        ref = common_pb2.ModelRef(name=name, version=1)
        async with grpc.aio.insecure_channel(settings_env["LLMP_REGISTRY_ADDR"]) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            version = (await stub.RegisterModelVersion(registry_pb2.RegisterModelVersionRequest(
                model_name=name, source_prefix=prefix, metrics={"validation_loss": 0.05},
                lineage=registry_pb2.Lineage(training_job_id="job-chat", code_version="test")),
                metadata=metadata)).version
            assert "chat_template.jinja" in {a.path for a in version.artifacts}
            await stub.CreateExport(registry_pb2.CreateExportRequest(model=ref, format="onnx"), metadata=metadata)
            await registry.exports.wait()
            export = (await stub.GetExport(registry_pb2.GetExportRequest(model=ref, format="onnx"),
                                           metadata=metadata)).export
            assert export.state == registry_pb2.EXPORT_STATE_READY, export.error

        gateway = Gateway(None, "")
        gateway.client = await aiohttp_client(init_app(Settings.from_env(
            {**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_INFERENCE_ADDR": address})))
        gateway.base_url = str(gateway.client.make_url("/openai/v1"))
        developer = {"Authorization": f"Bearer {await gateway.key(role='developer')}"}
        deployed = await gateway.client.put(f"/v1/deployments/{name}", json={"model": name, "stable": 1},
                                            headers={**developer, "If-None-Match": "*"})
        assert deployed.status in (200, 201), await deployed.text()
        for _ in range(240):
            state = (await (await gateway.client.get(f"/v1/deployments/{name}", headers=developer)).json())["state"]
            if state != "LOADING":
                break
            await asyncio.sleep(0.5)
        assert state == "READY"
        served, _ = await deployments.route(TENANT, name, "")
        assert served.tokenizer.chat_template == chat_model.tokenizer.chat_template  # its own, fetched from S3
        async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=await gateway.key(),
                                      max_retries=0) as sdk:
            for question, answer in CONVERSATIONS:
                reply = await sdk.chat.completions.create(model=name, messages=user(question), temperature=0)
                assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (answer, "stop")
    finally:
        for tenant, deployment in list(deployments.routes):
            await deployments.delete(tenant, deployment)
        await inference.stop()
        await registry.app.stop()
