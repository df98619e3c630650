"""What every component of the stack is (how it starts, when it is healthy, how it stops), and `Launch`,
the one `up` that starts components and remembers what it spawned."""

from __future__ import annotations

import abc
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cli import servers
from cli.stack.errors import StackError
from cli.stack.settings import child_env
from cli.stack.state import Record, StateDir
from services.common import config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# A started component: its record and the LLMP_* settings it resolved (e.g. the embedded PostgreSQL's URL).
Started = tuple[Record, dict[str, str]]


@dataclass(frozen=True)
class Component(abc.ABC):
    """One part of the stack. A subclass knows its ports, how to start it (or find it already served),
    how to tell it is doing its job, and how to stop what `up` started of it."""

    name: str
    requires: tuple[str, ...] = ()  # components that must be healthy before this one starts
    module: str | None = None  # python module it runs (must exist before `up` starts anything)
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL on `down`

    def ports(self, env: Mapping[str, str]) -> list[int]:
        """The ports it listens on under `env` (those `up` requires free and `down` waits to close)."""
        return []

    @abc.abstractmethod
    def start(self, launch: Launch) -> Started:
        """Start it and return once it is healthy; or record the server already doing its job."""

    @abc.abstractmethod
    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        """Does it do its job now? Asked only while `record` is alive."""

    def healthy(self, record: Record, env: Mapping[str, str], timeout: float = 2.0) -> bool:
        return record.alive() and self.probe(record, env, timeout)

    def stop(self, record: Record) -> None:
        """Stop what `up` started (never a process that reused its pid); an external server stays up."""
        if record.mode == "process" and record.pid is not None and record.alive():
            servers.stop_group(record.pid, record.grace)
        await_ports_closed(record)


def await_ports_closed(record: Record, timeout: float = 10.0) -> None:
    """Wait until what `up` started of `record` no longer listens, so a new `up` finds its ports free."""
    if not record.owned:
        return
    deadline = time.monotonic() + timeout
    while any(servers.port_open("127.0.0.1", p) for p in record.ports) and time.monotonic() < deadline:
        time.sleep(0.1)


class Launch:
    """One `up`: starts components, remembers every process it spawned (so a failure or Ctrl-C stops
    exactly those), and can be cancelled from the main thread."""

    def __init__(self, state_dir: StateDir, env: dict[str, str], timeout: float):
        self.dirs = state_dir
        self.env = env
        self.timeout = timeout
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self.spawned: dict[str, Record] = {}

    def start(self, component: Component) -> Started:
        began = time.monotonic()
        record, updates = component.start(self)
        record.startup_s = round(time.monotonic() - began, 2)
        return record, updates

    def adopt(self, record: Record) -> Record:
        """Remember a process this `up` started, before waiting on it."""
        with self._lock:
            self.spawned[record.name] = record
        return record

    def popen(self, component: Component, command: list[str], env: dict[str, str],
              detail: str = "") -> tuple[subprocess.Popen, Record]:
        """Run `command` in its own session, its output appended to the component's log."""
        log = self.dirs.log(component.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:
            handle.write(f"\n=== llmp up {time.strftime('%Y-%m-%dT%H:%M:%S')}: {' '.join(command)}\n".encode())
            handle.flush()
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=PROJECT_ROOT, start_new_session=True)
        record = Record(component.name, "process", pid=process.pid,
                        start_time=servers.process_start_time(process.pid), ports=component.ports(self.env),
                        log=str(log), detail=detail, grace=component.grace)
        return process, self.adopt(record)

    def wait(self, component: Component, record: Record, process: subprocess.Popen | None) -> None:
        """Until `component` is healthy; raises (with its log's tail) when its process exits or time runs out."""
        servers.wait_until(lambda: component.healthy(record, self.env), self.timeout, process,
                           Path(record.log) if record.log else None, component.name, self.cancel)

    def require_free(self, component: Component) -> None:
        for port in component.ports(self.env):
            if servers.port_open("127.0.0.1", port):
                raise StackError(f"{component.name}: port {port} is already in use by another process; "
                                 f"stop it or move {component.name} with its LLMP_* setting")


@dataclass(frozen=True)
class PythonProcess(Component):
    """One of llmp's own processes: `python -m <module>`, on ports that must be free."""

    def command(self, launch: Launch) -> tuple[list[str], dict[str, str], str]:
        """Its command line, environment and record detail. Every process gets the stack's one service
        secret (generated into the state dir on first `up`), so each verifies what the others sign."""
        env = child_env(launch.env)
        env["LLMP_SERVICE_SECRET"] = config.Settings.from_env(env).service_secret().decode()
        return [sys.executable, "-m", self.module], env, ""

    def start(self, launch: Launch) -> Started:
        launch.require_free(self)
        command, env, detail = self.command(launch)
        process, record = launch.popen(self, command, env, detail)
        launch.wait(self, record, process)
        return record, {}
