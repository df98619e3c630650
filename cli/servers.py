"""Start the real third-party servers llmp needs as local processes: SeaweedFS S3, NVIDIA Triton (the
`tritonserver` bundled in the nvidia-pytriton wheel) and an embedded PostgreSQL (the pgserver wheel).

Used by the local launcher (`llmp up`) and by the integration-test fixtures, so tests run against the
same servers, started the same way, as a user's machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nothing is bound to now, picked at random BELOW the kernel's ephemeral
    range. A port the kernel picks (bind to port 0) comes from that range, which every outgoing
    connection also draws its local port from, so another process's client could take it between our
    pick and the server's bind ("Address already in use"); below the range only an explicit bind can."""
    low, _ = _ephemeral_range()
    floor = 10000 if low > 12000 else 1024
    rng = random.SystemRandom()
    picked: list[int] = []
    while len(picked) < count:
        port = rng.randrange(floor, low)
        if port in picked:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))  # conflicts with a listener on any IPv4 address
            except OSError:
                continue
        picked.append(port)
    return picked


def free_port() -> int:
    """A TCP port nothing is bound to now (see `free_ports`)."""
    return free_ports(1)[0]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def venv_binary(name: str) -> str:
    """A console binary installed beside the running Python (e.g. SeaweedFS's `weed`), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH; run `make install`")
    return found


@dataclass
class SeaweedPorts:
    """SeaweedFS's ports. Its gRPC ports default to HTTP port + 10000, which overflows for high free
    ports, so they are always given explicitly."""

    s3: int
    master: int
    volume: int
    filer: int
    master_grpc: int | None = None
    volume_grpc: int | None = None
    filer_grpc: int | None = None
    s3_grpc: int | None = None

    @classmethod
    def free(cls, s3: int | None = None) -> "SeaweedPorts":
        picked = free_ports(8)
        if s3 is None:
            s3, *others = picked
        else:  # the caller's S3 port (free now, so the kernel may pick it) must not be handed out again
            others = [port for port in picked if port != s3][:7]
        master, volume, filer, master_grpc, volume_grpc, filer_grpc, s3_grpc = others
        return cls(s3=s3, master=master, volume=volume, filer=filer, master_grpc=master_grpc,
                   volume_grpc=volume_grpc, filer_grpc=filer_grpc, s3_grpc=s3_grpc)

    def grpc_flags(self) -> list[str]:
        flags = []
        for name in ("master", "volume", "filer", "s3"):
            port = getattr(self, f"{name}_grpc")
            if port is None:
                port = getattr(self, name) + 10000
            if port > 65535:
                raise ValueError(f"SeaweedFS {name} gRPC port {port} is out of range; give it explicitly")
            flags.append(f"-{name}.port.grpc={port}")
        return flags


def start_seaweedfs(data_dir: Path, ports: SeaweedPorts, access_key: str, secret_key: str,
                    log_path: Path) -> subprocess.Popen:
    """Start a single-process SeaweedFS (master, volume, filer, S3 gateway) serving S3 on `ports.s3`.

    Returns once the S3 port answers; the caller owns the process.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{
        "name": "llmp",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    config = data_dir / "s3-identities.json"
    config.write_text(json.dumps(identities))
    config.chmod(0o600)
    command = [
        venv_binary("weed"), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports.master}", f"-volume.port={ports.volume}", f"-filer.port={ports.filer}",
        "-master.volumeSizeLimitMB=256", "-volume.max=0",
        "-s3", f"-s3.port={ports.s3}", f"-s3.config={config}",
        *ports.grpc_flags(),
        # Nothing else listens (these default to fixed ports that parallel servers would fight over),
        # and nothing phones home.
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        # One master: resuming its raft state only delays the leader election on restart (~20 s); the
        # volumes and the filer (the objects and their metadata) keep their data either way.
        "-master.resumeState=false",
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = spawn(command, log_path)
    try:
        wait_for_port("127.0.0.1", ports.s3, process, log_path, timeout=60)
    except BaseException:
        stop(process, timeout=3)
        raise
    return process


def spawn(command: list[str], log_path: Path, **options: Any) -> subprocess.Popen:
    """`command` in a session of its own (the caller stops its group with `stop`), its output appended to
    `log_path` (the child keeps its own descriptor).

    A Ctrl-C that lands while the child starts is held until Popen has returned, then the child is stopped and
    KeyboardInterrupt raised: raised inside Popen, it would leave the child running and owned by no one (in its
    own session, the terminal's next Ctrl-C does not reach it either)."""
    held: list[int] = []
    holding = threading.current_thread() is threading.main_thread()  # only the main thread sets handlers
    previous = signal.signal(signal.SIGINT, lambda signum, _: held.append(signum)) if holding else None
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, **options)
    finally:
        if holding:
            signal.signal(signal.SIGINT, previous)
    if held and previous is not signal.SIG_IGN:
        stop(process, timeout=3)
        raise KeyboardInterrupt
    return process


def wait_for_port(host: str, port: int, process: subprocess.Popen | None, log_path: Path | None,
                  timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {host}:{port} opened"
                               + log_tail(log_path))
        if port_open(host, port):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} did not open within {timeout:.0f}s" + log_tail(log_path))


def log_tail(log_path: Path | None, lines: int = 30) -> str:
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {log_path} ---\n" + "\n".join(tail)


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process's group, then SIGKILL what is left after `timeout`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


# --- processes we did not spawn in this Python process (recorded by `llmp up`, stopped by `llmp down`) ---

def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (field 3, the state, is index 0), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, names one process even after pid reuse."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """True while `pid` runs (zombies count as gone) and, when given, started at `start_time`."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _reap(pid: int) -> None:
    """Collect `pid` if it is our own child (in-process callers), so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_group(pgid: int, grace: float, signum: int = signal.SIGTERM) -> bool:
    """Send `signum` to the group, wait up to `grace` s for all of it to exit, then SIGKILL what is left.

    Returns True when the group exited within the grace (False when it had to be killed).
    """
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pgid)
        if not group_members(pgid):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        _reap(pgid)
        time.sleep(0.05)
    _reap(pgid)
    return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (local URLs only)
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(check, timeout: float, process: subprocess.Popen | None = None, log_path: Path | None = None,
               what: str = "server", cancel=None) -> None:
    """Poll `check()` until it is true; fail early when `process` exits or `cancel` (an Event) is set."""
    deadline = time.monotonic() + timeout
    while True:
        if cancel is not None and cancel.is_set():
            raise InterruptedError(f"cancelled while waiting for {what}")
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready" + log_tail(log_path))
        if check():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} was not ready within {timeout:.0f}s" + log_tail(log_path))
        time.sleep(0.2)


# --- NVIDIA Triton (the tritonserver shipped in the nvidia-pytriton wheel) ---

@dataclass
class TritonPorts:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> "TritonPorts":
        return cls(http=free_port(), grpc=free_port(), metrics=free_port())


def triton_dist() -> Path:
    """pytriton's bundled Triton: bin/tritonserver, backends/python, caches/, python_backend_stubs/<x.y>/."""
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def triton_backends(directory: Path) -> Path:
    """A `--backend-directory` for the bundled Triton: its Python backend plus the stub for this Python.

    pytriton copies the whole server into a workspace and puts the stub matching the running Python
    beside `libtriton_python.so` (the backend looks for `triton_python_backend_stub` there). Symlinks do
    the same without copying; the binaries' RPATH ($ORIGIN/../../../../nvidia_pytriton.libs) resolves
    through them to the wheel's libraries.
    """
    dist = triton_dist()
    python_dir = directory / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    links = {
        "libtriton_python.so": dist / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": dist / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": dist / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, target in links.items():
        if not target.exists():
            raise FileNotFoundError(f"{target} is missing: nvidia-pytriton has no Triton for Python {version}")
        link = python_dir / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            link.unlink()
        link.symlink_to(target)
    return directory


def triton_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver needs: this Python's libpython first on LD_LIBRARY_PATH (else the Python
    backend stub loads another libpython3.x and fails with `'_thread.RLock' object has no attribute
    '_recursion_count'`), the wheel's libraries, and this venv's bin first on PATH so the stub's embedded
    Python finds the venv (its site-packages: numpy, onnxruntime...)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = [libdir, str(triton_dist().parent.parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(part for part in libs if part)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def triton_command(model_repository: Path | str, ports: TritonPorts, backends_dir: Path,
                   bind_host: str = "127.0.0.1") -> list[str]:
    """tritonserver's command line, as pytriton builds it, in explicit model-control mode."""
    dist = triton_dist()
    return [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={model_repository}",
        "--model-control-mode=explicit",
        f"--backend-directory={backends_dir}",
        f"--cache-directory={dist / 'caches'}",
        f"--http-address={bind_host}", f"--http-port={ports.http}",
        f"--grpc-address={bind_host}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={bind_host}", f"--metrics-port={ports.metrics}",
        # Python-backend shared memory regions are named by this prefix: unique, so servers never collide.
        f"--backend-config=python,shm-region-prefix-name=llmp{uuid.uuid4().hex[:12]}_",
        "--exit-timeout-secs=5",
        "--log-verbose=0",
    ]


def triton_ready(http_port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    return http_ok(f"http://{host}:{http_port}/v2/health/ready", timeout=timeout)


def start_triton(model_repository: Path | str, ports: TritonPorts, log_path: Path, *,
                 backends_dir: Path | None = None, bind_host: str = "127.0.0.1", wait: bool = True,
                 timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start tritonserver serving `model_repository` (explicit model control) on `ports`.

    Returns once `GET /v2/health/ready` answers 200 (unless `wait=False`); the caller owns the process
    (its own process group: stop it with `stop()`).
    """
    if isinstance(model_repository, Path) or "://" not in str(model_repository):
        Path(model_repository).mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    backends = triton_backends(backends_dir or log_path.parent / "triton-backends")
    command = triton_command(model_repository, ports, backends, bind_host)
    process = spawn(command, log_path, env=triton_env(env))
    if wait:
        try:
            wait_until(lambda: triton_ready(ports.http), timeout, process, log_path, "tritonserver")
        except BaseException:
            stop(process)
            raise
    return process


# --- PostgreSQL from the pgserver wheel (initdb / pg_ctl, run as an unprivileged user under root) ---

def postgres_bin(name: str) -> str:
    """A PostgreSQL program from the pgserver wheel (found without importing pgserver, whose import has
    side effects: a runtime dir, a lock file, a warning when XDG_RUNTIME_DIR is unset)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pgserver wheel is not installed; run `make install`")
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


def _postgres_os_user() -> str | None:
    """PostgreSQL refuses to run as root: under root it runs as `pgserver` (the user pgserver's own
    launcher creates for the same reason)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("pgserver")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", "pgserver"],
                       check=True, capture_output=True)
    return "pgserver"


def _run_as(user: str | None) -> dict:
    """subprocess keyword arguments running a command as `user`, with its own group only (keeping root's
    group would make group permission bits, not the other bits we grant, decide its access)."""
    if user is None:
        return {}
    import pwd

    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _grant(path: Path, user: str) -> None:
    """Give `user` `path`, and let it traverse the folders above (o+x), as pgserver does."""
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def postgres_pid(data_dir: Path) -> int | None:
    """The postmaster's pid from `postmaster.pid`, when that process runs."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    return pid if process_alive(pid) else None


def start_postgres(data_dir: Path, port: int, log_path: Path, *, user: str = "postgres",
                   host: str = "127.0.0.1", timeout: float = 60) -> int:
    """initdb `data_dir` (first time; trust auth, superuser `user`) and start PostgreSQL on host:port.

    The server daemonizes (pg_ctl); returns the postmaster's pid once it accepts connections. Stop it
    with `stop_postgres(data_dir)`.
    """
    os_user = _postgres_os_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.touch()
    if os_user:
        _grant(data_dir, os_user)
        _grant(log_path, os_user)
    with open(log_path, "ab") as log:
        if not (data_dir / "PG_VERSION").exists():
            initdb = subprocess.run([postgres_bin("initdb"), "-D", str(data_dir), "--auth=trust", "--encoding=utf8",
                                     "-U", user], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=timeout, **_run_as(os_user))
            if initdb.returncode != 0:
                raise RuntimeError(f"initdb exited with {initdb.returncode}" + log_tail(log_path, 10))
        # Unix sockets in the data dir when its path fits (108 bytes), else TCP only.
        socket_dir = str(data_dir) if len(str(data_dir)) < 90 else "''"
        options = f"-p {port} -c listen_addresses={host} -k {socket_dir}"
        result = subprocess.run([postgres_bin("pg_ctl"), "-D", str(data_dir), "-l", str(log_path), "-w",
                                 "-t", str(int(timeout)), "-o", options, "start"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout + 5,
                                stdin=subprocess.DEVNULL, **_run_as(os_user))
    if result.returncode != 0:
        raise RuntimeError(f"pg_ctl start failed: {result.stdout.decode(errors='replace').strip()}"
                           + log_tail(log_path))
    pid = postgres_pid(data_dir)
    if pid is None:
        raise RuntimeError("PostgreSQL started but postmaster.pid names no running process" + log_tail(log_path))
    return pid


def stop_postgres(data_dir: Path, timeout: float = 30) -> None:
    """`pg_ctl stop -m fast` (rolls back open transactions, checkpoints, exits); kills it if that fails."""
    pid = postgres_pid(data_dir)
    if pid is None:
        return
    result = subprocess.run([postgres_bin("pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w",
                             "-t", str(int(timeout)), "stop"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, **_run_as(_postgres_os_user()))
    if result.returncode != 0 and process_alive(pid):
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
