"""Conditional GETs answered 304 through the real gateway, against a bare aiohttp handler returning a constant.

One run, one SeaweedFS (started here on free ports), one PostgreSQL database (created here on the
server at LLMP_DATABASE_URL's host, dropped after), the dataset service in-process on a free port, and
in this same process two aiohttp servers on free ports:

- project:  the gateway (`init_app`, its whole per-request pipeline: request id + metrics + access log (off
  at WARNING, as here), error bodies, API key authentication with a developer key, tenant quota, role
  check, per-key rate limit set out of the way, query and path checks, the conditional-GET fast path) answering
  `GET /v1/datasets/{name}/versions/1` with `If-None-Match: <its ETag>` → 304. A READY dataset version
  is immutable, so after the first GET the gateway answers revalidations itself, without a gRPC round
  trip (see `gateway.http.ValidatorCache`);
- baseline: a bare aiohttp application with one handler returning a constant 2-byte body (the limit of
  aiohttp on this machine).

The load comes from a separate process (`--load`), the same for both: a raw asyncio HTTP/1.1 client
holding `--connections` keep-alive connections, each sending the next request when the previous answer
is complete. With two cores or more, the servers (this process) and the load process are each pinned to
a core of their own, the same for both sides, so that neither side's round has the scheduler put the
load and the server on one core (`--no-pin` leaves them free). `--rounds` rounds of `--seconds` each,
project and baseline alternating which goes first; every round's rates, ratio and the servers' CPU per
request printed; the BENCH line gives each side's median rate (requests per second) and their ratio,
project / baseline (higher is better).

`--pieces` first times each piece of the 304 path in-process, in µs (bench/gateway_pieces.py); `--profile
FILE` runs one project round under cProfile. Both are for finding the cost, not for the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import psycopg
from aiohttp import web

from bench import harness
from cli import servers
from services.common import topology
from services.common.config import Settings

ACCESS, SECRET = "llmp-bench", "llmp-bench-secret"
ADMIN_KEY = "llmp_bootstrap_bench-gateway-admin"
CORPUS = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(400))


# -- the load generator (runs in its own process) ------------------------------------------------

class _Connection(asyncio.Protocol):
    """One keep-alive connection sending `request` again as soon as each answer is complete."""

    def __init__(self, request: bytes, statuses: Counter, deadline: float, closed: asyncio.Future,
                 samples: dict[int, str]) -> None:
        self.request, self.statuses, self.deadline, self.closed = request, statuses, deadline, closed
        self.samples = samples  # status -> the first such answer, for a failure's message
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            status = int(head[9:12])
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0 and status != 304:  # a 304 has no body whatever its headers say
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            if status >= 400 and status not in self.samples:
                self.samples[status] = self.buffer[:total].decode(errors="replace")
            self.buffer = self.buffer[total:]
            self.statuses[status] += 1
            if time.monotonic() < self.deadline:
                self.transport.write(self.request)
            else:
                self.transport.close()
                return

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _load(host: str, port: int, path: str, headers: list[str], seconds: float, connections: int) -> dict:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", *headers, "", ""]
    request = "\r\n".join(lines).encode()
    loop = asyncio.get_running_loop()
    statuses: Counter = Counter()
    samples: dict[int, str] = {}
    started = time.monotonic()
    deadline = started + seconds
    closed = [loop.create_future() for _ in range(connections)]
    for future in closed:
        await loop.create_connection(lambda f=future: _Connection(request, statuses, deadline, f, samples), host, port)
    await asyncio.wait_for(asyncio.gather(*closed), timeout=seconds + 30)
    elapsed = time.monotonic() - started
    return {"statuses": {str(k): v for k, v in statuses.items()}, "seconds": elapsed,
            "samples": {str(k): v for k, v in samples.items()}}


def load_main(options: argparse.Namespace) -> None:
    if options.cpu is not None:
        os.sched_setaffinity(0, {options.cpu})
    result = asyncio.run(_load(options.host, options.port, options.path, options.header, options.seconds,
                               options.connections))
    print(json.dumps(result), flush=True)


def _measure(port: int, path: str, headers: list[str], expect: int, options: argparse.Namespace
             ) -> tuple[float, int]:
    """Requests/s the load process got, and how many answers, every answer having status `expect`."""
    command = [sys.executable, "-m", "bench.gateway", "--load", "--host", "127.0.0.1", "--port", str(port),
               "--path", path, "--seconds", str(options.seconds), "--connections", str(options.connections)]
    if options.load_cpu is not None:
        command += ["--cpu", str(options.load_cpu)]
    for header in headers:
        command += ["--header", header]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    statuses = result["statuses"]
    if set(statuses) != {str(expect)}:
        raise RuntimeError(f"expected only {expect} answers from {path}, got {statuses}; first of each failure: "
                           f"{result['samples']}")
    return statuses[str(expect)] / result["seconds"], statuses[str(expect)]


async def _measure_with_cpu(port: int, path: str, headers: list[str], expect: int, options: argparse.Namespace
                            ) -> tuple[float, float]:
    """Requests/s, and the CPU time this process (the servers; the load is another process) spent per request
    in µs: on a shared machine the rate falls with the neighbours' load, the CPU per request much less."""
    cpu = time.process_time()
    rate, answered = await asyncio.to_thread(_measure, port, path, headers, expect, options)
    return rate, (time.process_time() - cpu) / answered * 1e6


# -- the servers under test ------------------------------------------------------------------------

async def _constant(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = servers.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def _prepare(port: int) -> tuple[str, list[str]]:
    """A developer key and a READY dataset version through the gateway; its path and the request headers."""
    base = f"http://127.0.0.1:{port}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/api-keys", headers=admin,
                                json={"tenant": "bench", "role": "developer", "rate_limit": 100000}) as response:
            assert response.status == 201, await response.text()
            key = (await response.json())["key"]
        auth = {"Authorization": f"Bearer {key}"}
        async with session.post(f"{base}/v1/datasets?name=bench&tokenizer=char&wait=true", headers=auth,
                                data=CORPUS.encode()) as response:
            assert response.status in {200, 201}, await response.text()
            path = (response.headers["Location"])
        async with session.get(base + path, headers=auth) as response:
            assert response.status == 200 and (await response.json())["state"] == "READY"
            etag = response.headers["ETag"]
        async with session.get(base + path, headers={**auth, "If-None-Match": etag}) as response:
            assert response.status == 304 and response.headers["ETag"] == etag
    return path, [f"Authorization: Bearer {key}", f"If-None-Match: {etag}"]


async def run(options: argparse.Namespace) -> None:
    from gateway.app import init_app
    from services.dataset import server as dataset_server

    admin_url = os.environ.get("LLMP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    admin_url = admin_url.rsplit("/", 1)[0] + "/postgres"
    database = f"llmp_bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="llmp-bench-gateway-") as scratch:
        root = Path(scratch)
        ports = servers.SeaweedPorts.free()
        weed = servers.start_seaweedfs(root / "weed", ports, ACCESS, SECRET, root / "weed.log")
        options.load_cpu = _pin(options)  # after SeaweedFS started: it keeps every core
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
        env = {"LLMP_DATABASE_URL": admin_url.rsplit("/", 1)[0] + f"/{database}",
               "LLMP_S3_ENDPOINT": f"127.0.0.1:{ports.s3}", "LLMP_S3_ACCESS_KEY": ACCESS,
               "LLMP_S3_SECRET_KEY": SECRET, "LLMP_S3_BUCKET": "llmp-bench", "LLMP_LOG_LEVEL": "WARNING",
               "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_STATE_DIR": str(root / "state"),
               # The bench measures the gateway's own cost, not a tenant's quota: one tenant drives all of it.
               "LLMP_TENANT_RATE_LIMIT": "10000000",
               **{service.addr_env: f"127.0.0.1:{servers.free_port()}" for service in topology.GRPC_SERVICES}}
        dataset, runners = None, []
        try:
            settings = Settings.from_env(env)
            dataset = await dataset_server.build_app(settings, models_using=_no_lineage)
            await dataset.start(settings.listen_addr(topology.DATASET))
            gateway_runner, gateway_port = await _serve(init_app(settings))
            bare = web.Application()
            bare.router.add_get("/constant", _constant)
            bare_runner, bare_port = await _serve(bare)
            runners = [gateway_runner, bare_runner]
            path, headers = await _prepare(gateway_port)
            if options.pieces:
                from bench import gateway_pieces

                await gateway_pieces.report(gateway_runner.app, bare, path, headers)
            if options.profile:
                await _profiled_round(options, gateway_port, path, headers)
            rates: dict[str, list[float]] = {"project": [], "baseline": []}
            cpus: dict[str, list[float]] = {"project": [], "baseline": []}
            ratios, cpu_ratios = [], []
            for round_no in range(options.rounds):
                sides = {"baseline": (bare_port, "/constant", [], 200), "project": (gateway_port, path, headers, 304)}
                for side in sorted(sides, reverse=round_no % 2 == 1):  # alternate which side goes first
                    rate, cpu = await _measure_with_cpu(*sides[side], options)
                    rates[side].append(rate)
                    cpus[side].append(cpu)
                project, baseline = rates["project"][-1], rates["baseline"][-1]
                project_cpu, baseline_cpu = cpus["project"][-1], cpus["baseline"][-1]
                ratios.append(project / baseline)
                cpu_ratios.append(baseline_cpu / project_cpu)
                load = " ".join(f"{value:.2f}" for value in os.getloadavg())
                print(f"round {round_no + 1}: project {project:.0f} req/s, baseline {baseline:.0f} req/s "
                      f"(ratio {project / baseline:.2f}, load average {load}); server CPU per request: project "
                      f"{project_cpu:.1f} µs, baseline {baseline_cpu:.1f} µs (ratio {baseline_cpu / project_cpu:.2f})",
                      flush=True)
            harness.rounds("gateway", ratios)
            harness.rounds("gateway, server CPU per request (baseline / project)", cpu_ratios)
            if options.rounds:
                print(f"server CPU per request, median: project {statistics.median(cpus['project']):.1f} µs, "
                      f"baseline {statistics.median(cpus['baseline']):.1f} µs")
        finally:
            for runner in runners:
                await runner.cleanup()
            if dataset is not None:
                await dataset.stop()
            servers.stop(weed)
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    if not options.rounds:  # --rounds 0: only --pieces or --profile
        return
    pinned = "" if options.load_cpu is None else ", servers and load each pinned to a core"
    harness.report("gateway", statistics.median(rates["project"]), statistics.median(rates["baseline"]), "req/s",
                   f"a bare aiohttp handler returning a constant, same machine, process and load process, "
                   f"{options.connections} keep-alive connections, median of {options.rounds} alternating rounds"
                   f"{pinned}; project = authenticated GET of a READY dataset version with If-None-Match answered "
                   "304 through the gateway's whole pipeline", digits=0)


def _pin(options: argparse.Namespace) -> int | None:
    """Pins this process (both servers) to one core and returns another for the load process; None (nothing
    pinned) with `--no-pin` or fewer than two cores."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if options.no_pin or len(allowed) < 2:
        return None
    os.sched_setaffinity(0, {allowed[0]})
    return allowed[1]


async def _profiled_round(options: argparse.Namespace, port: int, path: str, headers: list[str]) -> None:
    """One project round with cProfile on in this process (the gateway's event loop; the load is elsewhere):
    where the gateway's time per request goes, aiohttp's own included. Written to `options.profile`."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        # `_measure` waits in a worker thread (not profiled); the gateway's loop runs in this one.
        rate, _ = await asyncio.to_thread(_measure, port, path, headers, 304, options)
    finally:
        profiler.disable()
    profiler.dump_stats(options.profile)
    stats = pstats.Stats(profiler)
    print(f"profiled round: {rate:.0f} req/s under cProfile; stats in {options.profile}")
    stats.sort_stats("tottime").print_stats(30)


async def _no_lineage(tenant: str, name: str, version: int) -> list[str]:
    return []  # no registry runs here: no model version uses the bench's dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one measurement (default 4)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds; the median counts (default 5; 0: only --pieces/--profile)")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave the servers and the load process free to run on any core")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--pieces", action="store_true",
                        help="first time each piece of the 304 path in-process (bench/gateway_pieces.py), in µs")
    parser.add_argument("--profile", metavar="FILE", help="first run one project round under cProfile, stats to FILE")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)  # the load process
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--header", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)  # the load process's core
    options = parser.parse_args()
    if options.load:
        load_main(options)
    else:
        asyncio.run(run(options))


if __name__ == "__main__":
    main()
