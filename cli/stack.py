"""The local stack: `llmp up | down | status`.

`up` starts every component as a local process, in dependency order (each level in parallel), and
returns once all are healthy; `down` stops exactly what `up` recorded; `status` shows it. What `up`
started, and the settings it resolved, live in `<LLMP_STATE_DIR>/stack.json`, so `down`, `status` and
the other `llmp` commands agree on one stack:

    <state>/stack.json         what runs: per component its mode, pid, ports, log; the resolved LLMP_* env
    <state>/pids/<name>.pid    one per process we started
    <state>/logs/<name>.log    each component's output
    <state>/postgres/data      the embedded PostgreSQL (when LLMP_DATABASE_URL is not reachable)
    <state>/s3/                SeaweedFS data
    <state>/broker/            the SQLite Celery broker (when LLMP_BROKER_URL is not reachable)
    <state>/triton-models/     Triton's model repository (unless LLMP_TRITON_MODEL_REPOSITORY)
    <state>/admin.key          the bootstrap admin key (when LLMP_ADMIN_KEY is unset)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cli import servers
from services.common import config, topology
from services.common.errors import InvalidArgument

STATE_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCAL_HOSTS = {"", "127.0.0.1", "localhost", "::1", "0.0.0.0"}
TRUE = {"1", "true", "yes", "on"}



class StackError(RuntimeError):
    """`up`/`down` could not do what was asked; the message says why (and shows the failing log)."""


# --- the components and their order -------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    name: str
    requires: tuple[str, ...] = ()
    module: str | None = None  # python module it runs (must exist before `up` starts anything)
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL on `down`


INFRA = ("postgres", "s3", "broker", "triton")
COMPONENTS: tuple[Component, ...] = (
    Component("postgres"),
    Component("s3", grace=3.0),  # SeaweedFS drains its filer subscriptions for ~25 s on SIGTERM
    Component("broker"),
    Component("triton"),
    Component(topology.DATASET.name, ("postgres", "s3"), topology.DATASET.module),
    Component(topology.TRAINING.name, ("postgres", "s3", "broker"), topology.TRAINING.module),
    Component(topology.REGISTRY.name, ("postgres", "s3"), topology.REGISTRY.module),
    Component(topology.INFERENCE.name, ("postgres", "s3", "triton"), topology.INFERENCE.module),
    Component("worker", ("postgres", "s3", "broker"), topology.WORKER_APP, grace=30.0),
    Component("gateway", tuple(s.name for s in topology.GRPC_SERVICES), topology.GATEWAY_MODULE),
)
BY_NAME = {component.name: component for component in COMPONENTS}


def select(names: Iterable[str] | None, components: Mapping[str, Component] = BY_NAME) -> list[str]:
    """The named components plus everything they require (all when `names` is None), in table order."""
    if names is None:
        return list(components)
    unknown = sorted(set(names) - set(components))
    if unknown:
        raise StackError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(components)}")
    chosen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in chosen:
            chosen.add(name)
            pending.extend(components[name].requires)
    return [name for name in components if name in chosen]


def start_levels(names: Iterable[str], components: Mapping[str, Component] = BY_NAME) -> list[list[str]]:
    """Group `names` into levels: each level only requires earlier ones, so a level starts in parallel."""
    remaining = list(names)
    placed: set[str] = set()
    levels: list[list[str]] = []
    while remaining:
        level = [n for n in remaining if all(r in placed or r not in remaining for r in components[n].requires)]
        if not level:
            raise StackError(f"dependency cycle among {', '.join(remaining)}")
        levels.append(level)
        placed.update(level)
        remaining = [n for n in remaining if n not in placed]
    return levels


def missing_modules(names: Iterable[str], components: Mapping[str, Component] = BY_NAME,
                    find_spec: Callable = importlib.util.find_spec) -> dict[str, str]:
    """Components whose python module does not exist (yet): name -> module."""
    missing = {}
    for name in names:
        module = components[name].module
        if module is None:
            continue
        try:
            found = find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing[name] = module
    return missing


# --- settings ----------------------------------------------------------------------------------

def base_env(environ: Mapping[str, str], cwd: Path | None = None) -> dict[str, str]:
    """Every LLMP_* setting (services' and the launcher's) from `environ` over the defaults, with the
    state dir made absolute and the local defaults that depend on it filled in. Pure."""
    variables = config.VARIABLES
    env = {v.name: environ.get(v.name, v.default) for v in variables}
    state = Path(env["LLMP_STATE_DIR"])
    if not state.is_absolute():
        state = (cwd or Path.cwd()) / state
    env["LLMP_STATE_DIR"] = str(state)
    if not env["LLMP_TRITON_MODEL_REPOSITORY"]:
        env["LLMP_TRITON_MODEL_REPOSITORY"] = str(state / "triton-models")
    return env


def child_env(env: Mapping[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a service process: the caller's, without its LLMP_* variables, plus the
    resolved settings the services know (launcher-only variables stay out: services reject them)."""
    source = os.environ if environ is None else environ
    result = {k: v for k, v in source.items() if not k.startswith("LLMP_")}
    result.update({k: v for k, v in env.items() if k in config.DEFAULTS})
    result["PATH"] = f"{Path(sys.executable).parent}:{result.get('PATH', '/usr/bin:/bin')}"
    result["PYTHONUNBUFFERED"] = "1"
    return result


def host_port(address: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' (or a URL) -> (host, port)."""
    if "://" in address:
        parts = urlsplit(address)
        return parts.hostname or "127.0.0.1", parts.port or default_port or 0
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        if default_port is None:
            raise StackError(f"{address!r} has no port")
        return address, default_port
    return host or "127.0.0.1", int(port)


def with_port(url: str, host: str, port: int, default_user: str | None = None) -> str:
    """`url` moved to host:port, keeping user (`default_user` when it has none), password, path and query."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0] or (default_user or "")
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def component_ports(name: str, env: Mapping[str, str]) -> list[int]:
    """The ports `name` listens on under `env` (those `up` requires free and `down` waits to close)."""
    if name == "postgres":
        return [host_port(env["LLMP_DATABASE_URL"], topology.POSTGRES_PORT)[1]]
    if name == "s3":
        return [host_port(env["LLMP_S3_ENDPOINT"])[1]]
    if name == "broker":
        return [host_port(env["LLMP_BROKER_URL"], topology.REDIS_PORT)[1]] if "://" in env["LLMP_BROKER_URL"] \
            and not env["LLMP_BROKER_URL"].startswith("sqla+") else []
    if name == "triton":
        return [host_port(env["LLMP_TRITON_HTTP_URL"])[1], host_port(env["LLMP_TRITON_GRPC_URL"])[1],
                int(env["LLMP_TRITON_METRICS_PORT"])]
    if name in topology.SERVICES_BY_NAME:
        return [host_port(env[topology.SERVICES_BY_NAME[name].addr_env])[1]]
    if name == "gateway":
        return [int(env["LLMP_GATEWAY_PORT"])]
    return []


def admin_key(env: dict[str, str]) -> str:
    """LLMP_ADMIN_KEY, else the key in <state>/admin.key, else a new one written there (mode 0600)."""
    if env.get("LLMP_ADMIN_KEY"):
        return env["LLMP_ADMIN_KEY"]
    path = Path(env["LLMP_STATE_DIR"]) / "admin.key"
    if path.exists():
        return path.read_text().strip()
    key = "llmp-admin-" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


# --- the state file ------------------------------------------------------------------------------

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
    grace: float = 10.0

    def alive(self) -> bool:
        if self.mode in ("external", "file"):
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
        for name in BY_NAME:
            record = state.records.get(name)
            if record is not None and record.pid is not None:
                self.pid_file(name).write_text(f"{record.pid}\n")
            else:
                self.pid_file(name).unlink(missing_ok=True)

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


# --- health --------------------------------------------------------------------------------------

def postgres_healthy(url: str, timeout: float = 2.0) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True) as connection:
            return connection.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:
        return False


def s3_client(env: Mapping[str, str], timeout: float = 3.0):
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout, read=timeout),
                               retries=urllib3.Retry(total=0))
    return Minio(env["LLMP_S3_ENDPOINT"], access_key=env["LLMP_S3_ACCESS_KEY"],
                 secret_key=env["LLMP_S3_SECRET_KEY"], secure=env["LLMP_S3_SECURE"].strip().lower() in TRUE,
                 region=env["LLMP_S3_REGION"], http_client=http)


def s3_healthy(env: Mapping[str, str], timeout: float = 3.0) -> bool:
    """The credentials work and the bucket exists."""
    try:
        return s3_client(env, timeout).bucket_exists(env["LLMP_S3_BUCKET"])
    except Exception:  # minio's and urllib3's errors alike: not healthy
        return False


def broker_healthy(url: str, timeout: float = 2.0) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            return True
    except Exception:  # kombu surfaces each transport's own errors
        return False


def broker_reachable(url: str) -> bool:
    """A networked broker (Redis, AMQP) that answers; checks the port first so a closed one fails fast."""
    if "://" in url and not url.startswith("sqla+"):
        host, port = host_port(url, topology.REDIS_PORT)
        if not servers.port_open(host, port):
            return False
    return broker_healthy(url)


def grpc_healthy(address: str, timeout: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def broker_supports_broadcast(url: str) -> bool:
    """Remote control (`celery inspect ping`) needs fanout across processes: Redis and AMQP have it,
    the SQLite (SQLAlchemy) broker does not."""
    return url.split("://", 1)[0] in {"redis", "rediss", "amqp", "amqps", "pyamqp"}


def worker_healthy(record: Record, env: Mapping[str, str], timeout: float = 2.0) -> bool:
    """The worker answers a Celery ping (Redis/AMQP), or, on a broker without broadcast, its log says it is
    ready (it logs `<node> ready.` once it consumes)."""
    if not record.alive():
        return False
    if broker_supports_broadcast(env["LLMP_BROKER_URL"]):
        from celery import Celery

        app = Celery("llmp-launcher", broker=env["LLMP_BROKER_URL"], set_as_current=False)
        try:
            replies = app.control.ping(destination=[record.detail], timeout=timeout)
        except Exception:  # the broker's own errors
            return False
        finally:
            app.close()
        return any(record.detail in reply for reply in replies)
    log = Path(record.log or "")
    return log.exists() and f"{record.detail} ready." in log.read_text(errors="replace")


def healthy(record: Record, env: Mapping[str, str], timeout: float = 2.0) -> bool:
    """Is `record`'s component doing its job now?"""
    if not record.alive():
        return False
    name = record.name
    if name == "postgres":
        return postgres_healthy(env["LLMP_DATABASE_URL"], timeout)
    if name == "s3":
        return s3_healthy(env, timeout)
    if name == "broker":
        return broker_healthy(env["LLMP_BROKER_URL"], timeout)
    if name == "triton":
        host, port = host_port(env["LLMP_TRITON_HTTP_URL"])
        return servers.triton_ready(port, host, timeout)
    if name in topology.SERVICES_BY_NAME:
        return grpc_healthy(env[topology.SERVICES_BY_NAME[name].addr_env], timeout)
    if name == "worker":
        return worker_healthy(record, env, timeout)
    if name == "gateway":
        return servers.http_ok(f"http://127.0.0.1:{env['LLMP_GATEWAY_PORT']}/readyz", timeout)
    raise StackError(f"no health check for {name}")


# --- starting ------------------------------------------------------------------------------------

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

    # bookkeeping

    def _spawned(self, record: Record) -> Record:
        with self._lock:
            self.spawned[record.name] = record
        return record

    def _popen(self, name: str, command: list[str], env: dict[str, str], grace: float,
               detail: str = "") -> tuple[subprocess.Popen, Record]:
        log = self.dirs.log(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:
            handle.write(f"\n=== llmp up {time.strftime('%Y-%m-%dT%H:%M:%S')}: {' '.join(command)}\n".encode())
            handle.flush()
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=PROJECT_ROOT, start_new_session=True)
        record = Record(name, "process", pid=process.pid, start_time=servers.process_start_time(process.pid),
                        ports=component_ports(name, self.env), log=str(log), detail=detail, grace=grace)
        return process, self._spawned(record)

    def _wait(self, record: Record, process: subprocess.Popen | None, what: str) -> None:
        servers.wait_until(lambda: healthy(record, self.env), self.timeout, process,
                           Path(record.log) if record.log else None, what, self.cancel)

    def _require_free(self, name: str) -> None:
        for port in component_ports(name, self.env):
            if servers.port_open("127.0.0.1", port):
                raise StackError(f"{name}: port {port} is already in use by another process; "
                                 f"stop it or move {name} with its LLMP_* setting")

    # one function per component: returns its record and the settings it resolved

    def start(self, name: str) -> tuple[Record, dict[str, str]]:
        began = time.monotonic()
        record, updates = getattr(self, f"_start_{name}", self._start_python)(name)
        record.startup_s = round(time.monotonic() - began, 2)
        return record, updates

    def _start_postgres(self, name: str) -> tuple[Record, dict[str, str]]:
        url = self.env["LLMP_DATABASE_URL"]
        parts = urlsplit(url)
        database = parts.path.lstrip("/") or "llmp"
        host, port = parts.hostname or "127.0.0.1", parts.port or topology.POSTGRES_PORT
        server_url = urlunsplit(parts._replace(path="/postgres"))
        if servers.port_open(host, port) and postgres_healthy(server_url):
            ensure_database(server_url, database)
            return Record(name, "external", ports=[port], detail=redact(url)), {}
        # Not reachable: our own server, on that very port when it is a free local one.
        if host not in LOCAL_HOSTS or servers.port_open(host, port):
            host, port = "127.0.0.1", servers.free_port()
        superuser = parts.username or "postgres"
        url = with_port(url, host, port, default_user=superuser)
        data_dir = self.dirs.root / "postgres" / "data"
        log = self.dirs.log(name)
        pid = servers.start_postgres(data_dir, port, log, user=superuser, timeout=min(self.timeout, 60))
        record = self._spawned(Record(name, "embedded", pid=pid, start_time=servers.process_start_time(pid),
                                      ports=[port], log=str(log), detail=str(data_dir), grace=30.0))
        ensure_database(with_port(server_url, host, port, default_user=superuser), database)
        return record, {"LLMP_DATABASE_URL": url}

    def _start_s3(self, name: str) -> tuple[Record, dict[str, str]]:
        host, port = host_port(self.env["LLMP_S3_ENDPOINT"])
        if servers.port_open(host, port):
            if not s3_reachable(self.env):
                raise StackError(f"s3: {host}:{port} is in use, but not by an S3 server that accepts "
                                 f"LLMP_S3_ACCESS_KEY/LLMP_S3_SECRET_KEY")
            ensure_bucket(self.env)
            return Record(name, "external", ports=[port], detail=f"S3 at {host}:{port}"), {}
        log = self.dirs.log(name)
        minio = shutil.which("minio")
        if minio:
            data = self.dirs.root / "s3" / "minio"
            data.mkdir(parents=True, exist_ok=True)
            env = {**child_env(self.env), "MINIO_ROOT_USER": self.env["LLMP_S3_ACCESS_KEY"],
                   "MINIO_ROOT_PASSWORD": self.env["LLMP_S3_SECRET_KEY"]}
            process, record = self._popen(name, [minio, "server", str(data), "--address", f"{host}:{port}",
                                                 "--console-address", f"127.0.0.1:{servers.free_port()}"],
                                          env, BY_NAME[name].grace, detail=f"minio at {host}:{port}")
        else:
            ports = seaweed_ports(self.dirs.root / "s3" / "ports.json", port)
            process = servers.start_seaweedfs(self.dirs.root / "s3" / "seaweedfs", ports,
                                              self.env["LLMP_S3_ACCESS_KEY"], self.env["LLMP_S3_SECRET_KEY"], log)
            record = self._spawned(Record(
                name, "process", pid=process.pid, start_time=servers.process_start_time(process.pid),
                ports=[p for p in asdict(ports).values() if p], log=str(log),
                detail=f"SeaweedFS at {host}:{port}", grace=BY_NAME[name].grace))

        def ready() -> bool:
            return s3_reachable(self.env) and ensure_bucket(self.env) and s3_writable(self.env)

        servers.wait_until(ready, self.timeout, process, log, "s3", self.cancel)
        return record, {}

    def _start_broker(self, name: str) -> tuple[Record, dict[str, str]]:
        url = self.env["LLMP_BROKER_URL"]
        if not url.startswith("sqla+") and broker_reachable(url):
            return Record(name, "external", ports=component_ports(name, self.env), detail=redact(url)), {}
        # Not reachable: a broker Celery supports with no server, SQLite through SQLAlchemy.
        path = self.dirs.root / "broker" / "celery.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        url = url if url.startswith("sqla+") else f"sqla+sqlite:///{path}"
        if not broker_healthy(url):
            raise StackError(f"broker: cannot open the SQLite broker at {path}")
        return Record(name, "file", detail=url), {"LLMP_BROKER_URL": url}

    def _start_triton(self, name: str) -> tuple[Record, dict[str, str]]:
        self._require_free(name)
        http_host, http_port = host_port(self.env["LLMP_TRITON_HTTP_URL"])
        ports = servers.TritonPorts(http=http_port, grpc=host_port(self.env["LLMP_TRITON_GRPC_URL"])[1],
                                    metrics=int(self.env["LLMP_TRITON_METRICS_PORT"]))
        repository = self.env["LLMP_TRITON_MODEL_REPOSITORY"]
        if repository == str(self.dirs.root / "triton-models"):  # the default; one the user names must exist
            Path(repository).mkdir(parents=True, exist_ok=True)
        backends = servers.triton_backends(self.dirs.root / "triton-backends")
        command = servers.triton_command(repository, ports, backends, self.env["LLMP_BIND_HOST"])
        env = servers.triton_env(child_env(self.env))
        process, record = self._popen(name, command, env, BY_NAME[name].grace, detail=f"http {http_port}")
        self._wait(record, process, "triton")
        return record, {}

    def _start_python(self, name: str) -> tuple[Record, dict[str, str]]:
        component = BY_NAME[name]
        self._require_free(name)
        env = child_env(self.env)
        detail = ""
        if name == "worker":
            detail = f"llmp-worker-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
            command = [sys.executable, "-m", "celery", "-A", component.module, "worker", "-Q", "gpu",
                       "--concurrency", "1", "--prefetch-multiplier", "1", "-n", detail, "--loglevel", "INFO"]
        else:
            command = [sys.executable, "-m", component.module]
            if name == "gateway":
                env["LLMP_ADMIN_KEY"] = admin_key(dict(self.env))
        process, record = self._popen(name, command, env, component.grace, detail=detail)
        self._wait(record, process, name)
        return record, {}


def seaweed_ports(path: Path, s3_port: int) -> servers.SeaweedPorts:
    """SeaweedFS's internal ports: the ones of the last run when still free (its master keeps its state
    in a folder named for its port, so a stable port keeps the cluster's state), else new free ones."""
    try:
        ports = servers.SeaweedPorts(**json.loads(path.read_text()))
        ports.s3 = s3_port
        internal = [p for k, p in asdict(ports).items() if k != "s3" and p]
        if not any(servers.port_open("127.0.0.1", p) for p in internal) and s3_port not in internal:
            return ports
    except (FileNotFoundError, ValueError, TypeError):
        pass
    ports = servers.SeaweedPorts.free(s3=s3_port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(ports)))
    return ports


def redact(url: str) -> str:
    """`url` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def ensure_database(server_url: str, database: str) -> None:
    """CREATE DATABASE `database` on the server at `server_url` (its `postgres` db) unless it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # a concurrent `up` won the race
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def s3_reachable(env: Mapping[str, str]) -> bool:
    try:
        s3_client(env).list_buckets()
        return True
    except Exception:  # minio and urllib3 errors alike: not (yet) an S3 server for these credentials
        return False


def ensure_bucket(env: Mapping[str, str]) -> bool:
    client = s3_client(env)
    bucket = env["LLMP_S3_BUCKET"]
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        return True
    except Exception:  # not ready yet; the caller polls
        return False


def s3_writable(env: Mapping[str, str]) -> bool:
    """A write and a read succeed. SeaweedFS grows its first volumes on the first write (~5 s here), so
    without this probe the first upload after `up` would pay that, or time out in a short-timeout client."""
    import io

    client = s3_client(env, timeout=30.0)
    bucket, key, payload = env["LLMP_S3_BUCKET"], ".llmp/ready", b"ready"
    try:
        client.put_object(bucket, key, io.BytesIO(payload), len(payload))
        response = client.get_object(bucket, key)
        try:
            return response.read() == payload
        finally:
            response.close()
            response.release_conn()
    except Exception:  # not ready yet; the caller polls
        return False


# --- stopping ------------------------------------------------------------------------------------

def stop_record(record: Record) -> None:
    """Stop one recorded component (never one we did not start, nor a process that reused its pid)."""
    if record.mode == "embedded":
        servers.stop_postgres(Path(record.detail), timeout=record.grace)
    elif record.mode == "process" and record.pid is not None and record.alive():
        servers.stop_group(record.pid, record.grace)
    if record.mode in ("embedded", "process"):
        deadline = time.monotonic() + 10
        while any(servers.port_open("127.0.0.1", p) for p in record.ports) and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_records(records: Mapping[str, Record]) -> None:
    """Stop `records` in reverse dependency order, each level in parallel."""
    names = [name for name in BY_NAME if name in records]
    for level in reversed(start_levels(names)):
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(level)) as pool:
            list(pool.map(lambda n: stop_record(records[n]), level))


# --- the commands --------------------------------------------------------------------------------

def state_dir(environ: Mapping[str, str]) -> StateDir:
    return StateDir(Path(base_env(environ)["LLMP_STATE_DIR"]))


def up(environ: Mapping[str, str], only: Iterable[str] | None = None, timeout: float | None = None,
       out=None) -> StackState:
    """Start what is selected and not yet running; return once everything recorded is healthy."""
    out = out or sys.stdout
    fresh = base_env(environ)
    dirs = StateDir(Path(fresh["LLMP_STATE_DIR"]))
    names = select(only)
    missing = missing_modules(names)
    if missing:
        lines = "\n".join(f"  {name}: python module {module} does not exist yet" for name, module in missing.items())
        raise StackError(f"cannot start the stack:\n{lines}\n(start a subset with --only, e.g. --only "
                         f"{','.join(INFRA)})")
    with dirs.lock():
        state = dirs.load()
        if state is not None and not any(r.alive() and r.mode != "external" and r.mode != "file"
                                         for r in state.records.values()):
            state = None  # nothing of it runs any more: start afresh with today's settings
        if state is None:
            state = StackState(env=fresh)
        env = state.env
        try:  # fail on bad settings before starting anything
            config.Settings.from_env(child_env(env))
        except InvalidArgument as error:
            raise StackError(str(error)) from error
        launch = Launch(dirs, env, timeout or float(env.get("LLMP_UP_TIMEOUT", "120")))
        try:
            for level in start_levels(names):
                todo = [n for n in level if not (n in state.records and healthy(state.records[n], env))]
                # Still running but not ready (a dependency was down, and was just restarted): it recovers
                # by itself. Restarting it would collide with its own port; forgetting it would orphan it.
                recovering = [n for n in todo if state.records.get(n) is not None
                              and state.records[n].mode in ("process", "embedded") and state.records[n].alive()]
                todo = [n for n in todo if n not in recovering]
                for name in recovering:
                    _await_recovery(launch, state.records[name])
                for name in todo:
                    state.records.pop(name, None)
                if not todo:
                    continue
                results = _start_level(launch, todo)
                for name in todo:
                    record, updates = results[name]
                    state.records[name] = record
                    env.update(updates)
                    out.write(f"  {name:<10} {describe(record)} ({record.startup_s:.1f}s)\n")
                    out.flush()
                dirs.save(state)
        except BaseException:
            launch.cancel.set()
            stop_records(launch.spawned)
            for name in launch.spawned:
                state.records.pop(name, None)
            if any(record.mode in ("process", "embedded") for record in state.records.values()):
                dirs.save(state)  # what an earlier `up` started still runs
            else:
                dirs.clear()
            raise
    return state


def _await_recovery(launch: Launch, record: Record) -> None:
    """Wait until a component `up` left running is healthy again; StackError when it does not recover."""
    log = Path(record.log) if record.log else None
    try:
        servers.wait_until(lambda: healthy(record, launch.env), launch.timeout, None, log,
                           f"{record.name} (running, not ready)", launch.cancel)
    except TimeoutError as error:
        raise StackError(f"{record.name} runs (pid {record.pid}) but did not become ready: {error}") from error


def _start_level(launch: Launch, names: list[str]) -> dict[str, tuple[Record, dict[str, str]]]:
    """Start `names` in parallel; raise StackError for the first that failed (after all finished)."""
    results: dict[str, tuple[Record, dict[str, str]]] = {}
    failures: dict[str, BaseException] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(names))
    futures = {pool.submit(launch.start, name): name for name in names}
    try:
        for future in concurrent.futures.as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except Exception as error:  # reported below, with the component's log
                failures[futures[future]] = error
                launch.cancel.set()  # the others stop waiting; the caller stops what was spawned
    except BaseException:
        launch.cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        # The first real failure, not the components cancelled because of it.
        name, error = next(((n, e) for n, e in failures.items() if not isinstance(e, InterruptedError)),
                           next(iter(failures.items())))
        raise StackError(f"{name} did not come up: {error}") from error
    return results


def down(environ: Mapping[str, str], out=None) -> list[str]:
    """Stop what `up` recorded; return the names stopped."""
    out = out or sys.stdout
    dirs = state_dir(environ)
    with dirs.lock():
        state = dirs.load()
        if state is None:
            out.write(f"nothing to stop: no stack recorded in {dirs.root}\n")
            return []
        stop_records(state.records)
        dirs.clear()
    stopped = [name for name in BY_NAME if name in state.records]
    for name in stopped:
        record = state.records[name]
        verb = "stopped" if record.mode in ("process", "embedded") else "left as it was"
        out.write(f"  {name:<10} {verb} ({describe(record)})\n")
    return stopped


def status(environ: Mapping[str, str]) -> list[dict]:
    """One row per recorded component: its mode, pid, ports, health and log."""
    dirs = state_dir(environ)
    state = dirs.load()
    if state is None:
        return []
    names = [n for n in BY_NAME if n in state.records]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        health = dict(zip(names, pool.map(lambda n: healthy(state.records[n], state.env), names), strict=True))
    return [{"name": n, "mode": state.records[n].mode, "pid": state.records[n].pid,
             "ports": state.records[n].ports, "healthy": health[n], "log": state.records[n].log,
             "detail": state.records[n].detail} for n in names]


def describe(record: Record) -> str:
    """One line about a record: `pid 123 port 5432` or `external: postgresql://…`."""
    ports = f" port {','.join(map(str, record.ports))}" if record.ports else ""
    if record.mode == "process":
        return f"pid {record.pid}{ports}"
    return f"{record.mode}: {record.detail}{ports}"


def format_table(rows: list[dict]) -> str:
    header = ("COMPONENT", "MODE", "PID", "PORTS", "HEALTHY", "LOG")
    table = [header] + [(r["name"], r["mode"], str(r["pid"] or "-"), ",".join(map(str, r["ports"])) or "-",
                         "yes" if r["healthy"] else "NO", r["log"] or r["detail"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in table)


# --- argparse wiring (registered by cli.main) ---------------------------------------------------

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    # `kill` of `llmp up` cleans up like Ctrl-C; SIGINT is set explicitly because a process started in
    # the background of a non-interactive shell (CI) inherits it ignored, and Python then never raises
    # KeyboardInterrupt.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    began = time.monotonic()
    try:
        state = up(os.environ, only, args.timeout)
    except StackError as error:
        print(f"llmp up failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmp up interrupted: stopped what it had started", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stack healthy in {time.monotonic() - began:.1f}s; state in {state.env['LLMP_STATE_DIR']}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    down(os.environ)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = status(os.environ)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("the stack is not running (no stack.json)")
    else:
        print(format_table(rows))
    return 0 if rows and all(r["healthy"] for r in rows) else 1


def register(commands: argparse._SubParsersAction) -> None:
    names = ", ".join(BY_NAME)
    parser = commands.add_parser("up", help="start the local stack and wait until it is healthy")
    parser.add_argument("--only", metavar="A,B", help=f"start these components and what they need ({names})")
    parser.add_argument("--timeout", type=float, help="seconds to wait for each component (LLMP_UP_TIMEOUT)")
    parser.set_defaults(func=cmd_up)
    parser = commands.add_parser("down", help="stop what `llmp up` started")
    parser.set_defaults(func=cmd_down)
    parser = commands.add_parser("status", help="show the local stack (exit 1 unless all healthy)")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.set_defaults(func=cmd_status)
