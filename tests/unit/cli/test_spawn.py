"""`servers.spawn`: a Ctrl-C that lands while a server's process starts leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from cli import servers


def test_a_ctrl_c_inside_popen_stops_the_child_and_is_raised(tmp_path, monkeypatch):
    started: list[subprocess.Popen] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):  # the signal arrives after the fork, before Popen returns
        started.append(real(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGINT)
        return started[-1]
    monkeypatch.setattr(servers.subprocess, "Popen", popen)
    with pytest.raises(KeyboardInterrupt):
        servers.spawn(["sleep", "60"], tmp_path / "log")
    assert started[0].poll() is not None, "the child was left running"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is back to normal


def test_without_a_ctrl_c_the_child_runs_and_logs(tmp_path):
    process = servers.spawn(["sh", "-c", "echo started"], tmp_path / "log")
    assert process.wait(10) == 0 and (tmp_path / "log").read_text() == "started\n"
