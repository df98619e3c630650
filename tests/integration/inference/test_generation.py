"""Generation through the inference service and a real Triton equals the PyTorch model's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import torch
import tritonclient.grpc.aio as triton_client

from services.common.contracts import triton_model_name
from services.inference import servicer
from services.inference.triton_engine import TritonEngine

pytestmark = pytest.mark.integration

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "What is", "And then the king said", "O"]


def hf_greedy(version, prompt: str, max_tokens: int) -> list[int]:
    ids = version.tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        out = version.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=version.tokenizer.eos_token_id)
    generated = out[0, len(ids):].tolist()
    eos = version.tokenizer.eos_token_id
    return generated[:generated.index(eos)] if eos in generated else generated


async def test_greedy_equals_pytorch_generate_token_for_token(service, model_root):
    _, versions = model_root
    response = await service.deploy(stable=1)
    assert response.deployment.state == "READY", response.deployment.message
    for prompt in PROMPTS:
        completion = await service.generate(prompt, max_tokens=24)
        expected = hf_greedy(versions[1], prompt, 24)
        assert list(completion.token_ids) == expected, prompt
        assert completion.text == versions[1].tokenizer.decode(expected, skip_special_tokens=True)
        assert completion.finish_reason == ("length" if len(expected) == 24 else "stop")
        assert completion.model_version == 1 and completion.completion_tokens == len(expected)


async def test_streaming_equals_non_streaming(service):
    await service.deploy(stable=1)
    for prompt in PROMPTS[:3]:
        whole = await service.generate(prompt, max_tokens=20)
        pieces, ids, last = [], [], None
        async for message in service.stream(prompt, max_tokens=20):
            pieces.append(message.text)
            ids.extend(message.token_ids)
            last = message
        assert "".join(pieces) == whole.text
        assert ids == list(whole.token_ids)
        assert len(pieces) > 1  # really streamed, not one message
        assert last.finish_reason == whole.finish_reason and last.summary.completion_tokens == len(ids)


async def test_concurrent_requests_are_batched_and_stay_correct(service, model_root, triton):
    _, versions = model_root
    await service.deploy(stable=1)
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    client = triton_client.InferenceServerClient(triton[0])
    name = triton_model_name("acme", "tiny", 1)
    before = (await client.get_inference_statistics(name)).model_stats[0]
    results = await asyncio.gather(*(service.generate(p, max_tokens=16) for p in prompts))
    after = (await client.get_inference_statistics(name)).model_stats[0]
    await client.close()
    for prompt, completion in zip(prompts, results, strict=True):
        assert list(completion.token_ids) == hf_greedy(versions[1], prompt, 16), prompt
    requests = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert requests >= 16 * 2
    assert executions < requests * 0.6, f"{requests} steps ran in {executions} executions: not batched"


async def test_requests_joining_and_leaving_a_running_batch_stay_correct(service, model_root):
    """Staggered starts and mixed lengths: sequences join the decoding batch after their prefill and leave it
    at their own max_tokens, so the model gathers the cache rows of the batch that is running, of a smaller
    one and of sequences new to it in one step; every answer still equals PyTorch's greedy one."""
    _, versions = model_root
    await service.deploy(stable=1)
    text = SHAKESPEARE.read_text()

    async def one(index: int):
        await asyncio.sleep(0.004 * (index * 7 % 11))
        prompt = text[index * 53:index * 53 + 5 + index * 3 % 40]
        return prompt, 4 + index * 5 % 20, await service.generate(prompt, max_tokens=4 + index * 5 % 20)

    for prompt, max_tokens, completion in await asyncio.gather(*(one(index) for index in range(20))):
        assert list(completion.token_ids) == hf_greedy(versions[1], prompt, max_tokens), prompt


async def test_seeded_sampling_is_reproducible(service):
    await service.deploy(stable=1)
    first = await service.generate("ROMEO:", max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    again = await service.generate("ROMEO:", max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    others = [await service.generate("ROMEO:", max_tokens=20, temperature=1.0, seed=s) for s in (8, 9, 10)]
    assert list(first.token_ids) == list(again.token_ids)
    assert any(list(o.token_ids) != list(first.token_ids) for o in others)


async def test_stop_sequence_ends_generation_before_it(service):
    await service.deploy(stable=1)
    free = await service.generate("ROMEO:", max_tokens=30)
    assert len(free.text) > 4
    stop = free.text[2:4]
    stopped = await service.generate("ROMEO:", max_tokens=30, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.index(stop)]
    assert stop not in stopped.text


@pytest.mark.parametrize("kwargs, code, fragment", [
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"temperature": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"max_tokens": 60}, grpc.StatusCode.OUT_OF_RANGE, "context length of 64"),
    ({"prompt": "ROMEO: " * 100_000}, grpc.StatusCode.OUT_OF_RANGE, "characters, over the"),  # before tokenizing
    ({"deployment": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
])
async def test_bad_requests_are_refused_with_the_right_status(service, kwargs, code, fragment):
    await service.deploy(stable=1)
    arguments = {"prompt": "ROMEO: " * 3, "max_tokens": 8, **kwargs}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.generate(arguments.pop("prompt"), **arguments)
    assert caught.value.code() == code
    assert fragment in caught.value.details()


async def test_triton_down_is_unavailable_with_retry_after():
    from cli.servers import free_port
    from services.common.errors import Unavailable

    engine = TritonEngine(f"127.0.0.1:{free_port()}")
    with pytest.raises(Unavailable) as caught:
        await engine.step("m-x", 1, [1, 2], start=True, timeout=5)
    assert caught.value.retry_after and caught.value.retry_after > 0
    with pytest.raises(Unavailable):
        await engine.check()
    await engine.close()


async def test_a_lone_sequence_is_sent_at_once_and_a_batch_waits_for_open_sequences(service, model_root):
    """No batch window for a sequence with nobody to batch with; one loop turn for an open sequence that has
    not queued its next step yet (so it joins the batch instead of waiting for the next one)."""
    await service.deploy(stable=1)
    engine = service.deployments.engine
    name = triton_model_name("acme", "tiny", 1)
    ids = model_root[1][1].tokenizer.encode("ROMEO:", add_special_tokens=False)
    loop = asyncio.get_running_loop()
    turned = asyncio.Event()  # set by a callback queued right after the submit: has the loop turned since?
    sent: list[tuple[bool, list[int]]] = []
    infer_rows = engine.infer_rows

    async def recording(model, steps, *, timeout):
        sent.append((turned.is_set(), [step.sequence_id for step in steps]))
        return await infer_rows(model, steps, timeout=timeout)

    engine.infer_rows = recording
    try:
        first = engine.submit(name, 11, ids, start=True, timeout=10)
        loop.call_soon(turned.set)
        token = (await first).next_token
        assert sent == [(False, [11])]  # sent before the loop turned once

        turned.clear()
        second = engine.submit(name, 12, ids, start=True, timeout=10)  # 11 is open and has not queued yet
        later: list[asyncio.Future] = []
        loop.call_soon(lambda: later.append(engine.submit(name, 11, [token], timeout=10)))
        loop.call_soon(turned.set)
        await second
        await later[0]
        assert sent[1] == (True, [12, 11])  # waited for 11's step, then sent both as one request

        await engine.step(name, 11, [], end=True, timeout=10)
        await engine.step(name, 12, [], end=True, timeout=10)
        assert not engine.batchers[name].open_sequences
    finally:
        del engine.infer_rows


def test_prompts_encode_as_the_tokenizer_wrapper_does(model_root):
    from services.inference.generation import _encode

    tokenizer = model_root[1][1].tokenizer
    text = SHAKESPEARE.read_text()[:5000]
    for prompt in [text[i:i + 1 + i % 97] for i in range(0, 4900, 37)] + ["<|endoftext|> x", "ünï ✓ 😀", "\n"]:
        assert _encode(tokenizer, prompt) == tokenizer.encode(prompt, add_special_tokens=False), prompt
    tokenizer.backend_tokenizer.enable_truncation(4)  # a wrapper setting the fast path must not bypass
    try:
        assert _encode(tokenizer, text[:200]) == tokenizer.encode(text[:200], add_special_tokens=False)
    finally:
        tokenizer.backend_tokenizer.no_truncation()


def test_generated_text_decodes_as_the_tokenizer_wrapper_does(model_root):
    from services.inference.generation import ServedVersion

    tokenizer = model_root[1][1].tokenizer
    served = ServedVersion("tiny", 1, "tiny", None, tokenizer)
    text = SHAKESPEARE.read_text()[:3000] + "<|endoftext|> ünï ✓ 😀\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for start in range(0, len(ids), 29):  # pieces that split characters' bytes and hold the special token
        piece = ids[start:start + 1 + start % 41]
        assert served.decode(piece) == tokenizer.decode(piece, skip_special_tokens=True), piece
    cleans = tokenizer.clean_up_tokenization_spaces
    tokenizer.clean_up_tokenization_spaces = True  # the wrapper's clean-up: the fast path must not bypass it
    try:
        assert served.decode(ids[:80]) == tokenizer.decode(ids[:80], skip_special_tokens=True)
    finally:
        tokenizer.clean_up_tokenization_spaces = cleans


async def test_a_lone_streams_first_text_goes_out_before_its_second_step(service, model_root, monkeypatch):
    """A stream alone on its model waits FIRST_TEXT_HEADSTART_S after its first text before the next step goes
    to Triton (whose ORT call would take the cores the text's way to the client needs); with another sequence
    open on the model it does not wait. The head start is made long here so that no load mistakes one for the
    other."""
    monkeypatch.setattr(servicer, "FIRST_TEXT_HEADSTART_S", 0.5)
    await service.deploy(stable=1)
    engine = service.deployments.engine
    name = triton_model_name("acme", "tiny", 1)
    calls: list[tuple[float, float]] = []  # (sent, answered) of every Triton request
    infer_rows = engine.infer_rows

    async def recording(model, steps, *, timeout):
        sent = time.perf_counter()
        try:
            return await infer_rows(model, steps, timeout=timeout)
        finally:
            calls.append((sent, time.perf_counter()))

    async def stream() -> float:
        """Streams 6 tokens; the longest wait between a Triton answer and the next request after the first
        text arrived."""
        calls.clear()
        first = None
        async for message in service.stream("ROMEO:", max_tokens=6):
            if first is None and message.text:
                first = time.perf_counter()
        assert first is not None and len(calls) >= 3
        return max(sent - answered for (_, answered), (sent, _) in zip(calls, calls[1:], strict=False)
                   if answered < first)

    engine.infer_rows = recording
    try:
        assert await stream() >= 0.5  # alone: the second step waited for the first text's head start
        other = 99
        await engine.step(name, other, model_root[1][1].tokenizer.encode("O", add_special_tokens=False),
                          start=True, timeout=10)  # open, never stepping again: the stream is not alone
        assert await stream() < 0.5
        await engine.step(name, other, [], end=True, timeout=10)
    finally:
        del engine.infer_rows
