"""Tokenize documents and pack them into flat, sharded token arrays.

A shard is a raw little-endian array of token ids (`uint16` when the vocabulary fits, else `uint32`),
each document followed by EOS, exactly as nanoGPT-style loaders `np.memmap` it. Shards are cut at a
fixed number of tokens, so a document may continue in the next shard; concatenating a split's shards
in order gives its whole token stream.

Documents are encoded in batches with the tokenizer's parallel `encode_batch_fast` (no offsets) and
flattened straight into a NumPy array, so memory stays bounded by one batch and one shard.

Supervised examples (conversations) are written whole and in order to the same kind of token shards,
with a loss-mask shard beside each token shard (one byte per token, cut at the same places) and the
split's example index (where each example starts, then the total), so training can lay out rows that
never mix two examples' attention or loss. No EOS is added between them: the template's end-of-turn
ends each answer, and the index, not a token id, marks where an example ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from services.common.contracts import EXAMPLE_INDEX_DTYPE, LOSS_MASK_DTYPE, loss_mask_file_name, shard_file_name

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
BATCH_CHARS = 1 << 20  # characters encoded per call


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned little-endian type that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends token arrays to `folder/shard-NNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 file_name=shard_file_name) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, not {shard_tokens}")
        self.folder, self.dtype, self.shard_tokens = folder, np.dtype(dtype), shard_tokens
        self.file_name = file_name  # index -> the shard's file name
        self.paths: list[Path] = []
        self.tokens = 0
        self._handle = None
        self._room = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._room == 0:
                self._next_shard()
            head, ids = ids[:self._room], ids[self._room:]
            head.tofile(self._handle)
            self._room -= head.size
            self.tokens += head.size

    def append(self, path: Path, chunk_tokens: int = 1 << 22) -> None:
        """Append the token stream in the file `path` (a piece of the split packed elsewhere), a chunk at a time."""
        with open(path, "rb") as handle:
            while (ids := np.fromfile(handle, dtype=self.dtype, count=chunk_tokens)).size:
                self.write(ids)

    def close(self) -> list[Path]:
        """Finish the last shard; return every shard's path in order."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        return self.paths

    def _next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        path = self.folder / self.file_name(len(self.paths))
        self.paths.append(path)
        self._handle = open(path, "wb")
        self._room = self.shard_tokens


def _batches(texts: Iterable[str], budget: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= budget:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode(tokenizer: Tokenizer, texts: Iterable[str], eos_id: int, dtype: np.dtype,
           batch_chars: int = BATCH_CHARS, add_special_tokens: bool = False, separator: str | None = None
           ) -> Iterator[np.ndarray]:
    """Token arrays of consecutive batches of `texts`, each document ending with `eos_id`.

    `add_special_tokens`: let the tokenizer's post-processor frame each document (a model's BOS, or its
    EOS, as it expects); EOS is then appended only where the tokenizer did not end the document with it.

    `separator`: EOS's text, when it is a special token of `tokenizer` and nothing else (no normalizer, no
    post-processor adding tokens) touches a document. Documents are then encoded `JOIN_CHARS` at a time,
    each followed by `separator`: a special token is split out of a text before anything else, so every
    document is encoded on its own and ends with `eos_id`, the same ids as one by one at a third less CPU
    (fewer Encoding objects). Where that cannot hold (a document ending with the separator's text already, or
    more EOS ids than separators came out), the batch is encoded one document at a time.
    """
    for batch in _batches(texts, batch_chars):
        if separator is not None and not add_special_tokens and not any(text.endswith(separator) for text in batch):
            joined = _joined(batch, separator)
            encodings = tokenizer.encode_batch_fast(joined, add_special_tokens=False)
            ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype)
            if np.count_nonzero(ids == eos_id) == sum(text.count(separator) for text in joined):
                yield ids
                continue
        yield _one_by_one(tokenizer, batch, eos_id, dtype, add_special_tokens)


JOIN_CHARS = 4096  # characters of documents per joined text (texts of a batch are encoded in parallel)


def _joined(batch: list[str], separator: str) -> list[str]:
    """The documents of `batch` as texts of about `JOIN_CHARS`, each document followed by `separator`."""
    joined, group, size = [], [], 0
    for text in batch:
        group.append(text)
        size += len(text)
        if size >= JOIN_CHARS:
            joined.append(separator.join(group) + separator)
            group, size = [], 0
    if group:
        joined.append(separator.join(group) + separator)
    return joined


def _one_by_one(tokenizer: Tokenizer, batch: list[str], eos_id: int, dtype: np.dtype, add_special_tokens: bool
                ) -> np.ndarray:
    eos = [eos_id]
    encodings = tokenizer.encode_batch_fast(batch, add_special_tokens=add_special_tokens)
    return np.fromiter(itertools.chain.from_iterable(e.ids if e.ids[-1:] == eos else e.ids + eos for e in encodings),
                       dtype)


def pack(tokenizer: Tokenizer, texts: Iterable[str], eos_id: int, writer: ShardWriter,
         batch_chars: int = BATCH_CHARS, add_special_tokens: bool = False, separator: str | None = None) -> int:
    """Tokenize `texts` into `writer` (`encode`); return the number of tokens written."""
    before = writer.tokens
    for ids in encode(tokenizer, texts, eos_id, writer.dtype, batch_chars, add_special_tokens, separator):
        writer.write(ids)
    return writer.tokens - before


class ExampleWriter:
    """Supervised examples of one split: token shards, loss-mask shards cut at the same places, the index."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
        self.tokens = ShardWriter(folder, dtype, shard_tokens)
        self.masks = ShardWriter(folder, np.dtype(LOSS_MASK_DTYPE), shard_tokens, file_name=loss_mask_file_name)
        self.index_path = folder / "examples.bin"
        self._index = open(self.index_path, "wb")
        self.starts: list[int] = []  # not yet written to the index (a split's examples need not fit in memory)
        self.loss_tokens = 0

    def write(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.starts.append(self.tokens.tokens)
        if len(self.starts) >= 1 << 16:
            np.asarray(self.starts, dtype=EXAMPLE_INDEX_DTYPE).tofile(self._index)
            self.starts = []
        self.tokens.write(ids)
        self.masks.write(mask)
        self.loss_tokens += int(mask.sum())

    def append(self, tokens: Path, masks: Path, index: Path, loss_tokens: int) -> None:
        """Append examples packed elsewhere (one token stream, its mask stream, its index from 0 with its total),
        as if written here one by one."""
        starts = np.fromfile(index, dtype=EXAMPLE_INDEX_DTYPE)[:-1] + self.tokens.tokens
        if self.starts:
            np.asarray(self.starts, dtype=EXAMPLE_INDEX_DTYPE).tofile(self._index)
            self.starts = []
        starts.astype(EXAMPLE_INDEX_DTYPE).tofile(self._index)
        self.tokens.append(tokens)
        self.masks.append(masks)
        self.loss_tokens += loss_tokens

    def close(self) -> tuple[list[Path], list[Path], Path]:
        """(token shards, mask shards, example index), the index ending with the split's total."""
        np.asarray([*self.starts, self.tokens.tokens], dtype=EXAMPLE_INDEX_DTYPE).tofile(self._index)
        self.starts = []
        self._index.close()
        return self.tokens.close(), self.masks.close(), self.index_path


def read_tokens(paths: Iterable[Path], dtype: np.dtype) -> np.ndarray:
    """The concatenated token stream of shards (for verification and tests)."""
    arrays = [np.fromfile(path, dtype=np.dtype(dtype)) for path in paths]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.dtype(dtype))
