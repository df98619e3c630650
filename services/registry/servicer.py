"""gRPC handlers of `llmp.registry.v1.RegistryService`: validate, convert, call the domain modules."""
# ruff: noqa: N802 (gRPC method names are the proto's CamelCase)

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2 as pb
from llmp.registry.v1 import registry_pb2_grpc

from services.common import contracts
from services.common.db import Database
from services.common.errors import Conflict, InvalidArgument, NotFound
from services.common.identity import caller_from_context
from services.common.s3 import ObjectStore
from services.registry import aliases, catalog, downloads, gates, registration
from services.registry.exports import Exports
from services.registry.imports import Imports

SERVICE_NAME = "llmp.registry.v1.RegistryService"


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def export_message(row: dict[str, Any]) -> pb.Export:
    return pb.Export(
        id=str(row["id"]), model=common_pb2.ModelRef(name=row["name"], version=row["version"]), format=row["format"],
        state=pb.ExportState.Value(f"EXPORT_STATE_{row['state']}"),
        parity_report_json=json.dumps(row["parity"], sort_keys=True) if row["parity"] else "", error=row["error"],
        artifacts=[pb.Artifact(path=item["path"], object=common_pb2.StoredObject(
            key=item["key"], size=item["size"], sha256=item["sha256"], role=item.get("role", ""),
            xxh3_128=item.get("xxh3_128", ""))) for item in row["artifacts"]],
        triton_repository_prefix=row["triton_prefix"], triton_model_name=row["triton_model"],
        created_at=_timestamp(row["created_at"]), updated_at=_timestamp(row["updated_at"]),
    )


def version_message(view: catalog.VersionView) -> pb.ModelVersion:
    row = view.row
    return pb.ModelVersion(
        ref=common_pb2.ModelRef(name=row["name"], version=row["version"]),
        state=pb.VersionState.Value(f"VERSION_STATE_{row['state']}"),
        artifacts=[pb.Artifact(path=item["path"], object=common_pb2.StoredObject(
            key=item["key"], size=item["size"], sha256=item["sha256"], role=item["role"],
            xxh3_128=item["xxh3_128"])) for item in view.artifacts],
        lineage=pb.Lineage(
            dataset=common_pb2.DatasetRef(name=row["dataset_name"], version=row["dataset_version"]),
            training_job_id=row["training_job_id"], code_version=row["code_version"],
            environment={str(k): str(v) for k, v in row["environment"].items()},
            parent=common_pb2.ModelRef(name=row["parent_name"], version=row["parent_version"]),
            origin=row.get("origin", "")),
        metrics={str(k): float(v) for k, v in row["metrics"].items()},
        exports=[export_message(item) for item in view.exports], aliases=view.aliases, deployments=view.deployments,
        digest=row["digest"], prefix=row["prefix"], source_prefix=row["source_prefix"], created_by=row["created_by"],
        created_at=_timestamp(row["created_at"]), ready_at=_timestamp(row["ready_at"]),
        description=row["description"],
    )


def import_message(row: dict[str, Any]) -> pb.ImportStatus:
    details = row["environment"]
    return pb.ImportStatus(
        ref=common_pb2.ModelRef(name=row["name"], version=row["version"]),
        state=pb.VersionState.Value(f"VERSION_STATE_{row['state']}"), error=row["error"],
        files=int(details.get("files", 0)), bytes=int(details.get("bytes", 0)),
        architecture=details.get("architecture", ""), created_at=_timestamp(row["created_at"]))


def _gate_message(row: dict[str, Any]) -> pb.AliasGate:
    return pb.AliasGate(model_name=row["name"], alias=row["alias"],
                        dataset=common_pb2.DatasetRef(name=row["dataset_name"], version=row["dataset_version"]),
                        split=row["split"], metric=row["metric"], max_regression=row["max_regression"],
                        updated_by=row["updated_by"], updated_at=_timestamp(row["updated_at"]))


def alias_message(row: dict[str, Any]) -> pb.Alias:
    return pb.Alias(model_name=row["name"], alias=row["alias"], version=row["version"], etag=row["etag"],
                    updated_at=_timestamp(row["updated_at"]), updated_by=row["updated_by"])


def model_message(row: dict[str, Any]) -> pb.Model:
    return pb.Model(name=row["name"], latest_version=row["latest_version"], version_count=row["version_count"],
                    aliases=[alias_message(item) for item in row["aliases"]], created_at=_timestamp(row["created_at"]))


def _lineage(lineage: pb.Lineage) -> registration.Lineage:
    return registration.Lineage(
        dataset_name=lineage.dataset.name, dataset_version=lineage.dataset.version,
        training_job_id=lineage.training_job_id, code_version=lineage.code_version,
        environment=dict(lineage.environment), parent_name=lineage.parent.name, parent_version=lineage.parent.version)


def _reservation_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no reservation {value!r}") from None


def _ref(ref: common_pb2.ModelRef) -> tuple[str, int]:
    return contracts.validate_name(ref.name, "model name"), contracts.validate_version(ref.version)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, db: Database, store: ObjectStore, exports: Exports, imports: Imports,
                 evaluations: gates.Evaluations | None = None) -> None:
        self.db, self.store, self.exports, self.imports = db, store, exports, imports
        self.evaluations = evaluations  # the training service's, for gated aliases

    async def RegisterModelVersion(self, request: pb.RegisterModelVersionRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = await registration.register(self.db, self.store, caller, registration.Registration(
            model_name=request.model_name, source_prefix=request.source_prefix, lineage=_lineage(request.lineage),
            metrics=dict(request.metrics), description=request.description))
        view = await catalog.get_version(self.db, caller.tenant, name, version)
        return pb.RegisterModelVersionResponse(version=version_message(view))

    async def ReserveModelVersion(self, request: pb.ReserveModelVersionRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        reservation = await registration.reserve(self.db, caller, registration.Registration(
            model_name=request.model_name, source_prefix="", lineage=_lineage(request.lineage),
            metrics=dict(request.metrics), description=request.description))
        return pb.ReserveModelVersionResponse(
            ref=common_pb2.ModelRef(name=reservation.name, version=reservation.version),
            reservation_id=str(reservation.reservation_id), prefix=reservation.prefix,
            lease_seconds=reservation.lease_seconds)

    async def RenewModelVersionReservation(self, request: pb.RenewModelVersionReservationRequest,
                                           context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        reservation = await registration.renew(self.db, caller, _reservation_id(request.reservation_id))
        return pb.RenewModelVersionReservationResponse(lease_seconds=reservation.lease_seconds)

    async def CommitModelVersion(self, request: pb.CommitModelVersionRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = await registration.commit(
            self.db, self.store, caller, _reservation_id(request.reservation_id),
            [registration.DeclaredArtifact(item.path, item.size, item.sha256, item.xxh3_128, item.crc32)
             for item in request.artifacts])
        view = await catalog.get_version(self.db, caller.tenant, name, version)
        return pb.CommitModelVersionResponse(version=version_message(view))

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        row = await catalog.get_model(self.db, caller.tenant, contracts.validate_name(request.name, "model name"))
        return pb.GetModelResponse(model=model_message(row))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        rows, token = await catalog.list_models(self.db, caller.tenant, request.page.page_size, request.page.page_token)
        return pb.ListModelsResponse(models=[model_message(row) for row in rows],
                                     page=common_pb2.PageResponse(next_page_token=token))

    async def GetModelVersion(self, request: pb.GetModelVersionRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = _ref(common_pb2.ModelRef(name=request.name, version=request.version))
        view = await catalog.get_version(self.db, caller.tenant, name, version)
        return pb.GetModelVersionResponse(version=version_message(view))

    async def ListModelVersions(self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name = contracts.validate_name(request.name, "model name")
        views, token = await catalog.list_versions(self.db, caller.tenant, name, request.page.page_size,
                                                   request.page.page_token)
        return pb.ListModelVersionsResponse(versions=[version_message(view) for view in views],
                                            page=common_pb2.PageResponse(next_page_token=token))

    async def ListModelVersionsByDataset(self, request: pb.ListModelVersionsByDatasetRequest,
                                         context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name = contracts.validate_name(request.dataset.name, "dataset name")
        version = contracts.validate_version(request.dataset.version, "dataset version")
        found = await catalog.list_by_dataset(self.db, caller.tenant, name, version)
        return pb.ListModelVersionsByDatasetResponse(
            versions=[common_pb2.ModelRef(name=model, version=number) for model, number in found])

    async def DeleteModelVersion(self, request: pb.DeleteModelVersionRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = _ref(common_pb2.ModelRef(name=request.name, version=request.version))
        deleted = await catalog.delete_version(self.db, self.store, caller.tenant, name, version)
        return pb.DeleteModelVersionResponse(objects_deleted=deleted)

    async def SetAlias(self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        actor = request.actor or caller.key_id
        note = ""
        if request.expected_etag and not request.must_not_exist:  # a move: a gated alias asks its gate first
            note = await self._gate(caller.tenant, request.model_name, request.alias, request.version, actor,
                                    request.reason)
        row = await aliases.set_alias(
            self.db, caller.tenant, request.model_name, request.alias, request.version,
            expected_etag=request.expected_etag, must_not_exist=request.must_not_exist,
            actor=actor, reason=request.reason, gate=note)
        return pb.SetAliasResponse(alias=alias_message(row))

    async def _gate(self, tenant: str, name: str, alias: str, version: int, actor: str, reason: str) -> str:
        """The gate's verdict on moving `alias` to `version`: its note when allowed ('' without a gate);
        a refusal is recorded in the history and raised (409)."""
        gate = await gates.get_gate(self.db, tenant, name, alias)
        if gate is None:
            return ""
        if self.evaluations is None:
            raise Conflict(f"alias {alias} of {name} is gated, and this registry cannot reach evaluations")
        current = await aliases.get_alias(self.db, tenant, name, alias)
        decision = await gates.decide(gate, self.evaluations, name, current["version"], version)
        if not decision.allowed:
            await gates.record_refusal(self.db, tenant, name, alias, version, decision, actor, reason)
            raise gates.refuse(decision)
        return decision.message

    async def PutAliasGate(self, request: pb.PutAliasGateRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        message = request.gate
        row = await gates.put_gate(self.db, caller.tenant, message.model_name, message.alias, gates.Gate(
            message.dataset.name, message.dataset.version, message.split, message.metric, message.max_regression),
            caller.key_id)
        return pb.PutAliasGateResponse(gate=_gate_message(row))

    async def GetAliasGate(self, request: pb.GetAliasGateRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT * FROM registry_alias_gates WHERE tenant = %s AND name = %s AND alias = %s",
                (caller.tenant, request.model_name, request.alias))).fetchone()
        if row is None:
            raise NotFound(f"alias {request.alias} of model {request.model_name} has no gate")
        return pb.GetAliasGateResponse(gate=_gate_message(row))

    async def CheckAliasGate(self, request: pb.CheckAliasGateRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        note = await self._gate(caller.tenant, request.model_name, request.alias, request.version,
                                request.actor or caller.key_id, "canary rollout")
        return pb.CheckAliasGateResponse(allowed=True, message=note)

    async def GetAlias(self, request: pb.GetAliasRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        row = await aliases.get_alias(self.db, caller.tenant, request.model_name, request.alias)
        return pb.GetAliasResponse(alias=alias_message(row))

    async def ListAliasHistory(self, request: pb.ListAliasHistoryRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        rows = await aliases.history(self.db, caller.tenant, request.model_name, request.alias)
        return pb.ListAliasHistoryResponse(entries=[pb.AliasHistoryEntry(
            sequence=row["sequence"], alias=row["alias"], from_version=row["from_version"],
            to_version=row["to_version"], actor=row["actor"], reason=row["reason"], at=_timestamp(row["at"]),
            decision=row["decision"], gate=row["gate"])
            for row in rows])

    async def ResolveAlias(self, request: pb.ResolveAliasRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        row = await aliases.get_alias(self.db, caller.tenant, request.model_name, request.alias)
        view = await catalog.get_version(self.db, caller.tenant, row["name"], row["version"])
        return pb.ResolveAliasResponse(version=version_message(view), alias=alias_message(row))

    async def CreateExport(self, request: pb.CreateExportRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = _ref(request.model)
        row = await self.exports.create(caller.tenant, name, version, request.format)
        return pb.CreateExportResponse(export=export_message(row))

    async def GetExport(self, request: pb.GetExportRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = _ref(request.model)
        row = await self.exports.get(caller.tenant, name, version, request.format)
        return pb.GetExportResponse(export=export_message(row))

    async def MarkDeployed(self, request: pb.MarkDeployedRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = _ref(request.model)
        found = await catalog.mark_deployed(self.db, caller.tenant, name, version, request.deployment,
                                            request.export_format)
        return pb.MarkDeployedResponse(deployments=found)

    async def UnmarkDeployed(self, request: pb.UnmarkDeployedRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = _ref(request.model)
        found = await catalog.unmark_deployed(self.db, caller.tenant, name, version, request.deployment)
        return pb.UnmarkDeployedResponse(deployments=found)

    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadArtifactResponse]:
        caller = caller_from_context(context)
        name, version = _ref(request.model)
        found = await downloads.find_artifact(self.db, caller.tenant, name, version, request.path)
        first = True
        async for offset, data in downloads.stream(self.store, found["key"], found["size"], found["sha256"]):
            if first:
                yield pb.DownloadArtifactResponse(data=data, offset=offset, size=found["size"], sha256=found["sha256"])
                first = False
            else:
                yield pb.DownloadArtifactResponse(data=data, offset=offset)
        if first:  # an empty object still announces its size and digest
            yield pb.DownloadArtifactResponse(size=0, sha256=found["sha256"])

    async def ImportModelVersion(self, request_iterator: AsyncIterator[pb.ImportModelVersionRequest],
                                 context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "options":
            raise InvalidArgument("the first ImportModelVersion message must carry the options")

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only the first ImportModelVersion message may carry options")
                yield message.chunk

        reservation = await self.imports.start(caller, first.options.model_name, first.options.description,
                                               chunks())
        row = await self.imports.status(caller.tenant, reservation.name, reservation.version)
        return pb.ImportModelVersionResponse(**{"import": import_message(row)})

    async def GetImport(self, request: pb.GetImportRequest, context: grpc.aio.ServicerContext):
        caller = caller_from_context(context)
        name, version = _ref(common_pb2.ModelRef(name=request.name, version=request.version))
        row = await self.imports.status(caller.tenant, name, version)
        return pb.GetImportResponse(**{"import": import_message(row)})
