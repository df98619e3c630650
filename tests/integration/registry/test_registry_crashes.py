"""Registrations SIGKILLed at random points never leave a READY version with a missing or wrong artifact,
and the sweep collects what they left."""

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.registry import registration

from .conftest import upload_folder

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("register_child.py")


def run_child(settings_env, tenant, model, prefix, kill_after: float | None) -> tuple[float, bool]:
    """Start a registration; SIGKILL it after `kill_after` seconds. Returns (seconds, finished)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMP_")}, **settings_env}
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, str(CHILD), tenant, model, prefix], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if kill_after is not None:
        try:
            child.wait(kill_after)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=120)
    return time.monotonic() - started, b"registered" in out


async def check_ready_versions_intact(registry, tenant: str, model: str) -> set[int]:
    async with registry.db.pool.connection() as conn:
        ready = await (await conn.execute(
            "SELECT version, digest FROM registry_versions WHERE tenant = %s AND name = %s AND state = 'READY'",
            (tenant, model))).fetchall()
        artifacts = await (await conn.execute(
            "SELECT version, path, key, size, sha256 FROM registry_artifacts WHERE tenant = %s AND name = %s",
            (tenant, model))).fetchall()
    for row in ready:
        mine = [item for item in artifacts if item["version"] == row["version"]]
        assert len(mine) >= 5, f"READY v{row['version']} has {len(mine)} artifacts"
        for item in mine:
            data = await asyncio.to_thread(registry.store.get_bytes, item["key"])
            assert len(data) == item["size"] and hashlib.sha256(data).hexdigest() == item["sha256"], item["key"]
    return {row["version"] for row in ready}


async def test_killed_registrations_never_leave_a_broken_ready_version(registry, settings_env, checkpoint, tenant):
    # A checkpoint with enough objects that a kill lands mid-copy.
    prefix = f"jobs/{tenant}/crash/final/"
    await asyncio.to_thread(upload_folder, registry.store, checkpoint, prefix)
    for index in range(24):
        await asyncio.to_thread(registry.store.put_bytes, f"{prefix}extra/blob-{index:02d}.bin",
                                os.urandom(256 * 1024))

    full, finished = await asyncio.to_thread(run_child, settings_env, tenant, "crashy", prefix, None)
    assert finished
    rng = random.Random(5)
    outcomes = []

    async def pending_count() -> int:
        async with registry.db.pool.connection() as conn:
            return (await (await conn.execute(
                "SELECT count(*) AS n FROM registry_versions WHERE tenant = %s AND name = 'crashy' "
                "AND state = 'PENDING'", (tenant,))).fetchone())["n"]

    # At least 6 kills at random points; more (up to 20) until one has landed mid-registration, since
    # how much of `full` is process start-up rather than registration depends on the machine's load.
    for attempt in range(20):
        if attempt >= 6 and await pending_count() >= 1:
            break
        delay = rng.uniform(0.0, full)
        _, done = await asyncio.to_thread(run_child, settings_env, tenant, "crashy", prefix, delay)
        outcomes.append(done)
        await check_ready_versions_intact(registry, tenant, "crashy")
    pending = await pending_count()
    assert pending >= 1, "no kill landed mid-registration in 20 tries: the test proves nothing"
    await asyncio.sleep(0.6)  # let the last killed registration's lease run out
    report = await registration.sweep(registry.db, registry.store, lease_seconds=0.5)
    assert report.abandoned == pending
    ready = await check_ready_versions_intact(registry, tenant, "crashy")
    assert len(ready) >= 1 + outcomes.count(True)
    async with registry.db.pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT version, state FROM registry_versions WHERE tenant = %s AND name = 'crashy' ORDER BY version",
            (tenant,))).fetchall()
    assert [row["version"] for row in rows] == list(range(1, len(rows) + 1))  # unique and gapless numbering
    assert {row["state"] for row in rows} <= {"READY", "FAILED"}
    leftovers = {key.split("/")[3] for key in (obj.key for obj in registry.store.list(f"models/{tenant}/crashy/"))}
    assert leftovers == {f"v{number}" for number in ready}
