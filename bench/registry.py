"""Registering and downloading a checkpoint through the registry, against raw S3 put + get of the same bytes.

One run, one SeaweedFS (started here on free ports), one PostgreSQL database (created here on the
server at LLMP_DATABASE_URL's host, dropped after), the registry service in-process on a free port:

- project:  `ReserveModelVersion`, upload the save_pretrained folder straight into the version's prefix
  (one streamed PUT per file; SHA-256, XXH3-128 and CRC32 computed from the bytes sent, the CRC32 sent as
  the S3 trailing checksum, which SeaweedFS recomputes and enforces; `--upload-checksum sha256` sends the
  SHA-256 there instead), `CommitModelVersion` (the registry checks every object's size and the checksum
  S3 reports for it against the declared one, READY in one transaction), then download every artifact
  straight from S3 verifying size and digest against the registry's record: the XXH3-128 the upload took
  in its SHA-256 pass (`services.common.model_transfer.fetch_artifact`, what services with S3 access use);
- baseline: the `minio` SDK's own `fput_object` + `fget_object` of the same files to the same server
  (no checksums): the limit of moving the bytes there and back.

`--copy-path` measures the older way instead (upload to a training prefix with `put_file`,
`RegisterModelVersion` copying server-side and verifying, `DownloadArtifact` over gRPC).

Best of `--repeats` interleaved rounds, the sides taking turns going first, each after a `sync` (so one
side's writeback does not throttle the other's writes), every round on an emptied, vacuumed server;
files live in /dev/shm when it has room (see `scratch_parent`). Throughput is checkpoint megabytes per
second of the whole round trip; the BENCH line's ratio is project / baseline (higher is better).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import psycopg
from llmp.registry.v1 import registry_pb2 as pb
from llmp.registry.v1 import registry_pb2_grpc
from minio import Minio

from bench import harness
from cli import servers
from services.common import contracts, topology
from services.common.config import UPLOAD_CHECKSUMS, Settings
from services.common.identity import Caller, signed_metadata, signer_for
from services.common.model_transfer import download_artifact, fetch_artifact, upload_model_version
from services.common.signing import Signer
from services.registry import server

ACCESS, SECRET = "llmp-bench", "llmp-bench-secret"


def make_checkpoint(folder: Path, megabytes: int) -> None:
    """A save_pretrained-shaped folder whose weights file is ~`megabytes` MB of random float32."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_tensor = 16 * 1024 * 1024 // 4
    tensors = {f"h.{i}.weight": rng.standard_normal(per_tensor, dtype=np.float32)
               for i in range(max(1, megabytes // 16))}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": len(tensors)}))
    (folder / "generation_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))


class TimedStub:
    """The registry stub, adding up the seconds spent in each RPC (to split the upload from the commit)."""

    def __init__(self, stub) -> None:
        self._stub = stub
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return timed


async def project_round(registry: server.Registry, stub, folder: Path, out: Path, tenant: str, signer: Signer,
                        round_no: int) -> tuple[float, dict[str, float]]:
    metadata = signed_metadata(signer, Caller(tenant, "bench", "developer"), "registry")
    timed = TimedStub(stub)
    started = time.perf_counter()
    version = await upload_model_version(timed, registry.store, "bench", folder, metadata=metadata)
    registered = time.perf_counter()
    await asyncio.gather(*(asyncio.to_thread(fetch_artifact, registry.store, artifact, out / artifact.path)
                           for artifact in version.artifacts))
    finished = time.perf_counter()
    for artifact in version.artifacts:
        (out / artifact.path).unlink()
    commit = timed.seconds.get("CommitModelVersion", 0.0)
    phases = {"reserve+upload": registered - started - commit, "commit": commit, "download": finished - registered}
    return finished - started, phases


async def copy_path_round(registry: server.Registry, stub, folder: Path, out: Path, tenant: str, signer: Signer,
                          round_no: int) -> tuple[float, dict[str, float]]:
    metadata = signed_metadata(signer, Caller(tenant, "bench", "developer"), "registry")
    prefix = contracts.JobLayout(tenant, f"bench-{round_no}").final
    started = time.perf_counter()
    files = sorted(path for path in folder.iterdir() if path.is_file())
    await asyncio.gather(*(asyncio.to_thread(registry.store.put_file, prefix + path.name, path) for path in files))
    uploaded = time.perf_counter()
    version = (await stub.RegisterModelVersion(pb.RegisterModelVersionRequest(
        model_name="bench", source_prefix=prefix), metadata=metadata)).version
    registered = time.perf_counter()
    await asyncio.gather(*(download_artifact(stub, "bench", version.ref.version, artifact.path, out / artifact.path,
                                             metadata=metadata) for artifact in version.artifacts))
    finished = time.perf_counter()
    for artifact in version.artifacts:
        (out / artifact.path).unlink()
    phases = {"upload": uploaded - started, "register": registered - uploaded, "download": finished - registered}
    return finished - started, phases


def baseline_round(client: Minio, bucket: str, folder: Path, out: Path, round_no: int) -> tuple[float, float]:
    """One put + get of every file with the SDK's defaults; returns (total seconds, put seconds)."""
    started = time.perf_counter()
    files = sorted(path for path in folder.iterdir() if path.is_file())
    for path in files:
        client.fput_object(bucket, f"baseline/{round_no}/{path.name}", str(path))
    uploaded = time.perf_counter()
    for path in files:
        client.fget_object(bucket, f"baseline/{round_no}/{path.name}", str(out / path.name))
    finished = time.perf_counter()
    for path in files:
        (out / path.name).unlink()
    return finished - started, uploaded - started


def forget_round(client: Minio, bucket: str, master_port: int) -> None:
    """Delete what both sides stored and reclaim its space, so every round starts from the same server
    state (untimed)."""
    for item in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, item.object_name)
    with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/vol/vacuum?garbageThreshold=0.0001",
                                timeout=120) as reply:
        reply.read()


def scratch_parent(megabytes: int) -> str | None:
    """/dev/shm when it holds the round's data with room to spare: memory-backed files keep the host's
    page-cache reclaim and disk out of both sides' timings (they moved downloads between 0.5 and 2 s)."""
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return None
    return "/dev/shm" if free > 8 * megabytes * 1024 * 1024 else None


async def run(options: argparse.Namespace) -> None:
    admin_url = os.environ.get("LLMP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    admin_url = admin_url.rsplit("/", 1)[0] + "/postgres"
    database = f"llmp_bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="llmp-bench-registry-", dir=scratch_parent(options.megabytes)) as scratch:
        print(f"scratch (checkpoint, SeaweedFS data, downloads): {scratch}", flush=True)
        root = Path(scratch)
        ports = servers.SeaweedPorts.free()
        weed = servers.start_seaweedfs(root / "weed", ports, ACCESS, SECRET, root / "weed.log")
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
        env = {"LLMP_DATABASE_URL": admin_url.rsplit("/", 1)[0] + f"/{database}",
               "LLMP_S3_ENDPOINT": f"127.0.0.1:{ports.s3}", "LLMP_S3_ACCESS_KEY": ACCESS,
               "LLMP_S3_SECRET_KEY": SECRET, "LLMP_S3_BUCKET": "llmp-bench", "LLMP_LOG_LEVEL": "WARNING",
               "LLMP_S3_UPLOAD_CHECKSUM": options.upload_checksum,
               **{service.addr_env: f"127.0.0.1:{servers.free_port()}" for service in topology.GRPC_SERVICES}}
        registry = None
        try:
            settings = Settings.from_env(env)
            registry = await server.build(settings)
            port = await registry.app.start("127.0.0.1:0")
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            folder, out = root / "checkpoint", root / "out"
            out.mkdir()
            make_checkpoint(folder, options.megabytes)
            size_mb = sum(path.stat().st_size for path in folder.iterdir()) / 1e6
            raw = Minio(f"127.0.0.1:{ports.s3}", access_key=ACCESS, secret_key=SECRET, secure=False)
            best = {"project": float("inf"), "baseline": float("inf")}
            measure = copy_path_round if options.copy_path else project_round
            signer = signer_for(settings)
            round_ratios: list[float] = []
            for round_no in range(options.repeats):
                # Each side starts with no dirty pages (the other side's gigabyte of writes must not
                # throttle its own), and the sides take turns going first.
                for side in ("baseline", "project") if round_no % 2 == 0 else ("project", "baseline"):
                    await asyncio.to_thread(os.sync)
                    if side == "baseline":
                        base, base_put = await asyncio.to_thread(baseline_round, raw, settings.s3.bucket, folder, out,
                                                                 round_no)
                        best["baseline"] = min(best["baseline"], base)
                    else:
                        elapsed, phases = await measure(registry, stub, folder, out, "bench", signer, round_no)
                        best["project"] = min(best["project"], elapsed)
                await asyncio.to_thread(forget_round, raw, settings.s3.bucket, ports.master)
                round_ratios.append(base / elapsed)
                detail = " ".join(f"{name} {seconds:.2f}s" for name, seconds in phases.items())
                print(f"round {round_no + 1}: project {elapsed:.2f}s ({detail}); baseline {base:.2f}s "
                      f"(put {base_put:.2f}s get {base - base_put:.2f}s); best project {best['project']:.2f}s "
                      f"baseline {best['baseline']:.2f}s ({size_mb:.0f} MB)", flush=True)
            await channel.close()
        finally:
            if registry is not None:
                await registry.app.stop()
            servers.stop(weed)
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    project, baseline = size_mb / best["project"], size_mb / best["baseline"]
    harness.rounds("registry", round_ratios)
    project_is = ("upload + copying register + verified gRPC download" if options.copy_path
                  else f"reserve + upload with S3-enforced {options.upload_checksum.upper()} + commit checking it + "
                       "XXH3-128-verified S3 download")
    harness.report("registry", project, baseline, "MB/s",
                   f"minio SDK fput_object+fget_object of the same {size_mb:.0f} MB checkpoint to the same SeaweedFS, "
                   f"no checksums; project = {project_is}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=512, help="checkpoint size (default 512)")
    parser.add_argument("--repeats", type=int, default=8)  # the download alone varies 0.6-1.9 s run to run
    parser.add_argument("--upload-checksum", choices=UPLOAD_CHECKSUMS, default="crc32",
                        help="trailing checksum S3 verifies on upload (LLMP_S3_UPLOAD_CHECKSUM; default crc32)")
    parser.add_argument("--copy-path", action="store_true",
                        help="measure RegisterModelVersion (copy) + gRPC download instead of reserve/commit")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
