"""Contamination: the share of evaluated documents that the model saw in training.

The model's training data is the train split of every dataset version in its lineage: the version's
own dataset, then its parent's (init_from, fine-tunes), up the chain; an imported version ends the
chain (its training data is unknown). Each evaluated document is compared with those documents the
way the dataset leakage check compares splits (services/dataset/splits.py): the same exact leak key
and the same MinHash LSH at the dataset's near-duplicate threshold. Documents are read back from the
shards: a plain split's documents end with the end-of-text token, a supervised split's are its examples.

The comparison runs on the dataset build's partitioned machinery (services/common/dedup.py), on local disk:
the training documents are records of split `train`, the evaluated ones of split `test`, and an evaluated
document is contaminated exactly when that build's leak check would remove it from `test` (a training
document shares its leak key, or a verified LSH pair joins them). Memory does not grow with the training
data (an in-memory LSH index took ~7.8 KiB per training document: 7.6 GiB for a million, bench/contamination.py).
The scan decodes every document; the signatures of the candidate pairs' documents are then computed from those
decoded again.
"""

from __future__ import annotations

import array
import itertools
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from services.common import cleaning, dedup
from services.common.cleaning import DEFAULT_NEAR_DUP_THRESHOLD
from services.training import data


@dataclass(frozen=True)
class Contamination:
    documents: int  # evaluated documents
    contaminated: int  # of them, exact or near copies of a training document
    datasets: tuple[str, ...]  # "name@version" of the training data compared with
    # Ordinals (in `spans` order) of the contaminated documents: what the figures without them leave out.
    flagged: tuple[int, ...] = ()

    @property
    def share(self) -> float:
        return self.contaminated / self.documents if self.documents else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "datasets": list(self.datasets), "flagged": list(self.flagged), "share": self.share}


@dataclass(frozen=True)
class Span:
    """Where one document lies: tokens [start, end] of a plain split (its end-of-text token included, when
    it has one), or example `start` of a supervised split (end unused)."""

    split: str
    start: int
    end: int
    example: bool


def spans(dataset: data.LocalDataset, splits: tuple[str, ...]) -> Iterator[Span]:
    """Every document of `splits`, in order (the ordinals `Contamination.flagged` counts)."""
    eos = dataset.info.eos_token_id
    for split in splits:
        if not dataset.has_split(split):
            continue
        stream = dataset.stream(split)
        if isinstance(stream, data.Examples):
            for index in range(len(stream)):
                yield Span(split, index, index, True)
            continue
        start = 0
        for end in itertools.chain(_ends(stream, eos), [stream.tokens]):
            if end > start:
                yield Span(split, start, min(end, stream.tokens - 1), False)
            start = end + 1


ENDS_CHUNK = 1 << 22  # tokens read at once looking for end-of-text tokens: 32 MiB as int64


def _ends(stream: data.TokenStream, eos: int) -> Iterator[int]:
    """Where the end-of-text tokens are, read a chunk at a time: the whole split at once took 9 bytes per token
    (a 10 M-document train split: ~7 GiB)."""
    for start in range(0, stream.tokens, ENDS_CHUNK):
        chunk = stream.read(start, min(ENDS_CHUNK, stream.tokens - start))
        yield from (np.flatnonzero(chunk == eos) + start).tolist()


def documents(dataset: data.LocalDataset, splits: tuple[str, ...]) -> Iterator[str]:
    """The normalised text of every document of `splits` (in `spans` order), decoded with the dataset's
    own tokenizer: a plain split's documents end with the end-of-text token, a supervised split's are its examples."""
    return map(_Decoder(dataset), spans(dataset, splits))


class _Decoder:
    """One document of a dataset, by its span: what `documents` yields for it."""

    def __init__(self, dataset: data.LocalDataset) -> None:
        self.dataset = dataset
        self.tokenizer = Tokenizer.from_file(str(dataset.tokenizer_dir / "tokenizer.json"))
        self.eos = dataset.info.eos_token_id
        self.streams: dict[str, Any] = {}

    def __call__(self, span: Span) -> str:
        stream = self.streams.get(span.split) or self.streams.setdefault(span.split, self.dataset.stream(span.split))
        if span.example:
            ids, _ = stream.example(span.start, int(stream.lengths[span.start]))
            ids = ids.tolist()
        else:
            ids = [token for token in stream.read(span.start, span.end + 1 - span.start).tolist() if token != self.eos]
        return cleaning.normalise(self.tokenizer.decode(ids))


def token_mask(dataset: data.LocalDataset, split: str, flagged: set[int], splits: tuple[str, ...]) -> np.ndarray | None:
    """For a plain split: True on the tokens of the flagged documents (None when it has none).
    For a supervised split: True at the flagged examples' indices."""
    stream = dataset.stream(split)
    size = len(stream) if isinstance(stream, data.Examples) else stream.tokens
    mask = np.zeros(size, dtype=bool)
    hit = False
    for ordinal, span in enumerate(spans(dataset, splits)):
        if span.split == split and ordinal in flagged:
            mask[span.start:span.end + 1] = True
            hit = True
    return mask if hit else None


def measure(evaluated: Callable[[], Iterator[str]], training: dict[str, data.LocalDataset], folder: Path,
            threshold: float = DEFAULT_NEAR_DUP_THRESHOLD) -> Contamination:
    """Compare the evaluated documents (`evaluated()` gives them, each call from the start, in `spans` order)
    with the train split of every dataset in `training` ("name@version"), on disk under `folder`."""
    present_path = folder / "present.u1"  # one byte per training document: 1 when it has text (a record)

    def trained(present: BinaryIO) -> Iterator[str]:
        for dataset in training.values():
            for text in documents(dataset, ("train",)):
                present.write(b"\x01" if text else b"\x00")
                if text:
                    yield text

    def wanted_texts(wanted: np.ndarray) -> Iterator[tuple[int, str]]:
        """(record, text) of the wanted records, in record order: only those training documents are decoded
        again (decoding and normalising took half of the first pass)."""
        present = np.memmap(present_path, dtype=np.uint8, mode="r") if present_path.stat().st_size else b""
        ordinal = record = 0
        for dataset in training.values():
            decode = _Decoder(dataset)
            for span in spans(dataset, ("train",)):
                if present[ordinal]:
                    if wanted[record]:
                        yield record, decode(span)
                    record += 1
                ordinal += 1
        for text in evaluated():
            if text:
                if wanted[record]:
                    yield record, text
                record += 1

    def texts(wanted: np.ndarray) -> Iterator[tuple[np.ndarray, list[str]]]:  # the blocks signature_stage reads
        numbers: list[int] = []
        block: list[str] = []
        for record, text in wanted_texts(wanted):
            numbers.append(record)
            block.append(text)
            if len(block) >= dedup.BATCH:
                yield np.array(numbers, dtype=np.uint64), block
                numbers, block = [], []
        if block:
            yield np.array(numbers, dtype=np.uint64), block

    shutil.rmtree(folder, ignore_errors=True)  # what a killed attempt left: the scan appends to its files
    work = dedup.Work(folder)
    try:
        scan = dedup.Scan(work, threshold)
        ordinals = array.array("q")  # the evaluated document each `test` record is (empty ones are counted)
        try:
            with open(present_path, "wb") as present:
                for text in trained(present):
                    key = cleaning.leak_key(text)
                    scan.add("train", key, key, text)  # as exact key too: no exact stage runs, every document stays
            first = scan.records
            for ordinal, text in enumerate(evaluated()):
                if text:
                    key = cleaning.leak_key(text)
                    scan.add("test", key, key, text)
                    ordinals.append(ordinal)
            scan.finish()
        finally:
            scan.close()
        flagged = np.zeros(0, dtype=np.int64)
        if ordinals:
            dedup.pair_stage(work)
            shutil.rmtree(work.same)  # pairs within the training data or within the evaluated set: not asked
            dedup.signature_stage(work, texts)
            dedup.verify_cross_stage(work, threshold)
            dedup.leak_stage(work, "test")
            flagged = np.asarray(ordinals)[np.asarray(work.status_map()[first:]) != dedup.KEPT]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Contamination(len(ordinals), len(flagged), tuple(training), tuple(flagged.tolist()))
