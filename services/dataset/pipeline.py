"""From a spooled corpus to a folder holding a version's tokenizer and packed shards.

One pass over the corpus parses, normalises and filters the documents, assigns each to its split and
writes it to that split's spool file, and its keys, MinHash signature and LSH band keys to partition files
on disk (`dedup.Scan`). Then the partitioned dedup and leak stages (`dedup.run`: exact duplicates, near
duplicates, leaks across splits, one status byte per document on disk), the tokenizer (trained on the train
split, on a seeded sample of it past `tokenizer_sample_bytes(vocab_size)`, or a registered model's copied unchanged) and
the packing of every split's kept documents. No stage holds per-document state in memory, so a build's peak
memory does not grow with its number of documents (bench/dataset_scale.py measures it). `build` is
synchronous and CPU-bound: the service runs it in a worker thread.

Supervised formats (pairs, chat) go through the same steps with a conversation as the unit: its
messages are normalised one by one, and it is split, deduplicated and leak-checked as one document
(the contents of its messages), so no conversation is ever cut across splits. Packing renders each
with the chat template and writes its tokens, its loss mask and its place in the example index.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from services.common import cleaning, dedup
from services.common.contracts import SPLITS
from services.common.errors import ValidationFailed
from services.dataset import conversations, ingest, packing, splits
from services.dataset import tokenizer as tokenizers
from services.dataset.options import DatasetOptions

log = logging.getLogger(__name__)

# progress(phase, bytes_done, documents_done)
ProgressFn = Callable[[str, int, int], None]
PROGRESS_EVERY = 2000  # documents between progress reports
PACK_BATCH_CHARS = packing.BATCH_CHARS  # characters tokenized per call when packing (bounds that phase's memory)


@dataclass
class SplitResult:
    """One split of a built version."""

    name: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: list[Path] = field(default_factory=list)
    near_duplicates: int = 0
    leaked_exact: int = 0
    leaked_near: int = 0
    loss_tokens: int = 0  # supervised: tokens the loss is computed on
    loss_masks: list[Path] = field(default_factory=list)  # supervised: one per shard
    examples: Path | None = None  # supervised: the example index

    def stats(self) -> dict:
        values = asdict(self)
        del values["shards"], values["name"], values["loss_masks"], values["examples"]
        return values


@dataclass
class CleaningCounts:
    documents_in: int = 0
    documents_out: int = 0
    too_short: int = 0
    too_long: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    leaked_exact: int = 0
    leaked_near: int = 0


@dataclass
class Built:
    """A version's files in a local folder, and what was counted on the way."""

    folder: Path
    splits: dict[str, SplitResult]
    cleaning: CleaningCounts
    tokenizer: tokenizers.TokenizerInfo
    dtype: np.dtype
    tokenizer_files: list[Path]


class _SplitSpool:
    """A split's documents (texts, or conversations as [role, content] lists) until they are packed: one line
    each, `<record>\t<JSON value>`, the record number (`dedup.Scan`) saying what became of it."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path = path
        self.handle = open(path, "w", encoding="utf-8") if write else None  # write=False: a written one, read

    def add(self, record: int, document: str | ingest.Messages) -> None:
        self.handle.write(f"{record}\t")
        self.handle.write(json.dumps(document, ensure_ascii=False))
        self.handle.write("\n")

    def documents(self, status: np.ndarray) -> Iterator:
        """The documents the dedup stages kept, in corpus order."""
        return self.read(self.path, status)

    @staticmethod
    def read(path: Path, status: np.ndarray) -> Iterator:
        for documents in _SplitSpool.blocks(path, status):
            yield from documents

    @staticmethod
    def blocks(path: Path, status: np.ndarray) -> Iterator[list]:
        """The kept documents a block of the file at a time."""
        for lines in _spool_lines(path):
            kept = lines.kept(status)
            if kept.any():
                yield lines.values(kept)

    @staticmethod
    def kept_value_bytes(path: Path, status: np.ndarray) -> int:
        """Bytes of the kept documents' lines past the record number (their JSON and newline)."""
        total = 0
        for lines in _spool_lines(path):
            kept = lines.kept(status)
            total += int((lines.ends[kept] - lines.tabs[kept]).sum())
        return total


SPOOL_BLOCK_BYTES = 1 << 20  # a spool is read this much at a time
_NEWLINE, _TAB, _COMMA, _ZERO = (ord(character) for character in "\n\t,0")


@dataclass
class _Lines:
    """A block of a spool's whole lines, parsed with NumPy: each line `starts` with its record number, which ends
    at its tab (exactly one per line: JSON escapes tabs and newlines inside a value); its value runs to its
    newline at `ends`."""

    data: np.ndarray
    starts: np.ndarray
    tabs: np.ndarray
    ends: np.ndarray
    records: np.ndarray

    def kept(self, status: np.ndarray) -> np.ndarray:
        """Which lines the dedup stages kept."""
        return status[self.records] == dedup.KEPT

    def values(self, chosen: np.ndarray) -> list:
        """The documents of the `chosen` lines (a mask, one true at least), decoded by one `json.loads` of their
        values joined as one JSON array (a `json.loads` per line took 6 times as long)."""
        # bytes from each chosen value's start to its newline, the newlines then turned into commas
        values = self.data[_spans(len(self.data), self.tabs[chosen] + 1, self.ends[chosen] + 1)]
        values[values == _NEWLINE] = _COMMA  # JSON escapes every newline inside a value
        return json.loads(b"[" + values[:-1].tobytes() + b"]")


def spool_texts(folder: Path) -> dedup.Documents:
    """The texts of wanted records, read from the split spools in `folder`: what their signatures were made of
    (`scan`), for `dedup.signature_stage`."""
    def documents(wanted: np.ndarray) -> Iterator[tuple[np.ndarray, list[str]]]:
        for name in SPLITS:
            for lines in _spool_lines(spool_path(folder, name)):
                chosen = wanted[lines.records]
                if chosen.any():
                    yield lines.records[chosen], [_text(document) for document in lines.values(chosen)]
    return documents


def _text(document: str | ingest.Messages) -> str:
    """A spooled document's text: a conversation's is its messages' contents (what `scan` keyed and signed)."""
    return document if isinstance(document, str) else ingest.conversation_text(document)


def _spool_lines(path: Path) -> Iterator[_Lines]:
    with open(path, "rb") as handle:
        rest = b""
        while chunk := handle.read(SPOOL_BLOCK_BYTES):
            block = rest + chunk
            cut = block.rfind(b"\n") + 1
            block, rest = block[:cut], block[cut:]
            if not block:
                continue
            data = np.frombuffer(block, dtype=np.uint8)
            ends = np.flatnonzero(data == _NEWLINE)
            tabs = np.flatnonzero(data == _TAB)
            if len(tabs) != len(ends):
                raise ValueError(f"{path} is not a split spool (a line without exactly one tab)")
            starts = np.concatenate(([0], ends[:-1] + 1))
            yield _Lines(data, starts, tabs, ends, _numbers(data, starts, tabs))
        if rest:
            raise ValueError(f"{path} ends in the middle of a line")


def _spans(size: int, begins: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A mask of `size` bytes, true on every [begins[i], ends[i]) (disjoint spans, in order)."""
    marks = np.zeros(size + 1, dtype=np.int8)
    marks[begins] += 1
    marks[ends] -= 1
    return np.cumsum(marks[:-1], dtype=np.int8).astype(bool)


def _numbers(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The decimal numbers written in data[starts[i]:ends[i]], parsed digit column by digit column."""
    widths = ends - starts
    numbers = np.zeros(len(starts), dtype=np.int64)
    for column in range(int(widths.max(initial=0))):
        has = widths > column
        numbers[has] = numbers[has] * 10 + (data[starts[has] + column].astype(np.int64) - _ZERO)
    return numbers


@dataclass
class Scanned:
    """What one pass over a corpus (or one shard of it) counted."""

    documents_in: int = 0
    too_short: int = 0
    too_long: int = 0
    records: int = 0  # documents past the filters: the dedup records, numbered from 0
    bytes_done: int = 0


def spool_path(folder: Path, split: str) -> Path:
    return folder / f"{split}.docs.jsonl"


def scan(handle: BinaryIO, options: DatasetOptions, folder: Path, report: ProgressFn, base_offset: int = 0
         ) -> Scanned:
    """Parse, normalise, filter and split-assign the documents of `handle`, writing each split's spool and the
    dedup scan's files (`folder/dedup`) into `folder`. Record numbers start at 0: a shard's are made global by
    `shards.merge`. `base_offset`: where `handle` starts in the corpus (progress, and a byte-order mark is
    dropped only at 0)."""
    counts = Scanned()
    spools = {name: _SplitSpool(spool_path(folder, name)) for name in SPLITS}
    scanner = dedup.Scan(dedup.Work(folder / "dedup"), options.near_dup_threshold)
    try:  # the spools are closed whatever happens (a build stopped mid-way raises from `report`)
        for document in ingest.parse(handle, options, at_start=base_offset == 0):
            counts.documents_in += 1
            counts.bytes_done = base_offset + document.end_offset
            if counts.documents_in % PROGRESS_EVERY == 0:
                report("clean", counts.bytes_done, counts.documents_in)
            messages = None
            if document.messages is not None:
                messages = conversations.normalised(document.messages)
                text = ingest.conversation_text(messages)
            else:
                text = cleaning.normalise(document.text)
            if len(text) < options.min_doc_chars:
                counts.too_short += 1
                continue
            if options.max_doc_chars and len(text) > options.max_doc_chars:
                counts.too_long += 1
                continue
            name = splits.assign(text, options.split_seed, options.fractions)
            record = scanner.add(name, cleaning.exact_key(text), cleaning.leak_key(text), text)
            spools[name].add(record, text if messages is None else messages)
        scanner.finish()
    finally:
        scanner.close()
        for spool in spools.values():
            spool.handle.close()
    counts.records = scanner.records
    return counts


def pack_split(spool: Path, status: np.ndarray, loaded: tokenizers.Loaded, supervised: bool, folder: Path,
               shard_tokens: int, result: SplitResult, counted: Callable[[int], None] = lambda documents: None
               ) -> None:
    """Tokenize and pack the kept documents of `spool` (records indexing `status`) into `folder`, adding to
    `result`'s counts and files. `counted(n)` is called as documents are read, n of them at a time."""
    dtype = packing.dtype_for(loaded.info.vocab_size)

    def documents() -> Iterator:
        for block in _SplitSpool.blocks(spool, status):
            texts = [_text(document) for document in block]
            result.bytes += len("".join(texts).encode("utf-8"))  # one call: the sum of each one's UTF-8 length
            counted(len(block))
            yield from block

    if supervised:
        examples = packing.ExampleWriter(folder, dtype, shard_tokens)
        renderer = conversations.Renderer(loaded.chat_template, loaded.special_tokens)
        try:
            for example in conversations.encode(loaded.tokenizer, renderer, documents()):
                examples.write(example.ids, example.mask)
        finally:
            result.shards, result.loss_masks, result.examples = examples.close()
        result.tokens, result.loss_tokens = examples.tokens.tokens, examples.loss_tokens
    else:
        writer = packing.ShardWriter(folder, dtype, shard_tokens)
        try:
            # a tokenizer built here has EOS as a special token: documents can be encoded joined by it
            separator = tokenizers.EOS if loaded.info.kind in tokenizers.BUILT_KINDS else None
            result.tokens = packing.pack(loaded.tokenizer, documents(), loaded.info.eos_token_id, writer,
                                         PACK_BATCH_CHARS, add_special_tokens=loaded.add_special_tokens,
                                         separator=separator)
        finally:
            result.shards = writer.close()


class FanOut(Protocol):
    """Runs the scan and the packing shard by shard elsewhere (`shards.CeleryFanOut`: on the workers)."""

    def scan(self, corpus: Path, options: DatasetOptions, work: Path, report: ProgressFn) -> Scanned:
        """`scan` of the whole corpus, the same files in `work` as if it had run here."""

    def pack(self, status: np.ndarray, loaded: tokenizers.Loaded, options: DatasetOptions, work: Path,
             results: dict[str, SplitResult], shard_tokens: int, report: ProgressFn) -> None:
        """`pack_split` of every split into `work/<split>`, the same bytes as if it had run here."""

    def close(self) -> None:
        """Removes what the fan-out stored (also after a failure or a cancel)."""


def build(corpus: Path, options: DatasetOptions, work: Path, progress: ProgressFn | None = None,
          shard_tokens: int = packing.DEFAULT_SHARD_TOKENS, model_tokenizer: Path | None = None,
          fanout: FanOut | None = None) -> Built:
    """Clean, split, tokenize and pack the corpus at `corpus` into `work` (an empty folder).

    `model_tokenizer`: for `tokenizer=model`, the folder holding the model version's tokenizer files.
    `fanout`: scan and pack shard by shard on the workers; the result is byte-identical.
    """
    report = progress or (lambda phase, done_bytes, done_docs: None)
    try:
        return _build(corpus, options, work, report, shard_tokens, model_tokenizer, fanout)
    finally:
        if fanout is not None:
            fanout.close()


def _build(corpus: Path, options: DatasetOptions, work: Path, report: ProgressFn, shard_tokens: int,
           model_tokenizer: Path | None, fanout: FanOut | None) -> Built:
    results = {name: SplitResult(name) for name in SPLITS}
    state = dedup.Work(work / "dedup")
    if fanout is None:
        with open(corpus, "rb") as handle:
            scanned = scan(handle, options, work, report)
    else:
        scanned = fanout.scan(corpus, options, work, report)
    counts = CleaningCounts(documents_in=scanned.documents_in, too_short=scanned.too_short,
                            too_long=scanned.too_long)
    bytes_done = scanned.bytes_done
    report("clean", bytes_done, counts.documents_in)
    if counts.documents_in == 0:
        raise ValidationFailed("the corpus holds no documents")

    dedup.run(state, options.near_dup_threshold, spool_texts(work),
              lambda: report("clean", bytes_done, counts.documents_in))
    table = dedup.counts(state)
    status = state.status_map()
    for index, name in enumerate(SPLITS):
        results[name].documents = int(table[index, dedup.KEPT])
        results[name].near_duplicates = int(table[index, dedup.NEAR])
        results[name].leaked_exact = int(table[index, dedup.LEAKED_EXACT])
        results[name].leaked_near = int(table[index, dedup.LEAKED_NEAR])
    counts.exact_duplicates = int(table[:, dedup.EXACT].sum())
    counts.near_duplicates = sum(result.near_duplicates for result in results.values())
    counts.leaked_exact = sum(result.leaked_exact for result in results.values())
    counts.leaked_near = sum(result.leaked_near for result in results.values())
    counts.documents_out = sum(result.documents for result in results.values())
    learning = options.fractions.learning_split
    learning_label = "training" if learning == "train" else learning
    if results[learning].documents == 0:
        raise ValidationFailed(f"no {learning_label} documents left after cleaning {counts.documents_in} document(s) "
                               f"(too short {counts.too_short}, too long {counts.too_long}, "
                               f"duplicates {counts.exact_duplicates + counts.near_duplicates})")

    report("tokenizer", bytes_done, counts.documents_in)
    spools = {name: _SplitSpool(spool_path(work, name), write=False) for name in SPLITS}
    loaded, tokenizer_files = _tokenizer(options, spools[learning], status, work / "tokenizer", model_tokenizer)

    packed = 0

    def counted(documents: int) -> None:
        nonlocal packed
        packed += documents
        if packed // PROGRESS_EVERY != (packed - documents) // PROGRESS_EVERY:
            report("pack", bytes_done, packed)

    if fanout is None:
        for name in SPLITS:
            pack_split(spools[name].path, status, loaded, options.supervised, work / name, shard_tokens, results[name],
                       counted)
    else:
        fanout.pack(status, loaded, options, work, results, shard_tokens, report)
        packed = counts.documents_out
    for spool in spools.values():
        spool.path.unlink()
    shutil.rmtree(state.folder)  # the memory-mapped status is read only by then
    report("pack", bytes_done, packed)
    log.info("built dataset", extra={"documents_in": counts.documents_in, "documents_out": counts.documents_out,
                                     "tokens": sum(r.tokens for r in results.values())})
    return Built(work, results, counts, loaded.info, packing.dtype_for(loaded.info.vocab_size), tokenizer_files)


def _tokenizer(options: DatasetOptions, train: _SplitSpool, status: np.ndarray, folder: Path,
               model_tokenizer: Path | None) -> tuple[tokenizers.Loaded, list[Path]]:
    """The version's tokenizer and its files in `folder`: a model's copied unchanged, or one built on train.

    BPE learns from the whole train split up to `tokenizer_sample_bytes(vocab_size)` of it; past that, from a
    seeded sample of about that size (`_sampled`). The char tokenizer always reads the whole split (its vocabulary
    is the split's alphabet: a character missed by a sample could not be encoded), holding one set of characters.
    """
    if options.tokenizer == "model":
        if model_tokenizer is None:
            raise ValueError("tokenizer=model needs the model's tokenizer folder")
        folder.mkdir(parents=True, exist_ok=True)
        files = [Path(shutil.copyfile(path, folder / path.name)) for path in sorted(model_tokenizer.iterdir())
                 if path.is_file()]
        return tokenizers.load_model_tokenizer(folder, options.tokenizer_model, options.tokenizer_model_version), files
    chat = options.supervised
    default = conversations.Renderer(None)

    def texts(documents: Iterator) -> Iterator[str]:  # what it learns from: conversations as the template writes them
        for document in documents:
            yield document if isinstance(document, str) else default.render(document)[0]

    if options.tokenizer == "bpe":
        sample = _sampled(train, status, options.split_seed, tokenizer_sample_bytes(options.vocab_size))
        tokenizer = tokenizers.train_bpe(texts(sample), options.vocab_size, chat=chat)
    else:
        characters: set[str] = set()
        for document in train.documents(status):
            if not isinstance(document, str):  # the contents' characters, then the template's (role names, breaks)
                characters.update(ingest.conversation_text(document))
                document = default.render(document)[0]
            characters.update(document)
        tokenizer = tokenizers.build_char(characters, chat=chat)
    files = tokenizers.save(tokenizer, options.tokenizer, folder, chat=chat)
    return tokenizers.built(tokenizer, options.tokenizer, folder, chat), files


TOKENIZER_SAMPLE_FLOOR = 8 << 20  # BPE learns from all of the train split up to this much, whatever its vocabulary…
TOKENIZER_SAMPLE_PER_TOKEN = 2 << 10  # …past it, from about this much per token of its vocabulary, if more
_SAMPLE_SALT = 0x5A3D_1E  # seeds the sample's hash with the split seed, apart from anything else that seed draws
_UINT64 = (1 << 64) - 1


def tokenizer_sample_bytes(vocab_size: int) -> int:
    """About the most of the train split a BPE of `vocab_size` tokens learns from: 2 KiB of text per token,
    8 MiB at least (128 MiB for the largest vocabulary, `contracts.MAX_VOCAB_SIZE`).

    A BPE's merges follow the most frequent pairs, which a sample ranks as the whole text does. Learned from
    samples this size, BPEs of 1024 to 16384 tokens encoded held-out text in at most 0.14 % more tokens than
    learned from the whole train split (synthetic one-line documents, Python source; 1 KiB per token: 0.3 %,
    4 KiB: 0.07 %), 4096 tokens from a 40 MB split in a fifth of the time.
    """
    return max(TOKENIZER_SAMPLE_FLOOR, vocab_size * TOKENIZER_SAMPLE_PER_TOKEN)


def _sampled(train: _SplitSpool, status: np.ndarray, seed: int, budget: int) -> Iterator:
    """The train split's kept documents, or, when they exceed `budget` bytes (counted as spooled JSON), those whose
    keyed hash (`_sample_points`, of the dataset's split seed) falls under the share that leaves about that many:
    seeded and independent of document order, so the same corpus and options learn the same tokenizer. Only the
    sampled documents are decoded."""
    spooled = _SplitSpool.kept_value_bytes(train.path, status)
    share = budget / spooled if spooled else 1.0
    if share >= 1.0:
        yield from train.documents(status)
        return
    log.info("tokenizer trained on a sample", extra={"share": share, "train_bytes": spooled})
    weights = np.random.default_rng([seed & _UINT64, _SAMPLE_SALT]).integers(
        0, np.iinfo(np.uint64).max, size=1 << 16, dtype=np.uint64, endpoint=True)
    for lines in _spool_lines(train.path):
        chosen = lines.kept(status)
        chosen[chosen] = _sample_points(lines, chosen, weights) < share
        if chosen.any():
            yield from lines.values(chosen)


def _sample_points(lines: _Lines, chosen: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Where each `chosen` line's document falls in [0, 1): the sum of the `weights` of its JSON value's byte pairs
    (a weight per pair of byte values), mixed with its length. It depends on the document's bytes and the seed
    only, not on where the document is; all lines of a block at once (a keyed BLAKE2 per document, as
    `splits.split_point` does, took 1.4 s for the 880,000 one-line documents of a 40 MB split)."""
    pairs = (lines.data[:-1].astype(np.uint16) << np.uint16(8)) | lines.data[1:]
    sums = np.cumsum(weights[pairs], dtype=np.uint64)  # sums[i]: the weights of pairs 0…i, modulo 2**64
    begins, ends = lines.tabs[chosen] + 1, lines.ends[chosen]  # each value's bytes, at least 2 (JSON)
    hashed = sums[ends - 2] - sums[begins - 1]  # the pairs begins…ends-2: those inside the value
    return (_mix64(hashed ^ (ends - begins).astype(np.uint64)) >> np.uint64(11)) * 2.0 ** -53


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit flips about half the output bits, so sums of weights that differ
    in a few bits land apart in [0, 1)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))
