"""Inference benchmark: generated tokens/s with 16 concurrent clients through the inference service (Triton
with dynamic batching and a server-side KV cache) vs Hugging Face `model.generate` called sequentially in
one process on the same model; plus time to first token and time per output token for a single request,
through the service vs calling Triton directly (the hops' overhead).

Run: `make bench-inference` (python -m bench.inference). Needs PostgreSQL at LLMP_TEST_DATABASE_URL
(default 127.0.0.1:5432); starts its own tritonserver on free ports. BENCH line last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psycopg
import torch
from llmp.inference.v1 import inference_pb2 as pb
from llmp.inference.v1 import inference_pb2_grpc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from cli.servers import free_port, stop
from services.common.config import Settings
from services.common.grpc_server import TENANT_KEY
from services.inference import server
from services.inference.generation import GenerationStats, generate
from services.inference.local_triton import TritonPorts, start_triton
from services.inference.model_source import LocalModelSource, publish_local_version
from services.inference.sampling import SamplingParams
from services.inference.triton_engine import TritonEngine
from services.registry.onnx_export import export_model_onnx

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
ADMIN_URL = os.environ.get("LLMP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def build_model(root: Path, n_layer: int, n_embd: int, context: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SHAKESPEARE.read_text()[:50_000]], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=4, n_embd=n_embd, vocab_size=len(tokenizer),
                                       n_positions=context, eos_token_id=eos, bos_token_id=eos)).eval()
    export_model_onnx(model, root / "export" / "model.onnx")
    publish_local_version(root, "bench", "bench", 1, root / "export", root / "tokenizer")
    return model, tokenizer


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


async def service_concurrent(stub, prompts: list[str], max_tokens: int, clients: int) -> tuple[int, float]:
    metadata = ((TENANT_KEY, "bench"),)
    queue = list(prompts)
    total = 0

    async def client():
        nonlocal total
        while queue:
            prompt = queue.pop()
            response = await stub.Generate(pb.GenerateRequest(deployment="bench", prompt=prompt, max_tokens=max_tokens),
                                           metadata=metadata)
            total += response.completion.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return total, time.perf_counter() - started


async def single_stream(stub, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token, time per output token after it) through the service, streamed."""
    request = pb.GenerateStreamRequest(request=pb.GenerateRequest(deployment="bench", prompt=prompt,
                                                                  max_tokens=max_tokens))
    started = time.perf_counter()
    first, tokens = None, 0
    async for message in stub.GenerateStream(request, metadata=((TENANT_KEY, "bench"),)):
        tokens += len(message.token_ids)
        if first is None and message.token_ids:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return first, (total - first) / max(1, tokens - 1)


async def single_direct(engine: TritonEngine, served, prompt: str, max_tokens: int) -> tuple[float, float]:
    stats = GenerationStats()
    ids = served.tokenizer.encode(prompt)
    tokens = 0
    async for chunk in generate(engine, served, ids, max_tokens, SamplingParams(), stats=stats):
        tokens += len(chunk.token_ids)
    total = time.perf_counter() - stats.started
    return stats.first_token_s, (total - stats.first_token_s) / max(1, tokens - 1)


async def main_async(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="llmp-bench-inference-"))
    model, tokenizer = build_model(work, args.n_layer, args.n_embd, args.context)
    text = SHAKESPEARE.read_text()
    prompts = [text[i * 97:i * 97 + 60] for i in range(args.requests)]
    db_name = f"llmp_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    ports = TritonPorts.free()
    process = start_triton(work / "repository", ports, work / "triton.log")
    try:
        settings = Settings.from_env({
            "LLMP_DATABASE_URL": ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}", "LLMP_STATE_DIR": str(work),
            "LLMP_TRITON_GRPC_URL": f"127.0.0.1:{ports.grpc}", "LLMP_TRITON_MODEL_REPOSITORY": str(work / "repository"),
            "LLMP_INFERENCE_ADDR": f"127.0.0.1:{free_port()}", "LLMP_LOG_LEVEL": "WARNING", "LLMP_LOG_FORMAT": "text"})
        app, deployments = await server.build(settings, LocalModelSource(work))
        port = await app.start("127.0.0.1:0")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await stub.PutDeployment(pb.PutDeploymentRequest(name="bench", model="bench", stable_version=1, wait=True),
                                 metadata=((TENANT_KEY, "bench"),))
        await service_concurrent(stub, prompts[:4], 4, 4)  # warm up
        served, _ = await deployments.route("bench", "bench", "")
        ttft_s, tpot_s, ttft_d, tpot_d = [], [], [], []
        for prompt in prompts[:args.single]:
            a, b = await single_stream(stub, prompt, args.max_tokens)
            c, d = await single_direct(deployments.engine, served, prompt, args.max_tokens)
            ttft_s.append(a), tpot_s.append(b), ttft_d.append(c), tpot_d.append(d)
        tokens, elapsed = await service_concurrent(stub, prompts, args.max_tokens, args.clients)
        await channel.close()
        await app.stop()
    finally:
        stop(process)
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    hf_tokens, hf_elapsed = hf_sequential(model, tokenizer, prompts, args.max_tokens)
    project, baseline = tokens / elapsed, hf_tokens / hf_elapsed
    ms = lambda values: statistics.median(values) * 1000  # noqa: E731
    print(f"model: GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} vocab={len(tokenizer)}; "
          f"{args.requests} requests x {args.max_tokens} tokens; cpus={os.cpu_count()}")
    print(f"service, {args.clients} concurrent clients: {tokens} tokens in {elapsed:.2f}s = {project:.1f} tok/s")
    print(f"HF generate, sequential: {hf_tokens} tokens in {hf_elapsed:.2f}s = {baseline:.1f} tok/s")
    print(f"single request TTFT: service {ms(ttft_s):.2f} ms, Triton direct {ms(ttft_d):.2f} ms")
    print(f"single request time per output token: service {ms(tpot_s):.2f} ms, Triton direct {ms(tpot_d):.2f} ms "
          f"(overhead {100 * (statistics.median(tpot_s) / statistics.median(tpot_d) - 1):.1f}%)")
    print(f"BENCH inference project={project:.1f}tok/s baseline={baseline:.1f}tok/s ratio={project / baseline:.2f} "
          f"(HF model.generate called sequentially in one process, same model, greedy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--single", type=int, default=5)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
