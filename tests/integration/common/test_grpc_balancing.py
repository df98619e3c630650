"""Issue 16, defect 9: a client balancing over a service's replicas loses no call when one of them drains.

Two real registry server processes serve one DNS name: a DNS server of this test answers
`registry.llmp.test` with two A records, 127.0.0.1 and 127.0.0.2, and both replicas listen on the same
port, one on each address (as the pods behind a headless Service, or compose's replicas of a service,
do). The client is llmp's own `ServiceClients`, as the gateway builds it from `LLMP_REGISTRY_ADDR`
(`dns://<this DNS server>/registry.llmp.test:<port>`, so grpc's resolver really asks DNS). Under
continuous load from several callers, one replica gets SIGTERM: not one call may fail, the draining
replica must have served before it went, and the survivor must serve everything after.

The same drain under the mesh: the channel (LLMP_GRPC_BALANCING=mesh) reaches one address, a proxy
standing in for the Envoy sidecar that balances each call over the two replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from llmp.registry.v1 import registry_pb2

from cli import servers
from gateway.auth import DEFAULT_TENANT
from services.common import identity, topology
from services.common.config import Settings
from services.common.grpc_client import ServiceClients, channel_options, health_check

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
NAME = "registry.llmp.test"
REPLICA_HOSTS = ("127.0.0.1", "127.0.0.2")
CALLERS = 8
CALLER = identity.Caller(tenant=DEFAULT_TENANT, key_id="balancing-test", role="admin")


class DnsServer(asyncio.DatagramProtocol):
    """Answers A queries for the names it holds (every address at once, as a headless Service's DNS
    does); NXDOMAIN for other names, no records for other types (AAAA)."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.queries = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query_id = struct.unpack(">H", data[:2])[0]
        offset, labels = 12, []
        while data[offset]:
            labels.append(data[offset + 1:offset + 1 + data[offset]].decode())
            offset += data[offset] + 1
        question_end = offset + 5
        query_type = struct.unpack(">H", data[offset + 1:offset + 3])[0]
        name = ".".join(labels).lower()
        self.queries += 1
        addresses = self.records.get(name, []) if query_type == 1 else []
        rcode = 0 if name in self.records else 3
        answer = struct.pack(">HHHHHH", query_id, 0x8180 | rcode, 1, len(addresses), 0, 0) + data[12:question_end]
        for address in addresses:  # a pointer to the question's name, type A, class IN, TTL 1 s
            answer += struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(address)
        self.transport.sendto(answer, addr)


def _replica_env(settings_env: dict[str, str], host: str, address: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_")}
    env.update(settings_env)
    env.update({"LLMP_BIND_HOST": host, "LLMP_REGISTRY_ADDR": address, "LLMP_LOG_FORMAT": "json",
                "LLMP_SHUTDOWN_GRACE": "8", "PYTHONUNBUFFERED": "1"})
    return env


def _served(log: Path) -> int:
    """How many registry calls (not health checks) this replica's handlers ran, from its `rpc` log lines."""
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == "rpc" and entry["rpc"].startswith("llmp.registry."):
            count += 1
    return count


async def _start_replicas(settings_env: dict[str, str], tmp_path: Path, address: str,
                          port: int) -> list[tuple[subprocess.Popen, Path]]:
    """Two registry processes on `port`, one on each of REPLICA_HOSTS, serving."""
    replicas: list[tuple[subprocess.Popen, Path]] = []
    for host in REPLICA_HOSTS:
        log = tmp_path / f"registry-{host}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen([sys.executable, "-m", topology.REGISTRY.module], cwd=ROOT,
                                       env=_replica_env(settings_env, host, address), stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        replicas.append((process, log))
    for (process, log), host in zip(replicas, REPLICA_HOSTS, strict=True):
        deadline = time.monotonic() + 60
        while await health_check(f"{host}:{port}") != "SERVING":
            assert process.poll() is None, servers.log_tail(log)
            assert time.monotonic() < deadline, f"replica {host} not serving" + servers.log_tail(log)
            await asyncio.sleep(0.3)
    return replicas


def _stop(replicas: list[tuple[subprocess.Popen, Path]]) -> None:
    for process, _ in replicas:
        if process.poll() is None:
            servers.stop(process, timeout=15)


async def _drain_one_under_load(clients: ServiceClients, replicas: list[tuple[subprocess.Popen, Path]],
                                label: str) -> None:
    """CALLERS callers call the registry without pause; the second replica gets SIGTERM mid-load, and the
    load goes on after it exited. Not one call may fail; both replicas must have served."""
    failures: list[str] = []
    calls = 0
    stop = asyncio.Event()

    async def caller() -> None:
        nonlocal calls
        with identity.acting_as(CALLER):
            while not stop.is_set():
                try:
                    await clients.registry.ListModels(registry_pb2.ListModelsRequest(), timeout=10)
                    calls += 1
                except Exception as error:  # every failure counts, whatever its kind
                    failures.append(f"{type(error).__name__}: {error}")

    load = [asyncio.create_task(caller()) for _ in range(CALLERS)]
    await asyncio.sleep(2.0)
    (_, survivor_log), (victim, victim_log) = replicas
    served_before = _served(victim_log)
    victim.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while victim.poll() is None and time.monotonic() - signalled < 15:
        await asyncio.sleep(0.05)
    drained = time.monotonic() - signalled
    calls_at_exit = calls
    await asyncio.sleep(2.0)  # the load goes on: every call now goes to the survivor
    stop.set()
    await asyncio.gather(*load)
    print(f"\nBALANCING {label}: calls={calls} failed={len(failures)} victim_served={_served(victim_log)} "
          f"survivor_served={_served(survivor_log)} drain_s={drained:.2f}")
    assert victim.returncode == 0, f"the victim exited {victim.returncode}" + servers.log_tail(victim_log)
    assert not failures, f"{len(failures)} of {calls + len(failures)} calls failed: {failures[:5]}"
    assert served_before >= 20, f"the victim served {served_before} calls before SIGTERM: no balancing"
    assert _served(survivor_log) >= 20, "the survivor served (almost) nothing"
    assert calls - calls_at_exit >= 20, "no load after the victim exited: the test proves nothing"


async def test_sigterm_to_one_of_two_replicas_behind_one_dns_name_fails_no_call(settings_env, tmp_path):
    """LLMP_GRPC_BALANCING=client: the channel resolves the name and balances over both replicas."""
    loop = asyncio.get_running_loop()
    dns = DnsServer({NAME: list(REPLICA_HOSTS)})
    transport, _ = await loop.create_datagram_endpoint(lambda: dns, local_addr=("127.0.0.1", 0))
    port = servers.free_port()
    address = f"dns://127.0.0.1:{transport.get_extra_info('sockname')[1]}/{NAME}:{port}"
    replicas: list[tuple[subprocess.Popen, Path]] = []
    clients = None
    try:
        replicas = await _start_replicas(settings_env, tmp_path, address, port)
        clients = ServiceClients(Settings.from_env({**settings_env, "LLMP_REGISTRY_ADDR": address}),
                                 principal=identity.GATEWAY)
        await _drain_one_under_load(clients, replicas, f"two registry replicas behind {NAME}")
    finally:
        if clients is not None:
            await clients.close()
        transport.close()
        _stop(replicas)
    assert dns.queries >= 1, "the channel never asked DNS"


class SidecarProxy(grpc.GenericRpcHandler):
    """What the client's channel reaches under the mesh: one address (the local Envoy) that forwards each
    call, as raw bytes with its metadata, to one replica chosen per call over its own health-checked
    connections to every replica (as Envoy balances a ClusterIP's calls over its endpoints). Health
    Watch streams are forwarded like any call, to whichever replica the proxy picks."""

    def __init__(self, upstream: grpc.aio.Channel) -> None:
        self.upstream = upstream

    @staticmethod
    def _metadata(context) -> tuple[tuple[str, str], ...]:
        return tuple((key, value) for key, value in context.invocation_metadata()
                     if not key.startswith((":", "grpc-")) and key not in {"user-agent", "te", "content-type"})

    def service(self, details):
        method = details.method
        if method == "/grpc.health.v1.Health/Watch":
            async def stream(request, context):
                try:
                    async for item in self.upstream.unary_stream(method)(request, metadata=self._metadata(context)):
                        yield item
                except grpc.aio.AioRpcError as error:
                    await context.abort(error.code(), error.details(), error.trailing_metadata())

            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(request, context):
            try:
                return await self.upstream.unary_unary(method)(request, metadata=self._metadata(context),
                                                               timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), error.details(), error.trailing_metadata())

        return grpc.unary_unary_rpc_method_handler(unary)


async def test_under_the_mesh_sigterm_to_one_replica_behind_the_sidecar_fails_no_call(settings_env, tmp_path):
    """LLMP_GRPC_BALANCING=mesh: the channel's one connection is to the proxy, which balances. (With the
    `client` configuration here, the channel's health Watch went through the proxy to a single replica:
    when that replica drained, its NOT_SERVING made the channel's only subchannel unhealthy and calls
    failed while the other replica served: issue 16, defect 9.)"""
    port = servers.free_port()
    replicas: list[tuple[subprocess.Popen, Path]] = []
    upstream = grpc.aio.insecure_channel(",".join(f"{host}:{port}" for host in REPLICA_HOSTS).join(("ipv4:", "")),
                                         options=channel_options("client"))
    proxy = grpc.aio.server()
    proxy.add_generic_rpc_handlers((SidecarProxy(upstream),))
    proxy_port = proxy.add_insecure_port("127.0.0.1:0")
    await proxy.start()
    clients = None
    try:
        replicas = await _start_replicas(settings_env, tmp_path, f"127.0.0.1:{port}", port)
        settings = Settings.from_env({**settings_env, "LLMP_REGISTRY_ADDR": f"127.0.0.1:{proxy_port}",
                                      "LLMP_GRPC_BALANCING": "mesh"})
        clients = ServiceClients(settings, principal=identity.GATEWAY)
        await _drain_one_under_load(clients, replicas, "two registry replicas behind a sidecar proxy")
    finally:
        if clients is not None:
            await clients.close()
        await proxy.stop(0)
        await upstream.close()
        _stop(replicas)
