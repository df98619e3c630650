"""Inference benchmark: generated tokens/s through the REST gateway (`POST /v1/completions` → gRPC inference
service → Triton with the service's step batching and a server-side KV cache) against Hugging Face
`model.generate` on the same model in one process, greedy, same prompts and token counts:

- `inference-batched`: 16 concurrent clients vs `generate` with the prompts batched 16 at a time (left-padded),
  torch on every core: static batching without a hop, the best a user gets without a server.
- `inference`: the same 16 clients vs `generate` called sequentially, one prompt at a time (on half the cores,
  as this line has always been measured).
- `inference-staggered`: requests of mixed prompt lengths and max_tokens arriving on a seeded schedule (Poisson
  arrivals), each sent when it arrives, vs static batching in process on every core as a server without
  continuous batching does it: whenever the model is free, every request that has arrived (up to 16) forms a
  batch, which runs until its longest member is done. Throughput is the requests' own tokens over the time
  from the first arrival to the last answer.
- time to first token and time per output token of a single streamed request through the gateway vs the same
  generation code calling Triton directly (the hops' overhead; goal ≤ 1.10×).

The model has GPT-2 small's shape (12 layers, 12 heads, 768 wide; random weights, the bench's own 512-token BPE
vocabulary since no hub is reachable), the smallest model the platform is meant for. Topology as deployed
(bench/serving.py): tritonserver, the inference service and the gateway each their own process; this process
is the HTTP client and, once the stack is stopped, the baselines (so each gets the whole machine). Needs
PostgreSQL at LLMP_TEST_DATABASE_URL (default 127.0.0.1:5432). Run: `make bench-inference` (python -m
bench.inference); `--requests`, `--staggered` and `--max-tokens` size it; `--only ttft --single N` runs only the
single-request part, N prompts each way (no baselines, no BENCH line). BENCH lines last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bench import harness
from bench.serving import DEPLOYMENT, MODEL, TENANT, serving_stack
from services.common import contracts
from services.inference.generation import ServedVersion, encode_prompt, generate
from services.inference.model_source import LocalModelSource, publish_local_version
from services.inference.sampling import SamplingParams
from services.inference.triton_engine import TritonEngine
from services.registry.onnx_export import export_model_onnx

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def build_model(root: Path, n_layer: int, n_head: int, n_embd: int, context: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SHAKESPEARE.read_text()[:50_000]], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=len(tokenizer),
                                       n_positions=context, eos_token_id=eos, bos_token_id=eos)).eval()
    export_model_onnx(model, root / "export" / "model.onnx")
    publish_local_version(root, TENANT, MODEL, 1, root / "export", root / "tokenizer")
    return model, tokenizer


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the schedule's start
    prompt: str
    max_tokens: int


def hf_sequential(model, tokenizer, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=0)
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - started


def hf_batch(model, tokenizer, prompts: list[str], max_tokens: int) -> int:
    """One `generate` of `prompts` left-padded into one batch, exactly `max_tokens` new tokens each (greedy)."""
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token  # padding is masked out
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return (out.shape[1] - encoded["input_ids"].shape[1]) * len(prompts)


def hf_batched(model, tokenizer, prompts: list[str], max_tokens: int, batch: int) -> tuple[int, float]:
    """`generate` on `prompts`, `batch` at a time, torch on every core."""
    torch.set_num_threads(os.cpu_count() or 1)
    hf_batch(model, tokenizer, prompts[:batch], 2)  # warm-up: the first call of a shape is slower
    tokens, started = 0, time.perf_counter()
    for first in range(0, len(prompts), batch):
        tokens += hf_batch(model, tokenizer, prompts[first:first + batch], max_tokens)
    return tokens, time.perf_counter() - started


def hf_static_batching(model, tokenizer, schedule: list[Arrival], batch: int) -> tuple[int, float, list[float]]:
    """Static batching in real time on the arrival schedule: whenever the model is free, the requests that have
    arrived (at most `batch`) form one `generate`, which runs to its longest member's max_tokens. Returns (the
    requests' own tokens, seconds from the start to the last answer, each request's latency)."""
    torch.set_num_threads(os.cpu_count() or 1)
    hf_batch(model, tokenizer, [schedule[0].prompt], 2)
    waiting, latencies, tokens = list(schedule), [], 0
    started = time.perf_counter()
    while waiting:
        now = time.perf_counter() - started
        if waiting[0].at > now:
            time.sleep(waiting[0].at - now)
            now = waiting[0].at
        members = [arrival for arrival in waiting[:batch] if arrival.at <= now]
        del waiting[:len(members)]
        hf_batch(model, tokenizer, [arrival.prompt for arrival in members], max(a.max_tokens for a in members))
        done = time.perf_counter() - started
        latencies += [done - arrival.at for arrival in members]
        tokens += sum(arrival.max_tokens for arrival in members)
    return tokens, time.perf_counter() - started, latencies


def staggered_schedule(text: str, tokenizer, count: int, mean_gap_s: float, context: int, seed: int,
                       offset: int) -> list[Arrival]:
    """`count` distinct requests: prompts of 8 to 120 tokens, max_tokens 8 to 96, Poisson arrivals."""
    rng = np.random.default_rng(seed)
    at, schedule = 0.0, []
    for index in range(count):
        chars = int(rng.integers(20, 300))
        start = offset + index * 331
        prompt = text[start:start + chars]
        ids = tokenizer.encode(prompt)[:120]
        prompt = tokenizer.decode(ids)
        max_tokens = min(int(rng.integers(8, 97)), context - len(ids) - 1)
        schedule.append(Arrival(at, prompt, max_tokens))
        at += float(rng.exponential(mean_gap_s))
    return schedule


# -- clients -----------------------------------------------------------------------------------------------

async def gateway_concurrent(http: aiohttp.ClientSession, url: str, prompts: list[str], max_tokens: int,
                             clients: int) -> tuple[int, float]:
    queue = list(prompts)
    total = 0

    async def client() -> None:
        nonlocal total
        while queue:
            body = {"model": DEPLOYMENT, "prompt": queue.pop(), "max_tokens": max_tokens, "temperature": 0}
            async with http.post(f"{url}/v1/completions", json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"completion failed: {response.status} {answer}")
                total += answer["usage"]["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return total, time.perf_counter() - started


async def gateway_staggered(http: aiohttp.ClientSession, url: str, schedule: list[Arrival]
                            ) -> tuple[int, float, list[float]]:
    """Each request sent at its arrival time; (tokens answered, seconds from the start to the last answer, each
    request's latency)."""
    latencies: list[float] = []
    total = 0
    started = time.perf_counter()

    async def one(arrival: Arrival) -> None:
        nonlocal total
        await asyncio.sleep(max(0.0, arrival.at - (time.perf_counter() - started)))
        body = {"model": DEPLOYMENT, "prompt": arrival.prompt, "max_tokens": arrival.max_tokens, "temperature": 0}
        async with http.post(f"{url}/v1/completions", json=body) as response:
            answer = await response.json()
            if response.status != 200:
                raise RuntimeError(f"completion failed: {response.status} {answer}")
        total += answer["usage"]["completion_tokens"]
        latencies.append(time.perf_counter() - started - arrival.at)

    await asyncio.gather(*(one(arrival) for arrival in schedule))
    return total, time.perf_counter() - started, latencies


async def gateway_single(http: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token, time per output token after it) of one streamed completion through the gateway."""
    body = {"model": DEPLOYMENT, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first, tokens = None, 0
    async with http.post(f"{url}/v1/completions", json=body) as response:
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None:
                first = time.perf_counter() - started
            if "usage" in event:
                tokens = event["usage"]["completion_tokens"]
    total = time.perf_counter() - started
    return first, (total - first) / max(1, tokens - 1)


async def direct_single(engine: TritonEngine, served: ServedVersion, prompt: str,
                        max_tokens: int) -> tuple[float, float]:
    """The same generation code, in this process, straight to Triton: no gateway, no inference service hop.
    Timed as the gateway client is: from the call to the first chunk in the consumer's hands."""
    started = time.perf_counter()
    ids = await encode_prompt(served, prompt, max_tokens)
    first, tokens = None, 0
    async with aclosing(generate(engine, served, ids, max_tokens, SamplingParams())) as chunks:
        async for chunk in chunks:
            if first is None:
                first = time.perf_counter() - started
            tokens += len(chunk.token_ids)
    total = time.perf_counter() - started
    return first, (total - first) / max(1, tokens - 1)


def print_single(ttft_g: list[float], tpot_g: list[float], ttft_d: list[float], tpot_d: list[float],
                 load: str = "") -> None:
    ms = lambda values: statistics.median(values) * 1000  # noqa: E731
    ratio = lambda a, b: statistics.median(a) / statistics.median(b)  # noqa: E731
    if load:
        print(load)
    print(f"single request TTFT: gateway {ms(ttft_g):.2f} ms, Triton direct {ms(ttft_d):.2f} ms "
          f"(ratio {ratio(ttft_g, ttft_d):.3f}, goal <= 1.10)")
    print(f"single request time per output token: gateway {ms(tpot_g):.2f} ms, Triton direct {ms(tpot_d):.2f} ms "
          f"(ratio {ratio(tpot_g, tpot_d):.3f})")


async def main_async(args, work: Path) -> None:
    model, tokenizer = build_model(work, args.n_layer, args.n_head, args.n_embd, args.context)
    text = SHAKESPEARE.read_text()
    # Distinct prompts everywhere: the gateway caches deterministic completions, a repeat would be a hit.
    prompts = [text[i * 97:i * 97 + 60] for i in range(args.requests + args.single + 4)]
    warmup, single, measured = prompts[:4], prompts[4:4 + args.single], prompts[4 + args.single:]
    schedule = staggered_schedule(text, tokenizer, args.staggered, args.arrival_ms / 1000, args.context, args.seed,
                                  offset=len(prompts) * 97 + 1000)
    async with serving_stack(work, max(args.clients, args.staggered)) as stack:
        http, url = stack.http, stack.url
        await gateway_concurrent(http, url, warmup, 4, 4)
        engine = TritonEngine(stack.triton_grpc)
        files = await LocalModelSource(work).fetch(TENANT, MODEL, 1)
        served = ServedVersion(MODEL, 1, contracts.triton_model_name(TENANT, MODEL, 1), files.spec(),
                               files.tokenizer())
        ttft_g, tpot_g, ttft_d, tpot_d = [], [], [], []
        for prompt in single:
            a, b = await gateway_single(http, url, prompt, args.max_tokens)
            c, d = await direct_single(engine, served, prompt, args.max_tokens)
            ttft_g.append(a), tpot_g.append(b), ttft_d.append(c), tpot_d.append(d)
        await engine.close()
        if args.only == "ttft":
            print_single(ttft_g, tpot_g, ttft_d, tpot_d, harness.load())
            return
        tokens, elapsed = await gateway_concurrent(http, url, measured, args.max_tokens, args.clients)
        s_tokens, s_elapsed, s_latencies = await gateway_staggered(http, url, schedule)
    batched_tokens, batched_elapsed = hf_batched(model, tokenizer, measured, args.max_tokens, args.clients)
    static_tokens, static_elapsed, static_latencies = hf_static_batching(model, tokenizer, schedule, args.clients)
    sequential = measured[:args.sequential]
    seq_tokens, seq_elapsed = hf_sequential(model, tokenizer, sequential, args.max_tokens)
    project, batched, seq = tokens / elapsed, batched_tokens / batched_elapsed, seq_tokens / seq_elapsed
    staggered, static = s_tokens / s_elapsed, static_tokens / static_elapsed
    ms = lambda values: statistics.median(values) * 1000  # noqa: E731
    print(f"model: GPT-2 n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} vocab={len(tokenizer)}; "
          f"cpus={os.cpu_count()}; {harness.load()}")
    print(f"gateway, {args.clients} concurrent clients, {len(measured)} requests x {args.max_tokens} tokens: "
          f"{tokens} tokens in {elapsed:.2f}s = {project:.1f} tok/s")
    print(f"HF generate, batches of {args.clients}, {os.cpu_count()} threads: {batched_tokens} tokens in "
          f"{batched_elapsed:.2f}s = {batched:.1f} tok/s")
    print(f"HF generate, sequential, first {len(sequential)} prompts: {seq_tokens} tokens in {seq_elapsed:.2f}s "
          f"= {seq:.1f} tok/s")
    print(f"staggered: {len(schedule)} requests, prompts {min(len(tokenizer.encode(a.prompt)) for a in schedule)}-"
          f"{max(len(tokenizer.encode(a.prompt)) for a in schedule)} tokens, max_tokens "
          f"{min(a.max_tokens for a in schedule)}-{max(a.max_tokens for a in schedule)}, arrivals over "
          f"{schedule[-1].at:.2f}s (mean gap {args.arrival_ms} ms, seed {args.seed})")
    print(f"staggered, gateway: {s_tokens} tokens, last answer at {s_elapsed:.2f}s = {staggered:.1f} tok/s; "
          f"latency median {ms(s_latencies):.0f} ms, max {max(s_latencies) * 1000:.0f} ms")
    print(f"staggered, HF static batching (<= {args.clients} a batch): {static_tokens} tokens, last answer at "
          f"{static_elapsed:.2f}s = {static:.1f} tok/s; latency median {ms(static_latencies):.0f} ms, "
          f"max {max(static_latencies) * 1000:.0f} ms")
    print_single(ttft_g, tpot_g, ttft_d, tpot_d)
    clients = f"project through the REST gateway, {args.clients} concurrent clients"
    harness.report("inference-batched", project, batched, "tok/s",
                   f"HF model.generate, prompts batched {args.clients} at a time in one process on all cores, same "
                   f"model and tokens, greedy; {clients}")
    harness.report("inference-staggered", staggered, static, "tok/s",
                   "HF model.generate static batching on the same arrival schedule (the arrived requests batched "
                   "whenever the model is free, each batch to its longest member), all cores; project: each "
                   "request sent to the REST gateway at its arrival")
    harness.report("inference", project, seq, "tok/s",
                   f"HF model.generate called sequentially in one process, same model, greedy; {clients}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=16)  # prompts the sequential baseline runs (tok/s)
    parser.add_argument("--staggered", type=int, default=32)  # requests of the staggered scenario
    parser.add_argument("--arrival-ms", type=float, default=150)  # their mean gap
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single", type=int, default=20)  # single-request samples; medians need more than a few
    parser.add_argument("--only", choices=["ttft"], help="run only the single-request TTFT/TPOT part (no BENCH "
                        "lines, no baselines): `python -m bench.inference --only ttft --single 60`")
    parser.add_argument("--n-layer", type=int, default=12)  # GPT-2 small's shape
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--context", type=int, default=256)
    work = Path(tempfile.mkdtemp(prefix="llmp-bench-inference-"))
    try:
        asyncio.run(main_async(parser.parse_args(), work))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the model's export: half a gigabyte at GPT-2 small's shape


if __name__ == "__main__":
    main()
