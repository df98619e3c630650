"""Running one node of a training job: `torchrun` under a guard, supervised until it ends.

`NodeRunner` claims the highest-priority free node from PostgreSQL (see coordinator.py), launches
`torchrun` for it in its own process group, and supervises it until it ends:

- every `tick` it forwards the runtime's events (events.py) into PostgreSQL, and every third of the
  lease renews the node's lease;
- when the job's cancel flag is set (or the lease was lost to a newer attempt) it sends SIGTERM to
  the whole process group, then SIGKILL to what is left after `KILL_GRACE` seconds, so nothing
  outlives the task and the worker is free again within seconds;
- when torchrun finishes, the node that ran global rank 0 (the one that saw `Finished`) registers
  the model with the registry (publish.py) and marks the job SUCCEEDED; a non-zero exit marks it FAILED.

If the whole machine disappears, the coordinator notices the expired lease, re-queues the job, and the
next run resumes from its last checkpoint. torchrun runs under `guard`, which stops every process
it started however it ends, also when the task process itself is killed.

Several nodes (`distributed.nnodes` > 1): the job gets one message per node; node 0 publishes a
c10d rendezvous endpoint (`host:port`, a free port on its host) for the attempt and every node runs

    torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
             --rdzv-id JOB-ATTEMPT -m services.training.train --job-dir DIR --events EVENTS

One node process per node, each machine with its own worker (`-c 1`); the rendezvous assigns the
global ranks. A single-node job uses `--standalone`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg_pool import PoolTimeout

from services.common import contracts
from services.common.config import Settings
from services.common.db import Database
from services.common.errors import LlmpError, Unavailable
from services.training import events, publish, warm
from services.training.coordinator import Assignment, Coordinator, JobState, Update, kept_lease
from services.training.guard import KILL_GRACE, guard, term_with_parent

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
TICK_SECONDS = 0.5  # how often events are forwarded and the process checked
RENDEZVOUS_WAIT = 300.0  # how long a node waits for node 0 to publish the rendezvous endpoint
REGISTER_ATTEMPTS = 6  # tries of registering while the registry is unavailable (1+2+...+16 s between)

Registrar = Callable[[Settings, Coordinator, Assignment, events.Finished], Awaitable[int]]


# --- translating the runtime's events -----------------------------------------------------------

@dataclass
class Outcome:
    """What the runtime's events said about the end of the run."""

    finished: events.Finished | None = None
    error: str = ""


_ENVIRONMENT_FIELDS = ("world_size", "mode", "device", "precision", "parameters", "resumed_from")
_FINAL_METRICS = ("test_loss", "test_perplexity", "best_validation_loss")


def translate_event(event: events.Event, outcome: Outcome) -> Update | None:
    """One runtime event as a coordinator Update; fills `outcome` at the end."""
    step = event.step
    match event:
        case events.Started():
            environment = dict(event.environment)
            for name in _ENVIRONMENT_FIELDS:
                if getattr(event, name) is not None:
                    environment[name] = getattr(event, name)
            return Update(step=step, environment=environment)
        case events.Train():
            return Update(step=step, metrics=publish.numbers({
                "train_loss": event.loss, "learning_rate": event.learning_rate,
                "tokens_per_second": event.tokens_per_second, "mfu": event.mfu}))
        case events.Eval():
            return Update(step=step, metrics=publish.numbers({"validation_loss": event.validation_loss,
                                                              "validation_perplexity": event.perplexity}))
        case events.Checkpoint():  # emitted once committed, in the background: steps later, so no progress
            return Update(checkpoint={"step": step, "prefix": event.prefix})
        case events.EarlyStop():
            return Update(step=step)
        case events.Finished():
            outcome.finished = event
            final = publish.numbers({name: event.metrics.get(name) for name in _FINAL_METRICS})
            return Update(step=step, metrics=final)
        case events.Replayed():  # a metric event logged before the checkpoint resumed from: its points again
            update = translate_event(event.of, Outcome())
            return Update(metrics=update.metrics, metrics_step=update.step) if update and update.metrics else None
        case events.Failed():
            outcome.error = event.error or "training failed"
    return None


# --- the node's processes -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def torchrun_command(assignment: Assignment, job_dir: Path, events: Path, rdzv_endpoint: str | None) -> list[str]:
    distributed = assignment.job.spec["distributed"]
    command = [sys.executable, "-m", "services.training.guard", "--",
               sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(distributed["nproc_per_node"])]
    if assignment.job.nnodes == 1:
        command += ["--standalone", "--nnodes", "1"]
    else:
        command += ["--nnodes", str(assignment.job.nnodes), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", rdzv_endpoint or "", "--rdzv-id", f"{assignment.job_id}-{assignment.attempt}"]
    return command + ["-m", "services.training.train", *train_arguments(job_dir, events)]


def train_arguments(job_dir: Path, events: Path) -> list[str]:
    """train.py's arguments for a node (its `main(argv)`)."""
    return ["--job-dir", str(job_dir), "--job", str(job_dir / "job.json"), "--events", str(events)]


def _one_process(assignment: Assignment) -> bool:
    """A job whose only process is this node's one rank: no torchrun agent needed (warm.py)."""
    return assignment.job.nnodes == 1 and int(assignment.job.spec["distributed"]["nproc_per_node"]) == 1


def job_file(assignment: Assignment) -> dict[str, Any]:
    """The job file train.py reads (see its docstring)."""
    job = assignment.job
    init_from = job.spec["model"].get("init_from")
    return {"tenant": job.tenant, "job_id": job.id, "spec": job.spec,
            "dataset_manifest_key": job.dataset_manifest_key,
            "init_from_prefix": (contracts.model_version_prefix(job.tenant, init_from["name"], init_from["version"])
                                 if init_from else None)}


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_all(pid: int, tree: list[psutil.Process], sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    for member in tree:  # torchrun starts each worker in a session of its own
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


async def stop_tree(process: asyncio.subprocess.Process | warm.Handed, grace: float = KILL_GRACE) -> None:
    """Stop torchrun and every process it started: SIGTERM (torchrun forwards it to its workers), then
    SIGKILL to whatever is left after `grace` seconds; returns once none of them is alive."""
    tree = _descendants(process.pid)
    _signal_all(process.pid, tree, signal.SIGTERM)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if sig == signal.SIGKILL:
            _signal_all(process.pid, tree, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process.returncode is None:
                known = {member.pid for member in tree}
                tree += [member for member in _descendants(process.pid) if member.pid not in known]
            elif not any(_alive(member) for member in tree):
                return
            await asyncio.sleep(0.05)
    log.error("processes survived SIGKILL", extra={"pids": [m.pid for m in tree if _alive(m)]})


# --- running one node ---------------------------------------------------------------------------

class NodeRunner:
    """Claims a node, runs its torchrun, forwards events, renews the lease, and ends the job."""

    def __init__(self, settings: Settings, worker: str, *, register: Registrar = publish.register_model,
                 tick: float = TICK_SECONDS, spare: warm.Spare | None = None) -> None:
        """`spare`: a warm runtime (warm.py) to run a job of one process in, instead of starting torchrun."""
        self.settings = settings
        self.spare = spare
        self.worker = worker
        self.host = settings.training_advertise_host or socket.gethostname()  # what node 0 publishes
        self.register = register
        self.tick = tick

    async def run(self, job_hint: str = "") -> str:
        db = await Database.connect(self.settings.database_url, component="training", migrations_dir=MIGRATIONS,
                                    min_size=1, max_size=2)
        try:
            coordinator = Coordinator(db)
            assignment = await coordinator.claim(self.worker, self.host)
            if assignment is None:
                log.info("nothing to run", extra={"job_hint": job_hint})
                return "idle"
            return await self.supervise(coordinator, assignment)
        finally:
            await db.close()

    async def supervise(self, coordinator: Coordinator, assignment: Assignment) -> str:
        job = assignment.job
        root = self.settings.state_dir / "training" / job.id
        job_dir = root / f"node-{assignment.node_rank}"
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "job.json").write_text(json.dumps(job_file(assignment)))
        events_path = job_dir / f"events-{assignment.attempt}.jsonl"
        events_path.unlink(missing_ok=True)
        log_path = root / f"torchrun-{assignment.attempt}-node{assignment.node_rank}.log"

        rdzv = await self._rendezvous(coordinator, assignment)
        if job.nnodes > 1 and rdzv is None:
            return "lost"  # the attempt ended while waiting for node 0
        process = await self._launch(assignment, job_dir, events_path, rdzv, log_path)
        tail, outcome = events.EventTail(events_path), Outcome()
        beat_every, last_beat = job.lease_seconds / 3, time.monotonic()
        stop_reason = ""
        try:
            while True:
                try:
                    await asyncio.wait_for(process.wait(), self.tick)
                except TimeoutError:
                    pass
                await self._forward(coordinator, assignment, tail, outcome)
                if process.returncode is not None:
                    break
                if time.monotonic() - last_beat >= beat_every:
                    try:
                        beat = await coordinator.heartbeat(assignment)
                        last_beat = time.monotonic()
                        if not beat.held:
                            stop_reason = "lost"
                        elif beat.cancel_requested:
                            stop_reason = "cancelled"
                    except (psycopg.Error, PoolTimeout, OSError) as error:
                        # PostgreSQL away for a moment: keep training while the lease may still hold.
                        log.warning("heartbeat failed", extra={"job_id": job.id, "error": str(error)})
                        if time.monotonic() - last_beat > job.lease_seconds:
                            stop_reason = "lost"  # the coordinator has re-queued it by now
                    if stop_reason:
                        log.info("stopping torchrun", extra={"job_id": job.id, "why": stop_reason})
                        await stop_tree(process)
                        break
        finally:
            if process.returncode is None:
                await stop_tree(process)
        await process.wait()
        await self._forward(coordinator, assignment, tail, outcome)

        if stop_reason == "lost":
            return "lost"
        if stop_reason == "cancelled":
            await coordinator.finish(assignment, JobState.CANCELLED)
            shutil.rmtree(root, ignore_errors=True)
            return "cancelled"
        if process.returncode == 0 and outcome.finished is not None:
            return await self._succeed(coordinator, assignment, outcome, root)
        if process.returncode == 0:  # another node ran global rank 0 and ends the job
            await coordinator.release(assignment)
            return "released"
        error = outcome.error or f"the runtime exited with {process.returncode}: {_tail(log_path)}"
        await coordinator.finish(assignment, JobState.FAILED, error=error)
        return "failed"

    async def _launch(self, assignment: Assignment, job_dir: Path, events_path: Path, rdzv: str | None,
                      log_path: Path) -> asyncio.subprocess.Process | warm.Handed:
        """Start the node's runtime: the warm spare for a job of one process (warm.py), else torchrun; each
        under its guard, in a session of its own."""
        job, launched = assignment.job, f"{time.time():.3f}"
        process, started = None, "warm runtime started"
        if self.spare is not None and self.spare.ready and _one_process(assignment):
            env = {events.LAUNCHED_AT_ENV: launched,
                   **warm.rank_environment(f"{assignment.job_id}-{assignment.attempt}", free_port())}
            process = self.spare.hand(train_arguments(job_dir, events_path), env, log_path)
        if process is None:
            command = torchrun_command(assignment, job_dir, events_path, rdzv)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", events.LAUNCHED_AT_ENV: launched}
            with open(log_path, "ab") as log_file:
                process = await asyncio.create_subprocess_exec(
                    *command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=str(warm.ROOT),
                    start_new_session=True, preexec_fn=term_with_parent)
            started = "torchrun started"
        log.info(started, extra={"job_id": job.id, "attempt": assignment.attempt, "pid": process.pid,
                                 "node_rank": assignment.node_rank})
        return process

    async def _succeed(self, coordinator: Coordinator, assignment: Assignment, outcome: Outcome, root: Path) -> str:
        # Keep the lease alive while the model is uploaded and the registry verifies it.
        try:
            async with kept_lease(coordinator, assignment):
                for attempt in range(REGISTER_ATTEMPTS):
                    try:
                        version = await self.register(self.settings, coordinator, assignment, outcome.finished)
                        break
                    except Unavailable as error:  # the registry is restarting: wait for it (publish.py resumes)
                        if attempt == REGISTER_ATTEMPTS - 1:
                            raise
                        log.warning("registry unavailable; retrying", extra={"job_id": assignment.job_id,
                                                                             "error": str(error)})
                        await asyncio.sleep(2 ** attempt)
        except LlmpError as error:
            await coordinator.finish(assignment, JobState.FAILED, error=f"registering the model failed: {error}")
            return "failed"
        await coordinator.finish(assignment, JobState.SUCCEEDED, model_version=version)
        shutil.rmtree(root, ignore_errors=True)
        return "succeeded"

    async def _rendezvous(self, coordinator: Coordinator, assignment: Assignment) -> str | None:
        if assignment.job.nnodes == 1:
            return None
        if assignment.node_rank == 0:
            endpoint = f"{self.host}:{free_port()}"
            await coordinator.set_rendezvous(assignment, endpoint)
            return endpoint
        deadline = time.monotonic() + RENDEZVOUS_WAIT
        while time.monotonic() < deadline:
            endpoint = await coordinator.rendezvous(assignment)
            if endpoint:
                return endpoint
            if not (await coordinator.heartbeat(assignment)).held:
                return None
            await asyncio.sleep(self.tick)
        return None

    async def _forward(self, coordinator: Coordinator, assignment: Assignment, tail: events.EventTail,
                       outcome: Outcome) -> None:
        updates = [update for event in tail.read() if (update := translate_event(event, outcome)) is not None]
        if not updates:
            return
        for attempt in range(3):
            try:
                await coordinator.record(assignment, updates)
                return
            except (psycopg.Error, PoolTimeout, OSError) as error:
                log.warning("recording events failed", extra={"job_id": assignment.job_id, "error": str(error)})
                await asyncio.sleep(1 + attempt)
        log.error("events dropped after retries", extra={"job_id": assignment.job_id, "count": len(updates)})


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


if __name__ == "__main__":  # the old spelling of `python -m services.training.guard -- COMMAND`
    if sys.argv[1:3] != ["guard", "--"] or len(sys.argv) < 4:
        sys.exit("usage: python -m services.training.guard -- COMMAND [ARG...]")
    sys.exit(guard(sys.argv[3:]))
