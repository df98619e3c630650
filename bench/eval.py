"""Evaluation throughput: the evaluation job's compute path against a bare `torch.no_grad()` loop.

Both sides read the same shard (random token ids written here, memory-mapped as a `data.TokenStream`) with
the same randomly initialised GPT-2, in consecutive windows of the model's context, `--batch-size` at a time:

- project:  `evaluation._window_batches` + `evaluation.evaluate_batch` into `Sums` (cross-entropy, accuracy,
  the 15 calibration bins), then `Sums.metrics()`, as an evaluation job's worker runs it;
- baseline: the same windows through `model(input_ids).logits` and a summed `cross_entropy`, nothing else:
  the least an evaluation could do.

Best of `--repeats` interleaved rounds (the sides take turns going first). Throughput is evaluated tokens
per second; the BENCH line's ratio is project / baseline (higher is better, goal >= 0.9).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench import harness
from services.training import data, evaluation


def bare(model, stream: data.TokenStream, block: int, batch_size: int, device: torch.device) -> int:
    tokens, total = 0, 0.0
    full = stream.tokens // block
    with torch.no_grad():
        for start in range(0, full, batch_size):
            rows = np.stack([stream.read(w * block, block) for w in range(start, min(start + batch_size, full))])
            ids = torch.from_numpy(rows).to(device)
            logits = model(input_ids=ids).logits[:, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1), reduction="sum"))
            tokens += ids[:, 1:].numel()
    return tokens


def project(model, stream: data.TokenStream, block: int, batch_size: int, device: torch.device) -> int:
    sums = evaluation.Sums()
    for batch in evaluation._window_batches(stream, block, batch_size):
        evaluation.evaluate_batch(model, batch, sums, device)
    sums.metrics()
    return sums.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.block_size, n_embd=256, n_layer=4, n_head=4)
    model = GPT2LMHeadModel(config).to(device).eval()
    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder) / "shard-00000.bin"
        np.random.default_rng(0).integers(0, args.vocab, args.tokens, dtype=np.uint16).tofile(shard)
        stream = data.TokenStream([shard], np.dtype("<u2"))
        sides = {"project": project, "baseline": bare}
        best = {name: 0.0 for name in sides}
        for repeat in range(args.repeats):
            order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
            for name in order:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                tokens = sides[name](model, stream, args.block_size, args.batch_size, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[name] = max(best[name], tokens / (time.perf_counter() - started))
    print(f"device {device}, {args.tokens} tokens, GPT-2 4x256, block {args.block_size}, batch {args.batch_size}")
    harness.report("eval", best["project"], best["baseline"], "tok/s",
                   "a bare torch.no_grad() loop over the same shard", digits=0)


if __name__ == "__main__":
    main()
