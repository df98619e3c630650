"""A dataset build fanned out over the Celery workers' `data` queue, byte-identical to the in-process build.

The corpus (already stored in S3 by the ingestor) is cut into byte ranges on line boundaries (`cut`; on
blank lines for blank-line documents, so no document straddles two ranges). Each range is one task of each
CPU-heavy stage, run by whichever worker takes it (`tasks.py`):

1. scan (`scan_shard`): the worker GETs its range and runs `pipeline.scan` on it: its split spools and dedup
   partition rows, record numbers from 0, uploaded under the build's prefix. The coordinator (the dataset
   service) downloads them one range at a time, in range order, each as soon as it and those before it are
   done (while the workers scan later ones), and `merge`s them: record numbers shifted by the prefix sums of
   the ranges' record counts, partition files and spools appended in range order, which gives exactly the
   files the sequential scan writes (it appends rows in record order too).
2. dedup (`dedup.run`) and the tokenizer stay in the coordinator, as in-process.
3. pack (`pack_shard`): the coordinator uploads the tokenizer (`tokenizer.to_json`) and each range's slice
   of the status file; the worker packs the range's kept documents of each split into one token stream
   (masks and example index for supervised formats). The coordinator appends the streams in range order,
   each as soon as it and those before it are done, into the version's fixed-size shards
   (`ShardWriter.append`): each document is encoded on its own, so the concatenation is the stream the
   sequential packer writes.

Fair share on the workers: the `data` queue is one FIFO for every build, so a build keeps at most
`LLMP_DATASET_RANGES_IN_FLIGHT` of its ranges sent and unfinished, and sends the next as one finishes. The ranges
of builds running at once then alternate on the queue: a small build's first range waits behind at most that many
of a huge build's, not all of them. How many builds run at once, and of one tenant, is the build slots' bound
(ingestion.py, turns.py), so one tenant holds at most its builds' windows of the queue.

A result is an object `<prefix><stage>-NNNNN.json`, written last; the coordinator polls the prefix's listing
(in its build thread, not the event loop). Tasks are acks_late and reject_on_worker_lost
(services/common/queues.py): a worker killed mid-task gives its message back and another worker redoes that
range only. A task marks each start with a `.started.<id>` object, from which the coordinator's wait for that
range counts (`CeleryFanOut._results`). A task's failure is an `.error.json` object that fails the build with its
message. The prefix holds
`build.json` while the build runs; closing the fan-out (done, failed or cancelled) revokes its tasks and deletes
the prefix, and a task finishing after that deletes what it wrote (it finds `build.json` gone), so nothing is
left. The prefix lies under the version's: if the dataset service dies mid-build, the replica that takes the
version over deletes it with the rest of what the interrupted build wrote.

`LLMP_DATASET_FANOUT_BYTES` says which corpora fan out (`factory`); smaller ones build in-process.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from celery import Celery
from kombu.exceptions import ChannelError

from services.common import dedup
from services.common.config import DEFAULTS, Settings
from services.common.contracts import DATASETS, SOURCES, SPLITS
from services.common.errors import Internal, InvalidArgument, LlmpError, ValidationFailed
from services.common.queues import DATA_QUEUE, PACK_TASK_NAME, SCAN_TASK_NAME, make_producer
from services.common.s3 import ObjectStore
from services.dataset import packing, pipeline
from services.dataset import tokenizer as tokenizers
from services.dataset.options import DatasetOptions

if TYPE_CHECKING:  # the data worker runs this module: it has no database (versions.py reaches PostgreSQL)
    from services.dataset.versions import VersionRow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
RANGE_SECONDS = 1800.0  # a range with no result this long after it started is sent again (64 MiB take minutes)
RANGE_SENDS = 3  # sends of one range before the build fails
IN_FLIGHT = int(DEFAULTS["LLMP_DATASET_RANGES_IN_FLIGHT"])  # a build's ranges queued or running at once, at most
_BUILD_PREFIX = re.compile(r"(?P<version>\S+/)building-[0-9a-f]{12}/")  # what CeleryFanOut names
STREAM_TOKENS = 1 << 62  # a worker's packed range is one stream: never cut
_PASSED_ON = {"ValidationFailed": ValidationFailed, "InvalidArgument": InvalidArgument}  # a task's user errors


def cut(corpus: Path, options: DatasetOptions, shard_bytes: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about `shard_bytes` covering `corpus`, each starting at a line start (for
    blank-line documents, after a blank line: a document is never cut)."""
    size = corpus.stat().st_size
    blank_lines = options.format == "text" and options.document_mode != "line"
    ranges, start = [], 0
    with open(corpus, "rb") as handle:
        while start < size:
            end = start + max(1, shard_bytes)
            if end < size:
                handle.seek(end - 1)
                handle.readline()  # to the end of the line holding byte end-1
                if blank_lines:  # bytes-blank implies blank to the parser (str.strip strips more)
                    while (line := handle.readline()) and line.strip():
                        pass
                end = handle.tell()
            end = min(end, size)
            ranges.append((start, end))
            start = end
    return ranges


def merge(parts: Iterable[tuple[Path, pipeline.Scanned]], work: Path) -> pipeline.Scanned:
    """The ranges' scans (folder and counts, in corpus order) as one scan of the whole corpus in `work` (see the
    module docstring). Each range's folder is deleted once appended: `parts` may fetch the next one only when
    asked (CeleryFanOut.scan does), so the coordinator's disk holds the merged scan and one range, not all twice."""
    total = pipeline.Scanned()
    state = dedup.Work(work / "dedup")
    kinds = (("exact", dedup.KEY_ROW), ("leak", dedup.KEY_ROW), ("bands", dedup.BAND_ROW))
    for kind, _ in kinds:
        getattr(state, kind).mkdir(parents=True, exist_ok=True)
    spools = {name: open(pipeline.spool_path(work, name), "w", encoding="utf-8") for name in SPLITS}
    try:
        with open(state.splits, "wb") as splits:
            for folder, counts in parts:
                part = dedup.Work(folder / "dedup")
                offset = np.uint64(total.records)
                with open(part.splits, "rb") as handle:
                    shutil.copyfileobj(handle, splits)
                for kind, dtype in kinds:
                    for path in sorted(getattr(part, kind).glob("part-*.bin")):
                        rows = np.fromfile(path, dtype=dtype)
                        rows["record"] += offset
                        with open(getattr(state, kind) / path.name, "ab") as handle:
                            rows.tofile(handle)
                for name in SPLITS:
                    with open(pipeline.spool_path(folder, name), encoding="utf-8") as handle:
                        for line in handle:
                            record, _, value = line.partition("\t")
                            spools[name].write(f"{int(record) + total.records}\t{value}")
                total.documents_in += counts.documents_in
                total.too_short += counts.too_short
                total.too_long += counts.too_long
                total.records += counts.records
                total.bytes_done = max(total.bytes_done, counts.bytes_done)
                shutil.rmtree(folder)
    finally:
        for spool in spools.values():
            spool.close()
    with open(state.status, "wb") as handle:  # every record kept until a stage says otherwise
        handle.truncate(total.records)
    return total


# -- the workers' side (tasks.py) --------------------------------------------------------------------------

def _put_tar(store: ObjectStore, key: str, folder: Path, names: list[str] | None = None) -> None:
    """`folder` (or only its entries `names`) as one object: one PUT for a range's many small files."""
    archive = folder.with_name(folder.name + "-" + key.rsplit("/", 1)[-1])
    with tarfile.open(archive, "w") as tar:
        for name in names if names is not None else ["."]:
            tar.add(folder / name, arcname=name)
    store.upload_file(key, archive)
    archive.unlink()


def _get_tar(store: ObjectStore, key: str, folder: Path) -> None:
    archive = folder.with_name(folder.name + "-" + key.rsplit("/", 1)[-1])
    store.download(key, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    archive.unlink()


def _key(prefix: str, stage: str, index: int, suffix: str) -> str:
    return f"{prefix}{stage}-{index:05d}{suffix}"


def run_task(store: ObjectStore, stage: str, spec: dict[str, Any]) -> None:
    """One range of one stage (`scan` or `pack`), its result or its error stored under the build's prefix.

    What cannot even be reported (S3 down throughout) only logs: the coordinator re-sends a range that gives
    no result in time (`CeleryFanOut._results`)."""
    prefix, index = spec["prefix"], spec["index"]
    if not _trusted(spec):
        log.error("dataset shard refused: not a build's prefix", extra={"stage": stage, "prefix": prefix})
        return
    try:
        if not store.exists(prefix + "build.json"):
            return  # the build is over (done, failed or cancelled): nothing to do
        _mark_started(store, prefix, stage, index)
        try:
            with tempfile.TemporaryDirectory(prefix=f"llmp-{stage}-") as folder:
                result = (_scan if stage == "scan" else _pack)(store, spec, Path(folder))
            store.put_bytes(_key(prefix, stage, index, ".json"), json.dumps(result).encode())
        except Exception as error:  # the build fails with it (a killed worker, by contrast, is redelivered)
            log.exception("dataset shard failed", extra={"stage": stage, "shard": index})
            # a tenant sees the reason: a user error's message, else only the kind (details stay in this log)
            error_class = type(error).__name__ if isinstance(error, LlmpError) else "Internal"
            message = (error.message if isinstance(error, LlmpError)
                       else f"internal error in range {index} of the {stage}: {type(error).__name__}")
            store.put_bytes(_key(prefix, stage, index, ".error.json"),
                            json.dumps({"class": error_class, "message": message}).encode())
        if not store.exists(prefix + "build.json"):  # closed while this ran: what it wrote must not stay
            store.delete_prefix(prefix)
    except Exception:
        log.exception("dataset shard could not store its outcome", extra={"stage": stage, "shard": index})


def _mark_started(store: ObjectStore, prefix: str, stage: str, index: int) -> None:
    """`<prefix><stage>-NNNNN.started.<id>`, one per start (a redelivered copy writes its own): the coordinator's
    wait for this range's result counts from the newest. Advisory: a range that cannot write it still runs."""
    try:
        store.put_bytes(_key(prefix, stage, index, f".started.{uuid.uuid4().hex[:12]}"), b"")
    except Exception:
        log.warning("dataset shard could not mark its start", extra={"stage": stage, "shard": index}, exc_info=True)


def _trusted(spec: dict[str, Any]) -> bool:
    """A task touches only a build prefix under a dataset version's, and reads only that version's corpus."""
    match = _BUILD_PREFIX.fullmatch(spec["prefix"])
    if match is None or not match["version"].startswith(DATASETS):
        return False
    return "source_key" not in spec or spec["source_key"] == f"{SOURCES}{match['version']}corpus"


def _scan(store: ObjectStore, spec: dict[str, Any], folder: Path) -> dict:
    options = DatasetOptions.from_dict(spec["options"])
    corpus = folder / "corpus"
    store.download_range(spec["source_key"], corpus, spec["start"], spec["end"] - spec["start"])
    out = folder / "out"
    out.mkdir()
    with open(corpus, "rb") as handle:
        scanned = pipeline.scan(handle, options, out, lambda *_: None, base_offset=spec["start"])
    corpus.unlink()
    # the spools apart: the range's pack task needs only them
    spools = [pipeline.spool_path(out, name).name for name in SPLITS]
    _put_tar(store, _key(spec["prefix"], "scan", spec["index"], ".spools.tar"), out, spools)
    _put_tar(store, _key(spec["prefix"], "scan", spec["index"], ".dedup.tar"), out, ["dedup"])
    return asdict(scanned)


def _pack(store: ObjectStore, spec: dict[str, Any], folder: Path) -> dict:
    prefix, index = spec["prefix"], spec["index"]
    scanned = folder / "scanned"
    _get_tar(store, _key(prefix, "scan", index, ".spools.tar"), scanned)
    status = np.frombuffer(store.get_bytes(_key(prefix, "status", index, ".u1")), dtype=np.uint8)
    loaded = tokenizers.from_json(store.get_bytes(prefix + "tokenizer.json").decode())
    out = folder / "out"
    stats = {}
    for name in SPLITS:
        result = pipeline.SplitResult(name)
        pipeline.pack_split(pipeline.spool_path(scanned, name), status, loaded, spec["supervised"], out / name,
                            STREAM_TOKENS, result)
        stats[name] = {"tokens": result.tokens, "bytes": result.bytes, "loss_tokens": result.loss_tokens}
    _put_tar(store, _key(prefix, "pack", index, ".tar"), out)
    return stats


# -- the coordinator's side (the dataset service) ----------------------------------------------------------

class CeleryFanOut:
    """pipeline.FanOut on the `data` queue for one build of the corpus stored at `source_key`."""

    def __init__(self, store: ObjectStore, producer: Celery, source_key: str, shard_bytes: int, under: str,
                 range_seconds: float = RANGE_SECONDS, in_flight: int = IN_FLIGHT) -> None:
        self.store, self.producer, self.source_key, self.shard_bytes = store, producer, source_key, shard_bytes
        self.range_seconds, self.in_flight = range_seconds, in_flight
        # under the version's prefix: a replica taking an interrupted build over deletes it with the rest
        self.prefix = f"{under}building-{uuid.uuid4().hex[:12]}/"
        self.ranges: list[tuple[int, int]] = []
        self.records: list[int] = []
        self._tasks: list[str] = []

    def scan(self, corpus: Path, options: DatasetOptions, work: Path, report: pipeline.ProgressFn
             ) -> pipeline.Scanned:
        self.store.put_bytes(self.prefix + "build.json", json.dumps({"source": self.source_key}).encode())
        self.ranges = cut(corpus, options, self.shard_bytes)
        specs = [{"prefix": self.prefix, "index": index, "source_key": self.source_key, "start": start, "end": end,
                  "options": options.as_dict()} for index, (start, end) in enumerate(self.ranges)]
        self.records = []

        def fetched() -> Iterator[tuple[Path, pipeline.Scanned]]:  # one range on disk at a time, as they come
            for index, result in self._results("scan", SCAN_TASK_NAME, specs, report, "clean"):
                counts = pipeline.Scanned(**result)
                folder = work / "ranges" / f"{index:05d}"
                for part in (".spools.tar", ".dedup.tar"):
                    _get_tar(self.store, _key(self.prefix, "scan", index, part), folder)
                self.records.append(counts.records)
                yield folder, counts
        try:
            return merge(fetched(), work)
        finally:
            shutil.rmtree(work / "ranges", ignore_errors=True)

    def pack(self, status: np.ndarray, loaded: tokenizers.Loaded, options: DatasetOptions, work: Path,
             results: dict[str, pipeline.SplitResult], shard_tokens: int, report: pipeline.ProgressFn) -> None:
        self.store.put_bytes(self.prefix + "tokenizer.json", tokenizers.to_json(loaded).encode())
        start = 0
        for index, records in enumerate(self.records):
            self.store.put_bytes(_key(self.prefix, "status", index, ".u1"), status[start:start + records].tobytes())
            start += records
        specs = [{"prefix": self.prefix, "index": index, "supervised": options.supervised}
                 for index in range(len(self.ranges))]
        dtype = packing.dtype_for(loaded.info.vocab_size)
        writers = {name: (packing.ExampleWriter if options.supervised else packing.ShardWriter)(
            work / name, dtype, shard_tokens) for name in SPLITS}
        try:
            for index, shard_stats in self._results("pack", PACK_TASK_NAME, specs, report, "pack"):
                folder = work / "ranges" / f"{index:05d}"
                _get_tar(self.store, _key(self.prefix, "pack", index, ".tar"), folder)
                for name in SPLITS:
                    stream = folder / name / packing.shard_file_name(0)
                    results[name].bytes += shard_stats[name]["bytes"]
                    if not stream.exists():  # no document of this split in this range
                        continue
                    if options.supervised:
                        writers[name].append(stream, folder / name / packing.loss_mask_file_name(0),
                                             folder / name / "examples.bin", shard_stats[name]["loss_tokens"])
                    else:
                        writers[name].append(stream)
                shutil.rmtree(folder)
        finally:
            for name, writer in writers.items():
                if options.supervised:
                    results[name].shards, results[name].loss_masks, results[name].examples = writer.close()
                    results[name].tokens, results[name].loss_tokens = writer.tokens.tokens, writer.loss_tokens
                else:
                    results[name].shards = writer.close()
                    results[name].tokens = writer.tokens
            shutil.rmtree(work / "ranges", ignore_errors=True)

    def close(self) -> None:
        """Best effort, never raising over the build's own outcome: what stays behind lies under the version's
        prefix, deleted with it (a failed build) or by the replica that takes an interrupted one over."""
        if self._tasks:  # stopped while tasks were out: those not started yet need not run (the rest clean up)
            try:
                self.producer.control.revoke(self._tasks)
            except Exception:  # a broker without broadcast (SQLAlchemy): they run, find build.json gone, stop
                log.warning("could not revoke a stopped build's tasks", exc_info=True)
        try:
            # build.json first, alone: a task that stores after the listing below then finds it gone and deletes
            # what it wrote (run_task's put-then-check)
            self.store.delete(self.prefix + "build.json")
            self.store.delete_prefix(self.prefix)
        except Exception:
            log.warning("could not delete a build's range objects", extra={"prefix": self.prefix}, exc_info=True)

    def _results(self, stage: str, task: str, specs: list[dict], report: pipeline.ProgressFn, phase: str
                 ) -> Iterator[tuple[int, dict]]:
        """Send one task per spec and yield each (index, result) in spec order, as soon as it and every earlier one
        are in: the coordinator appends a range while the workers still run later ones. Ranges are idempotent
        (fixed keys), so a second copy of one does no harm. A range is sent again when it has no result
        `range_seconds` after its latest start (`.started.<id>`: its worker's pod gone, its outcome unstorable; a
        copy redelivered after its worker was killed starts the wait again), or when it has not started
        `range_seconds` after it was sent and after this build last moved, unless it is still queued behind other
        work that workers take (`_still_queued`: other builds' ranges, a busy pool). After `RANGE_SENDS` sends the
        build fails naming it. At most `in_flight` ranges are out at once, sent in corpus order as earlier ones
        finish (the module docstring)."""
        sent_at: dict[int, float] = {}  # the ranges sent so far (or found still queued)
        started_at: dict[int, float] = {}  # when a range's latest `.started.<id>` marker was first listed
        markers: dict[int, set[str]] = {}  # the start markers seen per range
        moved_at = time.monotonic()  # when one of this build's ranges last started or finished
        sends = dict.fromkeys(range(len(specs)), 0)
        unsent = list(range(len(specs)))[::-1]  # popped in corpus order
        results: dict[int, dict] = {}

        def send(index: int) -> None:
            if sends[index] == RANGE_SENDS:
                raise Internal(f"range {index} of the {stage} got no result after {RANGE_SENDS} tries of "
                               f"{self.range_seconds:.0f} s each: are workers consuming the '{DATA_QUEUE}' queue?")
            sent = self.producer.send_task(task, args=[specs[index]], queue=DATA_QUEUE, routing_key=DATA_QUEUE)
            self._tasks.append(sent.id)
            sent_at[index], sends[index] = time.monotonic(), sends[index] + 1

        def top_up() -> None:  # at most `in_flight` ranges out: other builds' ranges queue between this one's
            while unsent and len(sent_at) - len(results) < self.in_flight:
                send(unsent.pop())

        top_up()
        following = 0  # the next range to yield
        while following < len(specs):
            listed = {stored.key for stored in self.store.list(f"{self.prefix}{stage}-")}
            now = time.monotonic()
            for index in sorted(sent_at):
                if index in results:
                    continue
                if _key(self.prefix, stage, index, ".error.json") in listed:
                    error = json.loads(self.store.get_bytes(_key(self.prefix, stage, index, ".error.json")))
                    raise _PASSED_ON.get(error["class"], Internal)(error["message"])
                if _key(self.prefix, stage, index, ".json") in listed:
                    results[index] = json.loads(self.store.get_bytes(_key(self.prefix, stage, index, ".json")))
                    moved_at = now
                    continue
                marker = _key(self.prefix, stage, index, ".started.")
                starts = {key for key in listed if key.startswith(marker)}
                if starts - markers.setdefault(index, set()):  # a (new) start of this range
                    markers[index] |= starts
                    started_at[index] = moved_at = now
                waited = now - (started_at[index] if index in started_at else max(sent_at[index], moved_at))
                if waited <= self.range_seconds:
                    continue
                if index not in started_at and self._still_queued():
                    sent_at[index] = now  # behind other work that moves: another wait
                    continue
                log.warning("dataset range without a result: sent again", extra={"stage": stage, "shard": index})
                started_at.pop(index, None)  # the new copy's own marker starts its wait
                send(index)
            top_up()
            done_bytes = sum(self.ranges[index][1] - self.ranges[index][0] for index in results)
            report(phase, done_bytes, sum(result.get("documents_in", 0) for result in results.values()))
            while following in results:  # the workers go on meanwhile: their next ranges are out already
                yield following, results[following]
                following += 1
            if len(results) < len(specs):
                time.sleep(POLL_SECONDS)
        self._tasks = []  # all done: nothing to revoke


    def _still_queued(self) -> bool:
        """Whether the `data` queue holds messages (any build's) and some live worker consumes it: a range of
        this build that has not started then waits its turn rather than being lost. Without an answer from the
        broker, or with no worker, it is not (the range is sent again)."""
        try:
            with self.producer.connection_for_read() as connection, connection.channel() as channel:
                queued = channel.queue_declare(DATA_QUEUE, passive=True).message_count
        except ChannelError as error:  # py-amqp's, which kombu's transports raise
            if error.reply_code != 404:  # 404: no such queue (Redis drops an empty one)
                log.warning("could not ask the broker the data queue's length", exc_info=True)
            return False
        except Exception:
            log.warning("could not ask the broker the data queue's length", exc_info=True)
            return False
        return queued > 0 and _data_consumed(self.producer)


def factory(settings: Settings, store: ObjectStore) -> Callable[[VersionRow, int], CeleryFanOut | None] | None:
    """The ingestor's choice per build: fan out a corpus over `LLMP_DATASET_FANOUT_BYTES`, else None (in-process)."""
    if not settings.dataset_fanout_bytes:
        return None
    producer = make_producer(settings)

    def fanout(row: VersionRow, corpus_bytes: int) -> CeleryFanOut | None:
        if corpus_bytes <= settings.dataset_fanout_bytes or not _data_consumed(producer):
            return None
        return CeleryFanOut(store, producer, row.source_key, settings.dataset_shard_bytes, row.prefix,
                            in_flight=settings.dataset_ranges_in_flight)
    return fanout


def _data_consumed(producer: Celery) -> bool:
    """Whether a live worker consumes the `data` queue (a broadcast answered within a second). Without one (the
    broker unreachable, a fleet without data workers) the build runs in-process: slower, never stuck."""
    try:
        queues = producer.control.inspect(timeout=1.0).active_queues() or {}
    except Exception:
        log.warning("could not ask the workers which queues they consume", exc_info=True)
        return False
    if any(queue.get("name") == DATA_QUEUE for consumed in queues.values() for queue in consumed):
        return True
    log.warning("no worker consumes the data queue: the build runs in-process", extra={"queue": DATA_QUEUE})
    return False
