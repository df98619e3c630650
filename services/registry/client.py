"""Client side of the registry's streaming download: write the artifact to disk, verifying size and SHA-256."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2 as pb

from services.common.errors import Internal
from services.common.s3 import StoredObject


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
