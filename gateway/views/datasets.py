"""`/v1/datasets…`: create dataset versions from streamed uploads or S3, inspect, follow and delete them.

The upload is never read whole: the request body (raw, or the first file part of a multipart form)
is forwarded chunk by chunk through the client-streaming `DatasetService/CreateDataset`.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

from aiohttp import web
from llmp.common.v1 import common_pb2
from llmp.dataset.v1 import dataset_pb2 as pb

from gateway.http import (
    EVENT_STREAM,
    EVENT_STREAM_HEADERS,
    PAGING,
    Link,
    Route,
    check_if_match,
    clients,
    etag_of,
    int32,
    int64,
    json_response,
    message_schema,
    page,
    path_version,
    query_int,
    responses,
    to_dict,
)
from gateway.state import SETTINGS
from services.common import contracts, errors

CHUNK = 1024 * 1024
FINAL_MAX_AGE = 3600  # seconds clients may keep a READY/FAILED version without asking again
# Seconds the gateway answers If-None-Match for a READY/FAILED version itself (well under FINAL_MAX_AGE;
# a DELETE through this gateway forgets it at once, one through another replica within this bound).
REVALIDATE_LOCALLY = 60.0
FORMATS = {"text": pb.CORPUS_FORMAT_TEXT, "jsonl": pb.CORPUS_FORMAT_JSONL, "pairs": pb.CORPUS_FORMAT_PAIRS,
           "chat": pb.CORPUS_FORMAT_CHAT}
MODES = {"blank-line": pb.DOCUMENT_MODE_BLANK_LINE, "line": pb.DOCUMENT_MODE_LINE}
TOKENIZERS = {"bpe": pb.TOKENIZER_KIND_BPE, "char": pb.TOKENIZER_KIND_CHAR, "model": pb.TOKENIZER_KIND_MODEL}
_SHARE = r"(?:0(?:\.[0-9]*)?|\.[0-9]+|1(?:\.0*)?)"
FRACTIONS_PATTERN = rf"^{_SHARE}(?:,{_SHARE}){{3}}$"  # four shares in [0, 1]; the service checks their sum
# The corpus of an upload, UTF-8 text (plain text, JSON Lines): the raw body or a multipart form's first file part;
# none with ?source=.
UPLOADS = {
    "text/plain": {"type": "string"},
    "multipart/form-data": {"type": "object", "required": ["file"], "additionalProperties": False,
                            "properties": {"file": {"type": "string", "contentMediaType": "text/plain",
                                                    "description": "the corpus (or the first part with a filename)"}}},
}
CREATE_QUERY = {
    "name": {"type": "string", "pattern": contracts.NAME_PATTERN}, "format": {"enum": list(FORMATS)},
    "document_mode": {"enum": list(MODES)},
    **{field: {"type": "string", "pattern": contracts.TEXT_PATTERN}
       for field in ("text_field", "prompt_field", "completion_field")},
    "tokenizer": {"enum": list(TOKENIZERS)},
    "vocab_size": int32(contracts.MIN_VOCAB_SIZE, contracts.MAX_VOCAB_SIZE, description="bpe only"),
    "split_seed": int64(0),
    "min_doc_chars": int32(0), "max_doc_chars": int32(0, description="0 (no limit) or at least min_doc_chars"),
    "tokenizer_model": {"type": "string", "pattern": contracts.NAME_PATTERN,
                        "description": "tokenizer=model: the registered model whose tokenizer files are used "
                                       "(copied unchanged; 404 when it has no READY version tokenizer_model_version)"},
    "tokenizer_model_version": int64(1),
    "purpose": {"enum": ["training", "evaluation"],
                "description": "evaluation: an external test set, every document in test (leave fractions out)"},
    "source": {"type": "string", "pattern": r"^s3://[^\u0000]*$",
               "description": "read the corpus from s3://{bucket}/imports/{tenant}/… (the platform bucket, the "
                              "caller tenant's import prefix) instead of the body; any other object is 404, "
                              "as a missing one is"},
    "fractions": {"type": "string", "pattern": FRACTIONS_PATTERN,
                  "description": "train,validation,test,calibration, summing to 1 with train > 0, "
                                 "e.g. 0.9,0.05,0.03,0.02"},
    "wait": {"type": "boolean"},
}


# What `present_version` makes of a version, and the bodies built from it.
VERSION_BODY = message_schema(
    pb.DatasetVersion.DESCRIPTOR, nullable=("created_at", "finished_at"),
    splits={"type": "object", "additionalProperties": message_schema(pb.SplitStats.DESCRIPTOR)},
    manifest={"type": "object", "required": ["key", "objects"], "properties": {
        "key": {"type": "string"},
        "objects": {"type": "array", "items": message_schema(common_pb2.StoredObject.DESCRIPTOR)}}})
VERSION_BODY["required"] = ["name", "version", "state", "splits", "manifest"]
_NEXT = {"next_page_token": {"type": "string", "pattern": contracts.PAGE_TOKEN_PATTERN}}
_DATASET_ITEM = {"type": "object", "required": ["name", "version_count", "latest"], "properties": {
    "name": {"type": "string"}, "version_count": {"type": "integer"}, "latest": VERSION_BODY,
    "created_at": {"type": "string"}}}
DATASET_LIST = {"type": "object", "required": ["datasets", "next_page_token"], "properties": {
    "datasets": {"type": "array", "items": _DATASET_ITEM}, **_NEXT}}
DATASET = {"type": "object", "required": ["name", "versions", "next_page_token"], "properties": {
    "name": {"type": "string"}, "versions": {"type": "array", "items": VERSION_BODY}, **_NEXT}}
DELETED = {"type": "object", "required": ["name", "version", "objects_deleted"], "properties": {
    "name": {"type": "string"}, "version": {"type": "integer"}, "objects_deleted": {"type": "integer"}}}


def present_version(version: pb.DatasetVersion) -> dict:
    """The REST shape: splits by name, the manifest with its objects' SHA-256 and size."""
    body = to_dict(version)
    body["splits"] = {split.pop("name"): split for split in body.get("splits", [])}
    body["manifest"] = {"key": body.pop("manifest_key"), "objects": body.pop("objects")}
    for unset in ("finished_at", "created_at"):
        body.setdefault(unset, None)
    return body


def _choice(request: web.Request, name: str, table: dict[str, int]) -> int:
    value = request.query.get(name)
    if value is None:
        return 0
    if value not in table:
        raise errors.ValidationFailed(f"{name}: must be one of {', '.join(table)}, not {value!r}")
    return table[value]


def _fractions(request: web.Request) -> pb.SplitFractions | None:
    raw = request.query.get("fractions")
    if raw is None:
        return None
    try:
        shares = [float(part) for part in raw.split(",")]
    except ValueError:
        raise errors.ValidationFailed(f"fractions: four comma-separated numbers, not {raw!r}") from None
    if len(shares) != 4 or not all(math.isfinite(share) for share in shares) \
            or not contracts.ecma_regex(FRACTIONS_PATTERN).search(raw):  # float() reads "nan", "inf", "1e-1"
        raise errors.ValidationFailed(f"fractions: four comma-separated numbers, not {raw!r}")
    return pb.SplitFractions(train=shares[0], validation=shares[1], test=shares[2], calibration=shares[3])


def _purpose(request: web.Request) -> str:
    value = request.query.get("purpose", "training")
    if value not in CREATE_QUERY["purpose"]["enum"]:
        raise errors.ValidationFailed(f"purpose: must be training or evaluation, not {value!r}")
    return value


def create_options(request: web.Request) -> pb.DatasetOptions:
    query = request.query
    if not query.get("name"):
        raise errors.ValidationFailed("name: the dataset name is required (?name=…)")
    contracts.validate_name(query["name"], "name")
    return pb.DatasetOptions(
        name=query["name"], format=_choice(request, "format", FORMATS),
        document_mode=_choice(request, "document_mode", MODES), tokenizer=_choice(request, "tokenizer", TOKENIZERS),
        text_field=query.get("text_field", ""), prompt_field=query.get("prompt_field", ""),
        completion_field=query.get("completion_field", ""),
        vocab_size=query_int(request, "vocab_size", 0, CREATE_QUERY["vocab_size"]),
        split_seed=query_int(request, "split_seed", 0, CREATE_QUERY["split_seed"]),
        min_doc_chars=query_int(request, "min_doc_chars", 0, CREATE_QUERY["min_doc_chars"]),
        max_doc_chars=query_int(request, "max_doc_chars", 0, CREATE_QUERY["max_doc_chars"]),
        tokenizer_model=query.get("tokenizer_model", ""),
        tokenizer_model_version=query_int(request, "tokenizer_model_version", 0,
                                          CREATE_QUERY["tokenizer_model_version"]),
        fractions=_fractions(request), source_uri=query.get("source", ""),
        purpose=_purpose(request), wait=query.get("wait", "false").lower() in {"1", "true", "yes"},
    )


async def _body_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The corpus bytes: the first file part of a multipart form (one with a filename, or named `file`), else the
    raw body; at most `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"upload of {request.content_length} bytes exceeds the limit of {limit} bytes")
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        part = await reader.next()
        while part is not None and not getattr(part, "filename", None) and getattr(part, "name", None) != "file":
            part = await reader.next()
        if part is None:
            raise errors.ValidationFailed("multipart upload has no file part")
        read = part.read_chunk
    else:
        read = request.content.read
    size = 0
    while True:
        chunk = await read(CHUNK)
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
        yield chunk


async def create_dataset(request: web.Request) -> web.Response:
    options = create_options(request)
    limit = request.app[SETTINGS].max_upload_bytes

    upload_error: list[Exception] = []  # why reading the body failed (grpc.aio then cancels the call)

    async def messages() -> AsyncIterator[pb.CreateDatasetRequest]:
        yield pb.CreateDatasetRequest(options=options)
        if not options.source_uri:
            try:
                async for chunk in _body_chunks(request, limit):
                    yield pb.CreateDatasetRequest(chunk=chunk)
            except Exception as error:  # over the limit, or the client went away: reported below
                upload_error.append(error)
                raise

    try:
        response = await clients(request).dataset.CreateDataset(messages())
    except errors.LlmpError as error:  # errors.Cancelled when the body could not be read
        raise (upload_error[0] if upload_error else error) from None
    version = response.version
    location = f"/v1/datasets/{version.name}/versions/{version.version}"
    status = 202 if version.state == pb.VERSION_STATE_PENDING else (201 if response.created else 200)
    return json_response(request, present_version(version), status=status, cache_control="no-store",
                         headers={"Location": location})


async def list_datasets(request: web.Request) -> web.Response:
    response = await clients(request).dataset.ListDatasets(pb.ListDatasetsRequest(page=page(request)))
    datasets = [{"name": d.name, "version_count": d.version_count, "latest": present_version(d.latest),
                 "created_at": to_dict(d).get("created_at")} for d in response.datasets]
    return json_response(request, {"datasets": datasets, "next_page_token": response.page.next_page_token})


async def get_dataset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    response = await clients(request).dataset.ListDatasetVersions(
        pb.ListDatasetVersionsRequest(name=name, page=page(request)))
    return json_response(request, {"name": name, "versions": [present_version(v) for v in response.versions],
                                   "next_page_token": response.page.next_page_token})


async def _version(request: web.Request) -> pb.DatasetVersion:
    response = await clients(request).dataset.GetDatasetVersion(pb.GetDatasetVersionRequest(
        name=request.match_info["name"], version=path_version(request)))
    return response.version


async def get_version(request: web.Request) -> web.Response:
    version = await _version(request)
    # READY and FAILED versions never change again: caches may keep them.
    if version.state == pb.VERSION_STATE_PENDING:
        return json_response(request, present_version(version))
    return json_response(request, present_version(version), cache_control=f"private, max-age={FINAL_MAX_AGE}",
                         immutable_for=REVALIDATE_LOCALLY)


async def delete_version(request: web.Request) -> web.Response:
    version = await _version(request)
    check_if_match(request, etag_of(present_version(version)), required=False)
    response = await clients(request).dataset.DeleteDatasetVersion(pb.DeleteDatasetVersionRequest(
        name=version.name, version=version.version))
    return json_response(request, {"name": version.name, "version": version.version,
                                   "objects_deleted": response.objects_deleted}, cache_control="no-store")


async def version_events(request: web.Request) -> web.StreamResponse:
    """Ingest progress as Server-Sent Events until the version is READY or FAILED."""
    message = pb.WatchIngestRequest(name=request.match_info["name"], version=path_version(request))
    with responses(clients(request).dataset.WatchIngest(message)) as events:
        first = await anext(events, None)  # an unknown version is a 404, not an empty stream
        response = web.StreamResponse(headers=EVENT_STREAM_HEADERS)
        await response.prepare(request)
        event, sequence = first, 0
        while event is not None:
            sequence += 1
            payload = to_dict(event)
            if event.HasField("version"):
                payload["version"] = present_version(event.version)
            kind = "version" if event.HasField("version") else "progress"
            await response.write(f"id: {sequence}\nevent: {kind}\ndata: {json.dumps(payload)}\n\n".encode())
            event = await anext(events, None)
    await response.write(b"data: [DONE]\n\n")
    return response


VERSION = "/v1/datasets/{name}/versions/{version}"
# Where a created version leads (each success of the create): its reads, its events, its deletion, its dataset.
_OF_VERSION = {"name": "$response.body#/name", "version": "$response.body#/version"}
VERSION_LINKS = {
    "GetVersion": Link("GET", VERSION, _OF_VERSION),
    "VersionEvents": Link("GET", VERSION + "/events", _OF_VERSION),
    "DeleteVersion": Link("DELETE", VERSION, _OF_VERSION),
    "GetDataset": Link("GET", "/v1/datasets/{name}", {"name": "$response.body#/name"}),
}


def _next_page(method: str, path: str, **path_parameters: str) -> dict[str, Link]:
    """The link from a page of a list to the next one."""
    return {"NextPage": Link(method, path, {**path_parameters, "page_token": "$response.body#/next_page_token"})}


ROUTES = [
    Route("POST", "/v1/datasets", create_dataset,
          "Create a dataset version from the body (raw or multipart) or ?source=s3://… → 202 while it is built",
          query=CREATE_QUERY, required_query=("name",), uploads=UPLOADS, tag="datasets", returns=VERSION_BODY,
          links=VERSION_LINKS,
          responses={200: "Same corpus and options: the existing version", 201: "Created READY (?wait=true)",
                     202: "Accepted, PENDING", 404: "?source names no object of the caller's import prefix",
                     413: "Upload over the limit"}),
    Route("GET", "/v1/datasets", list_datasets, "List datasets with their latest version", query=PAGING,
          tag="datasets", returns=DATASET_LIST, links=_next_page("GET", "/v1/datasets")),
    Route("GET", "/v1/datasets/{name}", get_dataset, "A dataset's versions, newest first", query=PAGING,
          tag="datasets", returns=DATASET,
          links=_next_page("GET", "/v1/datasets/{name}", name="$request.path.name")),
    Route("GET", VERSION, get_version, "A version: splits, tokens, tokenizer, manifest checksums", tag="datasets",
          returns=VERSION_BODY),
    Route("GET", VERSION + "/events", version_events, "Ingest progress (text/event-stream)", tag="datasets",
          media_type=EVENT_STREAM),
    Route("DELETE", VERSION, delete_version, "Delete a version (409 while a model's lineage points at it)",
          tag="datasets", returns=DELETED, headers={"If-Match": {"type": "string"}},
          responses={409: "A model version's lineage uses it"}),
]
