"""Peak memory of a dataset build as the corpus grows: it must not grow with the number of documents.

Generates corpora of short one-line documents (no download: a seeded generator over a synthetic
vocabulary, with ~2% exact copies, ~2% near copies (one word appended) and ~1% case variants of earlier
documents), builds each through `services.dataset.pipeline.build` (BPE 4096, line mode) in a child
process of its own, and reads that child's peak RSS from `os.wait4`. Two sizes: `--small` and `--large`
(defaults 100,000 and 400,000 documents, a few minutes here; `--small 1000000 --large 10000000` is the
issue's figure).

The BENCH line: project = peak RSS of the smaller build / peak RSS of the larger one (1.0: memory does not
grow; ≥ 1/1.2 = 0.83 is the target), baseline = 1.0 (flat memory). Both peaks and docs/s are printed.

Then (`--fanout N` documents, default 200,000; 0 skips it) the fan-out over Celery workers
(services/dataset/shards.py), on a SeaweedFS started here and a claimed Redis database: the same corpus
built by the coordinator (a child process, as the dataset service would) with 1, then 2 worker processes on
the `data` queue (`--shard-bytes`, default a quarter of the corpus: two ranges per worker). Two more BENCH
lines:

- `dataset-fanout-workers`: docs/s of the whole build with 2 workers / with 1 (target >= 1.6). The dedup
  stages and the tokenizer run in the coordinator either way, so they bound the ratio (Amdahl). So does the host:
  before each build the benchmark measures what 2 processes at once get from it at all (`harness.host_scaling`:
  a pure-Python loop alone, then two copies together), printed per round and in the BENCH line. On a 2-vCPU
  virtual machine that ceiling moved between 1.29 and 2.09 from one build to the next. And the stages that do
  not scale with workers: the ratio the round would have had, were the 2 workers' scan exactly twice as fast as the
  1 worker's and every other stage as long as measured with 2, is printed too (one worker process already packs on
  both cores, through the tokenizers library's threads).
- `dataset-fanout-vs-hf`: docs/s of the tokenize-and-pack stage with 2 workers (from handing out the
  ranges to the version's shards written) / HF `datasets` `Dataset.map(batched=True, num_proc=2)` running
  the same tokenizer (the build's, loaded with `PreTrainedTokenizerFast`) over the same corpus, loaded
  with `load_dataset("text")` beforehand (not timed) (target >= 1.5).

The peak RSS of every process taking part (coordinator, each worker's main and pool processes, HF's) is
printed.

`--done-when N` (`--skip-rss --fanout 0` implied) checks the issue's Done-when instead of timing: a corpus of N
documents built through the fan-out twice, with the production range size (`LLMP_DATASET_SHARD_BYTES`, 64 MiB)
unless `--shard-bytes` says otherwise: first by 2 data workers, one of whose pool processes is SIGKILLed in the
middle of its first scan range (`--kill-after` seconds into it), then by 1 worker. It prints every process's
peak RSS and each version's digest (SHA-256 over every output file's name and bytes, and the counts), and exits
1 unless the two versions are identical, the killed range was delivered again (and only it), and every
process stayed under 1 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import harness

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 10_000
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def vocabulary(size: int = 8000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = set()
    while len(words) < size:
        syllables = rng.integers(1, 4)
        words.add("".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                          for _ in range(syllables)))
    return np.array(sorted(words))


def generate(path: Path, documents: int, seed: int = 0) -> int:
    """Writes `documents` one-line documents to `path`; returns its size in bytes. Same arguments, same file."""
    words = vocabulary(seed=seed)
    size = 0
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, documents, CHUNK):
            rng = np.random.default_rng([seed, start])
            count = min(CHUNK, documents - start)
            lengths = rng.integers(5, 11, count)
            picks = rng.integers(0, len(words), int(lengths.sum()))
            kinds = rng.random(count)
            lines: list[str] = []
            offset = 0
            for number in range(count):
                line = " ".join(words[picks[offset:offset + lengths[number]]])
                offset += lengths[number]
                if lines and kinds[number] < 0.02:  # an exact copy of an earlier document of the chunk
                    line = lines[rng.integers(len(lines))]
                elif lines and kinds[number] < 0.04:  # a near copy: one word appended
                    line = lines[rng.integers(len(lines))] + " " + words[rng.integers(len(words))]
                elif lines and kinds[number] < 0.05:  # a case variant: the same shingles, another exact key
                    line = lines[rng.integers(len(lines))].capitalize()
                lines.append(line)
            text = "\n".join(lines) + "\n"
            size += len(text.encode("utf-8"))
            out.write(text)
    return size


def child(corpus: Path, work: Path, tokenizer: str, vocab_size: int) -> None:
    """Runs in the measured process: one build, its counts as JSON on stdout."""
    from services.dataset import pipeline
    from services.dataset.options import DatasetOptions

    options = DatasetOptions(name="scale", format="text", document_mode="line", tokenizer=tokenizer,
                             vocab_size=vocab_size).validated()
    started = time.perf_counter()
    built = pipeline.build(corpus, options, work)
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "cleaning": vars(built.cleaning),
                      "tokens": sum(split.tokens for split in built.splits.values())}))


def measure(documents: int, scratch: Path, tokenizer: str, vocab_size: int) -> dict:
    corpus = scratch / f"corpus-{documents}.txt"
    size = generate(corpus, documents)
    work = scratch / f"work-{documents}"
    work.mkdir()
    command = [sys.executable, "-m", "bench.dataset_scale", "--child", str(corpus), str(work),
               "--tokenizer", tokenizer, "--vocab-size", str(vocab_size)]
    path = [str(ROOT), str(ROOT / "gen"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"the build of {documents} documents failed ({process.returncode})")
    result = json.loads(output.decode().strip().splitlines()[-1])
    corpus.unlink()
    result.update(documents=documents, megabytes=size / 1e6, peak_rss_mib=usage.ru_maxrss / 1024)
    return result


def fanout_child(corpus: Path, work: Path, tokenizer: str, vocab_size: int, shard_bytes: int) -> None:
    """The coordinator's side, in the measured process: the corpus stored, then built fanned out."""
    from services.common import contracts
    from services.common.config import Settings
    from services.common.queues import make_producer
    from services.common.s3 import ObjectStore
    from services.dataset import pipeline, shards
    from services.dataset.options import DatasetOptions

    settings = Settings.from_env()
    store = ObjectStore(settings.s3)
    store.ensure_bucket()
    # where the ingestor keeps a version's corpus and files (the workers' tasks touch nothing else)
    tenant = f"bench-{work.name}"
    key = contracts.dataset_corpus_key(tenant, "scale", 1)
    store.upload_file(key, corpus)
    options = DatasetOptions(name="scale", format="text", document_mode="line", tokenizer=tokenizer,
                             vocab_size=vocab_size).validated()
    fanout = shards.CeleryFanOut(store, make_producer(settings), key, shard_bytes,
                                 contracts.dataset_version_prefix(tenant, "scale", 1))
    timed: dict[str, float] = {}

    def timing(name: str, function):  # `function` timed into timed[name]
        def timed_call(*args, **kwargs):
            begun = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timed[name] = timed.get(name, 0.0) + time.perf_counter() - begun
        return timed_call
    # the stages: scan over the workers with the coordinator's merge, dedup and tokenizer in it, pack over them
    last_range: dict[str, float] = {}  # stage: when its last range's result was handed to the coordinator
    results = fanout._results

    def noted(stage, task, specs, *rest):
        for index, result in results(stage, task, specs, *rest):
            if index == len(specs) - 1:
                last_range[stage] = time.perf_counter()
            yield index, result

    def tail(stage: str, function):  # how long `function` goes on after its stage's last range is in
        def tailed(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            finally:
                timed[f"{stage}_tail_seconds"] = time.perf_counter() - last_range.get(stage, time.perf_counter())
        return tailed
    fanout._results = noted
    fanout.scan = timing("scan_seconds", tail("scan", fanout.scan))
    fanout.pack = timing("pack_seconds", tail("pack", fanout.pack))
    pipeline.dedup.run = timing("dedup_seconds", pipeline.dedup.run)
    pipeline._tokenizer = timing("tokenizer_seconds", pipeline._tokenizer)
    started = time.perf_counter()
    built = pipeline.build(corpus, options, work, fanout=fanout)
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, **timed, "ranges": len(fanout.ranges),
                      "documents_out": built.cleaning.documents_out,
                      "tokens": sum(split.tokens for split in built.splits.values()),
                      "cleaning": vars(built.cleaning),
                      "splits": {name: split.stats() for name, split in built.splits.items()}}))


def hf_child(corpus: Path, tokenizer_folder: Path, cache: Path) -> None:
    """HF `datasets`: the same corpus tokenized by `map(batched=True, num_proc=2)` with the build's tokenizer."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_folder))
    dataset = datasets.load_dataset("text", data_files=str(corpus), split="train", cache_dir=str(cache))
    dataset = dataset.filter(lambda row: bool(row["text"].strip()), num_proc=2)  # what `document_mode=line` reads
    started = time.perf_counter()
    mapped = dataset.map(lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                         batched=True, num_proc=2, remove_columns=["text"], load_from_cache_file=False)
    elapsed = time.perf_counter() - started
    pool = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest of map's processes
    print(json.dumps({"seconds": elapsed, "documents": len(mapped), "pool_rss_mib": pool}))


def _run_child(command: list[str], env: dict[str, str]) -> tuple[dict, float]:
    """(its last stdout line as JSON, its peak RSS in MiB)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[2:4])} failed ({os.waitstatus_to_exitcode(status)})")
    return json.loads(output.decode().strip().splitlines()[-1]), usage.ru_maxrss / 1024


def _peak_rss_mib(pid: int) -> dict[str, float]:
    """VmHWM of a worker's main process and of its pool processes."""
    peaks = {}
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for label, process in [("main", str(pid)), *((f"pool {n}", child) for n, child in enumerate(children))]:
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks[label] = int(line.split()[1]) / 1024
    return peaks


def _digest(work: Path, result: dict) -> str:
    """SHA-256 over every file the build left in `work` (names and bytes, in name order) and its counts."""
    digest = hashlib.sha256(json.dumps({key: result[key] for key in ("documents_out", "tokens", "cleaning",
                                                                     "splits")}, sort_keys=True).encode())
    for path in sorted(path for path in work.rglob("*") if path.is_file()):
        digest.update(str(path.relative_to(work)).encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _scan_started(log: Path) -> int:
    from services.common.queues import SCAN_TASK_NAME

    return log.read_text(errors="replace").count(f"{SCAN_TASK_NAME}[")


def done_when(documents: int, scratch: Path, tokenizer: str, vocab_size: int, shard_bytes: int,
              kill_after: float) -> None:
    """See the module docstring (`--done-when`)."""
    from bench.training_e2e import claim_redis, release_redis
    from cli import servers
    from services.common import topology
    from services.common.config import DEFAULTS
    from tests.integration.training import workers

    corpus = scratch / "done-when-corpus.txt"
    started = time.perf_counter()
    size = generate(corpus, documents, seed=1)
    shard_bytes = shard_bytes or int(DEFAULTS["LLMP_DATASET_SHARD_BYTES"])
    print(f"corpus: {documents} documents, {size / 1e6:.1f} MB, generated in {time.perf_counter() - started:.0f} s; "
          f"ranges of {shard_bytes / 2**20:.0f} MiB", flush=True)
    redis_db = claim_redis()
    ports = servers.SeaweedPorts.free()
    weed = servers.start_seaweedfs(scratch / "weed", ports, "llmp-bench", "llmp-bench-secret", scratch / "weed.log")
    env = _fanout_env(scratch, ports, redis_db)
    runs = {}
    try:
        for count in (2, 1):
            work = scratch / f"done-when-{count}"
            work.mkdir()
            logs = [scratch / f"done-when-worker-{count}-{n}.log" for n in range(count)]
            killed: dict[str, float] = {}
            with contextlib.ExitStack() as stack:
                started_workers = [stack.enter_context(workers.celery_worker(env, log, queues="data",
                                                                             app=topology.DATA_WORKER_APP))
                                   for log in logs]
                command = [sys.executable, "-m", "bench.dataset_scale", "--fanout-child", str(corpus), str(work),
                           "--tokenizer", tokenizer, "--vocab-size", str(vocab_size), "--shard-bytes", str(shard_bytes)]
                coordinator = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, env=env)
                if count == 2:  # kill worker 0's pool process `kill_after` s into its first scan range
                    while not _scan_started(logs[0]) and not os.waitid(os.P_PID, coordinator.pid,
                                                                           os.WEXITED | os.WNOHANG | os.WNOWAIT):
                        time.sleep(0.5)  # (waitid with WNOWAIT leaves the coordinator to wait4 below)
                    time.sleep(kill_after)
                    [pool] = subprocess.run(["pgrep", "-P", str(started_workers[0].pid)], capture_output=True,
                                            text=True).stdout.split()
                    killed = _peak_rss_mib(started_workers[0].pid)
                    os.kill(int(pool), signal.SIGKILL)
                    print(f"SIGKILLed worker 0's pool process {pool} mid-range (its peak RSS so far: "
                          f"{killed['pool 0']:.0f} MiB)", flush=True)
                output = coordinator.stdout.read()
                _, status, usage = os.wait4(coordinator.pid, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    raise SystemExit(f"the build with {count} worker(s) failed ({os.waitstatus_to_exitcode(status)})")
                result = json.loads(output.decode().strip().splitlines()[-1])
                rss = {"coordinator": usage.ru_maxrss / 1024}
                for n, worker in enumerate(started_workers):
                    rss |= {f"worker {n} {label}": peak for label, peak in _peak_rss_mib(worker.pid).items()}
                if killed:
                    rss["worker 0 killed pool"] = killed["pool 0"]
            texts = [log.read_text(errors="replace") for log in logs]
            result |= {"rss": rss, "digest": _digest(work, result),
                       "received": sum(text.count(" received") for text in texts),
                       "succeeded": sum(text.count(" succeeded ") for text in texts),
                       "signal 9": sum(text.count("signal 9") for text in texts)}
            runs[count] = result
            shutil.rmtree(work)
            print(f"{count} worker(s): {result['seconds']:.0f} s, {result['ranges']} ranges, tasks received "
                  f"{result['received']} / succeeded {result['succeeded']}, kept {result['documents_out']} documents, "
                  f"{result['tokens']} tokens; digest {result['digest'][:16]}; peak RSS MiB "
                  + ", ".join(f"{name} {peak:.0f}" for name, peak in rss.items()), flush=True)
    finally:
        servers.stop(weed)
        release_redis(redis_db)
    two, one = runs[2], runs[1]
    failures = []
    if two["digest"] != one["digest"]:
        failures.append("the versions built by 2 workers and by 1 differ")
    if not (two["signal 9"] and two["received"] == 2 * two["ranges"] + 1 and two["succeeded"] == 2 * two["ranges"]):
        failures.append("the killed range was not redelivered once and only it")
    heavy = [f"{count} worker(s) {name} {peak:.0f} MiB" for count, run in runs.items()
             for name, peak in run["rss"].items() if peak >= 1024]
    if heavy:
        failures.append("over 1 GiB: " + ", ".join(heavy))
    print("done-when: " + ("; ".join(failures) if failures else
                           f"identical versions ({one['digest'][:16]}) with 2 workers (one killed mid-range) and "
                           f"with 1; every process under 1 GiB"), flush=True)
    if failures:
        raise SystemExit(1)


def _fanout_env(scratch: Path, ports, redis_db: int) -> dict[str, str]:
    """The coordinator's and the workers' environment: the SeaweedFS and Redis database started here."""
    path = [str(ROOT), str(ROOT / "gen"), os.environ.get("PYTHONPATH", "")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMP_")}
    return env | {"PYTHONPATH": os.pathsep.join(path), "LLMP_S3_ENDPOINT": f"127.0.0.1:{ports.s3}",
                  "LLMP_S3_ACCESS_KEY": "llmp-bench", "LLMP_S3_SECRET_KEY": "llmp-bench-secret",
                  "LLMP_S3_BUCKET": "llmp-bench", "LLMP_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
                  "LLMP_STATE_DIR": str(scratch / "state"), "LLMP_LOG_FORMAT": "text"}


def fanout_comparison(documents: int, scratch: Path, tokenizer: str, vocab_size: int, shard_bytes: int,
                      rounds: int) -> None:
    from bench.training_e2e import claim_redis, release_redis
    from cli import servers
    from services.common import topology
    from tests.integration.training import workers

    corpus = scratch / "fanout-corpus.txt"
    size = generate(corpus, documents, seed=1)
    shard_bytes = shard_bytes or -(-size // 4)
    redis_db = claim_redis()
    ports = servers.SeaweedPorts.free()
    weed = servers.start_seaweedfs(scratch / "weed", ports, "llmp-bench", "llmp-bench-secret", scratch / "weed.log")
    env = _fanout_env(scratch, ports, redis_db)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    ceilings: list[list[float]] = [[] for _ in range(rounds)]  # the host's own 2-process scaling, before each build
    try:
        for round_number, count in ((r, c) for r in range(rounds) for c in ((1, 2) if r % 2 == 0 else (2, 1))):
            ceilings[round_number].append(harness.host_scaling(2))
            work = scratch / f"fanout-{count}-{round_number}"
            work.mkdir()
            with contextlib.ExitStack() as stack:
                started = [stack.enter_context(workers.celery_worker(env, scratch / f"worker-{count}-{n}.log",
                                                                     queues="data", app=topology.DATA_WORKER_APP))
                           for n in range(count)]
                result, rss = _run_child([sys.executable, "-m", "bench.dataset_scale", "--fanout-child",
                                             str(corpus), str(work), "--tokenizer", tokenizer, "--vocab-size",
                                             str(vocab_size), "--shard-bytes", str(shard_bytes)], env)
                result["rss"] = {"coordinator": rss, **{f"worker {n} {label}": peak for n, worker in enumerate(started)
                                                        for label, peak in _peak_rss_mib(worker.pid).items()}}
            runs[count].append(result)
            print(f"round {round_number + 1}, fan-out, {count} worker(s): {documents} documents "
                  f"({size / 1e6:.1f} MB, {result['ranges']} ranges) in {result['seconds']:.1f} s "
                  f"({documents / result['seconds']:.0f} docs/s), pack stage "
                  f"{result['pack_seconds']:.1f} s ({result['pack_tail_seconds']:.1f} s after its last range; scan "
                  f"{result['scan_seconds']:.1f} s, {result['scan_tail_seconds']:.1f} s after its last range; dedup "
                  f"{result['dedup_seconds']:.1f} s; tokenizer {result['tokenizer_seconds']:.1f} s); peak RSS MiB "
                  + ", ".join(f"{name} {peak:.0f}" for name, peak in result["rss"].items())
                  + f"; the host's own 2-process scaling just before: {ceilings[round_number][-1]:.2f}", flush=True)
        hf_runs = []
        for _ in range(rounds):
            hf, hf_rss = _run_child([sys.executable, "-m", "bench.dataset_scale", "--hf-child", str(corpus),
                                     str(scratch / "fanout-2-0" / "tokenizer"), str(scratch / "hf-cache")], env)
            hf_runs.append(hf)
            print(f"HF datasets map(batched=True, num_proc=2): {hf['documents']} documents in {hf['seconds']:.1f} s "
                  f"({hf['documents'] / hf['seconds']:.0f} docs/s); peak RSS MiB main {hf_rss:.0f}, "
                  f"largest map process {hf['pool_rss_mib']:.0f}", flush=True)
    finally:
        servers.stop(weed)
        release_redis(redis_db)
    workers_ratios = [one["seconds"] / two["seconds"] for one, two in zip(runs[1], runs[2], strict=True)]
    harness.rounds("2 workers / 1, whole build", workers_ratios)
    round_ceilings = [statistics.mean(measured) for measured in ceilings]
    harness.rounds("the host's own 2-process scaling (a CPU loop alone vs 2 at once), the same rounds", round_ceilings)
    # Amdahl, from the stages measured: the ratio had 2 workers scanned in exactly half the 1-worker scan's time and
    # everything else (dedup and tokenizer in the coordinator, the pack) taken what it took with 2 workers
    perfect = [one["seconds"] / (one["scan_seconds"] / 2 + two["seconds"] - two["scan_seconds"])
               for one, two in zip(runs[1], runs[2], strict=True)]
    harness.rounds("2 workers / 1 were the scan perfectly parallel (the other stages as measured with 2)", perfect)
    one = statistics.median(run["seconds"] for run in runs[1])
    two = statistics.median(run["seconds"] for run in runs[2])
    harness.report("dataset-fanout-workers", documents / two, documents / one, " docs/s",
                   f"whole build with 1 worker process, median of {rounds} interleaved rounds; 2: {two:.1f} s, "
                   f"1: {one:.1f} s; target >= 1.6; the host's own 2-process scaling in the same rounds: median "
                   f"{statistics.median(round_ceilings):.2f}; were the scan perfectly parallel: median "
                   f"{statistics.median(perfect):.2f}")
    packed = statistics.median(run["documents_out"] / run["pack_seconds"] for run in runs[2])
    hf_rate = statistics.median(run["documents"] / run["seconds"] for run in hf_runs)
    harness.report("dataset-fanout-vs-hf", packed, hf_rate, " docs/s",
                   "HF datasets map(batched=True, num_proc=2), same tokenizer; project: the pack stage over 2 "
                   f"workers; medians of {rounds} rounds; target >= 1.5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100_000, help="documents of the smaller corpus")
    parser.add_argument("--large", type=int, default=400_000, help="documents of the larger corpus")
    parser.add_argument("--tokenizer", default="bpe", choices=("bpe", "char"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--scratch", type=Path, default=None, help="where corpora and builds go (default: a temp dir)")
    parser.add_argument("--fanout", type=int, default=200_000,
                        help="documents of the fan-out comparison (1 vs 2 workers vs HF datasets); 0 skips it")
    parser.add_argument("--shard-bytes", type=int, default=0, help="bytes per range (default: a quarter)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the fan-out comparison (sides alternate)")
    parser.add_argument("--skip-rss", action="store_true", help="only the fan-out comparison")
    parser.add_argument("--done-when", type=int, default=0, metavar="N",
                        help="build N documents with 2 workers (one killed) and 1; compare (see above)")
    parser.add_argument("--kill-after", type=float, default=20.0,
                        help="--done-when: seconds into its first scan range the worker is killed")
    parser.add_argument("--child", nargs=2, type=Path, metavar=("CORPUS", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--fanout-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hf-child", nargs=3, type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(*options.child, options.tokenizer, options.vocab_size)
        return
    if options.fanout_child:
        fanout_child(*options.fanout_child, options.tokenizer, options.vocab_size, options.shard_bytes)
        return
    if options.hf_child:
        hf_child(*options.hf_child)
        return

    print(harness.load())
    if options.done_when:
        with tempfile.TemporaryDirectory(dir=options.scratch) as scratch:
            done_when(options.done_when, Path(scratch), options.tokenizer, options.vocab_size, options.shard_bytes,
                      options.kill_after)
        return
    if not options.skip_rss:
        scale(options)
    if options.fanout:
        with tempfile.TemporaryDirectory(dir=options.scratch) as scratch:
            fanout_comparison(options.fanout, Path(scratch), options.tokenizer, options.vocab_size,
                              options.shard_bytes, options.rounds)


def scale(options: argparse.Namespace) -> None:
    figures = []
    with tempfile.TemporaryDirectory(dir=options.scratch) as scratch:
        for documents in (options.small, options.large):
            figure = measure(documents, Path(scratch), options.tokenizer, options.vocab_size)
            figures.append(figure)
            counts = figure["cleaning"]
            print(f"{documents:>10} documents ({figure['megabytes']:.1f} MB): peak RSS "
                  f"{figure['peak_rss_mib']:.0f} MiB, {figure['seconds']:.1f} s, {documents / figure['seconds']:.0f} "
                  f"docs/s; kept {counts['documents_out']}, "
                  f"exact {counts['exact_duplicates']}, near {counts['near_duplicates']}, "
                  f"leaked {counts['leaked_exact']}+{counts['leaked_near']}", flush=True)
    small, large = figures
    harness.report("dataset-scale", small["peak_rss_mib"] / large["peak_rss_mib"], 1.0, "",
                   f"peak RSS of the build of {small['documents']} documents / of {large['documents']}: "
                   f"{small['peak_rss_mib']:.0f} MiB / {large['peak_rss_mib']:.0f} MiB, "
                   f"{small['documents'] / small['seconds']:.0f} / {large['documents'] / large['seconds']:.0f} docs/s; "
                   f"1.0 = flat, target >= 0.83", digits=2)


if __name__ == "__main__":
    main()
