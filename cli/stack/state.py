"""What `up` left running, kept in <LLMP_STATE_DIR>/stack.json so `down`, `status` and the other `llmp`
commands agree on one stack."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cli import servers
from cli.stack.errors import StackError

STATE_VERSION = 1


@dataclass
class Record:
    """One component as `up` left it."""

    name: str
    mode: str  # "process" (we run it), "embedded" (our PostgreSQL), "external" (we only use it), "file"
    pid: int | None = None
    start_time: int | None = None  # with pid, names the process even after pid reuse
    ports: list[int] = field(default_factory=list)
    log: str | None = None
    detail: str = ""  # what it is: a URL, a data dir, a Celery node name
    startup_s: float = 0.0
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL on `down`

    @property
    def owned(self) -> bool:
        """`up` started it, so `down` stops it."""
        return self.mode in ("process", "embedded")

    def alive(self) -> bool:
        if not self.owned:
            return True
        return self.pid is not None and servers.process_alive(self.pid, self.start_time)


@dataclass
class StackState:
    env: dict[str, str]
    records: dict[str, Record] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps({
            "version": STATE_VERSION,
            "created_at": self.created_at,
            "env": self.env,
            "components": {name: asdict(record) for name, record in self.records.items()},
        }, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StackState:
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise StackError(f"stack.json has version {data.get('version')!r}, this llmp reads {STATE_VERSION}")
        records = {name: Record(**fields) for name, fields in data["components"].items()}
        return cls(env=data["env"], records=records, created_at=data["created_at"])


class StateDir:
    """The files under LLMP_STATE_DIR."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.json"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    def load(self) -> StackState | None:
        try:
            return StackState.from_json(self.stack_file.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: StackState) -> None:
        """Write stack.json atomically (0600: it holds the S3 secret) and one pid file per process."""
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.stack_file.with_suffix(".json.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(state.to_json())
        temporary.replace(self.stack_file)
        (self.root / "pids").mkdir(exist_ok=True)
        running = {name: record.pid for name, record in state.records.items() if record.pid is not None}
        for stale in (self.root / "pids").glob("*.pid"):
            if stale.stem not in running:
                stale.unlink(missing_ok=True)
        for name, pid in running.items():
            self.pid_file(name).write_text(f"{pid}\n")

    def clear(self) -> None:
        self.stack_file.unlink(missing_ok=True)
        shutil.rmtree(self.root / "pids", ignore_errors=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One `up`/`down` at a time per state dir."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "stack.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
