"""Training throughput: the project's training loop vs Hugging Face `Trainer`, same everything.

    python -m bench.training [--steps N] [--warmup W] [--repeats R] [--batch-size B] [--block-size T] ...

Both train the same GPT-2 config from the same initial weights on exactly the same batches of
tinyshakespeare (character-level, in the dataset contract's shard format, fed in the same order), with
the same batch, block size, step count, AdamW (fused, weight decay, beta2), warmup + cosine schedule,
gradient clipping and precision, in one process on this machine, evaluation off, both logging the
loss every W steps.

What is timed, for both: the N optimizer steps after the first W (warm-up: allocator, thread pools and
kernels settle), with the work each does along the way (data, forward, backward, clipping, AdamW,
schedule, the loss read back and logged every W steps), in windows of W steps: the project through
its own event stream (the `train` events `Run.run` emits every W steps), the baseline through a
`TrainerCallback` at the same steps (after a device synchronisation on GPU). Setup (model,
optimizer, data loaders) is excluded for both.

The two alternate R times (P T, T P, P T, …) so that drift on a machine shared with other work slows
both alike. Each side's figure is its median window over all its runs (a burst of other work spoils
a window, not the figure); the ratio is the quotient of the two medians. On a GPU the defaults become
GPT-2 124M in bf16 and the model FLOPs utilisation is printed too. The last line is the BENCH line (bench/RESULTS.md).

Then (`--scenario e2e` alone, `loop` to skip it) a job end to end, submit → SUCCEEDED through the training
service and its Celery worker (a job of one process in its warm runtime), against a bare loop doing the
same work in one process, with the job's phases: bench/training_e2e.py, BENCH `training-e2e`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from bench import harness
from services.common import contracts
from services.training import data, distributed, events, models, train
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
        shard = f"{split}/{contracts.shard_file_name(0)}"  # relative to the version, as readers accept
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / shard).write_bytes(piece.tobytes())
        splits[split] = contracts.SplitManifest(documents=1, tokens=len(piece), bytes=piece.nbytes, shards=(shard,))
    manifest = contracts.DatasetManifest(
        name="bench", version=1, tenant="bench", format="text", digest="", dtype="uint16", vocab_size=eos + 1,
        eos_token_id=eos, pad_token_id=eos, splits=splits,
        tokenizer=contracts.TokenizerManifest("char", eos + 1, contracts.DATASET_TOKENIZER))
    (root / contracts.DATASET_MANIFEST).write_text(manifest.to_json())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """When the steps that end a window (every `every` steps from `first` to `last`) ended."""

    def __init__(self, device: torch.device, first: int, last: int, every: int) -> None:
        self.device, self.first, self.last, self.every = device, first, last, every
        self.at: dict[int, float] = {}

    def mark(self, step: int) -> None:
        if self.first <= step <= self.last and (step - self.first) % self.every == 0:
            _sync(self.device)
            self.at[step] = time.perf_counter()

    @property
    def windows(self) -> list[float]:
        """Seconds of each window of `every` steps between `first` and `last`."""
        steps = range(self.first, self.last + 1, self.every)
        return [self.at[b] - self.at[a] for a, b in zip(steps, steps[1:], strict=False)]


class EventClock(StepClock):
    """The project's side: a file-like event sink that marks the `train` events' steps."""

    def write(self, line: str) -> None:
        event = json.loads(line)
        if event["event"] == "train":
            self.mark(event["step"])

    def flush(self) -> None:
        pass


class CallbackClock(StepClock, TrainerCallback):
    """The baseline's side: marks the end of Trainer's optimizer steps."""

    def on_step_end(self, args, state, control, **kwargs):
        self.mark(state.global_step)


def measure_project(dataset: data.LocalDataset, spec: JobSpec, work: Path, warmup: int, steps: int) -> list[float]:
    """Seconds of each window of `warmup` steps among steps warmup+1 … warmup+steps of `Run.run`."""
    clock = EventClock(torch.device("cpu"), warmup, warmup + steps, warmup)
    job = train.Job(tenant="bench", job_id=uuid.uuid4().hex, spec=spec)
    run = train.Run(job, distributed.init(), dataset, work_dir=work, writer=events.EventWriter(clock))
    run.setup()
    clock.device = run.ctx.device
    run.run()
    return clock.windows


def measure_trainer(model, rows: list[dict], spec: JobSpec, work: Path, warmup: int, steps: int) -> list[float]:
    """Seconds of each window of `warmup` steps among steps warmup+1 … warmup+steps of `Trainer.train`."""
    hp = spec.hyperparameters
    clock = CallbackClock(next(model.parameters()).device, warmup, warmup + steps, warmup)
    args = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=hp.max_steps, per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay,
        adam_beta1=hp.beta1, adam_beta2=hp.beta2, max_grad_norm=hp.grad_clip, warmup_steps=hp.warmup_steps,
        lr_scheduler_type="cosine", optim="adamw_torch_fused", bf16=hp.precision == "bf16",
        use_cpu=not torch.cuda.is_available(), logging_steps=hp.log_interval, save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), train_sampling_strategy="sequential",
        seed=hp.seed, data_seed=hp.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # its per-log print is not the point
    trainer.train()
    return clock.windows


def main(argv: list[str] | None = None) -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30 if gpu else 40, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first; also the log interval")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=1024 if gpu else 128)
    parser.add_argument("--n-layer", type=int, default=12 if gpu else 4)
    parser.add_argument("--n-head", type=int, default=12 if gpu else 4)
    parser.add_argument("--n-embd", type=int, default=768 if gpu else 128)
    parser.add_argument("--chars", type=int, default=400_000)
    parser.add_argument("--scenario", choices=("loop", "e2e", "both"), default="both",
                        help="loop: the loop vs HF Trainer (BENCH training); e2e: a job submit → SUCCEEDED vs a bare "
                             "loop (BENCH training-e2e, bench/training_e2e.py); both (default): one after the other")
    parser.add_argument("--e2e-steps", type=int, default=500, help="the e2e job's steps (nanoGPT's run: 2000)")
    parser.add_argument("--e2e-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.scenario in ("loop", "both"):
        loop(args, parser)
    if args.scenario in ("e2e", "both"):
        import asyncio

        from bench import training_e2e

        print(harness.load(), flush=True)
        asyncio.run(training_e2e.run(args.e2e_steps, args.e2e_repeats))


def loop(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the loss is logged every --warmup steps)")
    logging.basicConfig(level=logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    total = args.warmup + args.steps
    spec = JobSpec.from_dict({
        "dataset": {"name": "bench", "version": 1},
        "model": {"family": "gpt2", "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                  "block_size": args.block_size, "dropout": 0.0},
        "hyperparameters": {"batch_size": args.batch_size, "max_steps": total, "learning_rate": 6e-4,
                            "min_learning_rate": 6e-5, "warmup_steps": max(1, total // 10),
                            "eval_interval": 10 * total, "eval_batches": 1, "log_interval": args.warmup,
                            "precision": "bf16" if gpu else "fp32", "seed": 1337},
    })
    hp = spec.hyperparameters
    window_tokens = args.warmup * args.batch_size * args.block_size
    project_s: list[float] = []  # seconds of every timed window of every repeat
    baseline_s: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        write_char_dataset(work / "dataset", SHAKESPEARE.read_text()[:args.chars])
        dataset = data.LocalDataset.open(work / "dataset")
        manifest = dataset.info
        vocab = models.Vocabulary(manifest.vocab_size, manifest.eos_token_id, manifest.pad_token_id)
        device = torch.device("cuda") if gpu else torch.device("cpu")
        # The baseline gets the project's initial weights (same seed) and exactly the batches it draws.
        baseline_model = models.build_model(spec.model, vocab, seed=hp.seed).to(device)
        initial = {name: value.clone() for name, value in baseline_model.state_dict().items()}
        same = data.TrainBatches(dataset.stream("train"), args.block_size, args.batch_size, seed=hp.seed)
        rows = [{"input_ids": row, "labels": row} for _ in range(total) for row in same.next()]
        flops_per_token = models.flops_per_token(baseline_model, args.block_size)
        parameters = models.parameter_count(baseline_model)

        for repeat in range(args.repeats):
            for side in ("project", "baseline") if repeat % 2 == 0 else ("baseline", "project"):
                if side == "project":
                    project_s += measure_project(dataset, spec, work / f"project-{repeat}", args.warmup, args.steps)
                else:
                    baseline_model.load_state_dict(initial)
                    baseline_s += measure_trainer(baseline_model, rows, spec, work, args.warmup, args.steps)

    # Medians over windows: a burst of other work on a shared machine spoils a window, not the figure.
    project = window_tokens / statistics.median(project_s)
    baseline = window_tokens / statistics.median(baseline_s)
    where = torch.cuda.get_device_name() if gpu else f"CPU x{torch.get_num_threads()} threads"
    print(f"model: GPT-2 n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} "
          f"({parameters / 1e6:.2f}M params), block={args.block_size}, batch={args.batch_size}, "
          f"steps={args.steps} timed after {args.warmup} warm-up, precision={hp.precision}, {where}, "
          f"{args.repeats} interleaved repeats")
    for name, seconds, median in (("project loop", project_s, project), ("HF Trainer  ", baseline_s, baseline)):
        rates = sorted(window_tokens / s for s in seconds)
        print(f"{name}: median {median:,.0f} tokens/s over {len(rates)} windows of {args.warmup} steps "
              f"(min {rates[0]:,.0f}, max {rates[-1]:,.0f})")
    if gpu:
        peak = next((f for name, f in train.PEAK_FLOPS.items() if name in where), None)
        if peak:
            print(f"MFU: project {flops_per_token * project / peak:.1%}, "
                  f"Trainer {flops_per_token * baseline / peak:.1%} of {peak / 1e12:.0f} TFLOP/s dense bf16")
    harness.report("training", project, baseline, "tok/s",
                   f"Hugging Face Trainer, same GPT-2 config, data, batch, block size and steps, medians over "
                   f"{args.repeats} interleaved runs, {where}", digits=0)


if __name__ == "__main__":
    main()
