"""Embeddings benchmark: texts embedded per second through the REST gateway (`POST /openai/v1/embeddings`
→ gRPC inference service → Triton, the encoder model batching every request of a batch in one ORT call
and mean-pooling there) with concurrent clients, vs the same encoder run by Hugging Face in one process,
batched, on all cores (`AutoModel` + masked mean, what a user writes by hand).

The model has all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads; random weights and the bench's own
WordPiece vocabulary, since no hub is reachable), a common embedding model. Texts are lines of Tiny
Shakespeare, 8 to 40 words, distinct. Topology as deployed: tritonserver, the inference service and the
gateway are their own processes (the inference service reads the model from a local tree in the
registry's layout, exported by the registry's exporter with its parity gate); this process is the HTTP
client and the baseline. Needs PostgreSQL at LLMP_TEST_DATABASE_URL. Run: `make bench-embeddings`
(python -m bench.embeddings). BENCH line last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerFast

from bench import harness
from bench.inference import SHAKESPEARE
from bench.serving import DEPLOYMENT, MODEL, TENANT, serving_stack
from services.inference.model_source import publish_local_version
from services.registry import exporters

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_model(root: Path, n_layer: int, hidden: int, heads: int, context: int) -> Path:
    """A random BERT and a WordPiece tokenizer trained here, saved, exported (parity gate) and published as
    version 1 of the bench's model in the local tree. Returns the `save_pretrained` folder."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator([SHAKESPEARE.read_text()], trainers.WordPieceTrainer(vocab_size=4000,
                                                                                       special_tokens=SPECIAL))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder = root / "checkpoint"
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=context, pad_token_id=fast.pad_token_id)
    BertModel(config).save_pretrained(folder)
    held_out = np.random.default_rng(0).integers(0, len(fast), (4, 32), dtype=np.int64)
    outcome = exporters.export("onnx", folder, root / "export", exporters.EvalData(held_out=held_out))
    if not outcome.passed:
        raise RuntimeError(f"the export failed its parity check: {outcome.report}")
    publish_local_version(root, TENANT, MODEL, 1, root / "export", folder)
    return folder


def texts_of(count: int) -> list[str]:
    words = SHAKESPEARE.read_text().split()
    rng = np.random.default_rng(1)
    texts = []
    for index in range(count):
        length = int(rng.integers(8, 41))
        start = (index * 131) % (len(words) - length)
        texts.append(" ".join(words[start:start + length]))
    return texts


def hf_batched(folder: Path, texts: list[str], batch: int) -> float:
    """Seconds for HF to embed `texts` in batches of `batch`, torch on every core."""
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def run(items: list[str]) -> None:
        for start in range(0, len(items), batch):
            encoded = tokenizer(items[start:start + batch], padding=True, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            (hidden * mask).sum(1) / mask.sum(1)

    run(texts[:batch])  # warm-up
    started = time.perf_counter()
    run(texts)
    return time.perf_counter() - started


async def gateway_concurrent(http: aiohttp.ClientSession, url: str, texts: list[str], per_request: int,
                             clients: int) -> float:
    queue = [texts[start:start + per_request] for start in range(0, len(texts), per_request)]

    async def client() -> None:
        while queue:
            body = {"model": DEPLOYMENT, "input": queue.pop()}
            async with http.post(f"{url}/openai/v1/embeddings", json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"embeddings failed: {response.status} {answer}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started


async def main_async(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="llmp-bench-embeddings-"))
    folder = build_model(work, args.n_layer, args.hidden, args.heads, args.context)
    texts = texts_of(args.texts + 64)
    warmup, measured = texts[:64], texts[64:]
    async with serving_stack(work, args.clients) as stack:
        await gateway_concurrent(stack.http, stack.url, warmup, args.per_request, 4)
        elapsed = await gateway_concurrent(stack.http, stack.url, measured, args.per_request, args.clients)
    hf_elapsed = hf_batched(folder, measured, args.hf_batch)
    project, baseline = len(measured) / elapsed, len(measured) / hf_elapsed
    print(f"model: BERT n_layer={args.n_layer} hidden={args.hidden} heads={args.heads}; {len(measured)} texts of "
          f"8-40 words; cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
    print(f"gateway, {args.clients} concurrent clients x {args.per_request} texts per request: "
          f"{elapsed:.2f}s = {project:.1f} embeddings/s")
    print(f"HF AutoModel + masked mean, batches of {args.hf_batch}, {torch.get_num_threads()} threads: "
          f"{hf_elapsed:.2f}s = {baseline:.1f} embeddings/s")
    harness.report("embeddings", project, baseline, "emb/s",
                   f"HF AutoModel batched in one process on all cores, same encoder, masked mean; project through "
                   f"the REST gateway's /openai/v1/embeddings, {args.clients} concurrent clients")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=6)  # all-MiniLM-L6-v2's shape
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--context", type=int, default=128)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
