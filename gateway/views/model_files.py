"""Models in and out as Hugging Face directories: import a tar / tar.gz, download a version as a tar.

An import's body is never read whole: it is forwarded chunk by chunk through the client-streaming
`RegistryService/ImportModelVersion`, which unpacks and verifies it as it arrives. A download is a tar
assembled on the fly from each artifact's `DownloadArtifact` stream; its exact length is announced up
front, and every file's SHA-256 is checked against the registry's record as it goes by: a mismatch
cuts the connection before the archive is complete, so a client never mistakes bad bytes for a model.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import AsyncIterator

from aiohttp import web
from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2 as pb

from gateway.http import Route, clients, json_response, path_version, to_dict
from gateway.state import SETTINGS
from services.common import errors

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE  # 512: tar pads every file to it
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
IMPORT_QUERY = {"description": {"type": "string", "maxLength": 500}}
DOWNLOAD_MODE = 0o644


def present_import(status: pb.ImportStatus) -> dict:
    body = to_dict(status)
    body.pop("ref", None)
    return {"name": status.ref.name, "version": status.ref.version, **body}


async def _body_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"archive of {request.content_length} bytes exceeds the import limit of "
                                     f"{limit} bytes")
    size = 0
    while chunk := await request.content.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"archive exceeds the import limit of {limit} bytes")
        yield chunk


async def create_import(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    limit = request.app[SETTINGS].max_import_bytes
    upload_error: list[Exception] = []  # why reading the body failed (grpc.aio then cancels the call)

    async def messages() -> AsyncIterator[pb.ImportModelVersionRequest]:
        yield pb.ImportModelVersionRequest(options=pb.ImportOptions(
            model_name=name, description=request.query.get("description", "")))
        try:
            async for chunk in _body_chunks(request, limit):
                yield pb.ImportModelVersionRequest(chunk=chunk)
        except Exception as error:
            upload_error.append(error)
            raise

    try:
        response = await clients(request).registry.ImportModelVersion(messages())
    except errors.LlmpError as error:
        raise (upload_error[0] if upload_error else error) from None
    status = getattr(response, "import")
    location = f"/v1/models/{status.ref.name}/imports/{status.ref.version}"
    return json_response(request, present_import(status), status=202, cache_control="no-store",
                         headers={"Location": location})


async def get_import(request: web.Request) -> web.Response:
    response = await clients(request).registry.GetImport(pb.GetImportRequest(
        name=request.match_info["name"], version=path_version(request)))
    return json_response(request, present_import(getattr(response, "import")))


def tar_header(path: str, size: int) -> bytes:
    info = tarfile.TarInfo(path)
    info.size, info.mode = size, DOWNLOAD_MODE
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


async def download_version(request: web.Request) -> web.StreamResponse:
    name, number = request.match_info["name"], path_version(request)
    registry = clients(request).registry
    version = (await registry.GetModelVersion(pb.GetModelVersionRequest(name=name, version=number))).version
    artifacts = sorted(version.artifacts, key=lambda item: item.path)
    headers = [tar_header(item.path, item.object.size) for item in artifacts]
    length = sum(len(head) + item.object.size + len(_padding(item.object.size))
                 for head, item in zip(headers, artifacts, strict=True)) + len(END_OF_ARCHIVE)
    response = web.StreamResponse(headers={
        "Content-Type": TAR, "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="{name}-v{number}.tar"', "X-Llmp-Digest": version.digest})
    response.content_length = length
    await response.prepare(request)
    if request.method == "HEAD":  # the headers say it all; no file is read
        return response
    for head, item in zip(headers, artifacts, strict=True):
        await response.write(head)
        digest, size = hashlib.sha256(), 0
        try:
            async for message in registry.DownloadArtifact(pb.DownloadArtifactRequest(
                    model=common_pb2.ModelRef(name=name, version=number), path=item.path)):
                if message.offset != size:
                    raise errors.Internal(f"{item.path}: chunk at offset {message.offset}, expected {size}")
                digest.update(message.data)
                size += len(message.data)
                await response.write(message.data)
            if size != item.object.size or digest.hexdigest() != item.object.sha256:
                raise errors.Internal(f"{item.path}: streamed {size} bytes with SHA-256 {digest.hexdigest()}, "
                                      f"recorded {item.object.size} bytes with {item.object.sha256}")
        except errors.LlmpError as error:
            # The status line is gone: cutting the connection short of Content-Length is the only way to
            # tell the client the archive is not whole.
            log.error("download of %s v%s cut: %s", name, number, error)
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError(f"download of {name} v{number} cut: {error}") from None
        await response.write(_padding(size))
    await response.write(END_OF_ARCHIVE)
    await response.write_eof()
    return response


MODEL = "/v1/models/{name}"
TAR = "application/x-tar"  # a download's body, as its Content-Type and the document say
ROUTES = [
    Route("POST", MODEL + "/imports", create_import,
          "Import a Hugging Face model directory (body: tar or tar.gz) as the model's next version → 202 PENDING "
          "while its files are stored; 422 with the reason for an archive that is refused (links, paths "
          "leaving the directory, no config.json, weights that do not match it, remote code, an unsupported "
          "architecture), which leaves nothing behind",
          query=IMPORT_QUERY, tag="models",
          responses={202: "Verified; the version is PENDING until its files are stored (READY) or FAILED",
                     413: "Archive over the import limit (LLMP_MAX_IMPORT_BYTES)",
                     422: "Archive refused, with the reason"}),
    Route("GET", MODEL + "/imports/{version}", get_import,
          "An import's state (PENDING, READY, or FAILED with the reason), files and architecture", tag="models"),
    Route("GET", MODEL + "/versions/{version}/download", download_version,
          "The version's Hugging Face directory as a tar (weights, config, tokenizer, adapter/), each file checked "
          "against its recorded SHA-256 as it streams (application/x-tar; cut short of its Content-Length if a "
          "file fails its check)", tag="models", media_type=TAR),
]
