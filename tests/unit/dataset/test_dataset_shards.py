"""The fan-out's pure parts (services/dataset/shards.py): ranges cut where no document is split, and the ranges'
scans merged into exactly the files one scan of the whole corpus writes (the workers and S3 are tested in
tests/integration/dataset/test_dataset_fanout.py)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

from services.common.errors import Internal
from services.dataset import ingest, pipeline, shards
from services.dataset.options import DatasetOptions

# A byte-order mark opens the corpus (dropped) and some of its lines (kept: mid-corpus, it is text), whichever
# range a cut puts them at the start of.
CORPUS = ingest.BOM + "".join(
    f"Paragraph {n} line one.\r\nline two of {n % 7}\n\n\n" if n % 3 else
    f"   \nSame text {n % 5}\n\n" if n % 4 or not n else f"\ufeffMarked paragraph {n}\n\n"
    for n in range(400)).encode()


def files(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("mode", ["blank-line", "line"])
@pytest.mark.parametrize("shard_bytes", [1, 97, 1000, 10**9])
def test_ranges_cover_the_corpus_and_cut_no_document(tmp_path, mode, shard_bytes):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(CORPUS)
    options = DatasetOptions("d", document_mode=mode).validated()
    ranges = shards.cut(corpus, options, shard_bytes)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(CORPUS)
    assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False))
    whole = [document.text for document in ingest.parse(io.BytesIO(CORPUS), options)]
    pieces = [document.text for start, end in ranges
              for document in ingest.parse(io.BytesIO(CORPUS[start:end]), options, at_start=start == 0)]
    assert pieces == whole
    assert not whole[0].startswith("\ufeff") and sum(text.startswith("\ufeff") for text in whole) > 20
    if shard_bytes == 10**9:
        assert len(ranges) == 1


@pytest.mark.parametrize("shard_bytes", [150, 2000])
def test_merged_range_scans_are_the_whole_corpus_scan(tmp_path, shard_bytes):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(CORPUS)
    options = DatasetOptions("d").validated()
    whole = tmp_path / "whole"
    whole.mkdir()
    with open(corpus, "rb") as handle:
        expected = pipeline.scan(handle, options, whole, lambda *_: None)

    folders, counts = [], []
    for index, (start, end) in enumerate(shards.cut(corpus, options, shard_bytes)):
        folders.append(tmp_path / f"range-{index}")
        folders[-1].mkdir()
        counts.append(pipeline.scan(io.BytesIO(CORPUS[start:end]), options, folders[-1],
                                    lambda *_: None, base_offset=start))
    assert len(folders) > 3
    merged = tmp_path / "merged"
    merged.mkdir()
    assert shards.merge(zip(folders, counts, strict=True), merged) == expected
    assert files(merged) == files(whole) and expected.records > 100
    assert not any(folder.exists() for folder in folders)  # each range's files gone once appended


def test_merge_holds_one_range_on_disk_at_a_time(tmp_path):
    """The coordinator fetches a range only when merge asks for the next: the previous one is gone by then."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(CORPUS)
    options = DatasetOptions("d").validated()
    ranges = shards.cut(corpus, options, 2_000)
    on_disk = []

    def fetched():
        for index, (start, end) in enumerate(ranges):
            on_disk.append(sum(1 for path in tmp_path.glob("range-*") if path.exists()))
            folder = tmp_path / f"range-{index}"
            folder.mkdir()
            yield folder, pipeline.scan(io.BytesIO(CORPUS[start:end]), options, folder, lambda *_: None,
                                        base_offset=start)
    (tmp_path / "merged").mkdir()
    shards.merge(fetched(), tmp_path / "merged")
    assert len(on_disk) == len(ranges) > 3 and on_disk == [0] * len(ranges)


# -- fair share on the `data` queue ----------------------------------------------------------------------------

class FifoQueue:
    """The broker's `data` queue and one worker process taking its messages in order: each message is a range,
    whose start (`shards._mark_started`, as run_task) and result the worker stores where CeleryFanOut looks.

    `hang`: ranges whose worker gets stuck (started, never finished); `killed`: ranges whose first run dies
    after `range_seconds` and whose message goes back to the head of the queue (reject_on_worker_lost)."""

    def __init__(self, range_seconds: float = 0.005, hang: frozenset[int] = frozenset(),
                 killed: frozenset[int] = frozenset(), consumers: bool = True) -> None:
        self.range_seconds, self.hang, self.killed, self.consumers = range_seconds, hang, set(killed), consumers
        self.messages: list[dict] = []
        self.objects: dict[str, bytes] = {}
        self.finished: list[tuple[str, int]] = []  # (build, range) in the order the worker finished them
        self.events: list[tuple[str, str]] = []  # ("sent" or "done", build prefix), in order
        self.lock = threading.Lock()

    # the producer's side (CeleryFanOut.producer)
    def send_task(self, name, args, queue, routing_key):
        assert queue == routing_key == shards.DATA_QUEUE
        with self.lock:
            self.messages.append(args[0])
            self.events.append(("sent", args[0]["prefix"]))
        return types.SimpleNamespace(id=uuid.uuid4().hex)

    # the store's side (CeleryFanOut.store)
    def list(self, prefix):
        with self.lock:
            return [types.SimpleNamespace(key=key) for key in self.objects if key.startswith(prefix)]

    def get_bytes(self, key):
        with self.lock:
            return self.objects[key]

    def put_bytes(self, key, data):
        with self.lock:
            self.objects[key] = data

    # the broker's answer to CeleryFanOut._still_queued (a passive queue_declare)
    @contextlib.contextmanager
    def connection_for_read(self):
        yield self

    @contextlib.contextmanager
    def channel(self):
        yield self

    def queue_declare(self, name, passive):
        assert name == shards.DATA_QUEUE and passive
        with self.lock:
            return types.SimpleNamespace(message_count=len(self.messages))

    def work(self, stop: threading.Event) -> None:
        """Take and finish ranges in queue order until stopped."""
        while not stop.is_set():
            with self.lock:
                spec = self.messages.pop(0) if self.messages else None
            if spec is None:
                time.sleep(0.002)
                continue
            shards._mark_started(self, spec["prefix"], "scan", spec["index"])
            if spec["index"] in self.hang:
                continue  # a worker stuck in it: no result ever
            time.sleep(self.range_seconds)  # the range's work
            with self.lock:
                if spec["index"] in self.killed:  # redelivered, first in line
                    self.killed.discard(spec["index"])
                    self.messages.insert(0, spec)
                    continue
                self.objects[shards._key(spec["prefix"], "scan", spec["index"], ".json")] = b'{"documents_in": 1}'
                self.finished.append((spec["prefix"], spec["index"]))
                self.events.append(("done", spec["prefix"]))


def run_builds(monkeypatch, in_flight: int | None, sizes: dict[str, int]
               ) -> tuple[list[tuple[str, int]], dict, list[tuple[str, str]]]:
    """Builds of `sizes` ranges each started in that order, 50 ms apart, on one FIFO queue and one worker:
    the (build, range) finished in order, each build's most ranges sent and not finished at once, the queue's events."""
    monkeypatch.setattr(shards, "POLL_SECONDS", 0.002)
    queue = FifoQueue()
    peak: dict[str, int] = {}
    fanouts = {}
    for name, count in sizes.items():
        options = {} if in_flight is None else {"in_flight": in_flight}
        fanout = shards.CeleryFanOut(queue, queue, "sources/x", 1, f"datasets/{name}/1/", **options)
        fanout.ranges = [(index, index + 1) for index in range(count)]
        fanouts[name] = fanout

    def build(name: str) -> None:
        fanout = fanouts[name]
        specs = [{"prefix": fanout.prefix, "index": index} for index in range(len(fanout.ranges))]

        def report(*_):  # after each poll: the ranges of this build sent and not finished (queued or running)
            with queue.lock:
                out = (queue.events.count(("sent", fanout.prefix)) - queue.events.count(("done", fanout.prefix)))
            peak[name] = max(peak.get(name, 0), out)
        assert len(list(fanout._results("scan", shards.SCAN_TASK_NAME, specs, report, "clean"))) == len(specs)

    stop = threading.Event()
    worker = threading.Thread(target=queue.work, args=(stop,))
    worker.start()
    threads = []
    try:
        for name in sizes:
            threads.append(threading.Thread(target=build, args=(name,)))
            threads[-1].start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a build never got all its ranges back"
    finally:
        stop.set()
        worker.join(timeout=10)
    names = {fanout.prefix: name for name, fanout in fanouts.items()}
    return ([(names[prefix], index) for prefix, index in queue.finished], peak,
            [(event, names[prefix]) for event, prefix in queue.events])


def waited_behind(events: list[tuple[str, str]], small: str, huge: str) -> int:
    """Ranges of `huge` finished from the moment `small` sent its first range to its last range's end."""
    first = events.index(("sent", small))
    last = max(position for position, event in enumerate(events) if event == ("done", small))
    return sum(1 for event in events[first:last] if event == ("done", huge))


def test_a_small_build_started_after_a_huge_one_finishes_first_on_the_shared_queue(monkeypatch):
    finished, peak, events = run_builds(monkeypatch, 2, {"huge": 60, "small": 3})
    assert len(finished) == 63
    # its three ranges alternate with the huge build's window of two, whenever the small build starts
    assert waited_behind(events, "small", "huge") <= 8, [name for name, _ in finished]
    assert [name for name, _ in finished][-1] == "huge"
    assert peak["huge"] == 2 and peak["small"] <= 2  # its window full, never more: sent and not finished
    # each build's ranges still finish in corpus order (one worker), every one once
    for name, count in (("huge", 60), ("small", 3)):
        assert [index for build, index in finished if build == name] == list(range(count))


def test_without_a_window_the_small_build_waits_for_all_of_the_huge_ones(monkeypatch):
    """What the window prevents: every range sent at once (a window as large as the build) queues the small
    build behind the whole huge one."""
    finished, _, events = run_builds(monkeypatch, 1000, {"huge": 60, "small": 3})
    assert waited_behind(events, "small", "huge") > 20, [name for name, _ in finished]
    assert [name for name, _ in finished][-3:] == ["small"] * 3


def test_the_window_is_a_setting_the_factory_passes(monkeypatch):
    from services.common.config import Settings

    settings = Settings.from_env({"LLMP_DATASET_RANGES_IN_FLIGHT": "5", "LLMP_DATASET_FANOUT_BYTES": "1"})
    monkeypatch.setattr(shards, "_data_consumed", lambda producer: True)
    row = types.SimpleNamespace(source_key="sources/datasets/t/d/1/corpus", prefix="datasets/t/d/1/")
    fanout = shards.factory(settings, object())(row, 2)
    assert fanout.in_flight == 5
    default = Settings.from_env({}).dataset_ranges_in_flight
    assert shards.CeleryFanOut(object(), object(), "s", 1, "p/").in_flight == default


# -- re-sending a range without a result -------------------------------------------------------------------------

def run_one_build(monkeypatch, queue: FifoQueue, ranges: int, range_seconds: float) -> tuple[object, dict]:
    """One build of `ranges` ranges on `queue`'s single worker with a re-send wait of `range_seconds`: its
    `_results`' outcome (the results, or the exception raised) and how often each range was sent."""
    monkeypatch.setattr(shards, "POLL_SECONDS", 0.005)
    monkeypatch.setattr(shards, "_data_consumed", lambda producer: queue.consumers)
    fanout = shards.CeleryFanOut(queue, queue, "sources/x", 1, "datasets/t/1/", range_seconds=range_seconds)
    fanout.ranges = [(index, index + 1) for index in range(ranges)]
    specs = [{"prefix": fanout.prefix, "index": index} for index in range(ranges)]
    sent = {index: 0 for index in range(ranges)}
    send_task = queue.send_task

    def counted(name, args, queue, routing_key):
        sent[args[0]["index"]] += 1
        return send_task(name, args, queue, routing_key)
    queue.send_task = counted
    stop = threading.Event()
    worker = threading.Thread(target=queue.work, args=(stop,))
    worker.start()
    try:
        outcome = list(fanout._results("scan", shards.SCAN_TASK_NAME, specs, lambda *_: None, "clean"))
    except Internal as error:
        outcome = error
    finally:
        stop.set()
        worker.join(timeout=10)
    return outcome, sent


def test_a_range_queued_behind_others_is_not_sent_again_while_the_queue_moves(monkeypatch):
    """Eight ranges of 0.1 s on one worker: the last waits 0.7 s queued, over the 0.3 s re-send wait. The wait
    counts from a range's start (its `.started` marker), or while none of the build's ranges moves."""
    outcome, sent = run_one_build(monkeypatch, FifoQueue(range_seconds=0.1), ranges=8, range_seconds=0.3)
    assert len(outcome) == 8
    assert sent == {index: 1 for index in range(8)}


def other_builds_work(queue: FifoQueue, ranges: int) -> FifoQueue:
    """`queue` with `ranges` of another build queued ahead (each takes the queue's range time)."""
    queue.messages = [{"prefix": "datasets/other/1/building-000000000000/", "index": index} for index in range(ranges)]
    return queue


def test_a_range_queued_behind_other_builds_waits_its_turn_while_workers_consume(monkeypatch):
    """Another build's 4 ranges of 0.25 s ahead: this build's ranges wait 1 s unstarted, with none of its own
    moving, over the 0.3 s wait; the queue is not empty and a worker consumes it, so they are not lost."""
    queue = other_builds_work(FifoQueue(range_seconds=0.25), ranges=4)
    outcome, sent = run_one_build(monkeypatch, queue, ranges=2, range_seconds=0.3)
    assert len(outcome) == 2
    assert sent == {0: 1, 1: 1}


def test_without_a_consumer_a_queued_range_is_sent_again(monkeypatch):
    """The same queue, but no live worker consumes `data` (the broadcast unanswered): the ranges are sent again."""
    queue = other_builds_work(FifoQueue(range_seconds=0.25, consumers=False), ranges=4)
    _, sent = run_one_build(monkeypatch, queue, ranges=2, range_seconds=0.3)
    assert sent[0] > 1


def test_a_redelivered_range_waits_from_its_new_start(monkeypatch):
    """Range 0's first run dies after 0.25 s and its message comes back; the second run takes 0.25 s: 0.5 s from
    the first start, over the 0.35 s wait, but the second start restarts it, so it is not sent again."""
    outcome, sent = run_one_build(monkeypatch, FifoQueue(range_seconds=0.25, killed=frozenset({0})), ranges=1,
                                  range_seconds=0.35)
    assert len(outcome) == 1 and sent == {0: 1}


def test_run_task_marks_its_start_before_it_works(monkeypatch):
    """The marker the coordinator's wait counts from is written by run_task itself, before the range's work."""
    store = FifoQueue()
    prefix = "datasets/t/d/1/building-0123456789ab/"
    store.objects[prefix + "build.json"] = b"{}"
    store.exists = lambda key: key in store.objects
    seen = []

    def scan(store_, spec, folder):
        seen.extend(key for key in store.objects if key.startswith(prefix + "scan-00003.started."))
        return {"documents_in": 0}
    monkeypatch.setattr(shards, "_scan", scan)
    shards.run_task(store, "scan", {"prefix": prefix, "index": 3, "source_key": "sources/datasets/t/d/1/corpus"})
    assert len(seen) == 1 and prefix + "scan-00003.json" in store.objects


def test_a_started_range_without_a_result_is_sent_again_then_fails_the_build(monkeypatch):
    """A worker stuck in range 1 (started, never finished): sent again after the wait, until the build fails."""
    outcome, sent = run_one_build(monkeypatch, FifoQueue(range_seconds=0.01, hang=frozenset({1})), ranges=3,
                                  range_seconds=0.3)
    assert isinstance(outcome, Internal) and "range 1 of the scan got no result" in str(outcome)
    assert sent[1] == shards.RANGE_SENDS and sent[0] == sent[2] == 1


def test_results_come_in_range_order_while_later_ranges_still_run(monkeypatch):
    """The coordinator appends range 0 while the worker runs the others: each result is handed over once it and
    every earlier one are in, not after the last."""
    monkeypatch.setattr(shards, "POLL_SECONDS", 0.005)
    queue = FifoQueue(range_seconds=0.05)
    fanout = shards.CeleryFanOut(queue, queue, "sources/x", 1, "datasets/t/1/")
    fanout.ranges = [(index, index + 1) for index in range(6)]
    specs = [{"prefix": fanout.prefix, "index": index} for index in range(6)]
    stop = threading.Event()
    worker = threading.Thread(target=queue.work, args=(stop,))
    worker.start()
    handed: list[tuple[int, int]] = []  # (range handed over, ranges the worker had finished by then)
    try:
        for index, _ in fanout._results("scan", shards.SCAN_TASK_NAME, specs, lambda *_: None, "clean"):
            with queue.lock:
                handed.append((index, len(queue.finished)))
    finally:
        stop.set()
        worker.join(timeout=10)
    assert [index for index, _ in handed] == list(range(6))
    assert handed[0][1] < 6  # range 0 handed over before the worker finished them all
