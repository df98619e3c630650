"""Issue 16, defect 9: a client balancing over a service's replicas loses no call when one of them drains.

Two real registry server processes serve one DNS name: a DNS server of this test answers
`registry.llmp.test` with two A records, 127.0.0.1 and 127.0.0.2, and both replicas listen on the same
port, one on each address (as the pods behind a headless Service, or compose's replicas of a service,
do). The client is llmp's own `ServiceClients`, as the gateway builds it from `LLMP_REGISTRY_ADDR`
(`dns://<this DNS server>/registry.llmp.test:<port>`, so grpc's resolver really asks DNS). Under
continuous load from several callers, one replica gets SIGTERM: not one call may fail, the draining
replica must have served before it went, and the survivor must serve everything after.
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

import pytest
from llmp.registry.v1 import registry_pb2

from cli import servers
from gateway.auth import DEFAULT_TENANT
from services.common import identity, topology
from services.common.config import Settings
from services.common.grpc_client import ServiceClients, health_check

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


def _replica_env(settings_env: dict[str, str], host: str, address: str, port: int) -> dict[str, str]:
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


async def test_sigterm_to_one_of_two_replicas_behind_one_dns_name_fails_no_call(settings_env, tmp_path):
    loop = asyncio.get_running_loop()
    dns = DnsServer({NAME: list(REPLICA_HOSTS)})
    transport, _ = await loop.create_datagram_endpoint(lambda: dns, local_addr=("127.0.0.1", 0))
    dns_port = transport.get_extra_info("sockname")[1]
    port = servers.free_port()
    address = f"dns://127.0.0.1:{dns_port}/{NAME}:{port}"
    replicas: list[tuple[subprocess.Popen, Path]] = []
    clients = None
    try:
        for host in REPLICA_HOSTS:
            log = tmp_path / f"registry-{host}.log"
            with open(log, "wb") as handle:
                process = subprocess.Popen([sys.executable, "-m", topology.REGISTRY.module], cwd=ROOT,
                                           env=_replica_env(settings_env, host, address, port), stdout=handle,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            replicas.append((process, log))
        for (process, log), host in zip(replicas, REPLICA_HOSTS, strict=True):
            deadline = time.monotonic() + 60
            while await health_check(f"{host}:{port}") != "SERVING":
                assert process.poll() is None, servers.log_tail(log)
                assert time.monotonic() < deadline, f"replica {host} not serving" + servers.log_tail(log)
                await asyncio.sleep(0.3)

        clients = ServiceClients(Settings.from_env({**settings_env, "LLMP_REGISTRY_ADDR": address}))
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
        victim, victim_log = replicas[1]
        served_before = _served(victim_log)
        victim.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while victim.poll() is None and time.monotonic() - signalled < 15:
            await asyncio.sleep(0.05)
        exited = victim.returncode
        calls_at_exit = calls
        await asyncio.sleep(2.0)  # the load goes on: every call now goes to the survivor
        stop.set()
        await asyncio.gather(*load)
    finally:
        if clients is not None:
            await clients.close()
        transport.close()
        for process, _ in replicas:
            if process.poll() is None:
                servers.stop(process, timeout=15)

    survivor_log = replicas[0][1]
    print(f"\nBALANCING two registry replicas behind {NAME}: calls={calls} failed={len(failures)} "
          f"victim_served={_served(victim_log)} survivor_served={_served(survivor_log)} "
          f"drain_s={time.monotonic() - signalled:.2f} dns_queries={dns.queries}")
    assert exited == 0, f"the victim exited {exited}" + servers.log_tail(victim_log)
    assert not failures, f"{len(failures)} of {calls + len(failures)} calls failed: {failures[:5]}"
    assert served_before >= 20, f"the victim served {served_before} calls before SIGTERM: no balancing"
    assert _served(survivor_log) >= 20, "the survivor served (almost) nothing"
    assert calls - calls_at_exit >= 20, "no load after the victim exited: the test proves nothing"
