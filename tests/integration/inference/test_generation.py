"""Generation through the inference service and a real Triton equals the PyTorch model's."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
import tritonclient.grpc.aio as triton_client

from services.inference.triton_engine import TritonEngine

pytestmark = pytest.mark.integration

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
    name = "m-acme-tiny-v1"
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
