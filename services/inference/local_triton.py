"""Run the `tritonserver` bundled in the `nvidia-pytriton` wheel as a local process.

What it takes, learned the hard way (the launcher's `cli/servers.py` can adopt this as is):
- The wheel's Python backend ships one stub per Python version under
  `pytriton/tritonserver/python_backend_stubs/<X.Y>/`; the backend directory must hold
  `python/libtriton_python.so`, `python/triton_python_backend_utils.py` and the stub for the running
  Python as `python/triton_python_backend_stub`. We assemble that directory under the state dir
  (symlinks, except the stub which is copied) and point `--backend-directory` at it. The copied stub
  loses its relative RPATH, so the wheel's `nvidia_pytriton.libs` goes on `LD_LIBRARY_PATH`.
- `LD_LIBRARY_PATH` must start with the running Python's `sysconfig LIBDIR`, else the stub loads the
  system libpython (another 3.11 build) and dies with
  `'_thread.RLock' object has no attribute '_recursion_count'`.
- The stub embeds that libpython and imports the model's packages (onnxruntime, numpy) from the
  interpreter found first on `PATH`, so the venv's `bin` goes first on `PATH` (what pytriton does).
- `--model-control-mode=explicit`: the inference service loads and unloads models itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytriton

from cli.servers import free_port, log_tail, port_open

PYTRITON_DIR = Path(pytriton.__file__).parent / "tritonserver"


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> "TritonPorts":
        return cls(http=free_port(), grpc=free_port(), metrics=free_port())


def backend_directory(work_dir: Path) -> Path:
    """A backends/ directory whose python backend runs the stub built for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = PYTRITON_DIR / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    python_dir = work_dir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (PYTRITON_DIR / "backends" / "python").iterdir():
        if item.name == "__pycache__":
            continue
        link = python_dir / item.name
        if not link.exists():
            link.symlink_to(item)
    target = python_dir / "triton_python_backend_stub"
    if not target.exists():
        shutil.copy2(stub, target)
    return work_dir / "backends"


def triton_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    bundled = PYTRITON_DIR.parent.parent / "nvidia_pytriton.libs"  # the copied stub loses its RPATH to these
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, str(bundled), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def start_triton(model_repository: Path, ports: TritonPorts, log_path: Path, *, work_dir: Path | None = None,
                 timeout: float = 60.0) -> subprocess.Popen:
    """Start tritonserver (explicit model control) and return once its HTTP health endpoint is live."""
    model_repository.mkdir(parents=True, exist_ok=True)
    work_dir = work_dir or log_path.parent / "triton"
    command = [
        str(PYTRITON_DIR / "bin" / "tritonserver"),
        f"--model-repository={model_repository}",
        "--model-control-mode=explicit",
        f"--backend-directory={backend_directory(work_dir)}",
        f"--cache-directory={PYTRITON_DIR / 'caches'}",
        f"--http-port={ports.http}", f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}",
        "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
        "--allow-metrics=true", "--allow-gpu-metrics=false", "--strict-readiness=false",
        "--exit-timeout-secs=5", "--log-verbose=0",
    ]
    log = open(log_path, "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=triton_environment(),
                               start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {process.returncode}" + log_tail(log_path))
        if port_open("127.0.0.1", ports.http) and port_open("127.0.0.1", ports.grpc):
            return process
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"tritonserver did not open its ports within {timeout:.0f}s" + log_tail(log_path))
