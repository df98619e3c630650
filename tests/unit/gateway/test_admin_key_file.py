"""Issue 15, hygiene: the gateway's generated admin key file is private from its creation (it was written
with the umask's mode, then chmodded: a window in which other users could read the key)."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.auth import admin_key
from services.common.config import Settings


def _settings(state_dir: Path, key: str = "") -> Settings:
    return Settings.from_env({"LLMP_STATE_DIR": str(state_dir), "LLMP_ADMIN_KEY": key})


def test_the_key_file_is_created_private_without_a_chmod_afterwards(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "chmod", lambda *args, **kwargs: None)  # a fix after the fact would not count
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    previous = os.umask(0o022)
    try:
        key = admin_key(_settings(tmp_path))
    finally:
        os.umask(previous)
    path = tmp_path / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key + "\n" and key.startswith("llmp_")
    assert admin_key(_settings(tmp_path)) == key  # read back, not made again
    assert admin_key(_settings(tmp_path, "given")) == "given"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.key"]  # no temporary left behind


def test_replicas_starting_together_agree_on_one_key(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: admin_key(_settings(tmp_path)), range(32)))
    assert len(keys) == 1 and (tmp_path / "admin.key").read_text().strip() in keys
