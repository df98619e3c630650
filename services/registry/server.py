"""The registry service process: PostgreSQL, S3, the gRPC app, the sweep and the export tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from llmp.registry.v1 import registry_pb2_grpc

from services.common import topology
from services.common.config import Settings
from services.common.db import Database
from services.common.grpc_client import ServiceClients
from services.common.grpc_server import GrpcApp, run_main
from services.common.identity import service_principal
from services.common.s3 import ObjectStore
from services.registry import gates, registration
from services.registry.exports import Exports
from services.registry.imports import Imports
from services.registry.servicer import SERVICE_NAME, RegistryServicer

MIGRATIONS = Path(__file__).parent / "migrations"
SWEEP_SECONDS = 300.0  # period of the garbage collection of interrupted registrations


@dataclass
class Registry:
    """Everything the running service holds, so tests can build it in-process."""

    app: GrpcApp
    db: Database
    store: ObjectStore
    exports: Exports
    imports: Imports


async def build(settings: Settings, *, sweep_seconds: float = SWEEP_SECONDS) -> Registry:
    db = await Database.connect(settings.database_url, component="registry", migrations_dir=MIGRATIONS)
    store = ObjectStore(settings.s3)
    await asyncio.to_thread(store.ensure_bucket)
    exports = Exports(db, store)
    imports = Imports(db, store, settings.max_import_bytes, work_root=settings.state_dir / "registry-imports")
    await asyncio.to_thread(imports.remove_leftovers)
    # The first sweep runs now (collecting what a crash left), then every `sweep_seconds`; each period
    # also fails exports whose runner stopped heartbeating (another replica that died, say).
    sweeper = registration.sweeper(db, store, sweep_seconds, also=exports.recover)
    sweeper.start()

    async def stop_background() -> None:
        await sweeper.close()
        await exports.close()
        await imports.close()

    async def store_check() -> None:
        await asyncio.to_thread(store.check)

    # Gated aliases read (and start) evaluations in the training service, as the caller who moves them.
    clients = ServiceClients(settings, principal=service_principal(topology.REGISTRY.name))
    app = GrpcApp(settings, topology.REGISTRY)
    app.add_servicer(registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                     RegistryServicer(db, store, exports, imports, gates.TrainingEvaluations(clients)), SERVICE_NAME)
    app.add_readiness_check("postgresql", db.check)
    app.add_readiness_check("s3", store_check)
    app.on_shutdown(db.close)
    app.on_shutdown(clients.close)
    app.on_shutdown(stop_background)  # hooks run in reverse: background work stops before the pool closes
    return Registry(app, db, store, exports, imports)


async def main(settings: Settings) -> None:
    registry = await build(settings)
    await registry.app.run()


if __name__ == "__main__":
    run_main(main, "registry")
