"""`llmp` progress against the real gateway, dataset and training services (PostgreSQL, SeaweedFS, Redis):
the byte bar of an upload, an ingest followed to READY, and a training job followed live from its event
stream through a proxy that cuts the stream, so the CLI must resume with Last-Event-ID.

No Celery worker runs: the job's progress is reported through `Coordinator` (claim, record, finish), the
code a worker calls, on the same database.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cli import main
from cli.client import Client
from gateway.app import init_app
from services.common import topology
from services.common.config import Settings
from services.common.db import Database
from services.dataset import server as dataset_server
from services.training import server as training_server
from services.training.coordinator import Coordinator, JobState, Update

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN_KEY = "llmp_bootstrap_cli-progress-admin"
SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"
JOB = {"model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
       "hyperparameters": {"batch_size": 4, "max_steps": 20, "warmup_steps": 2, "log_interval": 2},
       "distributed": {"mode": "ddp", "nproc_per_node": 1}}


class CuttingProxy:
    """A TCP proxy in front of the gateway that closes the n-th event stream after `cuts[n]` events
    (no entry: passes it whole), and records every request's head."""

    def __init__(self, upstream_port: int, cuts: list[int]) -> None:
        self.upstream_port = upstream_port
        self.cuts = list(cuts)
        self.heads: list[str] = []  # request heads, in arrival order
        self.streams = 0
        self.server: asyncio.Server | None = None
        self.serving: set[asyncio.Task] = set()  # connections being served

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stops listening and ends every connection still being served (a handler left pending would be
        destroyed with its sockets unclosed: a ResourceWarning that fails the test)."""
        self.server.close()
        for task in list(self.serving):
            task.cancel()
        await asyncio.gather(*self.serving, return_exceptions=True)
        await self.server.wait_closed()

    def events_requests(self) -> list[str]:
        return [head for head in self.heads if "/events " in head.split("\r\n", 1)[0]]

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.serving.add(task)
        try:
            await self._proxy(client_reader, client_writer)
        finally:
            client_writer.close()
            self.serving.discard(task)

    async def _proxy(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        head = await client_reader.readuntil(b"\r\n\r\n")
        self.heads.append(head.decode())
        cut = None
        if b"/events " in head.split(b"\r\n", 1)[0]:
            cut = self.cuts[self.streams] if self.streams < len(self.cuts) else None
            self.streams += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        upstream_writer.write(head)
        upstream = asyncio.create_task(self._pipe(client_reader, upstream_writer))
        try:
            seen, buffer = 0, b""
            while chunk := await upstream_reader.read(65536):
                if cut is None:
                    client_writer.write(chunk)
                    await client_writer.drain()
                    continue
                buffer += chunk
                # aiohttp writes each event as one HTTP chunk: "<size>\r\nid: …\n\n\r\n"
                while (end := buffer.find(b"\n\n\r\n")) >= 0:
                    piece, buffer = buffer[:end + 4], buffer[end + 4:]
                    client_writer.write(piece)
                    seen += piece.count(b"\nid: ") + piece.startswith(b"id: ")
                    if seen >= cut:
                        await client_writer.drain()
                        return  # cut: both connections close below, mid-response
                await client_writer.drain()
        finally:
            upstream.cancel()
            upstream_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()


@pytest.fixture
async def gateway(aiohttp_client, settings_env, private_broker_url):
    """The gateway with the dataset and training services in-process; its port."""
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_BROKER_URL": private_broker_url})
    dataset = await dataset_server.build_app(settings)
    training = await training_server.build(settings)
    await dataset.start(settings.listen_addr(topology.DATASET))
    await training.start(settings.listen_addr(topology.TRAINING))
    client = await aiohttp_client(init_app(settings))
    db = await Database.connect(settings.database_url, component="test-worker")
    yield client.server.port, Coordinator(db)
    await db.close()
    await training.stop()
    await dataset.stop()


def llmp(port: int, *args: str) -> int:
    return main.main([*args, "--url", f"http://127.0.0.1:{port}", "--key", ADMIN_KEY, "--json"])


async def test_upload_bar_ingest_and_a_training_job_followed_across_a_dropped_stream(gateway, capsys):
    port, coordinator = gateway
    name = "cli-progress"

    # An upload counts its bytes as they are sent, then the ingest is followed until READY.
    code = await asyncio.to_thread(llmp, port, "dataset", "create", str(SHAKESPEARE), "--name", name,
                                   "--tokenizer", "char", "--watch")
    out, err = capsys.readouterr()
    assert code == 0, err
    version = json.loads(out)  # stdout is the JSON result alone
    assert version["state"] == "READY" and version["name"] == name
    uploads = [line for line in err.splitlines() if line.startswith("upload tinyshakespeare.txt")]
    percents = [int(line.split("]")[1].split("%")[0]) for line in uploads]
    assert percents[0] == 0 and percents[-1] == 100 and len(percents) >= 4  # streamed: several chunks counted
    assert percents == sorted(percents) and uploads[-1].endswith("1.1 MB/1.1 MB")
    ingest = [line for line in err.splitlines() if line.startswith("ingest")]
    assert ingest and ingest[-1].endswith("READY"), err

    # A job followed through a proxy that cuts the event stream after its first event.
    job = await asyncio.to_thread(Client(f"http://127.0.0.1:{port}", ADMIN_KEY).call, "POST", "/v1/training-jobs",
                                  {"dataset": {"name": name, "version": version["version"]}, **JOB})
    proxy = CuttingProxy(port, cuts=[1])
    proxy_port = await proxy.start()
    watcher = asyncio.create_task(asyncio.to_thread(llmp, proxy_port, "jobs", "watch", job["id"]))
    try:
        async with asyncio.timeout(60):
            while len(proxy.events_requests()) < 2:  # the first stream was cut; the watcher came back
                await asyncio.sleep(0.1)
        assignment = await coordinator.claim("test-worker", "localhost")
        assert assignment is not None and assignment.job_id == job["id"]
        for step in (10, 20):
            assert await coordinator.record(assignment, [Update(step=step, metrics={"train_loss": 3.0 - step / 10})])
            await asyncio.sleep(0.3)
        await coordinator.finish(assignment, JobState.SUCCEEDED)
        async with asyncio.timeout(60):
            code = await watcher
    finally:
        await proxy.close()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["state"] == "SUCCEEDED"
    first, second = proxy.events_requests()[:2]
    assert "last-event-id" not in first.lower()
    assert "last-event-id: 1\r\n" in second.lower()  # resumed after the one event it had
    lines = err.splitlines()
    states = [line.split()[0] for line in lines]
    assert states[0] == "QUEUED" and states[-1] == "SUCCEEDED" and "RUNNING" in states
    # Plain lines (stderr is not a terminal): one per tenth of the steps and per state, with the latest loss.
    assert any(line.startswith("RUNNING") and "50%  10/20 steps" in line for line in lines), err
    assert any(line.startswith("RUNNING") and "100%  20/20 steps  loss 2.0000" in line for line in lines), err
    assert lines[-1].startswith("SUCCEEDED") and lines[-1].endswith("100%  20/20 steps  loss 1.0000"), err

    # The whole stream again, cut after two events: every event once, in order, none lost or repeated.
    proxy = CuttingProxy(port, cuts=[2, 1])
    client = Client(f"http://127.0.0.1:{await proxy.start()}", ADMIN_KEY)
    try:
        events = await asyncio.to_thread(lambda: list(client.follow(f"/v1/training-jobs/{job['id']}/events",
                                                                    backoff=0.05)))
    finally:
        await proxy.close()
    direct = await asyncio.to_thread(lambda: list(Client(f"http://127.0.0.1:{port}", ADMIN_KEY).events(
        f"/v1/training-jobs/{job['id']}/events")))
    assert [int(event.id) for event in events] == [event["sequence"] for event in direct]
    assert len(events) >= 5 and len(proxy.events_requests()) == 3
    assert events[-1].event == "state_changed" and events[-1].data["state_changed"]["state"] == "SUCCEEDED"
