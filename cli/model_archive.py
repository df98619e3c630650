"""A model directory as a tar stream, and back: what `llmp models import` sends and `download` unpacks.

The archive is produced on the fly (no copy of the model on disk or in memory) and its exact length is
known before the first byte, so the upload carries a Content-Length and the progress bar a total.
Symbolic links are followed (a Hugging Face cache snapshot is made of links to blobs): the archive
carries the files' bytes, as the registry wants them. Unpacking refuses links and paths that leave the
destination (tarfile's `data` filter).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

CHUNK = 1024 * 1024
SKIPPED_DIRS = {".git", ".cache"}  # version control, and huggingface_hub's download bookkeeping
MODE = 0o644


def _files(folder: Path) -> list[tuple[str, Path, int]]:
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if SKIPPED_DIRS & set(relative.parts) or not path.is_file():  # is_file follows links
            continue
        files.append((relative.as_posix(), path, path.stat().st_size))
    if not files:
        raise FileNotFoundError(f"{folder} holds no files")
    return files


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, MODE
    return info.tobuf(format=tarfile.PAX_FORMAT)


def archive(folder: Path) -> tuple[Iterator[bytes], int]:
    """(the tar's bytes in chunks, its exact length) for the files under `folder`."""
    files = _files(folder)
    headers = [_header(name, size) for name, _, size in files]
    total = sum(len(head) + size + (-size % tarfile.BLOCKSIZE) for head, (_, _, size) in zip(headers, files,
                                                                                               strict=True))
    total += 2 * tarfile.BLOCKSIZE

    def chunks() -> Iterator[bytes]:
        for head, (name, path, size) in zip(headers, files, strict=True):
            yield head
            sent = 0
            with path.open("rb") as handle:
                while sent < size and (data := handle.read(min(CHUNK, size - sent))):
                    sent += len(data)
                    yield data
            if sent != size:
                raise OSError(f"{name} changed size while it was sent")
            yield b"\0" * (-size % tarfile.BLOCKSIZE)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    return chunks(), total


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks, self.pending = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            self.pending = next(self.chunks, b"")
            if not self.pending:
                return 0
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size


def extract(chunks: Iterable[bytes], destination: Path) -> list[str]:
    """Unpack a tar stream into `destination` (links and escaping paths refused); returns the files."""
    destination.mkdir(parents=True, exist_ok=True)
    names = []
    with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks), CHUNK), mode="r|") as stream:
        for member in stream:
            stream.extract(member, destination, filter="data")
            if member.isfile():
                names.append(member.name)
    return names
