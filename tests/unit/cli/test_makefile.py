"""The Makefile's entry points: `make help` lists every target, and the targets that run llmp install it first,
once. Every target is read from make itself (its database, dry runs), not copied from the Makefile."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
COMMENTED = re.compile(r"^([^\s#:=$][^:=]*):(?!=).*## ", re.MULTILINE)  # `target [target…]: … ## what it does`


def make(*args: str) -> str:
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def listed() -> dict[str, str]:
    """`make help`: target -> description."""
    rows = [line.split(None, 1) for line in make("help").splitlines() if line.strip()]
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


def phony() -> set[str]:
    """The .PHONY targets, with make's own expansion of the variables and functions that name them."""
    database = make("--print-data-base", "--dry-run", "help")
    lines = [line for line in database.splitlines() if line.startswith(".PHONY:")]
    assert len(lines) == 1, lines
    return set(lines[0].split(":", 1)[1].split())


def test_help_lists_every_target_with_a_description():
    help_rows = listed()
    declared = {name for match in COMMENTED.finditer((ROOT / "Makefile").read_text()) for name in match[1].split()}
    targets = phony()
    assert {"test-e2e", "test-reliability", "bench-inference"} <= targets  # the ones help once hid
    assert declared <= targets, declared - targets  # every documented target is a command, not a file
    assert sorted(targets - set(help_rows)) == []
    assert sorted(set(help_rows) - targets) == []  # nor does help name a target make does not have
    assert all(help_rows.values()), help_rows


def dry_run(target: str, venv: Path) -> str:
    return make("--dry-run", f"VENV={venv}", target)


@pytest.mark.parametrize("target", ["demo", "test"])
def test_demo_and_test_install_first_and_only_when_needed(target, tmp_path):
    venv = tmp_path / "venv"  # a virtual environment as `make` sees one: its python and the install stamp
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    install = f"{venv}/bin/pip install"
    fresh = dry_run(target, venv).splitlines()
    stamp = venv / ".installed"
    # pip, the lock, transformers 4 for its one test, llmp itself: first, then the job
    assert [line.split(" --")[0] for line in fresh[:5]] == [install] * 4 + [f"touch {stamp}"]
    assert len(fresh) > 5 and not any(line.startswith(install) for line in fresh[5:])
    stamp.touch()
    assert install not in dry_run(target, venv)  # installed: nothing to do
    lock_time = (ROOT / "requirements.lock").stat().st_mtime
    os.utime(stamp, (lock_time - 60, lock_time - 60))
    assert install in dry_run(target, venv)  # the lock changed since: install again
