"""The end-to-end training benchmark's baseline: one process doing a job's work with nothing around it.

    python -m bench.bare_training --dataset DIR --spec JOB_SPEC_JSON --out DIR

What nanoGPT's `train.py` is: read the dataset from local disk, build the model, then a plain loop of the
same optimizer steps (AdamW fused, warmup + cosine, clipping), reading the loss every log interval, the same
evaluations (the validation split's fixed batches every eval interval and at the end), a checkpoint to local
disk at each checkpoint step (model, optimizer, schedule and step in one `torch.save`, as nanoGPT's ckpt.pt),
the test split at the end and the final model written with `save_pretrained`. Same model class and initial
weights, same batches in the same order as a job of that spec (the project's data and model helpers: what is
measured is what surrounds the loop). It prints one JSON line: its losses and the seconds of each phase. Its
wall time, interpreter start to exit, is the baseline of `python -m bench.training --scenario e2e`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from services.training import data, models
from services.training.spec import JobSpec


def lr_factor(step: int, hp) -> float:
    if step < hp.warmup_steps:
        return (step + 1) / (hp.warmup_steps + 1)
    progress = min(1.0, (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (hp.min_learning_rate + cosine * (hp.learning_rate - hp.min_learning_rate)) / hp.learning_rate


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    total = sum(float(model(input_ids=b, labels=b, use_cache=False).loss) for b in batches)
    model.train()
    return total / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--spec", required=True, help="a JobSpec as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    phases = {"setup": 0.0, "train": 0.0, "eval": 0.0, "checkpoint": 0.0, "final": 0.0}
    started = time.perf_counter()
    spec = JobSpec.from_dict(json.loads(args.spec))
    hp, block = spec.hyperparameters, spec.model.block_size
    dataset = data.LocalDataset.open(args.dataset)
    info = dataset.info
    vocab = models.Vocabulary(info.vocab_size, info.eos_token_id, info.pad_token_id)
    model = models.build_model(spec.model, vocab, seed=hp.seed).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, hp))
    batches = data.TrainBatches(dataset.stream("train"), block, hp.batch_size, seed=hp.seed)
    validation = data.eval_batches(dataset.stream("validation"), block, hp.batch_size, hp.eval_batches)
    every = hp.effective_checkpoint_interval
    args.out.mkdir(parents=True, exist_ok=True)
    losses: dict[str, float] = {}
    mark = time.perf_counter()
    phases["setup"] = mark - started
    for step in range(1, hp.max_steps + 1):
        for _ in range(hp.grad_accum):
            tokens = batches.next()
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            (loss / hp.grad_accum).backward()
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % hp.log_interval == 0 or step == hp.max_steps:
            losses["train_loss"] = float(loss)
        now = time.perf_counter()
        phases["train"], mark = phases["train"] + now - mark, now
        if step % hp.eval_interval == 0 or step == hp.max_steps:
            losses["validation_loss"] = evaluate(model, validation)
            now = time.perf_counter()
            phases["eval"], mark = phases["eval"] + now - mark, now
        if step % every == 0 or step == hp.max_steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step}, args.out / "ckpt.pt")
            now = time.perf_counter()
            phases["checkpoint"], mark = phases["checkpoint"] + now - mark, now
    if dataset.has_split("test"):
        losses["test_loss"] = evaluate(model, data.eval_batches(dataset.stream("test"), block, hp.batch_size,
                                                                hp.eval_batches))
    model.save_pretrained(args.out / "final", safe_serialization=True)
    phases["final"] = time.perf_counter() - mark
    print(json.dumps({"losses": losses, "phases": phases}))


if __name__ == "__main__":
    main()
