"""A dataset build fanned out over real Celery workers on the `data` queue (services/dataset/shards.py), on the
test's own Redis database and the session's S3 server: byte-identical to the in-process build whatever the
number of workers, a worker killed mid-range costs a retry of that range only, and nothing stays behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import types
import uuid
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from llmp.dataset.v1 import dataset_pb2_grpc

from services.common import contracts, topology
from services.common.config import Settings
from services.common.errors import Internal
from services.common.queues import DATA_WORKER_QUEUES, SCAN_TASK_NAME, make_producer
from services.common.s3 import ObjectStore
from services.dataset import pipeline, server, shards
from services.dataset.options import DatasetOptions
from tests.integration.training import workers

from .conftest import Client

SHARD_TOKENS = 20_000


@pytest.fixture
def fanout_settings(settings_env, own_broker_url) -> Settings:
    return Settings.from_env({**settings_env, "LLMP_BROKER_URL": own_broker_url})


@pytest.fixture
def worker_env(settings_env, own_broker_url, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMP_")} | settings_env
    return env | {"LLMP_BROKER_URL": own_broker_url, "LLMP_STATE_DIR": str(tmp_path / "state"), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def start_workers(worker_env, tmp_path):
    """start(n): n real data workers (production's app, services/dataset/worker.py) of one process on the `data`
    queue, stopped at the end."""
    with ExitStack() as stack:
        def start(count: int) -> list[subprocess.Popen]:
            logs = [tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log" for _ in range(count)]
            return [stack.enter_context(workers.celery_worker(worker_env, log, queues=DATA_WORKER_QUEUES,
                                                             app=topology.DATA_WORKER_APP)) for log in logs]
        yield start


@pytest.fixture
def store(fanout_settings) -> ObjectStore:
    store = ObjectStore(fanout_settings.s3)
    store.ensure_bucket()
    return store


def corpus_of(tmp_path: Path, shakespeare: bytes, copies: int = 1) -> Path:
    """Shakespeare's lines, numbered after the first copy so copies are distinct documents, not duplicates."""
    path = tmp_path / f"corpus-{copies}.txt"
    with open(path, "wb") as handle:
        for copy in range(copies):
            handle.write(shakespeare if copy == 0 else shakespeare.replace(b"\n\n", f"\n{copy}\n\n".encode()))
    return path


def fingerprint(built: pipeline.Built) -> dict:
    """Every output file's bytes (by name) and every count: what must not depend on how the build ran."""
    files = {str(path.relative_to(built.folder)): hashlib.sha256(path.read_bytes()).hexdigest()
             for path in sorted(built.folder.rglob("*")) if path.is_file()}
    return {"files": files, "cleaning": vars(built.cleaning),
            "splits": {name: result.stats() for name, result in built.splits.items()},
            "tokenizer": built.tokenizer.as_dict()}


def build(corpus: Path, options: DatasetOptions, work: Path, fanout: shards.CeleryFanOut | None = None) -> dict:
    work.mkdir()
    return fingerprint(pipeline.build(corpus, options, work, shard_tokens=SHARD_TOKENS, fanout=fanout))


def fanout_for(store: ObjectStore, settings: Settings, corpus: Path, shard_bytes: int, **options
               ) -> tuple[shards.CeleryFanOut, str]:
    """A fan-out for `corpus` stored where the ingestor keeps a version's corpus, and that version's prefix
    (the tasks touch nothing else: shards._trusted)."""
    version = contracts.dataset_version_prefix(f"t{uuid.uuid4().hex[:10]}", "d", 1)
    source = contracts.dataset_corpus_key(f"{version.split('/')[1]}", "d", 1)
    store.upload_file(source, corpus)
    return shards.CeleryFanOut(store, make_producer(settings), source, shard_bytes, version, **options), version


@pytest.mark.parametrize("options", [
    DatasetOptions("d", tokenizer="bpe", vocab_size=400),
    DatasetOptions("d", tokenizer="char", document_mode="line"),
], ids=["bpe-blank-lines", "char-lines"])
def test_fanned_out_build_is_byte_identical_with_one_or_two_workers(options, shakespeare, tmp_path, store,
                                                                    fanout_settings, start_workers):
    options = options.validated()
    corpus = corpus_of(tmp_path, shakespeare)
    in_process = build(corpus, options, tmp_path / "in-process")
    assert in_process["splits"]["train"]["tokens"] > 0 and in_process["cleaning"]["exact_duplicates"] > 0

    start_workers(1)
    fanout, version = fanout_for(store, fanout_settings, corpus, shard_bytes=20_000)
    assert build(corpus, options, tmp_path / "one-worker", fanout) == in_process
    assert len(fanout.ranges) >= 7  # really cut: 150 kB in ranges of ~20 kB
    assert store.list(version) == []  # the build's intermediate files are gone

    start_workers(1)  # two now
    fanout, version = fanout_for(store, fanout_settings, corpus, shard_bytes=15_000)
    assert build(corpus, options, tmp_path / "two-workers", fanout) == in_process
    assert store.list(version) == []


def test_supervised_fanned_out_build_is_byte_identical(tmp_path, store, fanout_settings, start_workers):
    lines = [json.dumps({"prompt": f"question {i % 300} about {i * 7 % 11}", "completion": f"answer {i}"})
             for i in range(2000)]
    corpus = tmp_path / "pairs.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    options = DatasetOptions("d", format="pairs", tokenizer="char").validated()
    in_process = build(corpus, options, tmp_path / "in-process")
    start_workers(2)
    fanout, _ = fanout_for(store, fanout_settings, corpus, shard_bytes=10_000)
    assert build(corpus, options, tmp_path / "fanned-out", fanout) == in_process


def _pool_child(worker: subprocess.Popen) -> int:
    children = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children
    return int(children[0])


def test_a_worker_killed_mid_range_costs_a_retry_of_that_range_only(shakespeare, tmp_path, store, fanout_settings,
                                                                     start_workers):
    options = DatasetOptions("d", tokenizer="char", document_mode="line").validated()
    corpus = corpus_of(tmp_path, shakespeare, copies=4)  # 600 kB in 3 ranges: one is killed as it starts
    in_process = build(corpus, options, tmp_path / "in-process")
    [worker] = start_workers(1)
    fanout, version = fanout_for(store, fanout_settings, corpus, shard_bytes=200_000)
    child = _pool_child(worker)

    def kill_first_range(phase: str, *_: int) -> None:  # the pipeline's progress, polled while ranges run
        nonlocal child
        log = worker.log_path.read_text(errors="replace")
        if child and f"{SCAN_TASK_NAME}[" in log and " succeeded " not in log:
            os.kill(child, signal.SIGKILL)
            child = 0

    work = tmp_path / "killed"
    work.mkdir()
    built = pipeline.build(corpus, options, work, kill_first_range, shard_tokens=SHARD_TOKENS, fanout=fanout)
    assert child == 0, "the worker was not killed mid-range"
    assert fingerprint(built) == in_process
    log = worker.log_path.read_text(errors="replace")
    assert "signal 9" in log, log[-3000:]
    # every range scanned and packed once, the killed range's scan delivered twice
    assert log.count(" received") == 2 * len(fanout.ranges) + 1, log[-3000:]
    assert log.count(" succeeded ") == 2 * len(fanout.ranges), log[-3000:]
    assert store.list(version) == []


async def test_the_service_fans_out_a_corpus_over_the_threshold(client, shakespeare, dataset_settings, lineage,
                                                                own_broker_url, start_workers, store):
    """Through the dataset service: a version built over the workers has the in-process version's objects."""
    in_process = (await client.create(shakespeare, name="play", vocab_size=300)).version
    settings = Settings.from_env({**dataset_settings.raw, "LLMP_BROKER_URL": own_broker_url,
                                  "LLMP_DATASET_FANOUT_BYTES": "100000", "LLMP_DATASET_SHARD_BYTES": "30000"})
    app = await server.build_app(settings, models_using=lineage, shard_tokens=SHARD_TOKENS)
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        started = start_workers(2)
        other = Client(dataset_pb2_grpc.DatasetServiceStub(channel), f"t{uuid.uuid4().hex[:10]}")
        fanned_out = (await other.create(shakespeare, name="play", vocab_size=300)).version
    finally:
        await channel.close()
        await app.stop()

    def prefix(version) -> str:
        return version.manifest_key.rsplit("/", 1)[0] + "/"

    def objects(version) -> dict[str, str]:
        return {obj.key.removeprefix(prefix(version)): obj.sha256 for obj in version.objects
                if not obj.key.endswith("manifest.json")}

    def splits(version) -> list[str]:  # counts and file names, the version's own prefix left out
        return [str(split).replace(prefix(version), "") for split in version.splits]
    assert objects(fanned_out) == objects(in_process) and len(objects(in_process)) > 5
    assert splits(fanned_out) == splits(in_process) and fanned_out.cleaning == in_process.cleaning
    assert not [obj for obj in store.list(fanned_out.manifest_key.rsplit("/", 1)[0] + "/") if "building-" in obj.key]
    logs = "".join(worker.log_path.read_text(errors="replace") for worker in started)
    assert logs.count(f"Task {SCAN_TASK_NAME}[") >= 5  # 150 kB in ranges of 30 kB: really fanned out


class _Cancelled(Exception):
    pass


def test_a_build_stopped_while_ranges_run_leaves_nothing(shakespeare, tmp_path, store, fanout_settings,
                                                         start_workers):
    options = DatasetOptions("d", tokenizer="char", document_mode="line").validated()
    corpus = corpus_of(tmp_path, shakespeare, copies=4)
    [worker] = start_workers(1)
    fanout, version = fanout_for(store, fanout_settings, corpus, shard_bytes=100_000)

    def stop_once_a_range_runs(phase: str, *_: int) -> None:  # as the ingestor's progress stops a cancelled build
        if f"{SCAN_TASK_NAME}[" in worker.log_path.read_text(errors="replace"):
            raise _Cancelled

    work = tmp_path / "stopped"
    work.mkdir()
    with pytest.raises(_Cancelled):
        pipeline.build(corpus, options, work, stop_once_a_range_runs, fanout=fanout)
    assert len(fanout.ranges) >= 5
    deadline = time.monotonic() + 60  # the range that was running finishes, finds the build gone, cleans up
    while " succeeded " not in worker.log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    assert store.list(version) == []
    log = worker.log_path.read_text(errors="replace")
    assert log.count(" succeeded ") < len(fanout.ranges), log[-3000:]  # the rest were revoked, not run


def test_a_range_without_a_result_is_sent_again_then_fails_the_build_naming_it(tmp_path, store, fanout_settings):
    """No worker takes the ranges (a lost message, a fleet without data workers): each is sent again after its
    wait, and after `RANGE_SENDS` sends the build fails naming the range and the queue; nothing stays behind."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {n} of a corpus no worker will scan\n" for n in range(400)))
    options = DatasetOptions("d", tokenizer="char", document_mode="line").validated()
    fanout, version = fanout_for(store, fanout_settings, corpus, shard_bytes=4_000, range_seconds=0.5)
    work = tmp_path / "unscanned"
    work.mkdir()
    started = time.monotonic()
    with pytest.raises(Internal, match=f"range 0 of the scan got no result after {shards.RANGE_SENDS} tries.*'data'"):
        pipeline.build(corpus, options, work, fanout=fanout)
    assert shards.RANGE_SENDS * 0.5 <= time.monotonic() - started < 30
    assert len(fanout._tasks) >= shards.RANGE_SENDS * 2  # every range sent again, not only the first
    assert store.list(version) == []


def test_without_a_data_worker_the_service_builds_in_process(fanout_settings, store, start_workers):
    """The ingestor's choice (shards.factory): a corpus over the threshold fans out only while some worker
    consumes the data queue; otherwise (none yet, or the broker unreachable) it builds in-process."""
    settings = Settings.from_env({**fanout_settings.raw, "LLMP_DATASET_FANOUT_BYTES": "1000"})
    version = types.SimpleNamespace(source_key="sources/datasets/t/d/v1/corpus", prefix="datasets/t/d/v1/")
    choose = shards.factory(settings, store)
    assert choose(version, 10**6) is None
    start_workers(1)
    deadline = time.monotonic() + 60
    while (chosen := choose(version, 10**6)) is None:
        assert time.monotonic() < deadline, "the data worker never answered the broadcast"
    assert isinstance(chosen, shards.CeleryFanOut) and choose(version, 1000) is None
    unreachable = Settings.from_env({**settings.raw, "LLMP_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert shards.factory(unreachable, store)(version, 10**6) is None
