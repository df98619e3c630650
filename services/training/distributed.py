"""Process groups and the three ways replicas stay in agreement: `ddp`, `local-sgd` and `async`.

- `ddp`: `DistributedDataParallel`; gradients are all-reduced every micro-step that ends a
  gradient-accumulation cycle (the others run under `no_sync`). Replicas are identical after every
  step, so one copy of the weights and optimizer describes the job.
- `local-sgd`: semi-synchronous. Every replica steps on its own gradients; torch.distributed's
  `PeriodicModelAverager` averages the parameters every `sync_interval` optimizer steps. Much less
  communication than `ddp`; replicas (and their AdamW moments) differ between averagings, so each
  rank checkpoints its own weights and optimizer.
- `async`: bounded-staleness asynchronous averaging (Overlap Local-SGD, Wang et al. 2020). At every
  sync point a rank snapshots its parameters and starts a non-blocking all-reduce of the snapshot,
  then keeps training; at the next sync point it waits for that reduction (already done, usually) and
  moves to `average + (params - snapshot)`: the replicas' mean plus the progress it made locally while
  the mean was being computed. No rank ever waits for a slow peer's *computation*, only for a
  reduction started a full period earlier, so staleness is bounded by one period.
  Why not a parameter server (torch.distributed.rpc)? Its updates land in arrival order, which
  depends on timing: runs are not reproducible, the bitwise-exact resume this platform promises
  would be impossible, and the server is a bottleneck and a single point of failure. Here every
  value depends only on the data and the seed, never on timing.

`Context` describes this process (rank, device, backend: NCCL on GPU, gloo on CPU). Outside torchrun
(no `WORLD_SIZE`) it is a single process with no process group, and every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of `values` over ranks (float64 on CPU for gloo; moved back to the caller's device)."""
        if not self.distributed:
            return values
        wire = values.to(self.device if self.backend == "nccl" else "cpu", torch.float64)
        dist.all_reduce(wire)
        return wire.to(values.device, values.dtype)

    def all_gather_object(self, value):
        if not self.distributed:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def init(timeout_s: float = 600) -> Context:
    """Join the torchrun process group when launched by torchrun, else a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ:
        return Context(0, 0, 1, device, None)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if cuda else None)
    return Context(rank, local_rank, world_size, device, backend)


def shutdown(ctx: Context, clean: bool = True) -> None:
    """Before a rank exits: after a clean run every rank meets at a barrier, so none leaves while a peer still
    talks to it. The group is not destroyed: the process exits right after (`train.main`), which closes its
    sockets, and destroying it (or a failed rank waiting on peers that never come) is where ranks hung."""
    if ctx.distributed and dist.is_initialized() and clean:
        dist.barrier()


class Synchronizer:
    """What a mode does around the optimizer step. The base class is a single process: nothing."""

    per_rank_state = False  # True when replicas differ and each rank must checkpoint its own weights

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call for training forwards."""
        return model

    def no_sync(self, wrapped: torch.nn.Module, skip: bool):
        """Context for a micro-step whose gradients need not be communicated yet."""
        return contextlib.nullcontext()

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """Called after optimizer step number `step` (1-based)."""

    def finalize(self, model: torch.nn.Module) -> None:
        """Make every replica's weights equal before the final model is written."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DDPSync(Synchronizer):
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.ctx.distributed:
            return model
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        # Gradients as views into the all-reduce buckets: no copy into the buckets and back every step.
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    def no_sync(self, wrapped: torch.nn.Module, skip: bool):
        if skip and isinstance(wrapped, DistributedDataParallel):
            return wrapped.no_sync()
        return contextlib.nullcontext()


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters replicas can disagree on: those that train. A LoRA job's frozen base is the same on
    every rank, so the averaging modes exchange the adapter alone."""
    return [p for p in model.parameters() if p.requires_grad]


def _average_now(ctx: Context, model: torch.nn.Module) -> None:
    if not ctx.distributed:
        return
    with torch.no_grad():
        params = trainable(model)
        flat = torch.nn.utils.parameters_to_vector(params)
        dist.all_reduce(flat)
        flat /= ctx.world_size
        torch.nn.utils.vector_to_parameters(flat, params)


class LocalSGDSync(Synchronizer):
    per_rank_state = True

    def __init__(self, ctx: Context, period: int) -> None:
        super().__init__(ctx)
        # warmup_steps=0: average from the first step on (the replicas start identical, same seed).
        self.averager = PeriodicModelAverager(period=period, warmup_steps=0) if ctx.distributed else None

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        if self.averager is not None:
            self.averager.average_parameters(trainable(model))

    def finalize(self, model: torch.nn.Module) -> None:
        _average_now(self.ctx, model)

    def state_dict(self) -> dict:
        return {"averager_step": self.averager.step if self.averager else 0}

    def load_state_dict(self, state: dict) -> None:
        if self.averager is not None:
            self.averager.step = int(state["averager_step"])


class AsyncSync(Synchronizer):
    """Bounded-staleness asynchronous averaging; see the module docstring."""

    per_rank_state = True

    def __init__(self, ctx: Context, period: int) -> None:
        super().__init__(ctx)
        self.period = period
        self.snapshot: torch.Tensor | None = None  # this rank's parameters when the reduction started
        self.reduced: torch.Tensor | None = None  # the reduction's buffer: sum of every rank's snapshot
        self.work = None  # the in-flight all-reduce, if any

    def _settle(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        if not self.ctx.distributed or step % self.period:
            return
        with torch.no_grad():
            params = trainable(model)
            current = torch.nn.utils.parameters_to_vector(params)
            if self.snapshot is not None:
                self._settle()
                current = self.reduced / self.ctx.world_size + (current - self.snapshot)
                torch.nn.utils.vector_to_parameters(current, params)
            self.snapshot = current.clone()
            self.reduced = current.clone()
            self.work = dist.all_reduce(self.reduced, async_op=True)

    def finalize(self, model: torch.nn.Module) -> None:
        if self.ctx.distributed:
            with torch.no_grad():
                if self.snapshot is not None:
                    self._settle()
                    params = trainable(model)
                    current = torch.nn.utils.parameters_to_vector(params)
                    current = self.reduced / self.ctx.world_size + (current - self.snapshot)
                    torch.nn.utils.vector_to_parameters(current, params)
                    self.snapshot = self.reduced = None
            _average_now(self.ctx, model)

    def state_dict(self) -> dict:
        # The reduction's result depends only on the snapshots, never on timing: waiting for it here
        # and storing it lets a resumed run apply exactly what the uninterrupted one would have.
        self._settle()
        if self.snapshot is None:
            return {}
        return {"snapshot": self.snapshot.cpu(), "reduced": self.reduced.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state and self.ctx.distributed:
            self.snapshot = state["snapshot"].to(self.ctx.device)
            self.reduced = state["reduced"].to(self.ctx.device)
            self.work = None


def synchronizer(mode: str, ctx: Context, sync_interval: int) -> Synchronizer:
    if mode == "ddp":
        return DDPSync(ctx)
    if mode == "local-sgd":
        return LocalSGDSync(ctx, sync_interval)
    if mode == "async":
        return AsyncSync(ctx, sync_interval)
    raise ValueError(f"unknown distributed mode {mode!r}")
