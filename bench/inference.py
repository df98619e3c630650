"""Inference benchmark: generated tokens/s with 16 concurrent clients through the REST gateway
(`POST /v1/completions` → gRPC inference service → Triton with the service's step batching and a
server-side KV cache) vs Hugging Face `model.generate` called sequentially in one process on the same
model; plus time to first token and time per output token of a single streamed request through the
gateway vs the same generation code calling Triton directly (the hops' overhead).

The model has GPT-2 small's shape (12 layers, 12 heads, 768 wide; random weights, the bench's own
512-token BPE vocabulary since no hub is reachable), the smallest model the platform is meant for. On a
toy (`--n-layer 4 --n-head 4 --n-embd 256`) the model's own work is ~4 ms, so the two process hops'
fixed ~2.5 ms read as +60 % TTFT; at this shape they are a few percent. The output prints the absolute
milliseconds either way.

Topology as deployed: tritonserver, the inference service and the gateway each run as their own process
on free ports (the inference service reads the model from a local tree in the registry's layout); this
process is the HTTP client and the baseline. Needs PostgreSQL at LLMP_TEST_DATABASE_URL (default
127.0.0.1:5432). Run: `make bench-inference` (python -m bench.inference). BENCH line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import aclosing
from pathlib import Path

import aiohttp
import psycopg
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bench import harness
from cli.servers import TritonPorts, free_port, http_ok, port_open, start_triton, stop, wait_until
from services.common import contracts
from services.common.config import Settings
from services.inference.generation import ServedVersion, encode_prompt, generate
from services.inference.model_source import LocalModelSource, publish_local_version
from services.inference.sampling import SamplingParams
from services.inference.triton_engine import TritonEngine
from services.registry.onnx_export import export_model_onnx

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
ADMIN_URL = os.environ.get("LLMP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TENANT = "default"  # the bootstrap admin key's tenant
MODEL = DEPLOYMENT = "bench"


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


# -- the inference service as its own process ------------------------------------------------------------

async def serve_inference(root: Path) -> None:
    """`python -m bench.inference --serve-inference ROOT`: the service on LLMP_INFERENCE_ADDR until SIGTERM."""
    from services.inference import server

    app, _ = await server.build(Settings.from_env(), LocalModelSource(root))
    await app.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await app.stop()


def spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


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


async def deploy(http: aiohttp.ClientSession, url: str) -> None:
    async with http.put(f"{url}/v1/deployments/{DEPLOYMENT}", json={"model": MODEL, "stable": 1},
                        headers={"If-None-Match": "*"}) as response:
        if response.status not in (200, 201):
            raise RuntimeError(f"deploy failed: {response.status} {await response.text()}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        async with http.get(f"{url}/v1/deployments/{DEPLOYMENT}") as response:
            state = (await response.json()).get("state")
        if state == "READY":
            return
        if state == "FAILED":
            raise RuntimeError("deployment failed")
        await asyncio.sleep(0.2)
    raise TimeoutError("deployment did not become READY")


async def main_async(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="llmp-bench-inference-"))
    model, tokenizer = build_model(work, args.n_layer, args.n_head, args.n_embd, args.context)
    text = SHAKESPEARE.read_text()
    # Distinct prompts everywhere: the gateway caches deterministic completions, a repeat would be a hit.
    prompts = [text[i * 97:i * 97 + 60] for i in range(args.requests + args.single + 4)]
    warmup, single, measured = prompts[:4], prompts[4:4 + args.single], prompts[4 + args.single:]
    db_name = f"llmp_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    ports = TritonPorts.free()
    repository = work / "repository"
    gateway_port, admin_key = free_port(), secrets.token_urlsafe(24)
    env = {"LLMP_DATABASE_URL": ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}", "LLMP_STATE_DIR": str(work),
           "LLMP_TRITON_GRPC_URL": f"127.0.0.1:{ports.grpc}", "LLMP_TRITON_MODEL_REPOSITORY": str(repository),
           "LLMP_INFERENCE_ADDR": f"127.0.0.1:{free_port()}", "LLMP_GATEWAY_PORT": str(gateway_port),
           "LLMP_ADMIN_KEY": admin_key, "LLMP_LOG_LEVEL": "WARNING", "LLMP_LOG_FORMAT": "text"}
    processes = [start_triton(repository, ports, work / "triton.log")]
    try:
        processes.append(spawn([sys.executable, "-m", "bench.inference", "--serve-inference", str(work)], env,
                               work / "inference.log"))
        processes.append(spawn([sys.executable, "-m", "gateway.server"], env, work / "gateway.log"))
        url = f"http://127.0.0.1:{gateway_port}"
        host, port = env["LLMP_INFERENCE_ADDR"].rsplit(":", 1)
        wait_until(lambda: port_open(host, int(port)), 120, processes[1], work / "inference.log", "inference")
        wait_until(lambda: http_ok(f"{url}/healthz"), 120, processes[2], work / "gateway.log", "gateway")
        headers = {"Authorization": f"Bearer {admin_key}"}
        connector = aiohttp.TCPConnector(limit=args.clients + 4)
        async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
            await deploy(http, url)
            await gateway_concurrent(http, url, warmup, 4, 4)
            engine = TritonEngine(f"127.0.0.1:{ports.grpc}")
            files = await LocalModelSource(work).fetch(TENANT, MODEL, 1)
            served = ServedVersion(MODEL, 1, contracts.triton_model_name(TENANT, MODEL, 1), files.spec(),
                                   files.tokenizer())
            ttft_g, tpot_g, ttft_d, tpot_d = [], [], [], []
            for prompt in single:
                a, b = await gateway_single(http, url, prompt, args.max_tokens)
                c, d = await direct_single(engine, served, prompt, args.max_tokens)
                ttft_g.append(a), tpot_g.append(b), ttft_d.append(c), tpot_d.append(d)
            await engine.close()
            tokens, elapsed = await gateway_concurrent(http, url, measured, args.max_tokens, args.clients)
    finally:
        for process in reversed(processes):
            stop(process)
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    hf_tokens, hf_elapsed = hf_sequential(model, tokenizer, measured, args.max_tokens)
    project, baseline = tokens / elapsed, hf_tokens / hf_elapsed
    ms = lambda values: statistics.median(values) * 1000  # noqa: E731
    overhead = lambda a, b: 100 * (statistics.median(a) / statistics.median(b) - 1)  # noqa: E731
    print(f"model: GPT-2 n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} vocab={len(tokenizer)}; "
          f"{len(measured)} requests x {args.max_tokens} tokens; cpus={os.cpu_count()}")
    print(f"gateway, {args.clients} concurrent clients: {tokens} tokens in {elapsed:.2f}s = {project:.1f} tok/s")
    print(f"HF generate, sequential: {hf_tokens} tokens in {hf_elapsed:.2f}s = {baseline:.1f} tok/s")
    print(f"single request TTFT: gateway {ms(ttft_g):.2f} ms, Triton direct {ms(ttft_d):.2f} ms "
          f"(overhead {overhead(ttft_g, ttft_d):.1f}%)")
    print(f"single request time per output token: gateway {ms(tpot_g):.2f} ms, Triton direct {ms(tpot_d):.2f} ms "
          f"(overhead {overhead(tpot_g, tpot_d):.1f}%)")
    harness.report("inference", project, baseline, "tok/s",
                   f"HF model.generate called sequentially in one process, same model, greedy; project through the "
                   f"REST gateway, {args.clients} concurrent clients")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--single", type=int, default=20)  # single-request samples; medians need more than a few
    parser.add_argument("--n-layer", type=int, default=12)  # GPT-2 small's shape
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--serve-inference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_inference:
        from services.common import logs

        logs.configure(Settings.from_env(), "inference")
        asyncio.run(serve_inference(args.serve_inference))
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
