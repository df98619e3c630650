"""Fine-tuning throughput and memory: the project's runtime vs Hugging Face `Trainer` (+ `peft` for LoRA).

    python -m bench.finetune [--steps N] [--warmup W] [--repeats R] [--batch-size B] [--block-size T] ...

The model is a Llama-style checkpoint with grouped-query attention (fewer key/value heads than query
heads), random weights saved with `save_pretrained` (no hub is reachable), as an imported model would
be. Both sides load that same checkpoint and train it on exactly the same batches of tinyshakespeare
(character-level, in the dataset contract's shard format, fed in the same order), with the same batch,
block size, step count, AdamW (fused, weight decay, betas), warmup + cosine schedule, gradient clipping
and precision, in one process, evaluation off, both logging the loss every W steps:

- LoRA: the project with `model.adapter` (r, alpha, dropout, the attention projections), the baseline
  `peft.get_peft_model` with the same LoraConfig and the same initial adapter weights;
- full fine-tune: every weight trains on both sides.

What is timed, for both: the N optimizer steps after the first W, in windows of W steps (the project
through its `train` events, the baseline through a `TrainerCallback` at the same steps), as in
bench/training.py. Setup (loading, optimizer, data) is excluded.

Memory: every run is its own process, so its peak resident set size (and, on a GPU, peak allocated
device memory) is its own; the optimizer-state bytes are AdamW's tensors after the last step. Runs of
the two sides alternate R times (P T, T P, …) so drift on a shared machine slows both alike; a side's
figure is its median window over all its runs. The last line is the BENCH line (bench/RESULTS.md): the
LoRA ratio, with the full fine-tune's ratio beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import psutil
import torch

from bench import harness

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def job_spec(args, mode: str):
    from services.training.spec import JobSpec

    total = args.warmup + args.steps
    model = {"init_from": {"name": "base", "version": 1}, "block_size": args.block_size}
    if mode == "lora":
        model["adapter"] = {"type": "lora", "r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05,
                            "target_modules": TARGETS}
    return JobSpec.from_dict({
        "dataset": {"name": "bench", "version": 1}, "model": model,
        "hyperparameters": {"batch_size": args.batch_size, "max_steps": total,
                            "learning_rate": 2e-4 if mode == "lora" else 5e-5, "min_learning_rate": 1e-5,
                            "warmup_steps": max(1, total // 10), "eval_interval": 10 * total, "eval_batches": 1,
                            "log_interval": args.warmup, "precision": "bf16" if torch.cuda.is_available() else "fp32",
                            "seed": 1337},
    })


def write_base(folder: Path, vocab_size: int, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.block_size,
                         tie_word_embeddings=False, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)


def optimizer_state_bytes(optimizer) -> int:
    state = getattr(optimizer, "optimizer", optimizer).state  # Trainer wraps it in Accelerate's
    return sum(value.numel() * value.element_size() for entry in state.values() for value in entry.values()
               if isinstance(value, torch.Tensor) and value.dim() > 0)


def run_project(args, work: Path, mode: str) -> dict:
    from bench.training import EventClock
    from services.training import data, distributed, events, train

    spec = job_spec(args, mode)
    clock = EventClock(torch.device("cpu"), args.warmup, args.warmup + args.steps, args.warmup)
    job = train.Job(tenant="bench", job_id=uuid.uuid4().hex, spec=spec, init_from_prefix="base")

    class FromDisk(train.Run):
        def _fetch_init(self) -> Path:  # the folder the runtime downloads from the registry version
            return work / "base"

    run = FromDisk(job, distributed.init(), data.LocalDataset.open(work / "dataset"), work_dir=work / "project",
                   writer=events.EventWriter(clock))
    run.setup()
    clock.device = run.ctx.device
    run.run()
    return {"windows": clock.windows, "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
            "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad)}


def run_trainer(args, work: Path, mode: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from bench.training import CallbackClock
    from services.training import data

    spec = job_spec(args, mode)
    hp = spec.hyperparameters
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32).to(device)
    model.config.use_cache = False
    if mode == "lora":
        adapter = spec.model.adapter
        config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                            target_modules=list(adapter.target_modules), bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):  # the project draws its adapter from the same place
            from services.training.train import _seed_for

            torch.manual_seed(_seed_for(hp.seed, 4))
            model = get_peft_model(model, config)
    dataset = data.LocalDataset.open(work / "dataset")
    same = data.TrainBatches(dataset.stream("train"), args.block_size, args.batch_size, seed=hp.seed)
    rows = [{"input_ids": row, "labels": row} for _ in range(hp.max_steps) for row in same.next()]
    clock = CallbackClock(device, args.warmup, args.warmup + args.steps, args.warmup)
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=hp.max_steps, per_device_train_batch_size=hp.batch_size,
        learning_rate=hp.learning_rate, weight_decay=hp.weight_decay, adam_beta1=hp.beta1, adam_beta2=hp.beta2,
        max_grad_norm=hp.grad_clip, warmup_steps=hp.warmup_steps, lr_scheduler_type="cosine",
        optim="adamw_torch_fused", bf16=hp.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        logging_steps=hp.log_interval, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        train_sampling_strategy="sequential", seed=hp.seed, data_seed=hp.seed, label_names=["labels"])
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {"windows": clock.windows, "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def child(args) -> None:
    """One measured run in this process; prints its figures as one JSON line."""
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    work = Path(args.work)
    result = (run_project if args.side == "project" else run_trainer)(args, work, args.mode)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # After the last step: weights, gradients and optimizer state all live (the peak may be loading's).
    result["final_rss_bytes"] = psutil.Process().memory_info().rss
    if torch.cuda.is_available():
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, work: Path, side: str, mode: str, passthrough: list[str]) -> dict:
    command = [sys.executable, "-m", "bench.finetune", "--child", "--side", side, "--mode", mode,
               "--work", str(work), *passthrough]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} {mode} run failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30 if gpu else 15, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=10 if gpu else 5, help="untimed steps first; the log interval")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=1024 if gpu else 128)
    parser.add_argument("--hidden", type=int, default=1024 if gpu else 512)
    parser.add_argument("--intermediate", type=int, default=2816 if gpu else 1376)
    parser.add_argument("--layers", type=int, default=12 if gpu else 6)
    parser.add_argument("--heads", type=int, default=16 if gpu else 8)
    parser.add_argument("--kv-heads", type=int, default=4 if gpu else 2)
    parser.add_argument("--rank", type=int, default=16 if gpu else 8)
    parser.add_argument("--chars", type=int, default=400_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["project", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["lora", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the loss is logged every --warmup steps)")
    passthrough = [f"--{name}={value}" for name, value in (
        ("steps", args.steps), ("warmup", args.warmup), ("batch-size", args.batch_size),
        ("block-size", args.block_size), ("hidden", args.hidden), ("intermediate", args.intermediate),
        ("layers", args.layers), ("heads", args.heads), ("kv-heads", args.kv_heads), ("rank", args.rank))]

    from bench.training import write_char_dataset
    from services.common import contracts

    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        write_char_dataset(work / "dataset", SHAKESPEARE.read_text()[:args.chars])
        manifest = contracts.DatasetManifest.from_json((work / "dataset" / contracts.DATASET_MANIFEST).read_bytes())
        write_base(work / "base", manifest.vocab_size, args)
        for repeat in range(args.repeats):
            for mode in ("lora", "full"):
                sides = ("project", "trainer") if repeat % 2 == 0 else ("trainer", "project")
                for side in sides:
                    results.setdefault((mode, side), []).append(spawn(args, work, side, mode, passthrough))

    window_tokens = args.warmup * args.batch_size * args.block_size
    where = torch.cuda.get_device_name() if gpu else f"CPU x{torch.get_num_threads()} threads"
    print(f"model: Llama-style, hidden={args.hidden}, layers={args.layers}, heads={args.heads}, "
          f"kv_heads={args.kv_heads} (GQA), block={args.block_size}, batch={args.batch_size}, steps={args.steps} "
          f"timed after {args.warmup}, LoRA r={args.rank} on {','.join(TARGETS)}, {where}, "
          f"{args.repeats} interleaved repeats")
    figures = {}
    for mode in ("lora", "full"):
        baseline_name = "HF Trainer + peft" if mode == "lora" else "HF Trainer"
        for side, name in (("project", "project"), ("trainer", baseline_name)):
            runs = results[(mode, side)]
            rate = window_tokens / statistics.median([w for run in runs for w in run["windows"]])
            figures[(mode, side)] = rate
            rss = max(run["peak_rss_bytes"] for run in runs) / 2**20
            final_rss = max(run["final_rss_bytes"] for run in runs) / 2**20
            gpu_peak = (f", peak GPU memory {max(run['peak_gpu_bytes'] for run in runs) / 2**20:,.0f} MiB"
                        if gpu else "")
            print(f"{mode:4} {name:17}: {rate:,.0f} tokens/s, peak RSS {rss:,.0f} MiB (after training "
                  f"{final_rss:,.0f} MiB){gpu_peak}, "
                  f"trainable {runs[0]['trainable']:,} params, optimizer state "
                  f"{runs[0]['optimizer_state_bytes'] / 2**20:,.2f} MiB")
    full = figures[("full", "project")] / figures[("full", "trainer")]
    print(f"full fine-tune: project {figures[('full', 'project')]:.0f} tok/s vs Trainer "
          f"{figures[('full', 'trainer')]:.0f} tok/s, ratio {full:.2f}")
    harness.report("finetune", figures[("lora", "project")], figures[("lora", "trainer")], "tok/s",
                   f"LoRA: Hugging Face Trainer + peft, same Llama-style GQA checkpoint, data, batch, block and steps; "
                   f"full fine-tune ratio={full:.2f}; medians over {args.repeats} interleaved runs, {where}", digits=0)


if __name__ == "__main__":
    main()
