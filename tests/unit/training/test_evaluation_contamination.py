"""Figures without the contaminated documents: the tokens of flagged documents (contamination.spans' ordinals)
leave the clean sums and nothing else does, for a plain split (windows across document boundaries) and a
supervised one (examples packed in rows). The reference finds each token's document on its own (by counting
end-of-text tokens; by the examples' answer labels), not through the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from services.training import contamination, data, supervised
from services.training.evaluation import Sums, batches, evaluate_batch
from services.training.models import IGNORE_INDEX
from services.training.supervised import example_labels
from tests.supervised_dataset import addition_chats, write_supervised_dataset

from .test_evaluation_metrics import direct

BLOCK = 64
CPU = torch.device("cpu")


def tiny_model(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=vocab, n_positions=BLOCK)).eval()


def run(model, plan) -> tuple[Sums, Sums]:
    every, clean = Sums(), Sums()
    for batch in plan:
        evaluate_batch(model, batch, every, CPU, clean)
    return every, clean


def test_a_plain_split_leaves_out_the_tokens_of_flagged_documents(tiny_dataset):
    dataset = data.LocalDataset.open(tiny_dataset[0])
    model = tiny_model(dataset.info.vocab_size)
    stream = dataset.stream("test")
    tokens = stream.read(0, stream.tokens)
    # A token's document: how many end-of-text tokens come before it (a document's own one is its last token).
    document = np.concatenate([[0], np.cumsum(tokens == dataset.info.eos_token_id)[:-1]])
    assert len(list(contamination.spans(dataset, ("test",)))) == document[-1] + 1 > 10
    flagged = {1, 4, 7}

    every, clean = run(model, batches(dataset, "test", BLOCK, 8, 0, flagged))

    logits, targets, kept = [], [], []
    with torch.no_grad():
        for start in range(0, stream.tokens - 1, BLOCK):
            window = tokens[start:start + BLOCK]
            if len(window) < 2:
                break
            out = model(torch.from_numpy(window.astype(np.int64))[None]).logits[0, :-1]
            logits.append(out)
            targets.append(torch.from_numpy(window[1:].astype(np.int64)))
            kept.append(torch.from_numpy(~np.isin(document[start + 1:start + len(window)], list(flagged))))
    logits, targets, kept = torch.cat(logits), torch.cat(targets), torch.cat(kept)
    assert 0 < int((~kept).sum()) < len(kept)  # the flagged documents are predicted somewhere: not vacuous
    for figures, expected in ((every.metrics(), direct(logits, targets)),
                              (clean.metrics(), direct(logits[kept], targets[kept]))):
        for name, value in expected.items():
            assert math.isclose(figures[name], value, rel_tol=1e-5, abs_tol=1e-6), (name, figures, expected)

    unflagged_every, unflagged_clean = run(model, batches(dataset, "test", BLOCK, 8, 0))
    assert unflagged_every.as_dict() == every.as_dict() and unflagged_clean.as_dict() == every.as_dict()


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory) -> data.LocalDataset:
    root = tmp_path_factory.mktemp("chat-contamination") / "dataset"
    write_supervised_dataset(root, addition_chats(400))
    return data.LocalDataset.open(root)


def test_a_supervised_split_leaves_out_the_answers_of_flagged_examples(chat_dataset):
    model = tiny_model(chat_dataset.info.vocab_size)
    examples = chat_dataset.stream("test")
    assert isinstance(examples, data.Examples) and len(examples) > 10
    ordinal = {span.start: number for number, span in enumerate(contamination.spans(chat_dataset, ("test",)))}
    assert ordinal == {index: index for index in range(len(examples))}  # examples are counted in order
    flagged = {0, 3, 5}

    plan = batches(chat_dataset, "test", BLOCK, 4, 0, flagged)
    every, clean = run(model, plan)

    def answers(index: int) -> int:  # predicted tokens of one example: its answer labels after its first token
        ids, mask = examples.example(index, BLOCK)
        return int((example_labels(ids, mask)[1:] != IGNORE_INDEX).sum())

    assert all(answers(index) for index in flagged)
    assert every.tokens == sum(answers(index) for index in range(len(examples)))
    assert clean.tokens == every.tokens - sum(answers(index) for index in flagged)

    # The same batches with the flagged examples' labels ignored: an example starts where its positions
    # restart at 0, and a row holds its examples in Rows' order.
    rows = supervised.Rows(examples, BLOCK, seed=None)
    reference, row = Sums(), 0
    for batch in plan:
        labels = batch["labels"].clone()
        for slot in range(len(labels)):
            starts = np.flatnonzero(batch["position_ids"][slot].numpy() == 0).tolist() + [BLOCK]
            for number, example in enumerate(rows.order[rows.bounds[row]:rows.bounds[row + 1]]):
                if int(example) in flagged:
                    labels[slot, starts[number]:starts[number + 1]] = IGNORE_INDEX
            row += 1
        evaluate_batch(model, {name: t for name, t in batch.items() if name != "clean"} | {"labels": labels},
                       reference, CPU)
    assert reference.tokens == clean.tokens
    for name, value in reference.metrics().items():
        assert math.isclose(clean.metrics()[name], value, rel_tol=1e-6, abs_tol=1e-9), name

