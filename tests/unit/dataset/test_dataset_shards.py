"""The fan-out's pure parts (services/dataset/shards.py): ranges cut where no document is split, and the ranges'
scans merged into exactly the files one scan of the whole corpus writes (the workers and S3 are tested in
tests/integration/dataset/test_dataset_fanout.py)."""

from __future__ import annotations

import hashlib
import io
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
