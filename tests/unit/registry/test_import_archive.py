"""The import's archive handling without servers: the CLI's on-the-fly tar (exact length, links followed),
the registry's streamed unpacking (refusals, limits, gzip), and the checkpoint check on real checkpoints."""

from __future__ import annotations

import asyncio
import gzip
import io
import tarfile
from pathlib import Path

import pytest

from cli import model_archive
from services.common.errors import PayloadTooLarge, ValidationFailed
from services.registry import checkpoint_check, imports

from ...tiny_checkpoints import IMPORTABLE, build_importable, tar_of


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "adapter").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "blob").write_bytes(b"x" * 513)
    (folder / "linked.txt").symlink_to(tmp_path / "blob")  # as in a Hugging Face cache snapshot
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    return folder


def test_the_cli_archive_has_its_announced_length_and_carries_linked_files_as_bytes(tmp_path):
    chunks, total = model_archive.archive(_folder(tmp_path))
    data = b"".join(chunks)
    assert len(data) == total
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = {member.name: member for member in archive.getmembers()}
        assert sorted(members) == ["adapter/adapter_config.json", "config.json", "linked.txt", "weights.bin"]
        assert all(member.isfile() for member in members.values())
        assert archive.extractfile("linked.txt").read() == b"x" * 513
    out = tmp_path / "out"
    assert sorted(model_archive.extract([data[i:i + 1000] for i in range(0, len(data), 1000)], out)) == sorted(members)
    assert (out / "weights.bin").read_bytes() == bytes(range(256)) * 10


def test_the_cli_refuses_to_unpack_a_link(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        link = tarfile.TarInfo("evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(tarfile.FilterError):
        model_archive.extract([buffer.getvalue()], tmp_path / "out")


async def _unpack(data: bytes, work: Path, limit: int = 10**6) -> imports.Unpacked:
    async def chunks():
        for i in range(0, len(data), 700):
            yield data[i:i + 700]
            await asyncio.sleep(0)

    work.mkdir(exist_ok=True)
    return await imports.receive(chunks(), work, limit)


async def test_a_gzipped_archive_in_one_top_folder_is_unpacked_from_inside_it(tmp_path):
    chunks, _ = model_archive.archive(_folder(tmp_path))
    raw = b"".join(chunks)
    renamed = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as source, tarfile.open(fileobj=renamed, mode="w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            member.name = "top/" + member.name
            target.addfile(member, io.BytesIO(data))
    unpacked = await _unpack(gzip.compress(renamed.getvalue()), tmp_path / "work")
    assert unpacked.folder == tmp_path / "work" / "top" and unpacked.files == 4
    assert (unpacked.folder / "adapter" / "adapter_config.json").read_text() == "{}"


@pytest.mark.parametrize(("member", "reason"), [
    (dict(name="../x", data=b"1"), "leaves the model directory"),
    (dict(name="/abs", data=b"1"), "leaves the model directory"),
    (dict(name="l", type=tarfile.SYMTYPE, linkname="config.json"), "links are not accepted"),
    (dict(name="h", type=tarfile.LNKTYPE, linkname="config.json"), "links are not accepted"),
    (dict(name="fifo", type=tarfile.FIFOTYPE), "not a regular file"),
    (dict(name="config.json", data=b"{}"), "appears twice"),
])
async def test_a_dangerous_member_is_refused_with_its_name(tmp_path, member, reason):
    members = [(tarfile.TarInfo("config.json"), b"{}")]
    info = tarfile.TarInfo(member.pop("name"))
    data = member.pop("data", None)
    for key, value in member.items():
        setattr(info, key, value)
    members.append((info, data))
    with pytest.raises(ValidationFailed, match=reason):
        await _unpack(tar_of(members), tmp_path / "work")
    assert not (tmp_path / "x").exists()


async def test_limits_stop_a_large_body_and_a_gzip_bomb(tmp_path):
    bomb = gzip.compress(tar_of([(tarfile.TarInfo("zeros"), b"\0" * 200_000)]))
    assert len(bomb) < 10_000
    with pytest.raises(PayloadTooLarge, match="unpacks to more than"):
        await _unpack(bomb, tmp_path / "a", limit=50_000)
    # 45 000 bytes unpacked fit the limit, but the archive sent is longer (headers, padding): stopped there,
    # before the member's last bytes arrive.
    member = tar_of([(tarfile.TarInfo("w"), bytes(range(250)) * 180)])
    with pytest.raises(PayloadTooLarge, match="exceeds the import limit"):
        await _unpack(member, tmp_path / "b", limit=45_400)
    with pytest.raises(ValidationFailed, match="not a tar"):
        await _unpack(b"hello" * 100, tmp_path / "c")


@pytest.mark.parametrize("architecture", IMPORTABLE)
def test_the_checkpoint_check_accepts_each_architecture_and_names_a_mismatch(tmp_path, architecture):
    folder = build_importable(tmp_path / architecture, architecture)
    result = checkpoint_check.verify(folder)
    assert result["ok"] and result["loaded"] and result["architecture"].lower().startswith(architecture)
    key, shape = next(iter(checkpoint_check.weight_shapes(folder).items()))
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors[key] = tensors[key][..., :1].contiguous() if len(shape) > 1 else tensors[key][:1].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(checkpoint_check.Rejected, match=f"tensor {key} has shape"):
        checkpoint_check.verify(folder)


async def test_an_archive_over_the_limit_ends_even_when_the_unpacker_lags(tmp_path, monkeypatch):
    """The limit is hit while the queue to a slower unpacking thread is full: the thread must still be told to
    stop (it once waited for a chunk forever, and the import with it)."""
    import queue
    import threading
    import time

    monkeypatch.setattr(imports, "QUEUE_CHUNKS", 1)
    read, unpack = imports._QueueReader.read, imports.unpack
    ended, pipes = threading.Event(), []

    def slow_read(self, size=-1):
        time.sleep(0.002)
        return read(self, size)

    def watched_unpack(pipe, destination, limit):
        pipes.append(pipe)
        try:
            return unpack(pipe, destination, limit)
        finally:
            ended.set()

    monkeypatch.setattr(imports._QueueReader, "read", slow_read)
    monkeypatch.setattr(imports, "unpack", watched_unpack)
    # 59,000 bytes unpacked fit the limit; the archive sent (headers, padding) does not, in 700-byte chunks.
    member = tar_of([(tarfile.TarInfo("w"), bytes(range(250)) * 236)])
    try:
        with pytest.raises(PayloadTooLarge, match="exceeds the import limit"):
            await asyncio.wait_for(_unpack(member, tmp_path / "lagging", limit=59_400), 20)
        assert ended.wait(5), "the unpacking thread still waits for a chunk"
    finally:  # release a stuck thread, so a failure here does not also hang the run at exit
        for _ in range(4):
            for pipe in pipes:
                try:
                    pipe.put_nowait(None)
                except queue.Full:
                    pass
            time.sleep(0.05)
