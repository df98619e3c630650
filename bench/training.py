"""Training throughput: the project's training loop vs Hugging Face `Trainer`, same everything.

    python -m bench.training [--steps N] [--batch-size B] [--block-size T] [--n-layer L] [--n-embd D]

Both train the same GPT-2 config from the same initial weights on the same windows of
tinyshakespeare (character-level, in the dataset contract's shard format), with the same batch,
block size, step count, AdamW (weight decay, beta2), warmup + cosine schedule, gradient clipping and
precision, in one process on this machine, evaluation off. Measured: tokens per second over the
optimizer steps (`Trainer`'s `train_runtime` for the baseline, the same span for the project).
On a GPU the defaults become GPT-2 124M in bf16 and the model FLOPs utilisation is printed too.
The last line is SPEC.md's BENCH line.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Trainer, TrainingArguments

from services.training import data, distributed, models, train
from services.training.spec import JobSpec

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def write_char_dataset(root: Path, text: str) -> None:
    """A character-level dataset version in the contract's layout (manifest + uint16 shards)."""
    alphabet = sorted(set(text))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    eos = len(vocab)
    ids = np.asarray([vocab[ch] for ch in text] + [eos], dtype="<u2")
    cut = int(len(ids) * 0.9)
    splits = {}
    for split, piece in (("train", ids[:cut]), ("validation", ids[cut:])):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / "shard-00000.bin").write_bytes(piece.tobytes())
        splits[split] = {"documents": 1, "tokens": len(piece), "bytes": piece.nbytes,
                         "shards": [f"{split}/shard-00000.bin"]}
    manifest = {"name": "bench", "version": 1, "tenant": "bench", "format": "text", "dtype": "uint16",
                "vocab_size": eos + 1, "eos_token_id": eos, "pad_token_id": eos,
                "tokenizer": {"kind": "char", "vocab_size": eos + 1}, "splits": splits, "objects": []}
    (root / "manifest.json").write_text(json.dumps(manifest))


def project_run(dataset: data.LocalDataset, spec: JobSpec, work: Path) -> train.Run:
    ctx = distributed.init()
    job = train.Job(tenant="bench", job_id=uuid.uuid4().hex, spec=spec)
    run = train.Run(job, ctx, dataset, work_dir=work, events=train.Events(None))
    run.setup()
    return run


def measure_project(run: train.Run, steps: int) -> float:
    """Seconds for `steps` optimizer steps of the project's loop (train_step: data, forward, backward,
    clipping, AdamW, schedule, mode hooks)."""
    _sync(run.ctx.device)
    started = time.perf_counter()
    for _ in range(steps):
        loss = run.train_step()
    float(loss)  # wait for the device
    _sync(run.ctx.device)
    return time.perf_counter() - started


def measure_trainer(model, batches: list[torch.Tensor], spec: JobSpec, work: Path) -> float:
    hp = spec.hyperparameters
    rows = [{"input_ids": row, "labels": row} for batch in batches for row in batch]
    args = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=hp.max_steps, per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay,
        adam_beta1=hp.beta1, adam_beta2=hp.beta2, max_grad_norm=hp.grad_clip, warmup_steps=hp.warmup_steps,
        lr_scheduler_type="cosine", bf16=hp.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        logging_steps=10**9, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=hp.seed, data_seed=hp.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    return float(trainer.train().metrics["train_runtime"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30 if gpu else 40)
    parser.add_argument("--batch-size", type=int, default=16 if gpu else 16)
    parser.add_argument("--block-size", type=int, default=1024 if gpu else 128)
    parser.add_argument("--n-layer", type=int, default=12 if gpu else 4)
    parser.add_argument("--n-head", type=int, default=12 if gpu else 4)
    parser.add_argument("--n-embd", type=int, default=768 if gpu else 128)
    parser.add_argument("--chars", type=int, default=400_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers.utils.logging.set_verbosity_error()

    spec = JobSpec.from_dict({
        "dataset": {"name": "bench", "version": 1},
        "model": {"family": "gpt2", "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                  "block_size": args.block_size, "dropout": 0.0},
        "hyperparameters": {"batch_size": args.batch_size, "max_steps": args.steps, "learning_rate": 6e-4,
                            "min_learning_rate": 6e-5, "warmup_steps": max(1, args.steps // 10),
                            "eval_interval": args.steps, "log_interval": args.steps,
                            "precision": "bf16" if gpu else "fp32", "seed": 1337},
    })
    tokens = args.steps * args.batch_size * args.block_size
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        write_char_dataset(work / "dataset", SHAKESPEARE.read_text()[:args.chars])
        dataset = data.LocalDataset.open(work / "dataset")

        run = project_run(dataset, spec, work / "project")
        # The baseline gets the same initial weights and exactly the batches the project will draw.
        baseline_model = models.build_model(spec.model, run.vocab, seed=spec.hyperparameters.seed).to(run.ctx.device)
        same = data.TrainBatches(dataset.stream("train"), args.block_size, args.batch_size,
                                 seed=spec.hyperparameters.seed)
        batches = [same.next() for _ in range(args.steps)]

        # Alternate the two, twice, and keep each one's best: the machine may be shared.
        initial = {name: value.clone() for name, value in baseline_model.state_dict().items()}
        project_s, baseline_s = float("inf"), float("inf")
        for _ in range(2):
            project_s = min(project_s, measure_project(run, args.steps))
            baseline_model.load_state_dict(initial)
            baseline_s = min(baseline_s, measure_trainer(baseline_model, batches, spec, work))

    project, baseline = tokens / project_s, tokens / baseline_s
    device = torch.cuda.get_device_name() if gpu else f"CPU x{torch.get_num_threads()} threads"
    print(f"model: GPT-2 n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} "
          f"({models.parameter_count(run.model) / 1e6:.2f}M params), block={args.block_size}, "
          f"batch={args.batch_size}, steps={args.steps}, precision={spec.hyperparameters.precision}, {device}")
    print(f"project loop:  {project_s:.2f}s  {project:,.0f} tokens/s")
    print(f"HF Trainer:    {baseline_s:.2f}s  {baseline:,.0f} tokens/s")
    if gpu:
        peak = next((f for name, f in train.PEAK_FLOPS.items() if name in device), None)
        if peak:
            print(f"MFU: project {run.flops_per_token * project / peak:.1%}, "
                  f"Trainer {run.flops_per_token * baseline / peak:.1%} of {peak / 1e12:.0f} TFLOP/s")
    print(f"BENCH training project={project:.0f}tok/s baseline={baseline:.0f}tok/s ratio={project / baseline:.2f} "
          f"(Hugging Face Trainer, same GPT-2 config, data, batch, block size and steps, {device})")


if __name__ == "__main__":
    main()
