"""Issue 9, item 6: 50 concurrent users of mixed REST traffic on loopback.

Error rate < 0.1 %, p99 of cached (conditional) GETs < 50 ms, no llmp process's memory growing more
than 10 % after warm-up. The run lasts 6 s × LLMP_RELIABILITY_SCALE (20 gives the issue's 2 minutes);
the figures are printed (`-s`) for the report.
"""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS = 50
PROCESSES = ("gateway", "dataset", "training", "registry", "inference")


def rss(stack) -> dict[str, int]:
    return {name: psutil.Process(stack.record(name)["pid"]).memory_info().rss for name in PROCESSES}


async def user(session, base, key, stop, samples, errors, etags):
    headers = {"Authorization": f"Bearer {key}"}
    plan = [("GET", "/v1/datasets", True), ("GET", "/v1/models", True), ("GET", "/v1/deployments", True),
            ("GET", "/v1/training-jobs", True), ("GET", "/healthz", False), ("GET", "/v1/datasets/rel-none", False),
            ("POST", "/v1/completions", False)]
    while not stop.is_set():
        method, path, conditional = random.choice(plan)
        extra = {"If-None-Match": etags[path]} if conditional and path in etags else {}
        body = {"model": "rel-none", "prompt": "hi"} if method == "POST" else None
        started = time.perf_counter()
        try:
            async with session.request(method, base + path, headers={**headers, **extra}, json=body) as response:
                await response.read()
                elapsed = time.perf_counter() - started
                if response.status >= 500:
                    errors.append((path, response.status))
                if response.status == 200 and conditional:
                    etags[path] = response.headers["ETag"]
                samples.append((path, response.status, elapsed))
        except (TimeoutError, aiohttp.ClientError) as error:
            errors.append((path, repr(error)))


async def run_load(stack, seconds: float, key: str) -> tuple[list, list]:
    samples, errors, etags = [], [], {}
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=USERS)) as session:
        users = [asyncio.create_task(user(session, stack.url, key, stop, samples, errors, etags))
                 for _ in range(USERS)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*users)
    return samples, errors


def test_fifty_users_of_mixed_traffic(stack, scale):
    key = stack.keys[("acme", "developer")]
    asyncio.run(run_load(stack, 2.0, key))  # warm-up: pools, caches, lazily created channels
    before = rss(stack)
    seconds = 6.0 * scale
    samples, errors = asyncio.run(run_load(stack, seconds, key))
    after = rss(stack)
    total = len(samples) + len(errors)
    cached = sorted(elapsed for _, status, elapsed in samples if status == 304)
    p99 = cached[int(len(cached) * 0.99) - 1] if cached else float("inf")
    growth = {name: after[name] / before[name] - 1 for name in PROCESSES}
    print(f"\nLOAD users={USERS} seconds={seconds:.0f} requests={total} rps={total / seconds:.0f} "
          f"errors={len(errors)} ({len(errors) / max(total, 1):.3%}) cached_gets={len(cached)} "
          f"p99_cached_ms={p99 * 1000:.1f} memory_growth=" + ",".join(f"{n}:{g:+.1%}" for n, g in growth.items()))
    assert total > 100
    assert len(errors) / total < 0.001, errors[:10]
    assert len(cached) > 50
    # The 50 ms holds for the full-length run on a machine of its own; CI shares 2 cores with
    # every other test, so there the bound only catches a gateway that stalls.
    budget = 0.050 if scale >= 10 else 2.0
    assert p99 < budget, f"p99 of cached GETs {p99 * 1000:.1f} ms (budget {budget * 1000:.0f} ms)"
    assert all(g < 0.10 for g in growth.values()), growth
    assert stack.http("GET", "/readyz").status_code == 200
