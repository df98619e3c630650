"""The fan-out's pure parts (services/dataset/shards.py): ranges cut where no document is split, and the ranges'
scans merged into exactly the files one scan of the whole corpus writes (the workers and S3 are tested in
tests/integration/dataset/test_dataset_fanout.py)."""

from __future__ import annotations

import hashlib
import io
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

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
    assert shards.merge(folders, counts, merged) == expected
    assert files(merged) == files(whole) and expected.records > 100


# -- fair share on the `data` queue ----------------------------------------------------------------------------

class FifoQueue:
    """The broker's `data` queue and one worker process taking its messages in order: each message is a range,
    whose result the worker stores where CeleryFanOut looks for it."""

    def __init__(self) -> None:
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

    def work(self, stop: threading.Event) -> None:
        """Take and finish ranges in queue order until stopped."""
        while not stop.is_set():
            with self.lock:
                spec = self.messages.pop(0) if self.messages else None
            if spec is None:
                time.sleep(0.002)
                continue
            time.sleep(0.005)  # the range's work
            with self.lock:
                self.objects[shards._key(spec["prefix"], "scan", spec["index"], ".json")] = b'{"documents_in": 1}'
                self.finished.append((spec["prefix"], spec["index"]))
                self.events.append(("done", spec["prefix"]))


def run_builds(monkeypatch, in_flight: int | None, sizes: dict[str, int]
               ) -> tuple[list[tuple[str, int]], dict, list[tuple[str, str]]]:
    """Builds of `sizes` ranges each started in that order, 50 ms apart, on one FIFO queue and one worker:
    the (build, range) finished in order, each build's most ranges queued at once, the queue's events."""
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

        def report(*_):  # after each poll: the ranges of this build sent and not finished
            with queue.lock:
                out = sum(1 for spec in queue.messages if spec["prefix"] == fanout.prefix)
            peak[name] = max(peak.get(name, 0), out)
        assert len(fanout._run("scan", shards.SCAN_TASK_NAME, specs, report, "clean")) == len(specs)

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
    assert max(peak.values()) <= 2  # never more than its window queued
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
