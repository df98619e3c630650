"""Moving a model version's files in and out of the registry, from the client side (any service).

Registering by reserve / upload / commit writes the bytes once, straight into the version's own prefix:
`upload_folder` sends each file in one streamed PUT (hashed while sent, the digest enforced by S3 as a
trailing checksum) while renewing the reservation, and returns what to declare to CommitModelVersion;
`upload_model_version` does all three calls on a registry stub. Callers with S3 access download with
`fetch_artifact` (one GET, the digest checked against the registry's record); others use the
`DownloadArtifact` stream through `download_artifact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2 as pb

from services.common.errors import Internal, ValidationFailed
from services.common.s3 import ObjectStore, StoredObject

UPLOAD_PARALLELISM = 4  # files uploaded at once


def folder_files(folder: Path) -> list[Path]:
    """The files of a save_pretrained folder, in upload order (ValidationFailed when there are none)."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        raise ValidationFailed(f"{folder} holds no files")
    return files


async def upload_folder(store: ObjectStore, prefix: str, folder: Path, *, renew: Callable[[], Awaitable[object]],
                        renew_every: float) -> list[pb.DeclaredArtifact]:
    """Upload every file of `folder` to `{prefix}{relative path}`, calling `renew` every `renew_every`
    seconds meanwhile (the reservation's lease); returns each file's size and digests, for the commit.

    A failed renewal (the reservation was lost) stops the upload and raises its error.
    """
    files = folder_files(folder)

    async def renewing_loop() -> None:
        while True:
            await asyncio.sleep(renew_every)
            await renew()

    limit = asyncio.Semaphore(UPLOAD_PARALLELISM)

    async def upload(path: Path) -> pb.DeclaredArtifact:
        relative = path.relative_to(folder).as_posix()
        async with limit:
            stored = await asyncio.to_thread(store.upload_file, prefix + relative, path)
        return pb.DeclaredArtifact(path=relative, size=stored.size, sha256=stored.sha256, xxh3_128=stored.xxh3_128,
                                   crc32=stored.crc32)

    renewing = asyncio.create_task(renewing_loop())
    try:
        uploading = asyncio.gather(*(upload(path) for path in files))
        done, _ = await asyncio.wait({uploading, renewing}, return_when=asyncio.FIRST_COMPLETED)
        if renewing in done:  # the reservation was lost (renewal refused): stop uploading
            uploading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await uploading
            renewing.result()
        return list(uploading.result())
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await renewing


async def upload_model_version(stub, store: ObjectStore, model_name: str, folder: Path, *,
                               lineage: pb.Lineage | None = None, metrics: dict[str, float] | None = None,
                               description: str = "", metadata: Sequence[tuple[str, str]] = (),
                               timeout: float | None = 600) -> pb.ModelVersion:
    """Register the save_pretrained folder `folder` as the next version of `model_name`; returns it READY.

    ReserveModelVersion, `upload_folder` into the returned prefix while renewing the reservation, then
    CommitModelVersion with each file's size and digests (the registry checks them against the checksum
    S3 enforced on upload, or reads the objects back).
    """
    folder_files(folder)  # refuse an empty folder before reserving a number
    metadata = tuple(metadata)
    reservation = await stub.ReserveModelVersion(pb.ReserveModelVersionRequest(
        model_name=model_name, lineage=lineage, metrics=metrics or {}, description=description),
        metadata=metadata, timeout=timeout)

    async def renew() -> None:
        await stub.RenewModelVersionReservation(pb.RenewModelVersionReservationRequest(
            reservation_id=reservation.reservation_id), metadata=metadata, timeout=timeout)

    declared = await upload_folder(store, reservation.prefix, folder, renew=renew,
                                   renew_every=reservation.lease_seconds / 4)
    response = await stub.CommitModelVersion(pb.CommitModelVersionRequest(
        reservation_id=reservation.reservation_id, artifacts=declared), metadata=metadata, timeout=timeout)
    return response.version


def fetch_artifact(store: ObjectStore, artifact: pb.Artifact, destination: Path) -> StoredObject:
    """Download one artifact of a version straight from S3, checking the registry's size and digest (its
    XXH3-128 when the registry has one, else its SHA-256)."""
    return store.download(artifact.object.key, destination, expected_sha256=artifact.object.sha256,
                          expected_size=artifact.object.size, expected_xxh3_128=artifact.object.xxh3_128)


async def download_artifact(stub, name: str, version: int, path: str, destination: Path, *,
                            metadata: Sequence[tuple[str, str]] = (), timeout: float | None = None) -> StoredObject:
    """Stream `path` of model `name` v`version` into `destination` (atomically); raise Internal on a mismatch."""
    request = pb.DownloadArtifactRequest(model=common_pb2.ModelRef(name=name, version=version), path=path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    digest, size, expected_size, expected_sha = hashlib.sha256(), 0, None, ""
    try:
        with open(partial, "wb") as handle:
            async for message in stub.DownloadArtifact(request, metadata=tuple(metadata), timeout=timeout):
                if expected_size is None:
                    expected_size, expected_sha = message.size, message.sha256
                if message.offset != size:
                    raise Internal(f"download of {path}: chunk at offset {message.offset}, expected {size}")
                digest.update(message.data)
                handle.write(message.data)
                size += len(message.data)
        if size != (expected_size or 0) or digest.hexdigest() != expected_sha:
            raise Internal(f"download of {path} failed verification: got {size} bytes with SHA-256 "
                           f"{digest.hexdigest()}, expected {expected_size} bytes with {expected_sha}")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(destination)
    return StoredObject(path, size, expected_sha)
