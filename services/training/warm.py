"""A warm runtime: a spare training process, its imports done before any job, that becomes a job's one process.

A job's start-up used to pay two interpreters' imports one after the other: torchrun's (it imports torch)
and then train.py's (torch and Transformers again, ~5 s on a CPU). A single-node, single-process job needs
no torchrun agent: nothing to rendezvous, no peers to restart. So the worker keeps one spare ready:

    guard -- python -m services.training.warm

started by the Celery pool process while it is idle (worker.py), which imports everything train.py uses and
then blocks reading one line on its stdin. `Spare.hand` writes the job into that line: the argv train.py
would get, the environment torchrun would give its one rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
TORCHELASTIC_*: `rank_environment`) and the job's log file, which the spare puts on its stdout and stderr.
Then it runs `train.main` as torchrun's worker would, forming the same (one-rank) process group.

Nothing forks a process that already has threads or CUDA: the spare is a fresh interpreter (fork and exec),
and it touches no tensor before its job. The guard keeps its semantics: it is the spare's parent, a child
subreaper that stops the tree when the worker dies (PR_SET_PDEATHSIG) or on SIGTERM, and the worker
stops it on cancel or a lost lease exactly as it stops torchrun's guard (processes.stop_tree). Its exit
status is train.py's own (torchrun reported any failure as 1). A spare that is never handed a job exits
when its stdin closes (the worker went away). Multi-process and multi-node jobs keep torchrun.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from services.training.guard import term_with_parent

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
WAIT_POLL_SECONDS = 0.05  # how often a handed spare's exit is checked while the worker awaits it


def rank_environment(run_id: str, master_port: int) -> dict[str, str]:
    """What torchrun (`--standalone --nproc-per-node 1`) puts in its one worker's environment."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0",
            "GROUP_WORLD_SIZE": "1", "ROLE_RANK": "0", "ROLE_WORLD_SIZE": "1", "ROLE_NAME": "default",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "TORCHELASTIC_RUN_ID": run_id,
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a GPU rank's NCCL group fails on errors instead of hanging
            # No agent holds a store here: the rank hosts the rendezvous store itself, as it would without torchrun.
            "TORCHELASTIC_USE_AGENT_STORE": "False"}


class Handed:
    """A spare running a job: what the worker supervises (the guard's pid and exit status), like an
    asyncio subprocess. Its `wait` polls: the Popen outlives the event loop that started it."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.pid = process, process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    async def wait(self) -> int:
        while self.process.poll() is None:
            await asyncio.sleep(WAIT_POLL_SECONDS)
        return self.process.returncode


class Spare:
    """One idle warm runtime under its guard, owned by the process that started it (its main thread: the
    guard's PR_SET_PDEATHSIG follows the thread that forked it)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.handed = False

    @classmethod
    def start(cls) -> Spare:
        command = [sys.executable, "-m", "services.training.guard", "--",
                   sys.executable, "-m", "services.training.warm"]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT,
                                   start_new_session=True, preexec_fn=term_with_parent)
        return cls(process)

    @property
    def ready(self) -> bool:
        """Not yet handed a job and still alive (one that died importing is replaced, the job goes cold)."""
        return not self.handed and self.process.poll() is None

    def hand(self, argv: list[str], env: dict[str, str], log_path: Path) -> Handed | None:
        """Give the spare its job: train.py's `argv`, `env` added to its environment, output to `log_path`.
        None when it died meanwhile (the job then starts cold)."""
        self.handed = True
        order = {"argv": argv, "env": env, "log": str(log_path)}
        try:
            self.process.stdin.write(json.dumps(order).encode() + b"\n")
            self.process.stdin.close()
        except BrokenPipeError:
            log.warning("the warm runtime died before its job", extra={"pid": self.process.pid})
            return None
        return Handed(self.process)

    def close(self) -> None:
        """Let an unused spare go: it exits when its stdin closes."""
        if not self.handed and self.process.stdin is not None:
            self.process.stdin.close()
            self.handed = True


def main() -> None:
    from services.common import logs, s3  # noqa: F401 (imported now, not during the job: train.main's own)
    from services.common.config import Settings  # noqa: F401
    from services.training import train

    line = sys.stdin.readline()
    if not line:
        return  # the worker gave this spare up
    begun = time.time()
    order = json.loads(line)
    os.environ.update(order["env"])
    log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    train.main(order["argv"], begun=begun)


if __name__ == "__main__":
    main()
