"""Issue 9, item 10: SIGTERM to any llmp server under load loses no request it had accepted.

For each of the four gRPC services and the gateway, a fresh process of that server (the *victim*, on
free ports, beside a stable set of the four services it depends on) takes concurrent load: slow calls
(an upload, a streamed download) mixed with reads. Mid-load it gets SIGTERM. Every call's outcome is
recorded on the client, and the victim's own log says which calls its handlers ran (each `rpc` line
carries the call's request id and status). The rule:

- a call the server ran must have completed successfully on the client, whole (a streamed artifact
  arrives with every byte and the SHA-256 the registry recorded; a REST body is read to its end);
- a call that failed without the server having run it — connection refused, UNAVAILABLE, or the
  draining gate's ABORTED before the handler saw it — was *refused before acceptance*: a client may
  retry it elsewhere, and that is fine;
- the process exits 0, within its grace, and calls really were in flight when the signal landed.

The gateway's handlers call the services with the REST request's id, so a REST request the gateway
accepted is found in the stable services' logs. A last test puts two dataset replicas behind one gateway
and SIGTERMs one: there no REST request may fail at all (the gateway's channel health-checks each
replica and retries a refused call on the other).

What the first runs found, and what the servers now do about it: grpc core answers the calls it has
received but not yet handed to the application with CANCELLED when `server.stop()` begins
(grpc/grpc#41785), so a bare `stop(grace)` under load failed accepted-looking calls (10-14 per service
here). `GrpcApp.stop` now refuses new calls with ABORTED at the application (`ShutdownGate`) and
stops the transport only once the calls in flight are done and no new one has come for a moment.

This test brings up its own servers (PostgreSQL database, SeaweedFS, a private Redis database from the
root conftest); it does not touch the suite's `stack`. The inference service runs without Triton here
(not ready, but its deployment calls work): generation under shutdown is left to the e2e stack.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from llmp.common.v1 import common_pb2
from llmp.dataset.v1 import dataset_pb2, dataset_pb2_grpc
from llmp.inference.v1 import inference_pb2, inference_pb2_grpc
from llmp.registry.v1 import registry_pb2, registry_pb2_grpc
from llmp.training.v1 import training_pb2, training_pb2_grpc

from cli import servers
from gateway.auth import DEFAULT_TENANT
from services.common import topology
from services.common.config import Settings
from services.common.identity import REQUEST_ID_KEY
from services.common.model_transfer import upload_model_version
from services.common.s3 import ObjectStore
from tests import identities

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
GRACE = 8  # LLMP_SHUTDOWN_GRACE of every server here: the drain must finish well inside it
CLIENTS = 16  # concurrent callers of the victim
LOAD_BEFORE_SIGTERM = 1.5  # seconds of load before the signal


def caller_metadata(service: str) -> tuple[tuple[str, str], ...]:
    """An admin of the admin key's tenant calling `service`."""
    return identities.metadata(DEFAULT_TENANT, service, key_id="shutdown-test", role="admin")
MODEL, ARTIFACT = "shutdown-model", "model.safetensors"
ARTIFACT_BYTES = 3 * 1024 * 1024  # a streamed download of this size takes a while on 2 busy cores
UPLOAD_BYTES = 96 * 1024
REFUSED_BACKOFF = 1.0  # seconds a client waits after a refusal before it tries this server again


# --- servers ------------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    process: subprocess.Popen
    log: Path

    def handled(self) -> dict[str, str]:
        """request id -> status of every call this server's handlers ran (its `rpc` log lines)."""
        ran = {}
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            # Health watches are the clients' own (grpc's client-side health checking), ended by a client
            # that closes its channel: not calls of the load.
            if entry.get("message") == "rpc" and not entry["rpc"].startswith("grpc.health.v1.Health/"):
                ran[entry["request_id"]] = entry["code"]
        return ran

    def stop(self) -> None:
        servers.stop(self.process, timeout=GRACE + 5)


def start(name: str, module: str, env: dict[str, str], log_dir: Path) -> Server:
    log = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, process, log)


def wait_grpc(server: Server, address: str, timeout: float = 60) -> None:
    """Until the server answers the health service (any status: inference has no Triton here)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise AssertionError(f"{server.name} exited {server.process.returncode}" + servers.log_tail(server.log))
        with grpc.insecure_channel(address) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return
            except grpc.RpcError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{server.name} not up within {timeout}s" + servers.log_tail(server.log))
        time.sleep(0.3)


def wait_http(server: Server, url: str, timeout: float = 60) -> None:
    servers.wait_until(lambda: servers.http_ok(url), timeout, server.process, server.log)


@dataclass
class Cluster:
    env: dict[str, str]
    stable: dict[str, Server]
    log_dir: Path
    artifact_sha256: str
    dataset: tuple[str, int]

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def victim_env(self, name: str) -> tuple[dict[str, str], str]:
        """The environment of a second `name` server on a free port, and the address it serves on."""
        env = dict(self.env)
        if name == "gateway":
            port = servers.free_port()
            env["LLMP_GATEWAY_PORT"] = str(port)
            return env, f"http://127.0.0.1:{port}"
        address = f"127.0.0.1:{servers.free_port()}"
        env[topology.SERVICES_BY_NAME[name].addr_env] = address
        return env, address


async def _seed(env: dict[str, str], work: Path) -> tuple[str, tuple[str, int]]:
    """A READY dataset version (for the reads) and a READY model version with one artifact (for the
    streamed downloads), made through the stable services."""
    settings = Settings.from_env(env)
    metadata = caller_metadata("dataset")
    async with grpc.aio.insecure_channel(settings.service_addrs["dataset"]) as channel:
        created = await dataset_pb2_grpc.DatasetServiceStub(channel).CreateDataset(
            _upload_requests("shutdown-seed", CORPUS.read_bytes()[:UPLOAD_BYTES]), metadata=metadata, timeout=60)
        # READY before any victim starts, so that the reads of the load find its manifest.
        request = dataset_pb2.GetDatasetVersionRequest(name=created.version.name, version=created.version.version)
        for _ in range(240):
            reply = await dataset_pb2_grpc.DatasetServiceStub(channel).GetDatasetVersion(
                request, metadata=metadata, timeout=10)
            if reply.version.state != dataset_pb2.VERSION_STATE_PENDING:
                break
            await asyncio.sleep(0.25)
        assert reply.version.state == dataset_pb2.VERSION_STATE_READY, reply.version
    folder = work / "model"
    folder.mkdir()
    payload = os.urandom(ARTIFACT_BYTES)
    (folder / ARTIFACT).write_bytes(payload)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    async with grpc.aio.insecure_channel(settings.service_addrs["registry"]) as channel:
        await upload_model_version(registry_pb2_grpc.RegistryServiceStub(channel), ObjectStore(settings.s3),
                                   MODEL, folder, metadata=caller_metadata("registry"), timeout=60)
    return hashlib.sha256(payload).hexdigest(), (created.version.name, created.version.version)


@pytest.fixture(scope="module")
def cluster(settings_env, claim_broker, tmp_path_factory):
    work = tmp_path_factory.mktemp("shutdown")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMP_")}
    env.update(settings_env)
    env.update({"LLMP_BROKER_URL": claim_broker("shutdown-cluster"), "LLMP_LOG_FORMAT": "json",
                "LLMP_SHUTDOWN_GRACE": str(GRACE), "LLMP_ADMIN_KEY": f"llmp_shutdown_{uuid.uuid4().hex}",
                "LLMP_TRITON_GRPC_URL": f"127.0.0.1:{servers.free_port()}",  # no Triton: a closed port
                "LLMP_TRITON_HTTP_URL": f"127.0.0.1:{servers.free_port()}",
                # The load runs one tenant at the gateway's full speed, past the default 200 requests/s quota:
                # a 429 there is the quota, not a lost request (tests/integration/gateway/test_quotas.py).
                "LLMP_TENANT_RATE_LIMIT": "1000000",
                "PYTHONUNBUFFERED": "1"})
    stable: dict[str, Server] = {}
    try:
        for service in topology.GRPC_SERVICES:
            stable[service.name] = start(service.name, service.module, env, work)
        for service in topology.GRPC_SERVICES:
            wait_grpc(stable[service.name], env[service.addr_env])
        digest, dataset = asyncio.run(_seed(env, work))
        yield Cluster(env, stable, work, digest, dataset)
    finally:
        for server in stable.values():
            server.stop()


# --- the load -----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    request_id: str
    call: str
    started: float
    ended: float
    ok: bool
    refused: bool  # failed before reaching the server (connect refused / UNAVAILABLE / disconnected idle)
    detail: str = ""


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, calls: list[tuple[str, Callable[[str], Awaitable[None]]]], offset: int,
                     classify: Callable[[BaseException], bool]) -> None:
        turn = offset
        while not self.stop.is_set():
            name, call = calls[turn % len(calls)]
            turn += 1
            request_id = uuid.uuid4().hex
            started = time.monotonic()
            try:
                await call(request_id)
            except Exception as error:  # every failure is recorded and judged below
                refused = classify(error)
                detail = (f"{error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError)
                          else f"{type(error).__name__}: {error}")
                self.outcomes.append(Outcome(request_id, name, started, time.monotonic(), False, refused,
                                             detail[:300]))
                if refused:  # back off, as a retry policy would (and a balancer moves on meanwhile)
                    await asyncio.sleep(REFUSED_BACKOFF)
            else:
                self.outcomes.append(Outcome(request_id, name, started, time.monotonic(), True, False))


def _grpc_refused(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                        grpc.StatusCode.ABORTED)


def _upload_requests(name: str, corpus: bytes):
    yield dataset_pb2.CreateDatasetRequest(options=dataset_pb2.DatasetOptions(
        name=name, tokenizer=dataset_pb2.TOKENIZER_KIND_CHAR))
    for offset in range(0, len(corpus), 16 * 1024):
        yield dataset_pb2.CreateDatasetRequest(chunk=corpus[offset:offset + 16 * 1024])


def _grpc_calls(name: str, channel: grpc.aio.Channel, cluster: Cluster):
    """(call name, call(request_id)) for the service `name`: each raises unless the answer is whole."""

    def meta(request_id: str):
        return (*caller_metadata(name), (REQUEST_ID_KEY, request_id))

    page = common_pb2.PageRequest(page_size=20)
    corpus = CORPUS.read_bytes()[:UPLOAD_BYTES]
    if name == "dataset":
        stub = dataset_pb2_grpc.DatasetServiceStub(channel)
        dataset, version = cluster.dataset

        async def upload(request_id):
            reply = await stub.CreateDataset(_upload_requests("shutdown-upload", corpus), metadata=meta(request_id),
                                             timeout=30)
            assert reply.version.version > 0

        async def get(request_id):
            reply = await stub.GetDatasetVersion(dataset_pb2.GetDatasetVersionRequest(name=dataset, version=version),
                                                 metadata=meta(request_id), timeout=30)
            assert reply.version.manifest_key

        async def listing(request_id):
            await stub.ListDatasets(dataset_pb2.ListDatasetsRequest(page=page), metadata=meta(request_id), timeout=30)

        return [("CreateDataset", upload), ("GetDatasetVersion", get), ("ListDatasets", listing)]
    if name == "training":
        stub = training_pb2_grpc.TrainingServiceStub(channel)

        async def listing(request_id):
            await stub.ListJobs(training_pb2.ListJobsRequest(page=page), metadata=meta(request_id), timeout=30)

        return [("ListJobs", listing)]
    if name == "registry":
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        ref = common_pb2.ModelRef(name=MODEL, version=1)

        async def download(request_id):
            digest, size = hashlib.sha256(), 0
            async for reply in stub.DownloadArtifact(registry_pb2.DownloadArtifactRequest(model=ref, path=ARTIFACT),
                                                     metadata=meta(request_id), timeout=30):
                digest.update(reply.data)
                size += len(reply.data)
            assert (size, digest.hexdigest()) == (ARTIFACT_BYTES, cluster.artifact_sha256), "truncated download"

        async def version(request_id):
            await stub.GetModelVersion(registry_pb2.GetModelVersionRequest(name=MODEL, version=1),
                                       metadata=meta(request_id), timeout=30)

        async def listing(request_id):
            await stub.ListModels(registry_pb2.ListModelsRequest(page=page), metadata=meta(request_id), timeout=30)

        return [("DownloadArtifact", download), ("GetModelVersion", version), ("ListModels", listing)]
    stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def deployments(request_id):
        await stub.ListDeployments(inference_pb2.ListDeploymentsRequest(), metadata=meta(request_id), timeout=30)

    return [("ListDeployments", deployments)]


def _http_calls(session: aiohttp.ClientSession, url: str, key: str, cluster: Cluster):
    corpus = CORPUS.read_bytes()[:UPLOAD_BYTES // 2]
    dataset, version = cluster.dataset

    def request(method: str, path: str, body: bytes | None = None):
        async def call(request_id):
            headers = {"Authorization": f"Bearer {key}", "X-Request-Id": request_id}
            async with session.request(method, url + path, data=body, headers=headers) as response:
                payload = await response.read()  # raises on a truncated body
                assert response.status < 300, f"{response.status}: {payload[:200]!r}"
                json.loads(payload)

        return call

    return [("POST /v1/datasets", request("POST", "/v1/datasets?name=shutdown-rest&tokenizer=char", corpus)),
            ("GET /v1/datasets/{name}/versions/{v}", request("GET", f"/v1/datasets/{dataset}/versions/{version}")),
            ("GET /v1/models/{name}", request("GET", f"/v1/models/{MODEL}")),
            ("GET /v1/training-jobs", request("GET", "/v1/training-jobs")),
            ("GET /v1/deployments", request("GET", "/v1/deployments"))]


def _http_refused(error: BaseException) -> bool:
    """Connection refused, or the connection failed before any response byte: aiohttp closes idle
    keep-alive connections at shutdown, and a request written onto one at that instant fails (a GET is
    retried by aiohttp itself, RFC 9112 9.3.1; a POST is not). Whether the gateway ran such a request
    is then decided from the services' logs."""
    return isinstance(error, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError)


async def _drive(victim: Server, make_calls, classify, close) -> tuple[Load, float, float]:
    """Load the victim, SIGTERM it mid-load, keep calling until it has exited; returns the load, the
    signal's time and the exit's time (monotonic)."""
    load = Load()
    calls = make_calls()
    clients = [asyncio.create_task(load.client(calls, n, classify)) for n in range(CLIENTS)]
    await asyncio.sleep(LOAD_BEFORE_SIGTERM)
    signalled = time.monotonic()
    victim.process.send_signal(signal.SIGTERM)
    while victim.process.poll() is None and time.monotonic() - signalled < GRACE + 10:
        await asyncio.sleep(0.05)
    exited = time.monotonic()
    await asyncio.sleep(REFUSED_BACKOFF + 0.5)  # calls after the exit are refused: show that they are
    load.stop.set()
    await asyncio.gather(*clients)
    await close()
    return load, signalled, exited


def _judge(name: str, load: Load, handled: dict[str, str], signalled: float, exited: float,
           victim: Server) -> None:
    outcomes = load.outcomes
    in_flight = [o for o in outcomes if o.started < signalled < o.ended]
    lost = [o for o in outcomes if not o.ok and (not o.refused or o.request_id in handled)]
    refused = [o for o in outcomes if not o.ok and o.refused and o.request_id not in handled]
    print(f"\nSHUTDOWN {name}: calls={len(outcomes)} ok={sum(o.ok for o in outcomes)} "
          f"in_flight_at_sigterm={len(in_flight)} (ok {sum(o.ok for o in in_flight)}) refused={len(refused)} "
          f"lost={len(lost)} drain_s={exited - signalled:.2f} rc={victim.process.returncode}")
    assert victim.process.returncode == 0, f"{name} exited {victim.process.returncode}" + servers.log_tail(victim.log)
    assert exited - signalled < GRACE + 3, f"{name} took {exited - signalled:.1f}s to stop (grace {GRACE}s)"
    assert len(in_flight) >= 3, f"only {len(in_flight)} calls in flight at SIGTERM: the test proves nothing"
    assert not lost, f"{len(lost)} accepted call(s) lost: " + "; ".join(
        f"{o.call} {o.detail} (server: {handled.get(o.request_id, 'not run')})" for o in lost[:8])
    assert all(code == "OK" for code in handled.values()), {c for c in handled.values() if c != "OK"}
    assert refused, "no call was refused after the exit: the load never saw the server go"


@pytest.mark.parametrize("name", [service.name for service in topology.GRPC_SERVICES])
def test_sigterm_to_a_service_under_load_loses_no_accepted_call(cluster, name):
    env, address = cluster.victim_env(name)
    victim = start(name, topology.SERVICES_BY_NAME[name].module, env, cluster.log_dir)
    try:
        wait_grpc(victim, address)

        async def run():
            channel = grpc.aio.insecure_channel(address)  # one HTTP/2 connection, as the gateway has
            return await _drive(victim, lambda: _grpc_calls(name, channel, cluster), _grpc_refused, channel.close)

        load, signalled, exited = asyncio.run(run())
    finally:
        victim.stop()
    _judge(name, load, victim.handled(), signalled, exited, victim)
    if name == "dataset":
        asyncio.run(_assert_every_upload_ends_ready(cluster))


async def _assert_every_upload_ends_ready(cluster: Cluster) -> None:
    """What the dataset victim accepted is not lost with it: a build it had not finished at SIGTERM was
    released PENDING, and the stable instance resumes it from the stored corpus."""
    metadata = caller_metadata("dataset")
    request = dataset_pb2.ListDatasetVersionsRequest(name="shutdown-upload")
    async with grpc.aio.insecure_channel(cluster.env["LLMP_DATASET_ADDR"]) as channel:
        stub = dataset_pb2_grpc.DatasetServiceStub(channel)
        for _ in range(120):  # the stable instance looks for released builds every 10 s
            versions = (await stub.ListDatasetVersions(request, metadata=metadata, timeout=10)).versions
            if all(v.state != dataset_pb2.VERSION_STATE_PENDING for v in versions):
                break
            await asyncio.sleep(0.5)
    assert versions, "no upload was accepted"
    assert all(v.state == dataset_pb2.VERSION_STATE_READY for v in versions), [(v.version, v.state, v.error)
                                                                                for v in versions]


def test_sigterm_to_the_gateway_under_load_loses_no_accepted_request(cluster):
    env, url = cluster.victim_env("gateway")
    victim = start("gateway", topology.GATEWAY_MODULE, env, cluster.log_dir)
    key = env["LLMP_ADMIN_KEY"]
    try:
        wait_http(victim, url + "/healthz")
        before = {name: set(server.handled()) for name, server in cluster.stable.items()}

        async def run():
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                            connector=aiohttp.TCPConnector(limit=CLIENTS))
            return await _drive(victim, lambda: _http_calls(session, url, key, cluster), _http_refused, session.close)

        load, signalled, exited = asyncio.run(run())
    finally:
        victim.stop()
    # What the gateway forwarded is in the services' logs under the REST request's id.
    forwarded: dict[str, str] = {}
    for name, server in cluster.stable.items():
        forwarded.update({rid: code for rid, code in server.handled().items() if rid not in before[name]})
    _judge("gateway", load, forwarded, signalled, exited, victim)


def test_sigterm_to_one_replica_behind_the_gateway_fails_no_request(cluster):
    """Two dataset replicas behind one gateway (`ipv4:` address list, round_robin): SIGTERM to one of
    them under REST load fails no request at all, uploads included. The draining replica refuses new
    calls with ABORTED before running them, and the gateway's channel retries those on the other."""
    replica_env, replica_address = cluster.victim_env("dataset")
    replica = start("dataset", topology.DATASET.module, replica_env, cluster.log_dir)
    gateway = None
    try:
        wait_grpc(replica, replica_address)
        env, url = cluster.victim_env("gateway")
        env["LLMP_DATASET_ADDR"] = f"ipv4:{cluster.env['LLMP_DATASET_ADDR']},{replica_address}"
        gateway = start("gateway", topology.GATEWAY_MODULE, env, cluster.log_dir)
        wait_http(gateway, url + "/healthz")

        async def run():
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                            connector=aiohttp.TCPConnector(limit=CLIENTS))
            calls = [call for call in _http_calls(session, url, env["LLMP_ADMIN_KEY"], cluster)
                     if "datasets" in call[0]]
            return await _drive(replica, lambda: calls, lambda error: False, session.close)

        load, signalled, exited = asyncio.run(run())
    finally:
        replica.stop()
        if gateway is not None:
            gateway.stop()
    ran = replica.handled()
    failed = [o for o in load.outcomes if not o.ok]
    after = [o for o in load.outcomes if o.started > exited]
    print(f"\nSHUTDOWN dataset replica behind the gateway: requests={len(load.outcomes)} failed={len(failed)} "
          f"ran_on_replica={len(ran)} requests_after_exit={len(after)} drain_s={exited - signalled:.2f}")
    assert replica.process.returncode == 0, servers.log_tail(replica.log)
    assert len(ran) >= 3, "the replica served (almost) nothing: the test proves nothing"
    assert len(after) >= CLIENTS, "no request was made after the replica exited"
    assert not failed, f"{len(failed)} request(s) failed: " + "; ".join(f"{o.call} {o.detail}" for o in failed[:8])
