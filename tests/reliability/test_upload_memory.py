"""Issue 3, item 1: a large upload through the gateway never takes its size in memory in any process.

512 MB of text streamed to `POST /v1/datasets` (chunked, no Content-Length) goes gateway → client-streaming
gRPC → the dataset service's spool file. The last line holds an invalid UTF-8 byte, so the whole corpus is
received and validated, then refused (400 naming the line) and nothing is created: the build (minutes for
512 MB on 2 cores) never starts. While it streams, the resident memory of the gateway and the dataset service
is sampled every 20 ms; neither may grow by more than a small fraction of the upload.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UPLOAD_BYTES = 512 * 1024 * 1024
PARAGRAPH = b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 4 + b"\n"
CHUNK_PARAGRAPHS = 2_400  # ~0.8 MB per chunk, 5 lines per paragraph
ALLOWED_GROWTH = 96 * 1024 * 1024  # < 1/5 of the upload: buffering it anywhere would blow through this


CHUNKS = UPLOAD_BYTES // (len(PARAGRAPH) * CHUNK_PARAGRAPHS)
BAD_LINE = CHUNKS * CHUNK_PARAGRAPHS * 5 + 1


def corpus():
    chunk = PARAGRAPH * CHUNK_PARAGRAPHS
    for _ in range(CHUNKS):
        yield chunk
    yield b"the end, with a bad byte \xff here\n"


def test_a_512_mb_upload_streams_through_in_bounded_memory(stack):
    processes = {name: psutil.Process(stack.record(name)["pid"]) for name in ("gateway", "dataset")}
    before = {name: process.memory_info().rss for name, process in processes.items()}
    peak = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, process in processes.items():
                peak[name] = max(peak[name], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        response = stack.http("POST", "/v1/datasets", params={"name": "huge-upload", "tokenizer": "char"},
                              data=corpus(), headers={"Content-Type": "text/plain"}, timeout=600)
    finally:
        done.set()
        sampler.join()
    seconds = time.monotonic() - started
    growth = {name: peak[name] - before[name] for name in processes}
    print(f"\n512 MB upload refused after {seconds:.1f}s; peak RSS growth: "
          + ", ".join(f"{name} {value / 2**20:.1f} MiB" for name, value in growth.items()))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_argument" and "invalid UTF-8" in error["message"], error
    assert f"line {BAD_LINE}:" in error["message"], error["message"]
    assert all(value < ALLOWED_GROWTH for value in growth.values()), growth
    assert stack.http("GET", "/v1/datasets/huge-upload").status_code == 404
