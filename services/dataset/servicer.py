"""gRPC handlers of `llmp.dataset.v1.DatasetService`: check the request, convert, call the domain."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from llmp.common.v1 import common_pb2
from llmp.dataset.v1 import dataset_pb2 as pb
from llmp.dataset.v1 import dataset_pb2_grpc

from services.common import contracts
from services.common.contracts import SPLITS
from services.common.errors import InvalidArgument
from services.common.identity import caller_from_context
from services.dataset.ingestion import Ingestor, ProgressEvent
from services.dataset.options import DEFAULT_NEAR_DUP_THRESHOLD, DEFAULT_VOCAB_SIZE, DatasetOptions, Fractions
from services.dataset.versions import ModelsUsing, VersionRow, VersionStore

FORMATS = {pb.CORPUS_FORMAT_UNSPECIFIED: "text", pb.CORPUS_FORMAT_TEXT: "text", pb.CORPUS_FORMAT_JSONL: "jsonl",
           pb.CORPUS_FORMAT_PAIRS: "pairs", pb.CORPUS_FORMAT_CHAT: "chat"}
MODES = {pb.DOCUMENT_MODE_UNSPECIFIED: "blank-line", pb.DOCUMENT_MODE_BLANK_LINE: "blank-line",
         pb.DOCUMENT_MODE_LINE: "line"}
TOKENIZERS = {pb.TOKENIZER_KIND_UNSPECIFIED: "bpe", pb.TOKENIZER_KIND_BPE: "bpe", pb.TOKENIZER_KIND_CHAR: "char",
              pb.TOKENIZER_KIND_MODEL: "model"}
STATES = {"PENDING": pb.VERSION_STATE_PENDING, "READY": pb.VERSION_STATE_READY, "FAILED": pb.VERSION_STATE_FAILED}


def _enum(table: dict[int, str], value: int, label: str) -> str:
    if value not in table:
        raise InvalidArgument(f"unknown {label} {value}")
    return table[value]


def options_from_proto(message: pb.DatasetOptions) -> DatasetOptions:
    """Domain options from the wire, zero values meaning the defaults."""
    fractions = message.fractions
    shares = (fractions.train, fractions.validation, fractions.test, fractions.calibration)
    return DatasetOptions(
        name=message.name,
        format=_enum(FORMATS, message.format, "format"),
        document_mode=_enum(MODES, message.document_mode, "document_mode"),
        text_field=message.text_field or "text",
        prompt_field=message.prompt_field or "prompt",
        completion_field=message.completion_field or "completion",
        tokenizer=_enum(TOKENIZERS, message.tokenizer, "tokenizer"),
        vocab_size=message.vocab_size or DEFAULT_VOCAB_SIZE,
        split_seed=message.split_seed,
        fractions=Fractions(*shares) if any(shares) else Fractions(),
        min_doc_chars=message.min_doc_chars or 1,
        max_doc_chars=message.max_doc_chars,
        near_dup_threshold=message.near_dup_threshold or DEFAULT_NEAR_DUP_THRESHOLD,
        source_uri=message.source_uri,
        tokenizer_model=message.tokenizer_model,
        tokenizer_model_version=message.tokenizer_model_version,
        purpose=message.purpose or "training",
    )


def _reverse(table: dict[int, str]) -> dict[str, int]:
    return {name: number for number, name in table.items() if number}


def options_to_proto(options: DatasetOptions) -> pb.DatasetOptions:
    return pb.DatasetOptions(
        name=options.name, format=_reverse(FORMATS)[options.format],
        document_mode=_reverse(MODES)[options.document_mode], text_field=options.text_field,
        prompt_field=options.prompt_field, completion_field=options.completion_field,
        tokenizer=_reverse(TOKENIZERS)[options.tokenizer], vocab_size=options.vocab_size,
        split_seed=options.split_seed, fractions=pb.SplitFractions(**vars(options.fractions)),
        min_doc_chars=options.min_doc_chars, max_doc_chars=options.max_doc_chars,
        near_dup_threshold=options.near_dup_threshold, source_uri=options.source_uri,
        tokenizer_model=options.tokenizer_model, tokenizer_model_version=options.tokenizer_model_version,
        purpose=options.purpose,
    )


def _timestamp(value) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def version_to_proto(row: VersionRow) -> pb.DatasetVersion:
    stats = row.stats
    message = pb.DatasetVersion(
        name=row.name, version=row.version, state=STATES[row.state], error=row.error, digest=row.digest,
        options=options_to_proto(row.options), manifest_key=row.manifest_key, source_bytes=row.source_bytes,
        tenant=row.tenant, created_at=_timestamp(row.created_at), finished_at=_timestamp(row.finished_at),
        objects=[common_pb2.StoredObject(key=o["key"], size=o["size"], sha256=o["sha256"], role=o.get("role", ""))
                 for o in row.objects],
    )
    for name in SPLITS if "splits" in stats else ():
        message.splits.append(pb.SplitStats(name=name, **stats["splits"][name]))
    if "cleaning" in stats:
        message.cleaning.CopyFrom(pb.CleaningStats(**stats["cleaning"]))
    if "tokenizer" in stats:
        tokenizer = stats["tokenizer"]
        message.tokenizer.CopyFrom(pb.TokenizerInfo(
            kind=tokenizer["kind"], vocab_size=tokenizer["vocab_size"], eos_token_id=tokenizer["eos_token_id"],
            pad_token_id=tokenizer["pad_token_id"], prefix=tokenizer["prefix"], dtype=stats["dtype"],
            sha256=tokenizer.get("sha256", ""), model_name=tokenizer.get("model", ""),
            model_version=tokenizer.get("model_version", 0)))
    return message


def _event_to_proto(event: ProgressEvent) -> pb.WatchIngestResponse:
    unit, done = ("documents", event.documents_done) if event.phase == "pack" else ("bytes", event.bytes_done)
    total = event.bytes_total if unit == "bytes" else 0
    return pb.WatchIngestResponse(
        progress=common_pb2.Progress(phase=event.phase, done=done, total=total, unit=unit),
        bytes_done=event.bytes_done, documents_done=event.documents_done, state=STATES[event.state],
        version=version_to_proto(event.version) if event.version else None,
    )


def _name(name: str) -> str:
    if not name:
        raise InvalidArgument("name is required")
    return name


class DatasetServicer(dataset_pb2_grpc.DatasetServiceServicer):
    def __init__(self, ingestor: Ingestor, versions: VersionStore, models_using: ModelsUsing) -> None:
        self.ingestor = ingestor
        self.versions = versions
        self.models_using = models_using

    async def CreateDataset(self, request_iterator: AsyncIterator[pb.CreateDatasetRequest],  # noqa: N802 (gRPC name)
                            context: grpc.aio.ServicerContext) -> pb.CreateDatasetResponse:
        caller = caller_from_context(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "options":
            raise InvalidArgument("the first CreateDataset message must carry the options")
        options = options_from_proto(first.options)

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only the first CreateDataset message may carry options")
                yield message.chunk

        row, created = await self.ingestor.create(caller.tenant, options, chunks(), wait=first.options.wait)
        return pb.CreateDatasetResponse(version=version_to_proto(row), created=created)

    async def WatchIngest(self, request: pb.WatchIngestRequest,  # noqa: N802 (gRPC name)
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchIngestResponse]:
        caller = caller_from_context(context)
        if request.version <= 0:
            raise InvalidArgument("version must be positive")
        async for event in self.ingestor.watch(caller.tenant, _name(request.name), request.version):
            yield _event_to_proto(event)

    async def GetDatasetVersion(self, request: pb.GetDatasetVersionRequest,  # noqa: N802 (gRPC name)
                                context: grpc.aio.ServicerContext) -> pb.GetDatasetVersionResponse:
        caller = caller_from_context(context)
        if request.version < 0:
            raise InvalidArgument("version must be positive, or 0 for the latest READY version")
        row = await self.versions.get(caller.tenant, _name(request.name), request.version)
        return pb.GetDatasetVersionResponse(version=version_to_proto(row))

    async def ListDatasets(self, request: pb.ListDatasetsRequest,  # noqa: N802 (gRPC name)
                           context: grpc.aio.ServicerContext) -> pb.ListDatasetsResponse:
        caller = caller_from_context(context)
        summaries, token = await self.versions.list_datasets(
            caller.tenant, contracts.page_size(request.page.page_size), request.page.page_token)
        return pb.ListDatasetsResponse(
            datasets=[pb.DatasetSummary(name=s.name, version_count=s.version_count, latest=version_to_proto(s.latest),
                                        created_at=_timestamp(s.created_at)) for s in summaries],
            page=common_pb2.PageResponse(next_page_token=token))

    async def ListDatasetVersions(self, request: pb.ListDatasetVersionsRequest,  # noqa: N802 (gRPC name)
                                  context: grpc.aio.ServicerContext) -> pb.ListDatasetVersionsResponse:
        caller = caller_from_context(context)
        rows, token = await self.versions.list_versions(
            caller.tenant, _name(request.name), contracts.page_size(request.page.page_size), request.page.page_token)
        return pb.ListDatasetVersionsResponse(versions=[version_to_proto(row) for row in rows],
                                              page=common_pb2.PageResponse(next_page_token=token))

    async def DeleteDatasetVersion(self, request: pb.DeleteDatasetVersionRequest,  # noqa: N802 (gRPC name)
                                   context: grpc.aio.ServicerContext) -> pb.DeleteDatasetVersionResponse:
        caller = caller_from_context(context)
        if request.version <= 0:
            raise InvalidArgument("version must be positive")
        removed = await self.versions.delete(caller.tenant, _name(request.name), request.version, self.models_using)
        return pb.DeleteDatasetVersionResponse(objects_deleted=removed)
