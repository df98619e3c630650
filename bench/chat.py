"""Chat benchmark: generated tokens/s with 16 concurrent streamed clients through the gateway
(`POST /openai/v1/chat/completions`, stream=true → gRPC inference service → Triton with step batching
and a server-side KV cache) vs Hugging Face `model.generate` on the same rendered prompts, batched
(16 a batch, left-padded) in one process on all cores, same model, greedy, same max tokens.

The model has GPT-2 small's shape (12 layers, 12 heads, 768 wide; random weights) with a 512-token
byte-level BPE vocabulary trained here that carries the ChatML markers as special tokens and llmp's
default chat template, as a tokenizer llmp trains for chat data does. Both sides stop a conversation at
`<|im_end|>` or EOS (a random model rarely says either), and each counts the tokens it really generated.

Topology as bench/serving.py sets it up: tritonserver, the inference service (reading the model from a
local tree in the registry's layout) and the gateway each as their own process; this process is the
clients and the baseline. Needs PostgreSQL at LLMP_TEST_DATABASE_URL (default 127.0.0.1:5432).
Run: `make bench-chat` (python -m bench.chat). BENCH line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bench import harness
from bench.inference import SHAKESPEARE
from bench.serving import DEPLOYMENT, MODEL, TENANT, serving_stack
from services.common.contracts import CHAT_SPECIAL_TOKENS, DEFAULT_CHAT_TEMPLATE, END_OF_TURN
from services.inference.model_source import publish_local_version
from services.registry.onnx_export import export_model_onnx

EOS = "<|endoftext|>"


def build_chat_model(root: Path, n_layer: int, n_head: int, n_embd: int, context: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SHAKESPEARE.read_text()[:50_000]], trainers.BpeTrainer(
        vocab_size=512, special_tokens=[EOS, *CHAT_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, chat_template=DEFAULT_CHAT_TEMPLATE,
                            additional_special_tokens=list(CHAT_SPECIAL_TOKENS)).save_pretrained(root / "tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")  # as the inference service reads it
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=len(tokenizer),
                                       n_positions=context, eos_token_id=eos, bos_token_id=eos)).eval()
    export_model_onnx(model, root / "export" / "model.onnx")
    publish_local_version(root, TENANT, MODEL, 1, root / "export", root / "tokenizer")
    return model, tokenizer


def conversations(count: int) -> list[list[dict]]:
    """Distinct one-question conversations (the gateway caches deterministic answers: a repeat would be a hit)."""
    text = SHAKESPEARE.read_text()
    return [[{"role": "user", "content": text[i * 97:i * 97 + 60]}] for i in range(count)]


def hf_batched(model, tokenizer, chats: list[list[dict]], max_tokens: int, batch: int) -> tuple[int, float]:
    """HF generate on the rendered prompts, `batch` at a time, left-padded, on all cores; tokens up to each
    conversation's first stop token are counted."""
    torch.set_num_threads(os.cpu_count() or 1)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    prompts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    tokenizer.padding_side, tokenizer.pad_token = "left", EOS  # padding is masked out: any token will do
    tokens, started = 0, time.perf_counter()
    for first in range(0, len(prompts), batch):
        encoded = tokenizer(prompts[first:first + batch], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=stops[0])
        for row in out[:, encoded["input_ids"].shape[1]:].tolist():
            ends = [i for i, token in enumerate(row) if token in stops]
            tokens += ends[0] if ends else len(row)
    return tokens, time.perf_counter() - started


async def gateway_streamed(http: aiohttp.ClientSession, url: str, chats: list[list[dict]], max_tokens: int,
                           clients: int) -> tuple[int, float]:
    """`clients` concurrent streamed chats; tokens as each stream's closing usage counts them."""
    queue = list(chats)
    total = 0

    async def client() -> None:
        nonlocal total
        while queue:
            body = {"model": DEPLOYMENT, "messages": queue.pop(), "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with http.post(f"{url}/openai/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"chat failed: {response.status} {await response.text()}")
                usage = None
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
                if usage is None:
                    raise RuntimeError("the stream ended without its usage chunk")
                total += usage["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return total, time.perf_counter() - started


async def main_async(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="llmp-bench-chat-"))
    model, tokenizer = build_chat_model(work, args.n_layer, args.n_head, args.n_embd, args.context)
    chats = conversations(args.requests + 4)
    warmup, measured = chats[:4], chats[4:]
    async with serving_stack(work, args.clients) as stack:
        await gateway_streamed(stack.http, stack.url, warmup, 4, 4)
        tokens, elapsed = await gateway_streamed(stack.http, stack.url, measured, args.max_tokens, args.clients)
    hf_batched(model, tokenizer, warmup, 4, args.clients)
    hf_tokens, hf_elapsed = hf_batched(model, tokenizer, measured, args.max_tokens, args.clients)
    project, baseline = tokens / elapsed, hf_tokens / hf_elapsed
    print(f"model: GPT-2 n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} vocab={len(tokenizer)}; "
          f"{len(measured)} conversations, at most {args.max_tokens} tokens each; cpus={os.cpu_count()}")
    print(f"gateway, {args.clients} concurrent streamed clients: {tokens} tokens in {elapsed:.2f}s "
          f"= {project:.1f} tok/s")
    print(f"HF generate, batches of {args.clients}: {hf_tokens} tokens in {hf_elapsed:.2f}s = {baseline:.1f} tok/s")
    harness.report("chat", project, baseline, "tok/s",
                   f"HF model.generate on the same rendered prompts batched {args.clients} at a time in one process "
                   f"on all cores, same model, greedy; project: {args.clients} concurrent streamed clients of "
                   f"/openai/v1/chat/completions through the gateway")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=12)  # GPT-2 small's shape
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--context", type=int, default=256)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
