"""The guard torchrun runs under: `python -m services.training.guard -- COMMAND [ARG...]`.

A module of its own, importing nothing of the service (no database, S3 or gRPC clients): it is the first
process of every job's start-up, so each of its imports is paid before torchrun even begins.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading

import psutil

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of the process group
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def term_with_parent() -> None:  # runs in the guard between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def guard(command: list[str], grace: float = KILL_GRACE) -> int:
    """Run `command` so that nothing it starts outlives it: `python -m services.training.guard -- CMD`.

    torchrun starts each worker in a session of its own, so killing torchrun's process group misses
    them, and if torchrun itself is SIGKILLed they are orphaned. The guard is a child subreaper:
    orphans are re-parented to it, so it can always find and stop the whole tree. It gets SIGTERM when
    the task process that started it dies (PR_SET_PDEATHSIG), and on SIGTERM it stops the tree
    (SIGTERM, then SIGKILL after `grace`) and exits. It returns the command's exit status.
    """
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    child = subprocess.Popen(command)
    while child.poll() is None and not stopping.is_set():
        stopping.wait(0.1)
    me = psutil.Process()
    tree = me.children(recursive=True)
    for sig, wait in ((signal.SIGTERM, grace if stopping.is_set() else 1.0), (signal.SIGKILL, 10.0)):
        for member in tree:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        gone, tree = psutil.wait_procs(tree, timeout=wait)  # also reaps the orphans re-parented to us
        for member in gone:
            if member.pid == child.pid and child.returncode is None:
                child.returncode = member.returncode  # psutil reaped it: keep its status
        tree += [member for member in me.children(recursive=True) if member not in tree]
        if not tree:
            break
    returncode = child.wait()
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    if sys.argv[1:2] != ["--"] or len(sys.argv) < 3:
        sys.exit("usage: python -m services.training.guard -- COMMAND [ARG...]")
    sys.exit(guard(sys.argv[2:]))
