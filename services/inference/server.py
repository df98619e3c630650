"""Wiring and lifecycle of the inference service: `python -m services.inference.server`."""

from __future__ import annotations

import os
from pathlib import Path

from llmp.inference.v1 import inference_pb2_grpc

from services.common import topology
from services.common.config import Settings
from services.common.db import Database
from services.common.grpc_client import ServiceClients
from services.common.grpc_server import GrpcApp, run_main
from services.common.identity import service_principal
from services.common.s3 import ObjectStore
from services.inference import metrics, model_repository
from services.inference.canary import CanaryController
from services.inference.deployments import Deployments
from services.inference.mesh import IstioWeights
from services.inference.model_source import ModelSource, S3ModelSource
from services.inference.servicer import InferenceServicer
from services.inference.triton_engine import TritonEngine

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(settings: Settings, source: ModelSource | None = None) -> tuple[GrpcApp, Deployments]:
    """The service, wired but not started (tests call this with their own model source)."""
    db = await Database.connect(settings.database_url, component="inference", migrations_dir=MIGRATIONS)
    engine = TritonEngine(settings.triton_grpc_url)
    clients = ServiceClients(settings, principal=service_principal(topology.INFERENCE.name))
    if source is None:
        store = ObjectStore(settings.s3)
        source = S3ModelSource(clients, store, settings.state_dir / "inference-cache")
    # The mesh splits traffic only between pods of the two tracks; a process without a track splits itself.
    mesh = IstioWeights.in_cluster(os.environ) if settings.inference_track else None
    deployments = Deployments(db, engine, source, model_repository.open_repository(settings),
                              model_repository.BatchingConfig.from_settings(settings),
                              track=settings.inference_track, mesh=mesh)
    fleet_metrics = metrics.FleetMetrics(db)  # this process's figures into PostgreSQL, for the canary controller
    canary = CanaryController(db, deployments)  # its weights go through deployments.put, mesh included
    app = GrpcApp(settings, topology.INFERENCE)
    # A lone stream's first token waits for a core only where Triton's models run on the CPUs.
    headstart = settings.triton_instance_kind == "KIND_CPU"
    app.add_servicer(inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                     InferenceServicer(deployments, engine, canary, headstart), "llmp.inference.v1.InferenceService")
    app.add_readiness_check("postgresql", db.check)
    app.add_readiness_check("triton", engine.check)
    app.on_shutdown(db.close)
    app.on_shutdown(fleet_metrics.close)  # the last flush, after the server stopped serving, before the pool closes
    app.on_shutdown(engine.close)
    app.on_shutdown(clients.close)
    app.on_shutdown(deployments.close)
    app.on_shutdown(canary.close)  # hooks run in reverse: the controller stops first
    await deployments.restore()
    fleet_metrics.start()
    canary.start()
    return app, deployments


async def main(settings: Settings) -> None:
    app, _ = await build(settings)
    await app.run()


if __name__ == "__main__":
    run_main(main, "inference")
