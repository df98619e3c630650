"""Text generation over Triton: tokenize (a prompt, or a conversation through the chat template), prefill
once, then one token per step with the KV cache in Triton.

`generate` yields `Chunk`s (new text and token ids, with their log-probabilities when asked) as tokens
are chosen; the non-streaming RPC joins them, so streaming and non-streaming outputs are the same by
construction. The n choices of one request are n `generate`s of the same prompt running together:
their steps meet in the engine's step batcher, so each token of all n costs one Triton call.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property

import jinja2
import numpy as np
from transformers import PreTrainedTokenizerFast

from services.common import contracts
from services.common.contracts import DecoderSpec
from services.common.errors import BadRequest, DeadlineExceeded, ValidationFailed
from services.inference.sampling import Penalties, SamplingParams, StopScanner, choose, log_softmax, most_likely
from services.inference.triton_engine import TritonEngine, new_sequence_id

# Prompts up to this many characters are tokenized on the event loop (microseconds); longer ones in a
# thread, so that tokenizing a long prompt never stalls the tokens of every other request.
INLINE_PROMPT_CHARS = 4096


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character a byte-level vocabulary writes it with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


@dataclass(frozen=True)
class ServedVersion:
    """A model version as loaded in Triton, with what generation needs beside it."""

    model: str
    version: int
    triton_name: str
    spec: DecoderSpec
    tokenizer: PreTrainedTokenizerFast
    digest: str = ""

    @property
    def eos_token_id(self) -> int | None:
        if self.spec.eos_token_id is not None:
            return self.spec.eos_token_id
        return self.tokenizer.eos_token_id

    @cached_property
    def end_of_turn_ids(self) -> frozenset[int]:
        """The tokens that end a chat answer: the end-of-turn marker (when the vocabulary has it as a
        token) and the end of sequence."""
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        marker = self.tokenizer.get_vocab().get(contracts.END_OF_TURN)
        if marker is not None:
            ids.add(marker)
        return frozenset(ids)

    @property
    def chat_template(self) -> str:
        """The version's own chat template, else llmp's default (contracts.chat)."""
        return self.tokenizer.chat_template or contracts.DEFAULT_CHAT_TEMPLATE

    def decode(self, token_ids: list[int]) -> str:
        """`tokenizer.decode(token_ids, skip_special_tokens=True)`, straight from the Rust tokenizer when the
        wrapper would not clean up spaces: the same text without the wrapper's Python layers (70 -> 26 us for
        32 tokens), which a streamed sequence pays for every token."""
        if self.tokenizer.clean_up_tokenization_spaces:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return self.tokenizer.backend_tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's text decoded alone, special tokens included."""
        return self.tokenizer.backend_tokenizer.decode([token], skip_special_tokens=False)

    @cached_property
    def _byte_level(self) -> dict[str, int] | None:
        """GPT-2's byte-to-character table inverted, when the tokenizer decodes byte-level (else None)."""
        decoder = json.loads(self.tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {part.get("type") for part in decoder.get("decoders") or ()}
        if "ByteLevel" not in kinds:
            return None
        return {char: byte for byte, char in bytes_to_unicode().items()}

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes (OpenAI's `bytes`): for a byte-level vocabulary, the bytes its piece stands for,
        which may be part of a multi-byte character; otherwise its text's UTF-8."""
        table = self._byte_level
        piece = self.tokenizer.backend_tokenizer.id_to_token(token)
        if table is None or piece is None or token in self._special_ids or any(char not in table for char in piece):
            return self.token_text(token).encode()
        return bytes(table[char] for char in piece)

    @cached_property
    def max_prompt_chars(self) -> int:
        """The longest prompt that can fit the context, checked before tokenizing: no token covers more
        characters than the vocabulary's longest (special tokens included; byte-level and character
        tokenizers drop no character), so a longer prompt needs more tokens than the context holds."""
        longest = max(len(token) for token in self.tokenizer.get_vocab())
        return min(contracts.MAX_PROMPT_CHARS, self.spec.context_length * longest)


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability, and the most likely alternatives at its position."""

    token_id: int
    token: str  # its text in context (TokenText)
    logprob: float
    top: tuple[tuple[int, str, float, bytes], ...] = ()  # (token id, text, logprob, bytes), most likely first
    raw: bytes = b""  # its own bytes


class TokenText:
    """Tokens' text as the tokenizer decodes them in context: a token that ends a character carries it
    whole, one holding only its first bytes carries nothing (the characters' bytes are split across byte-
    level tokens). The texts of a sequence's tokens join into its decoded text; `bytes` keep each token's own."""

    def __init__(self, served: ServedVersion) -> None:
        self.served = served
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, token: int) -> tuple[str, bytes]:
        """The text `token` adds after the tokens taken so far (and its bytes); it is taken too."""
        raw = self.served.token_bytes(token)
        return self.decoder.decode(raw), raw

    def peek(self, token: int) -> tuple[str, bytes]:
        """What `take` would answer, without taking it (an alternative at this position)."""
        other = codecs.getincrementaldecoder("utf-8")("replace")
        other.setstate(self.decoder.getstate())
        raw = self.served.token_bytes(token)
        return other.decode(raw), raw


@dataclass
class Chunk:
    text: str  # new text released by this step (may be empty while a stop sequence is undecided)
    token_ids: list[int]  # tokens chosen since the previous chunk
    finish_reason: str = ""  # set on the last chunk: "stop" (EOS or a stop sequence) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token in token_ids, when asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # on the first chunk, when asked


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    started: float = field(default_factory=time.perf_counter)


def render_chat(served: ServedVersion, messages: list[dict[str, str]]) -> str:
    """The conversation as the prompt text the version was trained on, the assistant's turn opened
    (contracts.chat: the tokenizer's template, else ChatML)."""
    if not messages:
        raise ValidationFailed("messages must not be empty")
    for index, message in enumerate(messages):
        if message["role"] not in contracts.ROLES:
            raise ValidationFailed(f"messages[{index}].role must be one of {', '.join(contracts.ROLES)}, "
                                   f"not {message['role']!r}")
    try:
        return served.tokenizer.apply_chat_template(messages, chat_template=served.chat_template, tokenize=False,
                                                    add_generation_prompt=True)
    except jinja2.TemplateError as error:  # a template's raise_exception (e.g. roles out of order)
        raise ValidationFailed(f"messages: the model's chat template refuses them: {error}") from None


async def encode_prompt(served: ServedVersion, prompt: str, max_tokens: int) -> list[int]:
    """Token ids of the prompt, after checking it and max_tokens (0: what the context leaves) against the
    model's context: its length in characters before tokenizing (`ServedVersion.max_prompt_chars`), its
    tokens after."""
    if not prompt:
        raise ValidationFailed("prompt must not be empty")
    if max_tokens < 0:
        raise ValidationFailed(f"max_tokens must be at least 1 (or 0 for the rest of the context), not {max_tokens}")
    context = served.spec.context_length
    if len(prompt) > served.max_prompt_chars:
        raise BadRequest(f"prompt has {len(prompt)} characters, over the {served.max_prompt_chars} that the model's "
                         f"context length of {context} tokens can hold")
    if len(prompt) <= INLINE_PROMPT_CHARS:
        ids = _encode(served.tokenizer, prompt)
    else:
        ids = await asyncio.to_thread(_encode, served.tokenizer, prompt)
    if not ids:
        raise ValidationFailed("prompt encodes to no tokens")
    if max_tokens == 0 and len(ids) >= context:
        raise BadRequest(f"prompt ({len(ids)} tokens) leaves no room in the model's context length of "
                         f"{context} tokens")
    if len(ids) + max_tokens > context:
        raise BadRequest(f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                         f"context length of {context} tokens")
    return ids


def _encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False)`, straight from the Rust tokenizer when nothing
    (truncation, padding) would make the wrapper's answer differ: the same ids, without the wrapper's
    Python layers, which cost more than the tokenization itself on a short prompt."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


async def generate(engine: TritonEngine, served: ServedVersion, prompt_ids: list[int], max_tokens: int,
                   params: SamplingParams, *, deadline: float | None = None,
                   stats: GenerationStats | None = None, stream_text: bool = True,
                   stop_token_ids: frozenset[int] | None = None, logprobs: bool = False, top_logprobs: int = 0,
                   choice: int = 0, prompt_logprobs: bool = False) -> AsyncIterator[Chunk]:
    """Decode up to `max_tokens` tokens after `prompt_ids`. `deadline` is a `time.monotonic()` instant.

    Generation ends at any of `stop_token_ids` (default: the end of sequence), which is not part of the
    output. `logprobs`: each chunk carries its tokens' log-probabilities (and `top_logprobs` alternatives).
    `choice`: which of a request's n choices this is (it picks the choice's random generator).
    `prompt_logprobs`: the first chunk also scores every prompt token given the ones before it (the first
    with logprob 0); Triton gives the logits of a step's last position only, so the prompt is then read
    one token per step.

    With `stream_text` false (a caller that joins the chunks anyway) and no stop sequences, the text is
    decoded once at the end instead of after every token: the same text, less work per token.

    Greedy decoding without penalties or log-probabilities needs only Triton's argmax; anything else
    asks for the logits, penalises them, and chooses (and reports) from those.

    The next step is sent to Triton before a chunk is handed to the consumer, so whatever the consumer
    does with it (the gRPC stream, the gateway, the client) overlaps the model's work on the next token.
    Except for the first chunk with text: it goes out first and the second step is sent when the consumer
    asks for more, so the first token's way to the client does not share the CPU with the next step's
    work (0.2-0.45 ms off the time to first token through the gateway on 2 cores).
    """
    stats = stats or GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    rng = None if params.greedy else params.rng(choice)  # seeding from OS entropy is not free: only when sampling
    scanner = StopScanner(params.stop)
    if stop_token_ids is None:
        stop_token_ids = frozenset() if served.eos_token_id is None else frozenset((served.eos_token_id,))
    need_logits = not params.greedy or params.penalized or logprobs
    penalties = Penalties(params, served.spec.vocab_size)
    sequence_id = new_sequence_id()
    generated: list[int] = []
    pending: list[int] = []
    pending_logprobs: list[TokenLogprob] = []
    finished = False
    first_text = True  # no text handed out yet
    incremental = stream_text or bool(params.stop)

    def send(feed: list[int], start: bool) -> asyncio.Future:
        last = len(generated) + 1 >= max_tokens
        return engine.submit(served.triton_name, sequence_id, feed, start=start, end=last,
                             logits=need_logits, timeout=_remaining(deadline))

    scored: list[TokenLogprob] = []  # the prompt's, until the first chunk carries them
    texts = TokenText(served) if logprobs else None

    def chunk(text: str, reason: str = "") -> Chunk:
        nonlocal scored
        made = Chunk(text, pending, reason, stats.prompt_tokens, len(generated), pending_logprobs, scored)
        scored = []
        return made

    step: asyncio.Future | None = None
    try:
        if prompt_logprobs:
            text, raw = texts.take(prompt_ids[0])
            scored = [TokenLogprob(prompt_ids[0], text, 0.0, raw=raw)]
            for position, token in enumerate(prompt_ids[:-1]):
                step = engine.submit(served.triton_name, sequence_id, [token], start=position == 0,
                                     logits=True, timeout=_remaining(deadline))
                result = await step
                scored.append(_logprob(texts, result.logits, prompt_ids[position + 1], top_logprobs))
            step = send(prompt_ids[-1:], len(prompt_ids) == 1)
        else:  # (the prompt is text: its tokens' bytes end with a whole character, nothing for `texts` to carry)
            step = send(prompt_ids, True)
        while True:
            last = len(generated) + 1 >= max_tokens
            result = await step
            finished = last
            if need_logits:
                scores = penalties.apply(result.logits)
                token = int(np.argmax(scores)) if params.greedy else choose(scores, params, rng)
            else:
                token = result.next_token
            if stats.first_token_s is None:
                stats.first_token_s = time.perf_counter() - stats.started
            if token in stop_token_ids:
                yield chunk(_final_text(scanner, served, generated), "stop")
                return
            generated.append(token)
            pending.append(token)
            penalties.add(token)
            if logprobs:
                pending_logprobs.append(_logprob(texts, scores, token, top_logprobs))
            stats.completion_tokens = len(generated)
            if not incremental:
                if last:
                    yield chunk(_final_text(scanner, served, generated), "length")
                    return
                step = send([token], False)
                continue
            text = served.decode(generated)
            release = scanner.feed(text)
            if scanner.stopped:
                yield chunk(release, "stop")
                return
            if last:
                yield chunk(release + scanner.flush(text), "length")
                return
            if release and first_text:  # the time to first token: nothing runs beside its delivery
                first_text = False
                yield chunk(release)
                pending, pending_logprobs = [], []
                step = send([token], False)
                continue
            step = send([token], False)
            if release:
                yield chunk(release)
                pending, pending_logprobs = [], []
    finally:
        if step is None:
            pass
        elif not step.done():
            step.cancel()  # drops the result; the step itself still runs, and the free below follows it
        elif not step.cancelled():
            step.exception()  # retrieved: an error of a step nobody awaits any more is not worth a log line
        if not finished:  # stopped early (EOS, stop sequence, error, client gone): free Triton's state
            try:
                await engine.step(served.triton_name, sequence_id, [], end=True, timeout=5)
            except Exception:  # best effort; Triton evicts idle state anyway
                pass


def _logprob(texts: TokenText, scores: np.ndarray, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability among `scores` (and the `top` most likely), named in context; `token` is taken."""
    logprobs = log_softmax(scores)
    alternatives = []
    for other, value in most_likely(logprobs, top):
        text, raw = texts.peek(other)
        alternatives.append((other, text, value, raw))
    text, raw = texts.take(token)
    return TokenLogprob(token, text, float(logprobs[token]), tuple(alternatives), raw)


def _final_text(scanner: StopScanner, served: ServedVersion, generated: list[int]) -> str:
    return scanner.flush(served.decode(generated))


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded during generation")
    return left
