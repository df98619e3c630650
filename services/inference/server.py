"""Wiring and lifecycle of the inference service: `python -m services.inference.server`."""

from __future__ import annotations

from pathlib import Path

from llmp.inference.v1 import inference_pb2_grpc

from services.common import topology
from services.common.config import Settings
from services.common.db import Database
from services.common.errors import InvalidArgument
from services.common.grpc_client import ServiceClients
from services.common.grpc_server import GrpcApp, run_main
from services.common.s3 import ObjectStore
from services.inference.deployments import Deployments
from services.inference.model_source import ModelSource, S3ModelSource
from services.inference.servicer import InferenceServicer
from services.inference.triton_engine import TritonEngine

MIGRATIONS = Path(__file__).parent / "migrations"


def model_repository_path(settings: Settings) -> Path:
    configured = settings.triton_model_repository
    if configured.startswith("s3://"):
        raise InvalidArgument("an s3:// Triton model repository is read by the NGC tritonserver; the inference "
                              "service needs the same repository mounted locally (LLMP_TRITON_MODEL_REPOSITORY)")
    return Path(configured) if configured else settings.state_dir / "triton-models"


async def build(settings: Settings, source: ModelSource | None = None) -> tuple[GrpcApp, Deployments]:
    """The service, wired but not started (tests call this with their own model source)."""
    db = await Database.connect(settings.database_url, component="inference", migrations_dir=MIGRATIONS)
    engine = TritonEngine(settings.triton_grpc_url)
    clients = ServiceClients(settings)
    if source is None:
        store = ObjectStore(settings.s3)
        source = S3ModelSource(clients, store, settings.state_dir / "inference-cache")
    repository = model_repository_path(settings)
    repository.mkdir(parents=True, exist_ok=True)
    deployments = Deployments(db, engine, source, repository)
    app = GrpcApp(settings, topology.INFERENCE)
    app.add_servicer(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(deployments, engine),
                     "llmp.inference.v1.InferenceService")
    app.add_readiness_check("postgresql", db.check)
    app.add_readiness_check("triton", engine.check)
    app.on_shutdown(db.close)
    app.on_shutdown(engine.close)
    app.on_shutdown(clients.close)
    app.on_shutdown(deployments.close)
    await deployments.restore()
    return app, deployments


async def main(settings: Settings) -> None:
    app, _ = await build(settings)
    await app.run()


if __name__ == "__main__":
    run_main(main, "inference")
