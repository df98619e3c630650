"""Process and command-line helpers of cli/servers.py (the servers themselves: tests/integration/cli)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cli import servers


def test_seaweed_grpc_ports_are_explicit_and_in_range():
    ports = servers.SeaweedPorts.free()
    flags = ports.grpc_flags()
    assert len(flags) == 4 and all(0 < int(flag.split("=")[1]) <= 65535 for flag in flags)
    with pytest.raises(ValueError, match="out of range"):
        servers.SeaweedPorts(s3=9000, master=60000, volume=1, filer=2).grpc_flags()
    assert servers.SeaweedPorts(s3=9000, master=9333, volume=1, filer=2).grpc_flags()[0] == "-master.port.grpc=19333"


def test_triton_backends_hold_the_stub_for_this_python(tmp_path):
    backends = servers.triton_backends(tmp_path / "backends")
    python = backends / "python"
    assert {p.name for p in python.iterdir()} == {"libtriton_python.so", "triton_python_backend_utils.py",
                                                   "triton_python_backend_stub"}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert python.joinpath("triton_python_backend_stub").resolve().parent.name == version
    assert servers.triton_backends(tmp_path / "backends") == backends  # idempotent


def test_triton_env_puts_this_pythons_libpython_first():
    env = servers.triton_env({"LD_LIBRARY_PATH": "/opt/x", "PATH": "/usr/bin"})
    parts = env["LD_LIBRARY_PATH"].split(":")
    assert parts[0] == sysconfig.get_config_var("LIBDIR") and parts[-1] == "/opt/x"
    assert env["PATH"] == f"{Path(sys.executable).parent}:/usr/bin"


def test_triton_command_uses_explicit_model_control_and_the_given_ports(tmp_path):
    command = servers.triton_command(tmp_path / "models", servers.TritonPorts(1, 2, 3), tmp_path / "b", "127.0.0.1")
    assert "--model-control-mode=explicit" in command
    expected = {"--http-port=1", "--grpc-port=2", "--metrics-port=3", f"--backend-directory={tmp_path / 'b'}"}
    assert expected <= set(command)
    prefixes = {arg for arg in command if "shm-region-prefix-name" in arg}
    other = {arg for arg in servers.triton_command("m", servers.TritonPorts(1, 2, 3), tmp_path, "h")
             if "shm-region-prefix-name" in arg}
    assert prefixes and prefixes != other  # two servers never share shared-memory regions


def test_stop_group_stops_children_too():
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    start = servers.process_start_time(process.pid)
    servers.wait_until(lambda: len(servers.group_members(process.pid)) == 2, 10)
    assert servers.stop_group(process.pid, grace=5) is True
    assert servers.group_members(process.pid) == []
    assert not servers.process_alive(process.pid, start)
    process.wait(5)  # already reaped by stop_group; this only tells the Popen object


def test_stop_group_kills_what_ignores_sigterm():
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print('ready', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"ready"
    start = servers.process_start_time(process.pid)
    assert servers.stop_group(process.pid, grace=0.5) is False  # had to SIGKILL
    assert not servers.process_alive(process.pid, start) and servers.group_members(process.pid) == []
    process.wait(5)
    process.stdout.close()


def test_wait_until_reports_an_exited_process_with_its_log(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("line one\nfatal: it broke\n")
    process = subprocess.Popen(["false"])
    with pytest.raises(RuntimeError, match="(?s)exited with 1.*fatal: it broke"):
        servers.wait_until(lambda: False, 10, process, log, "thing")
    assert os.path.exists(log)
