"""The training runtime: what `torchrun` runs on every process of a job.

    torchrun --nproc-per-node N -m services.training.train --job-dir DIR [--job FILE] [--events PATH]

`--job` (default `DIR/job.json`) is the job file the worker writes:

    {"tenant": str, "job_id": str,
     "spec": JobSpec.to_dict(),                         # see spec.py
     "dataset_manifest_key": "datasets/{tenant}/{name}/v{n}/manifest.json",
     "init_from_prefix": "models/{tenant}/{name}/v{n}/" | null}   # a save_pretrained folder in S3

S3 is reached with `services.common.s3.ObjectStore` configured from the `LLMP_S3_*` environment.
`DIR` is node-local scratch: the dataset and tokenizer are downloaded there once per node.
A job resumes by itself: when the job already has a complete checkpoint it continues from the
latest one, bit-exactly on CPU.

Events (rank 0 only) are JSON lines, on stdout or appended to `--events PATH`: `events.py` defines
every kind and its fields (`Started`, `Train`, `Eval`, `Checkpoint`, `EarlyStop`, `Finished`,
`Stopped`, `Failed`, `Replayed`). `Finished` names the final model's folder on this node's disk: the
worker registers it (the bytes go once, straight into the registry's version prefix).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import psutil
import torch
import transformers

from services.common.contracts import JobLayout
from services.common.errors import Conflict
from services.training import adapters, checkpoints, data, distributed, events, models, supervised
from services.training.spec import JobSpec

log = logging.getLogger(__name__)

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s by GPU name


@dataclass
class Job:
    tenant: str
    job_id: str
    spec: JobSpec
    dataset_manifest_key: str = ""
    init_from_prefix: str | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> Job:
        return cls(tenant=raw["tenant"], job_id=raw["job_id"], spec=JobSpec.from_dict(raw["spec"]),
                   dataset_manifest_key=raw.get("dataset_manifest_key", ""),
                   init_from_prefix=raw.get("init_from_prefix"))

    def to_dict(self) -> dict:
        return {"tenant": self.tenant, "job_id": self.job_id, "spec": self.spec.to_dict(),
                "dataset_manifest_key": self.dataset_manifest_key, "init_from_prefix": self.init_from_prefix}

    @property
    def layout(self) -> JobLayout:
        return JobLayout(self.tenant, self.job_id)


def environment(device: torch.device) -> dict:
    """Hardware and software the run used (recorded in lineage)."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["hardware"] = {"gpu": props.name, "gpu_memory_bytes": props.total_memory,
                            "gpu_count": torch.cuda.device_count()}
    else:
        info["hardware"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return info


def lr_factor(step: int, hp) -> float:
    """Learning rate at optimizer step `step` (0-based) over the peak: linear warmup, cosine to the floor."""
    if step < hp.warmup_steps:
        return (step + 1) / (hp.warmup_steps + 1)
    span = max(1, hp.max_steps - hp.warmup_steps)
    progress = min(1.0, (step - hp.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (hp.min_learning_rate + cosine * (hp.learning_rate - hp.min_learning_rate)) / hp.learning_rate


def make_optimizer(model: torch.nn.Module, hp) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for every parameter (CPU and CUDA); deterministic, and what HF Trainer defaults to.
    return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), fused=True)


_RANDOM_OBJECTIVES = {"bert"}  # families whose objective draws random numbers (masks) every micro-batch
_NON_CACHING_FAMILIES = {"bert"}  # every other family's forward builds a KV cache unless told not to


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]) >> 1


@dataclass
class Progress:
    """The loop's counters, checkpointed in state.json."""

    step: int = 0
    best_validation_loss: float | None = None
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    tokens: int = 0
    metrics: dict = field(default_factory=dict)


class Run:
    """One process's part of a training job."""

    def __init__(self, job: Job, ctx: distributed.Context, dataset: data.LocalDataset, *, store=None,
                 work_dir: Path, writer: events.EventWriter) -> None:
        self.job, self.ctx, self.dataset, self.store = job, ctx, dataset, store
        self.work_dir, self.events = work_dir, writer  # work_dir: node-local, shared by the node's ranks
        spec = job.spec
        self.spec, self.hp = spec, spec.hyperparameters
        info = dataset.info
        self.vocab = models.Vocabulary(info.vocab_size, info.eos_token_id, info.pad_token_id)
        self.train_stream, self.validation_stream = dataset.stream("train"), dataset.stream("validation")
        supervised.check_dataset(spec, self.vocab.size, self.train_stream, self.validation_stream)
        self.progress = Progress()
        self.resumed_from: int | None = None
        self.startup: dict[str, float] = {}  # milestones of the process's start-up (events.Started.startup)
        # A checkpoint uploads and commits in the background while training goes on (one at a time); its
        # Checkpoint event is emitted once it is committed.
        self.pending: checkpoints.Pending | None = None
        self._uploads: ThreadPoolExecutor | None = None
        self.logged: list[events.Train | events.Eval] = []  # so far: checkpoints carry them (see Replayed)
        self.autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16)
                         if self.hp.precision == "bf16" else nullcontext())

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        latest = checkpoints.latest_step(self.store, self.job.layout) if self.store else None
        restored = None
        adapter = self.spec.model.adapter
        if latest is not None:
            restored = checkpoints.fetch(self.store, self.job.layout, latest, ctx, self.work_dir / "resume")
            self._check_lineage(restored.state)
        # An adapter's checkpoint holds the adapter alone: its base is the init_from version, every time.
        init_dir = restored.folder / "model" if restored is not None and adapter is None else self._fetch_init()
        model = models.build_model(self.spec.model, self.vocab, seed=hp.seed, init_dir=init_dir)
        self.family = self.spec.model.family or model.config.model_type
        if self.spec.model.init_from is not None:
            self.spec.model.resolve_base(self.family)  # a job file written before resolution: defaults
        if adapter is not None:
            model = adapters.wrap(model, adapter, self.family, seed=_seed_for(hp.seed, 4))
            if restored is not None:
                adapters.load_checkpoint(model, restored.folder / "model")
        self.model = model
        self.model.to(ctx.device).train()
        self.trainable = distributed.trainable(self.model)
        self.optimizer = make_optimizer(self.model, hp)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, hp))
        self.sync = distributed.synchronizer(self.spec.distributed.mode, ctx, self.spec.distributed.sync_interval)
        self.batches = supervised.train_batches(self.train_stream, self.spec.model.block_size, hp.batch_size,
                                                seed=hp.seed, pad_id=self.vocab.pad_token_id, rank=ctx.rank,
                                                world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda")
        torch.manual_seed(_seed_for(hp.seed, ctx.rank, 1))  # dropout: distinct per rank
        if restored is not None:
            self._restore(restored)
        self.wrapped = self.sync.wrap(self.model)
        self.flops_per_token = models.flops_per_token(self.model, self.spec.model.block_size)

    def _fetch_init(self) -> Path | None:
        prefix = self.job.init_from_prefix
        if not prefix:
            return None
        dest = self.work_dir / "init"
        if self.ctx.local_rank == 0:
            for obj in self.store.list(prefix):
                name = obj.key[len(prefix):]
                if "/" not in name and name.endswith((".json", ".safetensors")):
                    self.store.download(obj.key, dest / name)
        self.ctx.barrier()
        return dest

    def _check_lineage(self, state: dict) -> None:
        for name, ours in (("dataset_sha256", self.dataset.dataset_sha256),
                           ("tokenizer_sha256", self.dataset.tokenizer_sha256)):
            if state.get(name) != ours:
                raise Conflict(f"checkpoint step {state.get('step')} was trained on a different {name[:-7]} "
                               f"({state.get(name)} != {ours})")

    def _restore(self, restored: checkpoints.Restored) -> None:
        mine = restored.load(checkpoints.rank_file(self.ctx.rank))
        if self.sync.per_rank_state:
            adapters.load_trainable_state(self.model, mine["model"])
            self.optimizer.load_state_dict(mine["optimizer"])
        else:
            self.optimizer.load_state_dict(restored.load("optimizer.pt"))
        self.scheduler.load_state_dict(restored.load("scheduler.pt"))
        self.sync.load_state_dict(mine["sync"])
        checkpoints.set_rng_state(mine["rng"], self.ctx.device)
        state = restored.state
        self.batches.position = int(state["data_position"])
        self.progress = Progress(step=state["step"], best_validation_loss=state["best_validation_loss"],
                                 evaluations_without_improvement=state["evaluations_without_improvement"],
                                 stopped_early=state["stopped_early"], tokens=state["tokens"],
                                 metrics=state["metrics"])
        self.resumed_from = restored.step
        self.logged = [events.from_dict(raw) for raw in state.get("logged", [])]
        self.ctx.barrier()  # every rank of the node has read the shared files
        if self.ctx.local_rank == 0:
            shutil.rmtree(restored.folder, ignore_errors=True)

    # -- the loop ---------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.hp.batch_size * self.spec.model.block_size * self.hp.grad_accum * self.ctx.world_size

    def loss(self, module: torch.nn.Module, tokens: torch.Tensor, generator_seed: int | None) -> torch.Tensor:
        """The objective's loss on one micro-batch (tokens: int64 [batch, block_size], or a supervised batch's
        inputs, on the host).

        `generator_seed` seeds the objective's randomness (BERT's masks); None for objectives without any.
        """
        family = self.family
        generator = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
        inputs = supervised.model_inputs(family, tokens, self.vocab, generator, self.hp.mlm_probability)
        moved: dict[int, torch.Tensor] = {}  # gpt2's input_ids and labels are one tensor: copy it once
        for name, value in inputs.items():
            if id(value) not in moved:
                moved[id(value)] = value.to(self.ctx.device, non_blocking=True)
            inputs[name] = moved[id(value)]
        if family not in _NON_CACHING_FAMILIES:
            # Training never reads a KV cache; building one copies every layer's keys and values
            # (what HF Trainer avoids by setting config.use_cache = False).
            inputs["use_cache"] = False
        with self.autocast:
            return module(**inputs).loss

    def _objective_seed(self, *parts: int) -> int | None:
        return _seed_for(self.hp.seed, *parts) if self.family in _RANDOM_OBJECTIVES else None

    def train_step(self) -> torch.Tensor:
        """One optimizer step (grad_accum micro-batches); returns this rank's mean micro-batch loss as a
        0-d tensor, so the step never waits for the device: callers read it only when they log."""
        hp, total = self.hp, torch.zeros((), device=self.ctx.device)
        for micro in range(hp.grad_accum):
            seed = self._objective_seed(2, self.batches.position, self.ctx.rank)
            tokens = self.batches.next()
            with self.sync.no_sync(self.wrapped, skip=micro < hp.grad_accum - 1):
                loss = self.loss(self.wrapped, tokens, seed)
                (loss / hp.grad_accum).backward()
            total += loss.detach().float()
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, hp.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        self.sync.after_step(self.model, self.progress.step)  # before zero_grad: averagers skip grad-less params
        self.optimizer.zero_grad(set_to_none=True)
        return total / hp.grad_accum

    @torch.no_grad()
    def evaluate(self, stream: data.TokenStream) -> float:
        """Mean loss over the fixed evaluation batches of `stream`, all ranks together (one host sync)."""
        self.model.eval()
        batches = supervised.eval_batches(stream, self.spec.model.block_size, self.hp.batch_size,
                                          self.hp.eval_batches, pad_id=self.vocab.pad_token_id, rank=self.ctx.rank,
                                          world_size=self.ctx.world_size)
        losses = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for index, tokens in enumerate(batches):
            seed = self._objective_seed(3, index * self.ctx.world_size + self.ctx.rank)
            losses += self.loss(self.model, tokens, seed).double()
        self.model.train()
        total = torch.stack([losses.cpu(), torch.tensor(float(len(batches)), dtype=torch.float64)])
        total = self.ctx.all_reduce_sum(total)
        return float(total[0] / total[1])

    def run(self, stop_after_step: int | None = None) -> int:
        ctx, hp, progress = self.ctx, self.hp, self.progress
        self.events.emit(events.Started(
            step=progress.step, world_size=ctx.world_size, mode=self.spec.distributed.mode, device=str(ctx.device),
            precision=hp.precision, parameters=models.parameter_count(self.model), resumed_from=self.resumed_from,
            max_steps=hp.max_steps, tokens_per_step=self.tokens_per_step, environment=environment(ctx.device),
            trainable_parameters=models.parameter_count(self.model, trainable=True),
            optimizer_state_bytes=models.optimizer_state_bytes(self.model), startup=self.startup))
        for logged in self.logged:  # the worker may have been killed before it forwarded them
            self.events.emit(events.Replayed(step=logged.step, of=logged))
        interval = hp.effective_checkpoint_interval
        window_start, window_tokens = time.perf_counter(), 0
        self.loop_seconds, loop_start = 0.0, time.perf_counter()
        last_saved = self.resumed_from
        while progress.step < hp.max_steps and not progress.stopped_early:
            loss = self.train_step()
            window_tokens += self.tokens_per_step
            if self.pending is not None and self.pending.done():
                self._committed()
            step = progress.step
            if step % hp.log_interval == 0 or step == hp.max_steps:
                mean = float(ctx.all_reduce_sum(torch.tensor([float(loss)], dtype=torch.float64))[0] / ctx.world_size)
                elapsed = time.perf_counter() - window_start
                rate = window_tokens / elapsed if elapsed > 0 else 0.0
                progress.metrics.update(train_loss=mean, tokens_per_second=rate)
                self._log_metrics(events.Train(
                    step=step, loss=mean, learning_rate=self.scheduler.get_last_lr()[0], tokens_per_second=rate,
                    tokens=progress.tokens, mfu=self._mfu(rate) if ctx.device.type == "cuda" else None))
                window_start, window_tokens = time.perf_counter(), 0
            if step % hp.eval_interval == 0 or step == hp.max_steps:
                self._evaluate_and_decide(step)
            if self.store is not None and (step % interval == 0 or step == hp.max_steps or progress.stopped_early):
                prefix = self.checkpoint()
                last_saved = step
                if stop_after_step is not None and step >= stop_after_step and step < hp.max_steps:
                    self._committed()
                    self.events.emit(events.Stopped(step=step, checkpoint=prefix))
                    return 0
        self.loop_seconds = time.perf_counter() - loop_start
        if self.store is not None and last_saved != progress.step:
            self.checkpoint()
        self.finish()
        return 0

    def _log_metrics(self, event: events.Train | events.Eval) -> None:
        self.events.emit(event)
        self.logged.append(event)

    def _mfu(self, tokens_per_second: float) -> float | None:
        name = torch.cuda.get_device_properties(self.ctx.device).name
        peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
        if peak is None:
            return None
        return self.flops_per_token * tokens_per_second / (peak * self.ctx.world_size)

    def _evaluate_and_decide(self, step: int) -> None:
        progress, patience = self.progress, self.hp.early_stopping_patience
        started = time.perf_counter()
        validation = self.evaluate(self.validation_stream)
        seconds = round(time.perf_counter() - started, 3)
        if progress.best_validation_loss is None or validation < progress.best_validation_loss:
            progress.best_validation_loss, progress.evaluations_without_improvement = validation, 0
        else:
            progress.evaluations_without_improvement += 1
        progress.metrics.update(validation_loss=validation, validation_perplexity=_perplexity(validation))
        self._log_metrics(events.Eval(step=step, validation_loss=validation, perplexity=_perplexity(validation),
                                      best_validation_loss=progress.best_validation_loss, seconds=seconds))
        if patience and progress.evaluations_without_improvement >= patience and step < self.hp.max_steps:
            progress.stopped_early = True
            self.events.emit(events.EarlyStop(
                step=step, best_validation_loss=progress.best_validation_loss,
                evaluations_without_improvement=progress.evaluations_without_improvement))

    def _committed(self) -> None:
        """Wait for the checkpoint in flight (raising its upload's error) and emit its event."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.wait()
            self.events.emit(events.Checkpoint(step=pending.step, prefix=pending.prefix,
                                               seconds=round(pending.seconds, 3), blocked=round(pending.blocked, 3)))

    def checkpoint(self) -> str:
        """Write a checkpoint and start its upload; returns its prefix (committed once `_committed` returns)."""
        self._committed()
        progress = self.progress
        rank_state = {"rng": checkpoints.rng_state(self.ctx.device), "sync": self.sync.state_dict()}
        if self.sync.per_rank_state:
            rank_state["model"] = adapters.trainable_state(self.model)
            rank_state["optimizer"] = self.optimizer.state_dict()
        state = {
            "data_position": self.batches.position, "spec": self.spec.to_dict(),
            "dataset_manifest_key": self.job.dataset_manifest_key,
            "dataset_sha256": self.dataset.dataset_sha256, "tokenizer_sha256": self.dataset.tokenizer_sha256,
            "best_validation_loss": progress.best_validation_loss,
            "evaluations_without_improvement": progress.evaluations_without_improvement,
            "stopped_early": progress.stopped_early, "tokens": progress.tokens, "metrics": progress.metrics,
            "mode": self.spec.distributed.mode, "logged": [events.to_dict(event) for event in self.logged],
        }
        main = self.ctx.is_main
        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending = checkpoints.begin(
            self.store, self.job.layout, progress.step, self.ctx, self.work_dir / "checkpoints", self._uploads,
            rank_state=rank_state, model=self.model if main else None,
            optimizer_state=self.optimizer.state_dict() if main else None,
            scheduler_state=self.scheduler.state_dict() if main else None, state=state if main else None,
        )
        return self.pending.prefix

    def finish(self) -> dict:
        """Equalise the replicas, measure the test split, save the final model (rank 0) and the metrics.

        The final model is a save_pretrained folder with the dataset's tokenizer files beside it, in this
        node's scratch (`DIR/final/`): the worker uploads it once, straight into the registry's version.
        """
        progress = self.progress
        self.sync.finalize(self.model)
        metrics = dict(progress.metrics, steps=progress.step, tokens=progress.tokens,
                       best_validation_loss=progress.best_validation_loss, stopped_early=progress.stopped_early)
        if self.dataset.has_split("test"):
            test = self.evaluate(self.dataset.stream("test"))
            metrics.update(test_loss=test, test_perplexity=_perplexity(test))
        final_dir = None
        if self.store is not None and self.ctx.is_main:
            final_dir = self.work_dir / "final"  # rank 0 only
            shutil.rmtree(final_dir, ignore_errors=True)
            init = self.spec.model.init_from
            if adapters.is_adapted(self.model):  # merged weights, and the adapter under adapter/
                adapters.write_final(self.model, final_dir, base=f"{init.name}/v{init.version}")
            else:
                self.model.save_pretrained(final_dir, safe_serialization=True)
            for path in self.dataset.tokenizer_dir.iterdir():
                if path.is_file():
                    shutil.copy(path, final_dir / path.name)
            self.store.put_bytes(self.job.layout.metrics, json.dumps(metrics, indent=1).encode(),
                                 content_type="application/json")
        self._committed()  # the last checkpoint uploaded while the test split and the final model were done
        self.ctx.barrier()
        self.metrics = metrics
        self.events.emit(events.Finished(step=progress.step, final_dir=str(final_dir.resolve()) if final_dir else None,
                                         metrics=metrics))
        return metrics


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--job-dir", type=Path, required=True, help="node-local scratch directory")
    parser.add_argument("--job", type=Path, help="job file (default: JOB_DIR/job.json)")
    parser.add_argument("--events", type=Path, help="append JSON-lines events here (default: stdout)")
    parser.add_argument("--stop-after-step", type=int, help="stop after the first checkpoint at or after this "
                                                            "step (tests, preemption)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, begun: float | None = None) -> NoReturn:
    """Run the job `argv` names and exit. `begun`: when a warm spare (warm.py), imported long before, was
    handed this job; it stands for the process's start in the start-up milestones."""
    from services.common import logs
    from services.common.config import Settings
    from services.common.s3 import ObjectStore

    startup = {"imported": time.time()}  # this module's imports (torch, transformers) are done by now
    startup["process"] = begun if begun is not None else psutil.Process().create_time()
    if os.environ.get(events.LAUNCHED_AT_ENV):
        startup["launched"] = float(os.environ[events.LAUNCHED_AT_ENV])
    args = parse_args(argv)
    settings = Settings.from_env()
    logs.configure(settings, "training-runtime")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    job = Job.from_dict(json.loads((args.job or args.job_dir / "job.json").read_text()))
    ctx = distributed.init()
    startup["group"] = time.time()
    sink = None
    if ctx.is_main:
        sink = open(args.events, "a") if args.events else sys.stdout
    writer = events.EventWriter(sink)
    code = 1  # until the run returns its own
    try:
        store = ObjectStore(settings.s3)
        node_dir = args.job_dir
        if ctx.local_rank == 0:
            data.fetch_dataset(store, job.dataset_manifest_key, node_dir / "dataset")
        ctx.barrier()
        startup["data"] = time.time()
        dataset = data.LocalDataset.open(node_dir / "dataset")
        run = Run(job, ctx, dataset, store=store, work_dir=node_dir, writer=writer)
        run.setup()
        run.startup = dict(startup, model=time.time())
        code = run.run(stop_after_step=args.stop_after_step)
    except Exception as error:
        log.exception("training failed")
        writer.emit(events.Failed(step=0, error=f"{type(error).__name__}: {error}"))
        code = 1
    finally:
        distributed.shutdown(ctx, clean=code == 0)
        if sink is not None and sink is not sys.stdout:
            sink.close()
        # Leave without unwinding: freeing this frame's model, optimizer and process group, and then the
        # interpreter's finalization, ran destructors that waited on gloo's threads and left a finished
        # rank hung in a futex wait, so torchrun never returned. Everything the run wrote is closed above.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
