"""End-to-end training: a job from submit to SUCCEEDED through the platform against a bare loop in one process.

    python -m bench.training --scenario e2e [--e2e-steps N] [--e2e-repeats R]

The configuration is nanoGPT's CPU Shakespeare run (character-level tinyshakespeare, GPT-2 with 4 layers,
4 heads, 128 wide, block 64, batch 12, no dropout, AdamW lr 1e-3 to 1e-4 with warmup, beta2 0.99, clipping
1.0, the validation loss over 20 batches every 250 steps, a checkpoint with each); its 2,000 steps with
`--e2e-steps 2000`. A shorter run keeps its 8 evaluations and checkpoints (every steps/8).

- project: the stack `make demo` and the integration tests run, started here: SeaweedFS on free ports, a fresh
  PostgreSQL database, the dataset, registry and training services in this process, a Celery worker process
  (on the local launcher's queues, `queues.WORKER_QUEUES`, `-c 1`, ready before anything is timed) that runs
  the job in its warm runtime (warm.py; under torchrun before it). Before each run of either side the worker's
  processes are idle (no CPU used). The dataset is
  ingested through the dataset service before timing. Timed: SubmitJob until WatchJob reports SUCCEEDED (the
  model registered), the job's checkpoints and final model in S3.
- baseline: `python -m bench.bare_training` (its docstring): interpreter start to exit of one process doing
  the same steps, evaluations, checkpoints (to local disk) and final save on the same dataset version's files,
  already on local disk, as nanoGPT's `train.py` is timed.

Throughput is steps per second end to end; the two alternate (P B, B P, …) and each side's figure is its
median run. The job's phases come from its row (created, claimed, finished) and the runtime's events (the
`Started` event's start-up milestones, the evaluations' and checkpoints' seconds, `Finished`), read from the
node's events file as the worker forwards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psutil
import psycopg
import redis
from google.protobuf import json_format
from llmp.dataset.v1 import dataset_pb2, dataset_pb2_grpc
from llmp.training.v1 import training_pb2 as pb
from llmp.training.v1 import training_pb2_grpc

from bench import harness
from cli import servers
from services.common import contracts, topology
from services.common.config import Settings
from services.common.identity import Caller, signed_metadata, signer_for
from services.common.queues import WORKER_QUEUES
from services.common.s3 import ObjectStore
from services.dataset import server as dataset_server
from services.registry import server as registry_server
from services.training import data, events
from services.training import server as training_server

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
ACCESS, SECRET = "llmp-bench", "llmp-bench-secret"
TENANT = "bench"
CLAIM_KEY = "llmp-test-claim"  # tests/conftest.py's: a Redis database the tests' runs leave alone while claimed


def job_spec(steps: int) -> dict:
    """nanoGPT's config/train_shakespeare_char.py as its README runs it on a CPU, for `steps` steps."""
    return {
        "dataset": {"name": "shakespeare", "version": 1},
        "model": {"family": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0},
        "hyperparameters": {"batch_size": 12, "max_steps": steps, "learning_rate": 1e-3, "min_learning_rate": 1e-4,
                            "warmup_steps": min(100, steps // 10), "beta2": 0.99, "grad_clip": 1.0,
                            "eval_interval": min(250, max(1, steps // 8)), "eval_batches": 20, "log_interval": 10,
                            "seed": 1337, "precision": "fp32"},
        "distributed": {"mode": "ddp", "nproc_per_node": 1, "nnodes": 1},
    }


def claim_redis() -> int:
    """An empty Redis database (1-14) for the worker's queue, claimed as the tests claim theirs."""
    for number in range(1, 15):
        client = redis.Redis(host="127.0.0.1", port=6379, db=number)
        try:
            if client.dbsize() == 0 and client.set(CLAIM_KEY, f"bench-training-{os.getpid()}", nx=True):
                return number
        finally:
            client.close()
    raise RuntimeError("no empty Redis database (1-14) for the benchmark's queue")


def release_redis(number: int) -> None:
    client = redis.Redis(host="127.0.0.1", port=6379, db=number)
    try:
        client.flushdb()
    finally:
        client.close()


class EventsFile:
    """The node's events file, opened as soon as it appears: the open handle still reads it after the worker
    removes the job's folder on success."""

    def __init__(self, path: Path) -> None:
        self.path, self.handle = path, None

    async def follow(self) -> None:
        while self.handle is None:
            try:
                self.handle = open(self.path, "rb")  # noqa: SIM115 (kept open past the file's removal)
            except FileNotFoundError:
                await asyncio.sleep(0.02)

    def read(self) -> list[events.Event]:
        if self.handle is None:
            return []
        found = [events.decode(line) for line in self.handle.read().splitlines() if line.strip()]
        self.handle.close()
        return found


def phases(row: dict, runtime: list[events.Event], submitted: float, done: float) -> dict[str, float]:
    """Seconds of each phase of one job, in order; they add up to submit → SUCCEEDED."""
    started = next(e for e in runtime if isinstance(e, events.Started))
    finished = next(e for e in runtime if isinstance(e, events.Finished))
    evals = [e for e in runtime if isinstance(e, events.Eval)]
    # The loop ends with the last step's evaluation; its checkpoint, the test split and the final model follow.
    loop_end = evals[-1].time if evals else started.time
    during = [e for e in runtime if isinstance(e, events.Checkpoint) and e.step < finished.step]
    s = started.startup
    evaluating = sum(e.seconds for e in evals[:-1])
    # What training waited for (`blocked`; a runtime without it uploaded synchronously: all of `seconds`).
    checkpointing = sum(e.seconds if getattr(e, "blocked", None) is None else e.blocked for e in during)
    claimed = row["started_at"].timestamp()
    return {
        "submit → claimed (queue)": claimed - submitted,
        "claimed → runtime launched": s["launched"] - claimed,
        "launched → train.py process (guard; torchrun or warm runtime)": s["process"] - s["launched"],
        "train.py imports": s["imported"] - s["process"],
        "process group": s["group"] - s["imported"],
        "dataset fetch": s["data"] - s["group"],
        "model + optimizer": s["model"] - s["data"],
        "→ loop start": started.time - s["model"],
        "training steps": loop_end - started.time - evaluating - checkpointing - (evals[-1].seconds if evals else 0.0),
        "evaluations": evaluating,
        "checkpoints (S3), training waiting": checkpointing,
        "last evaluation": evals[-1].seconds if evals else 0.0,
        "last checkpoint, test split, final model": finished.time - loop_end,
        "exit + registration": row["finished_at"].timestamp() - finished.time,
        "→ SUCCEEDED seen": done - row["finished_at"].timestamp(),
    }


async def project_run(stub, metadata, db_url: str, state_dir: Path, spec: dict, name: str):
    request = pb.SubmitJobRequest(spec=json_format.ParseDict(spec, pb.JobSpec()), model_name=name)
    submitted = time.time()
    job = (await stub.SubmitJob(request, metadata=metadata)).job
    follower = EventsFile(state_dir / "training" / job.id / "node-0" / "events-1.jsonl")
    follow = asyncio.create_task(follower.follow())
    final = None
    async for event in stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata, timeout=3600):
        if event.HasField("state_changed") and event.state_changed.state in (
                pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            final = event.state_changed.state
            break
    done = time.time()
    follow.cancel()
    if final != pb.JOB_STATE_SUCCEEDED:
        got = (await stub.GetJob(pb.GetJobRequest(id=job.id), metadata=metadata)).job
        logs = "".join(servers.log_tail(path) for path in (state_dir / "training" / job.id).glob("torchrun-*.log"))
        raise RuntimeError(f"job {job.id} ended {pb.JobState.Name(final or 0)}: {got.error}{logs}")
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT created_at, started_at, finished_at, latest_metrics FROM training_jobs "
                           "WHERE id = %s", (job.id,)).fetchone()
    row = dict(zip(("created_at", "started_at", "finished_at", "latest_metrics"), row, strict=True))
    return done - submitted, phases(row, follower.read(), submitted, done), row["latest_metrics"]


def wait_idle(worker: subprocess.Popen, window: float = 0.5, most: float = 0.05, timeout: float = 600.0) -> None:
    """Until the worker's processes use under `most` CPU seconds in `window`: a warm runtime still importing or
    a finished job's clean-up never competes with the next run of either side."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tree = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        before = _cpu_seconds(tree)
        time.sleep(window)
        if _cpu_seconds(tree) - before < most:
            return
    print(f"the worker was still busy after {timeout:.0f}s; running anyway", flush=True)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def bare_run(dataset_dir: Path, spec: dict, out: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "bench.bare_training", "--dataset", str(dataset_dir),
                             "--spec", json.dumps(spec), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"bare loop failed:\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])


async def run(steps: int, repeats: int) -> None:
    admin_url = os.environ.get("LLMP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    admin_url = admin_url.rsplit("/", 1)[0] + "/postgres"
    database = f"llmp_bench_{uuid.uuid4().hex[:10]}"
    spec = job_spec(steps)
    redis_db = claim_redis()
    with tempfile.TemporaryDirectory(prefix="llmp-bench-training-") as scratch:
        root = Path(scratch)
        ports = servers.SeaweedPorts.free()
        weed = servers.start_seaweedfs(root / "weed", ports, ACCESS, SECRET, root / "weed.log")
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
        db_url = admin_url.rsplit("/", 1)[0] + f"/{database}"
        env = {"LLMP_DATABASE_URL": db_url, "LLMP_S3_ENDPOINT": f"127.0.0.1:{ports.s3}", "LLMP_S3_ACCESS_KEY": ACCESS,
               "LLMP_S3_SECRET_KEY": SECRET, "LLMP_S3_BUCKET": "llmp-bench",
               "LLMP_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}", "LLMP_STATE_DIR": str(root / "state"),
               "LLMP_SERVICE_SECRET": uuid.uuid4().hex, "LLMP_SHUTDOWN_GRACE": "2",
               **{service.addr_env: f"127.0.0.1:{servers.free_port()}" for service in topology.GRPC_SERVICES}}
        worker, apps, channels = None, [], []
        try:
            settings = Settings.from_env(env)
            apps = [await dataset_server.build_app(settings), (await registry_server.build(settings)).app,
                    await training_server.build(settings)]
            for app in apps:
                await app.start()
            worker_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMP_")} | env
            log_path = root / "worker.log"
            with open(log_path, "ab") as log_file:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "services.training.worker", "worker", "-Q", WORKER_QUEUES,
                     "-c", "1", "-n", f"bench-{uuid.uuid4().hex[:8]}@%h", "--without-gossip", "--without-mingle",
                     "--without-heartbeat", "-l", "info"],
                    cwd=ROOT, env=worker_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            signer = signer_for(settings)
            caller = Caller(TENANT, "bench-key", "developer")
            channels = [grpc.aio.insecure_channel(settings.service_addrs[name]) for name in ("dataset", "training")]
            datasets = dataset_pb2_grpc.DatasetServiceStub(channels[0])
            training = training_pb2_grpc.TrainingServiceStub(channels[1])
            options = dataset_pb2.DatasetOptions(name="shakespeare", tokenizer=dataset_pb2.TOKENIZER_KIND_CHAR,
                                                 wait=True)
            created = await datasets.CreateDataset(
                iter([dataset_pb2.CreateDatasetRequest(options=options),
                      dataset_pb2.CreateDatasetRequest(chunk=SHAKESPEARE.read_bytes())]),
                metadata=signed_metadata(signer, caller, "dataset"), timeout=600)
            assert created.version.state == dataset_pb2.VERSION_STATE_READY, created
            dataset_dir = root / "bare-dataset"  # the same version's files, on local disk as nanoGPT's are
            data.fetch_dataset(ObjectStore(settings.s3), contracts.dataset_manifest_key(TENANT, "shakespeare", 1),
                               dataset_dir)
            deadline = time.monotonic() + 120
            while "ready." not in log_path.read_text(errors="replace"):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("worker not ready" + servers.log_tail(log_path))
                await asyncio.sleep(0.3)

            metadata = signed_metadata(signer, caller, "training")
            project_s, bare_s, ratios = [], [], []
            for repeat in range(repeats):
                for side in ("project", "bare") if repeat % 2 == 0 else ("bare", "project"):
                    await asyncio.to_thread(wait_idle, worker)
                    if side == "project":
                        seconds, split, metrics = await project_run(training, metadata, db_url, settings.state_dir,
                                                                    spec, "bench-e2e")
                        project_s.append(seconds)
                        print(f"round {repeat + 1} project: {seconds:.2f}s submit → SUCCEEDED "
                              f"(validation loss {metrics.get('validation_loss', float('nan')):.4f}, "
                              f"test loss {metrics.get('test_loss', float('nan')):.4f})", flush=True)
                        for name, value in split.items():
                            print(f"    {name:<46} {value:7.2f}s", flush=True)
                    else:
                        seconds, result = await asyncio.to_thread(bare_run, dataset_dir, spec, root / f"bare-{repeat}")
                        bare_s.append(seconds)
                        print(f"round {repeat + 1} bare loop: {seconds:.2f}s process start → exit "
                              f"(validation loss {result['losses'].get('validation_loss', float('nan')):.4f}, "
                              f"test loss {result['losses'].get('test_loss', float('nan')):.4f})", flush=True)
                        rest = seconds - sum(result["phases"].values())
                        for name, value in {"interpreter + imports": rest, **result["phases"]}.items():
                            print(f"    {name:<46} {value:7.2f}s", flush=True)
                ratios.append(bare_s[-1] / project_s[-1])
        finally:
            for channel in channels:
                await channel.close()
            if worker is not None:
                servers.stop(worker, timeout=20)
            for app in reversed(apps):
                await app.stop()
            servers.stop(weed)
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            release_redis(redis_db)
    project, baseline = steps / statistics.median(project_s), steps / statistics.median(bare_s)
    harness.rounds("training-e2e", ratios)
    harness.report("training-e2e", project, baseline, " steps/s",
                   f"one process doing the same {steps} steps, evaluations, checkpoints and final save of nanoGPT's "
                   f"CPU Shakespeare config, interpreter start to exit; project = submit → SUCCEEDED through the "
                   f"training service and a Celery worker (one process: its warm runtime; several: torchrun); "
                   f"medians of {repeats} interleaved runs", digits=2)
