"""The dataset service process: wiring and lifecycle. Start with `python -m services.dataset.server`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from llmp.dataset.v1 import dataset_pb2_grpc

from services.common import topology
from services.common.config import Settings
from services.common.db import Database
from services.common.grpc_client import ServiceClients
from services.common.grpc_server import GrpcApp, run_main
from services.common.identity import service_principal
from services.common.s3 import ObjectStore
from services.dataset import shards
from services.dataset.ingestion import HEARTBEAT_SECONDS, LEASE_SECONDS, Ingestor
from services.dataset.lineage import registry_lineage
from services.dataset.model_tokenizers import ResolveTokenizer, registry_tokenizers
from services.dataset.servicer import DatasetServicer
from services.dataset.versions import ModelsUsing, VersionStore

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAME = "llmp.dataset.v1.DatasetService"


async def build_app(settings: Settings, *, models_using: ModelsUsing | None = None,
                    shard_tokens: int | None = None, lease_seconds: float = LEASE_SECONDS,
                    heartbeat_seconds: float = HEARTBEAT_SECONDS, build_grace: float | None = None,
                    tokenizer_source: ResolveTokenizer | None = None) -> GrpcApp:
    """The service's gRPC app, connected to PostgreSQL and S3, not yet started.

    It resumes PENDING versions whose lease has lapsed from the moment it is built. At shutdown, after
    the calls in flight are drained, builds get `build_grace` seconds (default: the shutdown grace) to
    finish; the rest stay PENDING for another replica.
    """
    db = await Database.connect(settings.database_url, component="dataset", migrations_dir=MIGRATIONS)
    store = ObjectStore(settings.s3)
    await asyncio.to_thread(store.ensure_bucket)
    versions = VersionStore(db, store)
    clients = ServiceClients(settings, principal=service_principal(topology.DATASET.name))
    ingestor = Ingestor(versions, settings.state_dir / "dataset-work", settings.max_upload_bytes,
                        shard_tokens=shard_tokens, lease_seconds=lease_seconds, heartbeat_seconds=heartbeat_seconds,
                        tokenizer_source=tokenizer_source or registry_tokenizers(clients),
                        ingest_bytes_per_day=settings.tenant_ingest_bytes_per_day,
                        build_slots=settings.dataset_build_slots,
                        tenant_build_slots=settings.tenant_dataset_build_slots,
                        fanout=shards.factory(settings, store))
    ingestor.start()
    app = GrpcApp(settings, topology.DATASET)
    app.add_servicer(dataset_pb2_grpc.add_DatasetServiceServicer_to_server,
                     DatasetServicer(ingestor, versions, models_using or registry_lineage(clients)), SERVICE_NAME)
    app.add_readiness_check("postgresql", db.check)
    app.add_readiness_check("s3", lambda: asyncio.to_thread(store.check))
    app.on_shutdown(db.close)
    app.on_shutdown(clients.close)
    grace = settings.shutdown_grace if build_grace is None else build_grace
    # hooks run in reverse: builds finish or are released before the pool closes
    app.on_shutdown(lambda: ingestor.close(grace))
    return app


async def serve(settings: Settings) -> None:
    app = await build_app(settings)
    await app.run()


def main() -> None:
    run_main(serve, "dataset")


if __name__ == "__main__":
    main()
