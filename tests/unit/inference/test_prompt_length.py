"""Issue 15, finding 6: a prompt's length is checked against the deployment's context before it is
tokenized (a 1,000,000-character prompt was tokenized on the event loop first), and a long prompt is
tokenized off the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
from transformers import PreTrainedTokenizerFast

from gateway.views import completions
from services.common import contracts, errors
from services.dataset import tokenizer as dataset_tokenizer
from services.inference import generation
from services.inference.generation import ServedVersion, encode_prompt
from services.registry.onnx_export import DecoderSpec

CONTEXT = 64


def served(context: int = CONTEXT) -> ServedVersion:
    built = dataset_tokenizer.build_char("abcdefghijklmnopqrstuvwxyz \n")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=built)
    spec = DecoderSpec(n_layer=1, n_head=1, head_dim=8, vocab_size=built.get_vocab_size(), context_length=context,
                       eos_token_id=0, input_names=(), output_names=())
    return ServedVersion("m", 1, "m-v1", spec, tokenizer)


@pytest.fixture
def encodes(monkeypatch) -> list[tuple[int, int]]:
    """(prompt length, thread id) of every tokenization."""
    seen: list[tuple[int, int]] = []
    real = generation._encode

    def recording(tokenizer, text):
        seen.append((len(text), threading.get_ident()))
        return real(tokenizer, text)

    monkeypatch.setattr(generation, "_encode", recording)
    return seen


def test_the_character_bound_follows_the_context_and_the_longest_token():
    version = served()
    longest = max(len(token) for token in version.tokenizer.get_vocab())  # a special token: "<|endoftext|>"…
    assert longest > 1 and version.max_prompt_chars == CONTEXT * longest
    assert served(10**9).max_prompt_chars == contracts.MAX_PROMPT_CHARS


async def test_a_huge_prompt_is_refused_naming_the_limit_without_being_tokenized(encodes):
    version = served()
    with pytest.raises(errors.BadRequest) as refused:
        await encode_prompt(version, "a" * 1_000_000, 8)
    assert str(version.max_prompt_chars) in refused.value.message
    assert f"context length of {CONTEXT} tokens" in refused.value.message
    assert encodes == []  # refused before the tokenizer saw it
    with pytest.raises(errors.BadRequest):  # one past the bound too
        await encode_prompt(version, "a" * (version.max_prompt_chars + 1), 8)
    assert encodes == []


async def test_a_prompt_within_the_bound_is_still_checked_in_tokens(encodes):
    version = served()
    assert len(await encode_prompt(version, "ab c", 8)) == 4
    with pytest.raises(errors.BadRequest, match="plus max_tokens"):
        await encode_prompt(version, "a" * CONTEXT, 1)  # fits the character bound, not the context
    assert [length for length, _ in encodes] == [4, CONTEXT]


async def test_a_long_prompt_is_tokenized_off_the_event_loop(encodes):
    version = served(context=100_000)
    loop_thread = threading.get_ident()
    await encode_prompt(version, "ab", 1)
    short = "a" * (generation.INLINE_PROMPT_CHARS + 1)
    await encode_prompt(version, short, 1)
    assert encodes[0] == (2, loop_thread)  # a short one inline: a thread hop would cost more than it
    assert encodes[1][0] == len(short) and encodes[1][1] != loop_thread
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await encode_prompt(version, "ab " * 30_000, 1)
    task.cancel()
    assert ticks > 1  # the loop kept running other work meanwhile


def test_the_gateway_refuses_what_no_deployment_could_take():
    body = {"model": "m", "prompt": "a" * (contracts.MAX_PROMPT_CHARS + 1)}
    assert not completions._plainly_valid(body)
    with pytest.raises(errors.ValidationFailed, match="^prompt:"):
        completions.validate(body, completions.COMPLETION)
