"""The main job from an installed wheel, as the images run llmp: no source tree anywhere.

The wheel is built as the Dockerfiles build it (from the files they COPY), installed with the
dependencies the images install (requirements-runtime.lock) into a fresh virtual environment outside
the checkout, and that installation's `llmp up` runs the stack: dataset -> training -> export ->
deployment -> completion. A data file the package lacks (a migration, the Triton model template, a
console asset) or a run-time dependency the lock's run-time part lacks fails here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cli.client import Client

from .stack_env import stack_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _images_helper():
    spec = importlib.util.spec_from_file_location("images", ROOT / "tests" / "unit" / "deploy" / "images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment outside the checkout holding the runtime lock and llmp's wheel."""
    where = tmp_path_factory.mktemp("installed")
    wheel = _images_helper().build_wheel(where / "wheel")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements-runtime.lock")], check=True, timeout=900)
    subprocess.run([*pip, str(wheel)], check=True, timeout=300)
    return venv


def test_the_main_job_runs_from_the_installed_wheel(installed, tmp_path, claim_broker):
    python = installed / "bin" / "python"
    located = subprocess.run([str(python), "-c", "import services, cli; print(services.__file__, cli.__file__)"],
                             capture_output=True, text=True, cwd=tmp_path,
                             env={"PATH": os.environ["PATH"]}, check=True)
    assert str(ROOT) not in located.stdout and str(installed) in located.stdout, located.stdout

    with stack_settings(tmp_path / "state", claim_broker("installed-wheel-stack"), "wheel") as (settings, admin_key):
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_") and key != "PYTHONPATH"}
        env |= settings | {"PATH": f"{installed / 'bin'}:{os.environ['PATH']}"}
        _main_job(installed, tmp_path, env, admin_key, int(settings["LLMP_GATEWAY_PORT"]))


def _main_job(installed: Path, tmp_path: Path, env: dict[str, str], admin_key: str, gateway: int) -> None:
    def llmp(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(installed / "bin" / "llmp"), *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)

    started = time.monotonic()
    try:
        up = llmp("up")
        assert up.returncode == 0, f"llmp up from the wheel failed after {time.monotonic() - started:.0f}s:\n" \
                                   f"{up.stdout}\n{up.stderr}"
        from cli import demo

        client = Client(f"http://127.0.0.1:{gateway}", admin_key)
        corpus = demo.stdlib_docstrings(limit_bytes=100_000)
        text = demo.run(client, corpus, max_steps=20, prompt="Return the ")
        assert isinstance(text, str) and text
        assert client.call("GET", "/v1/status")["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway}/", timeout=10) as console:  # packaged assets
            assert console.status == 200 and b"<html" in console.read().lower()
    finally:
        llmp("down")
