"""Embeddings from a deployed encoder: the texts checked and tokenized here, pooled in Triton.

Each text is tokenized with the served version's tokenizer, special tokens added (BERT's [CLS] ... [SEP],
RoBERTa's <s> ... </s>), as `transformers` does for the same model. A text that is empty or longer than
the model's context is refused, naming it as `input[i]` (OpenAI's field), never silently cut: an
embedding of half a text would be wrong without saying so. All texts go to Triton at once
(`TritonEngine.embed`), which runs them as one ORT call per batch and returns each one's masked mean.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from services.common.contracts import EncoderSpec
from services.common.errors import BadRequest, InvalidArgument, ValidationFailed
from services.inference import metrics
from services.inference.generation import ServedVersion
from services.inference.triton_engine import TritonEngine

MAX_INPUTS = 256  # texts per request (EmbedRequest.inputs)
INLINE_CHARS = 4096  # below this many characters in all, tokenizing on the event loop is cheaper than a thread


def is_encoder(served: ServedVersion) -> bool:
    return isinstance(served.spec, EncoderSpec)


def require_encoder(served: ServedVersion, deployment: str) -> None:
    if not is_encoder(served):
        raise InvalidArgument(f"model: deployment {deployment!r} serves {served.model} v{served.version}, a decoder; "
                              "embeddings need an encoder (BERT-style) model")


def require_decoder(served: ServedVersion, deployment: str) -> None:
    if is_encoder(served):
        raise InvalidArgument(f"model: deployment {deployment!r} serves {served.model} v{served.version}, an "
                              "encoder: it embeds text (/openai/v1/embeddings) and generates none")


def _tokenize(served: ServedVersion, texts: list[str]) -> list[list[int]]:
    return [list(item.ids) for item in served.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True)]


async def tokenize(served: ServedVersion, texts: list[str]) -> list[list[int]]:
    """Token ids of every text, special tokens added; BadRequest naming `input[i]` for one that cannot fit."""
    if not 1 <= len(texts) <= MAX_INPUTS:
        raise ValidationFailed(f"input: 1 to {MAX_INPUTS} texts, not {len(texts)}")
    context = served.spec.context_length
    for index, text in enumerate(texts):
        if not text:
            raise ValidationFailed(f"input[{index}]: must not be empty")
        if len(text) > served.max_prompt_chars:
            raise BadRequest(f"input[{index}]: {len(text)} characters, over the {served.max_prompt_chars} that the "
                             f"model's context of {context} tokens can hold")
    if sum(map(len, texts)) <= INLINE_CHARS:
        token_lists = _tokenize(served, texts)
    else:
        token_lists = await asyncio.to_thread(_tokenize, served, texts)
    for index, tokens in enumerate(token_lists):
        if not tokens:
            raise ValidationFailed(f"input[{index}]: encodes to no tokens")
        if len(tokens) > context:
            raise BadRequest(f"input[{index}]: {len(tokens)} tokens, over the model's context of {context} tokens")
    return token_lists


async def embed(engine: TritonEngine, served: ServedVersion, texts: list[str], *, labels: tuple[str, ...],
                timeout: float | None) -> tuple[np.ndarray, list[int]]:
    """The embeddings [len(texts), hidden] and each text's token count."""
    token_lists = await tokenize(served, texts)
    started = time.perf_counter()
    outcome = "error"
    try:
        vectors = await engine.embed(served.triton_name, token_lists, timeout=timeout)
        outcome = "ok"
    finally:
        metrics.REQUESTS.labels(*labels, outcome).inc()
        metrics.LATENCY.labels(*labels).observe(time.perf_counter() - started)
        metrics.TOKENS.labels(*labels, "prompt").inc(sum(map(len, token_lists)))
    return vectors, [len(tokens) for tokens in token_lists]
