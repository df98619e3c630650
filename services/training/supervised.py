"""Supervised inputs: whole examples packed into rows, with a loss only where the dataset's mask is 1.

A supervised dataset version (format pairs or chat, docs/CONTRACTS.md) gives each split its examples
(`data.Examples`: tokens, a loss mask per token, where each example starts). Training turns them into
rows of `block_size` tokens:

- **Packing.** Examples go whole into rows, next-fit in an order drawn once from the job's seed; the
  rest of a row is padding. An example longer than `block_size` keeps its first `block_size` tokens,
  and one left with no answer token is not trained on at all. The rows are fixed for the run; each
  epoch visits them in a seeded permutation, so global sample `g` is row `perm_{g // W}[g % W]` and
  resuming at a position is exact, as with `data.TrainBatches`.
- **No attention across examples.** Each example's position ids restart at 0 (and so does the padding's).
  Transformers builds the causal mask of a row whose position ids restart as block-diagonal
  (`masking_utils.find_packed_sequence_indices`, when no 2D attention mask is given), so a token sees
  only the earlier tokens of its own example: every example reads exactly as it would alone, with the
  positions it would have alone. We rely on that rather than pass our own 4D mask because the model
  then builds the kind of mask its attention implementation needs (boolean for SDPA, additive for
  eager, sequence lengths for flash attention) without a [batch, 1, T, T] tensor per micro-batch;
  tests/unit/training/test_training_supervised.py checks the logits of a packed example against the
  same example alone, for SDPA and eager.
- **No loss across examples, none on prompts.** Labels are the token where the mask is 1 and
  `IGNORE_INDEX` elsewhere: on the prompt (system and user turns, the template's markers), on
  padding, and on each example's first token, so no loss term predicts one example's first token
  from the previous example's last.

Only causal language models train on supervised data; `JobSpec.check_supervised_dataset` refuses the
others (at submit, and again here at start).
"""

from __future__ import annotations

import numpy as np
import torch

from services.common.errors import ValidationFailed
from services.training import data, models
from services.training.models import IGNORE_INDEX
from services.training.spec import JobSpec


def check_dataset(spec: JobSpec, vocab_size: int, train: data.TokenStream | data.Examples,
                  validation: data.TokenStream | data.Examples) -> None:
    """The spec's dataset rules (`JobSpec.check_dataset` for token streams, these for supervised examples)."""
    if not isinstance(train, data.Examples):
        spec.check_dataset(vocab_size, train.tokens, validation.tokens)
        return
    spec.check_supervised_dataset(len(train), len(validation))


def _trainable(examples: data.Examples, block_size: int) -> np.ndarray:
    """Indices of the examples with at least one label within their first `block_size` tokens (an answer token
    other than the first: the first is never a label)."""
    return np.asarray([index for index in range(len(examples))
                       if examples.masks.read(int(examples.starts[index]),
                                              int(min(examples.lengths[index], block_size)))[1:].any()],
                      dtype=np.int64)


def pack_rows(lengths: np.ndarray, order: np.ndarray, block_size: int) -> np.ndarray:
    """Next-fit packing of the examples `order` (lengths already cut to block_size): the row boundaries into
    `order`, [rows + 1]."""
    bounds, used = [0], 0
    for position, example in enumerate(order):
        size = int(lengths[example])
        if used and used + size > block_size:
            bounds.append(position)
            used = 0
        used += size
    if len(order):
        bounds.append(len(order))
    return np.asarray(bounds, dtype=np.int64)


def example_labels(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An example's labels: its token where the loss mask is 1, `IGNORE_INDEX` elsewhere and at its first
    position (never predicted from what precedes the example)."""
    out = np.where(mask.astype(bool), tokens, IGNORE_INDEX)
    out[:1] = IGNORE_INDEX
    return out


class Rows:
    """A split's examples packed into rows of `block_size` tokens (see the module docstring)."""

    def __init__(self, examples: data.Examples, block_size: int, seed: int | None) -> None:
        self.examples, self.block_size = examples, block_size
        kept = _trainable(examples, block_size)
        if seed is not None:  # training: packed in a seeded order; evaluation: in the split's order
            kept = kept[np.random.default_rng([seed, 0x5F7]).permutation(len(kept))]
        self.order = kept
        self.bounds = pack_rows(np.minimum(examples.lengths, block_size), kept, block_size)
        self.count = len(self.bounds) - 1

    def fill(self, row: int, ids: np.ndarray, labels: np.ndarray, positions: np.ndarray, pad_id: int) -> None:
        """Write row `row` into the [block_size] arrays `ids`, `labels` and `positions`."""
        used = 0
        for example in self.order[self.bounds[row]:self.bounds[row + 1]]:
            tokens, mask = self.examples.example(int(example), self.block_size)
            end = used + len(tokens)
            ids[used:end] = tokens
            labels[used:end] = example_labels(tokens, mask)
            positions[used:end] = np.arange(len(tokens))
            used = end
        ids[used:] = pad_id
        labels[used:] = IGNORE_INDEX
        positions[used:] = np.arange(self.block_size - used)  # padding: a run of its own

    def batch(self, rows: list[int], pad_id: int, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """The model inputs of `rows`: input_ids, labels and position_ids, int64 [len(rows), block_size]."""
        shape = (len(rows), self.block_size)
        batch = {name: torch.empty(shape, dtype=torch.int64, pin_memory=pin_memory)
                 for name in ("input_ids", "labels", "position_ids")}
        ids, labels, positions = (batch[name].numpy() for name in ("input_ids", "labels", "position_ids"))
        for slot, row in enumerate(rows):
            self.fill(row, ids[slot], labels[slot], positions[slot], pad_id)
        return batch


class SupervisedBatches(data.TrainBatches):
    """`data.TrainBatches` over packed rows of examples instead of windows of a token stream: the same
    position arithmetic (so resuming is exact), each sample a row."""

    def __init__(self, examples: data.Examples, block_size: int, batch_size: int, *, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1, position: int = 0, pin_memory: bool = False) -> None:
        self.rows = Rows(examples, block_size, seed)
        if not self.rows.count:
            raise ValidationFailed(f"no training example has an answer token within model.block_size "
                                   f"({block_size}) tokens")
        self.block_size, self.batch_size, self.pad_id = block_size, batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position, self.pin_memory = position, pin_memory
        self.windows = self.rows.count  # W: rows play the part of windows
        self._epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)

    def _row(self, index: int) -> int:
        epoch, within = divmod(index, self.windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._epoch = epoch
        return int(self._order[within])

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows.batch([self._row(index)], self.pad_id)

    def next(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch of rows; advances the position."""
        batch = self.rows.batch([self._row(index) for index in self.indices()], self.pad_id, self.pin_memory)
        self.position += self.batch_size * self.world_size
        return batch


def train_batches(stream: data.TokenStream | data.Examples, block_size: int, batch_size: int, *, seed: int,
                  pad_id: int, **kwargs) -> data.TrainBatches:
    """The training batches of a split: packed rows of supervised examples, or windows of a token stream."""
    if isinstance(stream, data.Examples):
        return SupervisedBatches(stream, block_size, batch_size, seed=seed, pad_id=pad_id, **kwargs)
    return data.TrainBatches(stream, block_size, batch_size, seed=seed, **kwargs)


def eval_batches(stream: data.TokenStream | data.Examples, block_size: int, batch_size: int, n_batches: int, *,
                 pad_id: int, rank: int = 0, world_size: int = 1) -> list:
    """A fixed evaluation set (`data.eval_batches` for token streams): for supervised examples, `n_batches`
    micro-batches of rows (packed in the split's order) spread evenly over the split, dealt round-robin."""
    if not isinstance(stream, data.Examples):
        return data.eval_batches(stream, block_size, batch_size, n_batches, rank=rank, world_size=world_size)
    rows = Rows(stream, block_size, seed=None)
    if not rows.count:
        raise ValidationFailed(f"no evaluation example has an answer token within model.block_size ({block_size})")
    chosen = np.linspace(0, rows.count, num=n_batches * batch_size, endpoint=False).astype(np.int64) % rows.count
    return [rows.batch([int(row) for row in chosen[b * batch_size:(b + 1) * batch_size]], pad_id)
            for b in range(rank, n_batches, world_size)]


def model_inputs(family: str, batch: torch.Tensor | dict[str, torch.Tensor], vocab: models.Vocabulary,
                 generator: torch.Generator | None = None, mlm_probability: float = 0.15) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model: a supervised batch as it is (labels already masked), else the
    family's objective on a block of the token stream (`models.model_inputs`)."""
    if isinstance(batch, dict):
        return dict(batch)
    return models.model_inputs(family, batch, vocab, generator, mlm_probability)
