"""A real Celery worker for the tests: one process on the `gpu` and `eval` queues (or those given) of the training
worker's app (or the one given: the data worker's), ready before it is used."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli import servers
from services.common import topology

ROOT = Path(__file__).resolve().parents[3]


@contextmanager
def celery_worker(env: dict[str, str], log_path: Path, queues: str = "gpu,eval",
                  app: str = topology.WORKER_APP) -> Iterator[subprocess.Popen]:
    """Start it with `env`, wait for "ready.", yield it (its log at `.log_path`), then stop it."""
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues, "-c", "1",
               "-n", f"test-{uuid.uuid4().hex[:8]}@%h", "--without-gossip", "--without-mingle",
               "--without-heartbeat", "-l", "info"]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 90
    while "ready." not in log_path.read_text(errors="replace"):
        assert process.poll() is None, servers.log_tail(log_path)
        assert time.monotonic() < deadline, "worker not ready" + servers.log_tail(log_path)
        time.sleep(0.3)
    process.log_path = log_path
    try:
        yield process
    finally:
        servers.stop(process, timeout=20)
