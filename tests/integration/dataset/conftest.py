"""The dataset service in-process on a free port, against the session's real PostgreSQL and SeaweedFS."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from llmp.dataset.v1 import dataset_pb2 as pb
from llmp.dataset.v1 import dataset_pb2_grpc

from services.common.config import Settings
from services.common.s3 import ObjectStore
from services.dataset import server
from tests import identities

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"
UPLOAD_LIMIT = 2_000_000  # bytes: small, so the over-limit test stays cheap
CHUNK = 64 * 1024


@dataclass
class Lineage:
    """Stands in for the registry's answer: which model versions use which dataset versions."""

    users: dict[tuple[str, str, int], list[str]] = field(default_factory=dict)

    async def __call__(self, tenant: str, name: str, version: int) -> list[str]:
        return self.users.get((tenant, name, version), [])


def requests(options: pb.DatasetOptions, data: bytes) -> Iterator[pb.CreateDatasetRequest]:
    yield pb.CreateDatasetRequest(options=options)
    for start in range(0, len(data), CHUNK):
        yield pb.CreateDatasetRequest(chunk=data[start:start + CHUNK])


class Client:
    def __init__(self, stub: dataset_pb2_grpc.DatasetServiceStub, tenant: str) -> None:
        self.stub, self.tenant = stub, tenant
        self.metadata = identities.metadata(tenant, "dataset")

    async def create(self, data: bytes, **options) -> pb.CreateDatasetResponse:
        options.setdefault("wait", True)
        return await self.stub.CreateDataset(requests(pb.DatasetOptions(**options), data), metadata=self.metadata)



@pytest.fixture(scope="session")
def shakespeare() -> bytes:
    return SHAKESPEARE.read_bytes()[:150_000]


@pytest.fixture
def dataset_settings(settings_env) -> Settings:
    return Settings.from_env({**settings_env, "LLMP_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)})


@pytest.fixture
def lineage() -> Lineage:
    return Lineage()


@pytest.fixture
async def service(dataset_settings, lineage):
    app = await server.build_app(dataset_settings, models_using=lineage, shard_tokens=20_000)
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield dataset_pb2_grpc.DatasetServiceStub(channel)
    await channel.close()
    await app.stop()


@pytest.fixture
async def start_service(dataset_settings, lineage):
    """Start another instance of the service (a replica) on its own port; all are stopped at the end.
    Returns (app, stub); keyword arguments go to `server.build_app`."""
    started: list[tuple[object, grpc.aio.Channel]] = []

    async def start(**kwargs):
        app = await server.build_app(dataset_settings, models_using=lineage, shard_tokens=20_000, **kwargs)
        port = await app.start("127.0.0.1:0")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((app, channel))
        return app, dataset_pb2_grpc.DatasetServiceStub(channel)

    yield start
    for app, channel in started:
        await channel.close()
        await app.stop()


@pytest.fixture
def store(dataset_settings) -> ObjectStore:
    return ObjectStore(dataset_settings.s3)


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(service, tenant) -> Client:
    return Client(service, tenant)
