"""Checkpoints in S3 that become visible only when complete, and finding the latest one to resume.

Layout under `JobLayout.step(n)` (`jobs/{tenant}/{job_id}/checkpoints/step-{n}/`, services.common.contracts):

- `model/`: `save_pretrained` of rank 0's model (`config.json`, `model.safetensors`, …);
- `optimizer.pt`, `scheduler.pt`: rank 0's AdamW and LR-schedule state;
- `rank-{r:05d}.pt`, one per rank: its RNG states (torch CPU/CUDA, Python), its mode state
  (averager step, in-flight averaging), and — in modes where replicas differ — its own weights and
  optimizer state;
- `state.json`: step, data position, world size, resolved spec, hashes of the dataset version and
  tokenizer, early-stopping counters, latest metrics;
- `COMMITTED`, written last by rank 0 once every rank's objects are uploaded: `{"step", "objects":
  [{"key", "size", "sha256"}…]}`. A step folder without it is an interrupted write and is ignored;
  readers verify every object against it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.contracts import JobLayout
from services.common.errors import Conflict

log = logging.getLogger(__name__)

COMMITTED = "COMMITTED"
_STEP = re.compile(r"/checkpoints/step-(\d+)/COMMITTED$")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def committed_steps(store, layout: JobLayout) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    steps = [int(match.group(1)) for obj in store.list(layout.checkpoints)
             if (match := _STEP.search(obj.key))]
    return sorted(steps)


def latest_step(store, layout: JobLayout) -> int | None:
    steps = committed_steps(store, layout)
    return steps[-1] if steps else None


def upload_folder(store, local: Path, prefix: str) -> list[dict]:
    """Upload every file under `local` to `prefix`; return the stored objects as dicts."""
    return [store.put_file(prefix + path.relative_to(local).as_posix(), path).as_dict()
            for path in sorted(local.rglob("*")) if path.is_file()]


def save(store, layout: JobLayout, step: int, ctx, scratch: Path, *, rank_state: dict, model=None,
         optimizer_state: dict | None = None, scheduler_state: dict | None = None,
         state: dict | None = None) -> str:
    """Collective: every rank uploads its rank file; rank 0 uploads the rest and commits last.

    `model`, `optimizer_state`, `scheduler_state` and `state` are used on rank 0 only.
    Returns the checkpoint's prefix once it is committed.
    """
    with ThreadPoolExecutor(max_workers=1) as uploads:
        prefix = begin(store, layout, step, ctx, scratch, uploads, rank_state=rank_state, model=model,
                       optimizer_state=optimizer_state, scheduler_state=scheduler_state, state=state).wait()
    ctx.barrier()
    return prefix


class Pending:
    """A checkpoint whose files are written (training may change the model from now on) and whose upload and
    commit run in the background on rank 0. `wait` returns its prefix once committed, or raises the upload's
    error; `done` says whether that is over."""

    def __init__(self, step: int, prefix: str, started: float, future: Future | None) -> None:
        self.step, self.prefix, self.started, self.future = step, prefix, started, future
        self.blocked = 0.0  # seconds the caller waited for it: writing its files, then waiting for the upload
        self.seconds = 0.0  # from the start until committed

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> str:
        waited = time.monotonic()
        committed_at = self.future.result() if self.future is not None else None
        now = time.monotonic()
        self.blocked += now - waited
        # Until the commit, not until this wait: the last checkpoint is waited for only after the test split.
        self.seconds = self.seconds or (committed_at or now) - self.started
        return self.prefix


def begin(store, layout: JobLayout, step: int, ctx, scratch: Path, uploads: Executor, *, rank_state: dict,
          model=None, optimizer_state: dict | None = None, scheduler_state: dict | None = None,
          state: dict | None = None) -> Pending:
    """Collective: `save`, returning once every file is written to `scratch`, with rank 0's uploads and the
    commit running on `uploads`. Each rank's own file is uploaded before the ranks exchange what they stored,
    so the commit waits for no other rank."""
    started = time.monotonic()
    prefix = layout.step(step)
    local = scratch / f"step-{step}"
    local.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, local / rank_file(ctx.rank))
    mine = store.put_file(prefix + rank_file(ctx.rank), local / rank_file(ctx.rank)).as_dict()
    (local / rank_file(ctx.rank)).unlink()
    rank_objects = ctx.all_gather_object(mine)
    future = None
    if ctx.is_main:
        # Written now, synchronously: the optimizer's state dict holds the live tensors the next step changes.
        model.save_pretrained(local / "model", safe_serialization=True)
        torch.save(optimizer_state, local / "optimizer.pt")
        torch.save(scheduler_state, local / "scheduler.pt")
        (local / "state.json").write_text(json.dumps({**state, "step": step, "world_size": ctx.world_size},
                                                     indent=1, sort_keys=True))
        future = uploads.submit(_upload_and_commit, store, local, prefix, step, rank_objects, started)
    pending = Pending(step, prefix, started, future)
    pending.blocked = time.monotonic() - started
    return pending


def _upload_and_commit(store, local: Path, prefix: str, step: int, rank_objects: list[dict],
                       started: float) -> float:
    """Uploads the step's files and commits them; returns when it committed (time.monotonic())."""
    try:
        objects = rank_objects + upload_folder(store, local, prefix)
        store.put_bytes(prefix + COMMITTED, json.dumps({"step": step, "objects": objects}, indent=1).encode(),
                        content_type="application/json")
    finally:
        shutil.rmtree(local, ignore_errors=True)
    committed_at = time.monotonic()
    log.info("checkpoint committed", extra={"step": step, "objects": len(objects),
                                            "seconds": round(committed_at - started, 3)})
    return committed_at


@dataclass(frozen=True)
class Restored:
    """A downloaded checkpoint on local disk."""

    step: int
    folder: Path  # holds model/, optimizer.pt, scheduler.pt, state.json and this rank's rank file
    state: dict

    def load(self, name: str) -> dict:
        return torch.load(self.folder / name, map_location="cpu", weights_only=True)


def fetch(store, layout: JobLayout, step: int, ctx, dest: Path) -> Restored:
    """Collective: download checkpoint `step`, verified against its COMMITTED manifest.

    The shared objects are downloaded once per node (local rank 0), each rank's file by its rank.
    """
    prefix = layout.step(step)
    manifest = json.loads(store.get_bytes(prefix + COMMITTED))
    folder = dest / f"step-{step}"
    by_name = {obj["key"][len(prefix):]: obj for obj in manifest["objects"]}
    writers = sum(1 for name in by_name if name.startswith("rank-"))
    if writers != ctx.world_size:
        raise Conflict(f"checkpoint step {step} was written by {writers} processes; this run has {ctx.world_size}")
    shared = [name for name in by_name if not name.startswith("rank-")]
    if ctx.local_rank == 0:
        for name in shared:
            store.download(prefix + name, folder / name, expected_sha256=by_name[name]["sha256"])
    mine = rank_file(ctx.rank)
    store.download(prefix + mine, folder / mine, expected_sha256=by_name[mine]["sha256"])
    ctx.barrier()
    return Restored(step, folder, json.loads((folder / "state.json").read_text()))


def rng_state(device: torch.device) -> dict:
    """This process's random number generators (dropout draws from torch's)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
