"""Reading a dataset version (docs/CONTRACTS.md) into batches that resume exactly.

A version is a `manifest.json` (`contracts.DatasetManifest`), a `tokenizer/` folder and per split
`{split}/shard-{i:05d}.bin` files of flat little-endian token ids. `fetch_dataset` downloads it once per
node, verifying every SHA-256; `LocalDataset` memory-maps the shards as one token stream per split.

Training order is a pure function of (seed, position): the train stream is cut into `W` windows of
`block_size` tokens (shifted each epoch by a seeded offset, so window boundaries move), each epoch
visits them in a seeded permutation, and global sample `g` is window `perm_{g // W}[g % W]`. Rank `r`
of `world` takes samples `position + j * world + r` for `j < batch_size`, then every rank advances the
position by `batch_size * world`. The position is therefore one integer, identical on every rank;
restoring it restores the exact sequence of batches.

A supervised version (format pairs or chat) also has, per split, a loss mask beside each shard and an
example index; `LocalDataset.stream` then returns `Examples`, which `supervised.py` lays out in rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.common import contracts
from services.common.contracts import DatasetManifest
from services.common.errors import ValidationFailed


class TokenStream:
    """The shards of one split as a single read-only sequence of token ids."""

    def __init__(self, paths: list[Path], dtype: np.dtype) -> None:
        self.shards = [np.memmap(path, dtype=dtype, mode="r") for path in paths if path.stat().st_size]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])  # [n_shards + 1]
        self.tokens = int(self.starts[-1])

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries (written into `out` when given)."""
        out = np.empty(length, dtype=np.int64) if out is None else out
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[shard])
        while filled < length:
            piece = self.shards[shard][offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard, offset = shard + 1, 0
        return out


class Examples:
    """A supervised split: its token stream, the loss mask of every token, and where each example starts."""

    def __init__(self, tokens: TokenStream, masks: TokenStream, index: np.ndarray) -> None:
        if masks.tokens != tokens.tokens or int(index[-1]) != tokens.tokens:
            raise ValidationFailed(f"a supervised split's loss masks ({masks.tokens}), example index "
                                   f"({int(index[-1])}) and tokens ({tokens.tokens}) do not line up")
        self.stream, self.masks = tokens, masks
        self.starts = index[:-1].astype(np.int64)  # [examples]
        self.lengths = np.diff(index).astype(np.int64)  # [examples]
        self.tokens = tokens.tokens

    def __len__(self) -> int:
        return len(self.starts)

    def example(self, index: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `limit` (at most) token ids and loss-mask values of example `index`."""
        start, length = int(self.starts[index]), min(int(self.lengths[index]), limit)
        return self.stream.read(start, length), self.masks.read(start, length)


@dataclass(frozen=True)
class LocalDataset:
    """A dataset version on local disk: its manifest, shards and tokenizer folder."""

    root: Path
    info: DatasetManifest
    dataset_sha256: str  # SHA-256 of manifest.json: identifies the version's exact content
    tokenizer_sha256: str  # SHA-256 over the tokenizer files' (name, SHA-256) pairs

    @classmethod
    def open(cls, root: Path) -> LocalDataset:
        raw = (root / contracts.DATASET_MANIFEST).read_bytes()
        return cls(root, DatasetManifest.from_json(raw), hashlib.sha256(raw).hexdigest(),
                   _tokenizer_digest(root / contracts.DATASET_TOKENIZER))

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / contracts.DATASET_TOKENIZER

    def has_split(self, split: str) -> bool:
        return bool(self.info.shards(split))

    @property
    def supervised(self) -> bool:
        return self.info.supervised

    def stream(self, split: str) -> TokenStream | Examples:
        """The split's token stream, or for a supervised version its `Examples`."""
        paths = [self.root / contracts.within_dataset_version(key) for key in self.info.shards(split)]
        tokens = TokenStream(paths, np.dtype(self.info.numpy_dtype))
        if not self.supervised:
            return tokens
        found = self.info.splits.get(split)
        if found is None or not found.examples:
            return Examples(tokens, tokens, np.zeros(1, dtype=np.int64))
        masks = TokenStream([self.root / contracts.within_dataset_version(key) for key in found.loss_masks],
                            np.dtype(contracts.LOSS_MASK_DTYPE))
        index = np.fromfile(self.root / contracts.within_dataset_version(found.examples),
                            dtype=np.dtype(contracts.EXAMPLE_INDEX_DTYPE))
        return Examples(tokens, masks, index)


def _tokenizer_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file():
            digest.update(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def fetch_dataset(store, manifest_key: str, root: Path) -> LocalDataset:
    """Download a dataset version (manifest, shards, tokenizer files) under `root`, verifying SHA-256.

    Idempotent: files already present with the right digest are kept, so a resumed job on the same
    node does not download again.
    """
    root.mkdir(parents=True, exist_ok=True)
    store.download(manifest_key, root / contracts.DATASET_MANIFEST)
    manifest = DatasetManifest.from_json((root / contracts.DATASET_MANIFEST).read_bytes())
    prefix = manifest_key.rsplit("/", 1)[0] + "/"
    digests = {contracts.within_dataset_version(obj.key): obj.sha256 or None for obj in manifest.objects}
    wanted = {contracts.within_dataset_version(key) for split in contracts.SPLITS for key in manifest.shards(split)}
    for split in manifest.splits.values():  # supervised: loss masks and example indexes
        wanted |= {contracts.within_dataset_version(key) for key in (*split.loss_masks, split.examples) if key}
    wanted |= {name for name in digests if name.startswith(contracts.DATASET_TOKENIZER)}
    if not any(name.startswith(contracts.DATASET_TOKENIZER) for name in wanted):
        wanted |= {obj.key[len(prefix):] for obj in store.list(prefix + contracts.DATASET_TOKENIZER)}
    for name in sorted(wanted):
        path, expected = root / name, digests.get(name)
        if expected and path.exists() and _sha256(path) == expected:
            continue
        store.download(prefix + name, path, expected_sha256=expected)
    return LocalDataset.open(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TrainBatches:
    """Micro-batches of one rank, in the deterministic order described in the module docstring.

    `position` is the number of global samples all ranks have consumed; set it to resume.
    """

    def __init__(self, stream: TokenStream, block_size: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, position: int = 0, pin_memory: bool = False) -> None:
        if stream.tokens < block_size:
            raise ValidationFailed(f"model.block_size is {block_size} but the split has only {stream.tokens} tokens")
        self.stream, self.block_size, self.batch_size = stream, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = position
        self.pin_memory = pin_memory  # page-locked batches: host-to-GPU copies that overlap compute
        self.windows = stream.tokens // block_size  # W, the same every epoch
        self._epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)
        self._offset = 0

    def _layout(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            slack = self.stream.tokens - self.windows * self.block_size  # in [0, block_size)
            self._offset = int(rng.integers(0, slack + 1))
            self._order = rng.permutation(self.windows)
            self._epoch = epoch

    def _start(self, index: int) -> int:
        """Where global sample `index` starts in the stream."""
        epoch, within = divmod(index, self.windows)
        self._layout(epoch)
        return self._offset + int(self._order[within]) * self.block_size

    def sample(self, index: int) -> np.ndarray:
        """Global sample `index`: block_size tokens."""
        return self.stream.read(self._start(index), self.block_size)

    def indices(self) -> list[int]:
        """The global sample indices of this rank's next micro-batch."""
        return [self.position + j * self.world_size + self.rank for j in range(self.batch_size)]

    def next(self) -> torch.Tensor:
        """This rank's next micro-batch: int64 [batch_size, block_size]; advances the position.

        The windows are read straight from the memory-mapped shards into the batch (no per-row copies).
        A fresh tensor every time: a non-blocking copy of the previous one may still be in flight.
        """
        batch = torch.empty((self.batch_size, self.block_size), dtype=torch.int64, pin_memory=self.pin_memory)
        rows = batch.numpy()
        for row, index in zip(rows, self.indices(), strict=True):
            self.stream.read(self._start(index), self.block_size, out=row)
        self.position += self.batch_size * self.world_size
        return batch


def eval_batches(stream: TokenStream, block_size: int, batch_size: int, n_batches: int, *, rank: int = 0,
                 world_size: int = 1) -> list[torch.Tensor]:
    """A fixed evaluation set: `n_batches` micro-batches of windows spread evenly over the split,
    dealt round-robin to the ranks (rank r gets batches r, r + world, …)."""
    windows = max(1, stream.tokens // block_size)
    total = n_batches * batch_size
    starts = (np.linspace(0, windows, num=total, endpoint=False).astype(np.int64) % windows) * block_size
    batches = []
    for b in range(rank, n_batches, world_size):
        rows = [stream.read(int(s), block_size) for s in starts[b * batch_size:(b + 1) * batch_size]]
        batches.append(torch.from_numpy(np.stack(rows)))
    return batches
