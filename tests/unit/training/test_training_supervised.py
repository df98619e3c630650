"""Supervised training inputs: the loss is on the assistant's tokens only, and packed examples never meet.

The dataset is built by the dataset service's own pipeline (format=chat, a char tokenizer with the
ChatML markers), so these tests read exactly what a dataset version holds.
"""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from services.common.errors import ValidationFailed
from services.training import data, distributed, events, supervised, train
from services.training.models import IGNORE_INDEX
from services.training.spec import JobSpec

from ...supervised_dataset import addition_chats, write_supervised_dataset

SINGLE = distributed.Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
BLOCK = 64  # two examples of ~28 tokens per row


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory) -> data.LocalDataset:
    root = tmp_path_factory.mktemp("chat") / "dataset"
    write_supervised_dataset(root, addition_chats(600))
    return data.LocalDataset.open(root)


@pytest.fixture(scope="module")
def tokenizer(chat_dataset) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(chat_dataset.tokenizer_dir))


def tiny_gpt2(vocab_size: int, attn: str = "sdpa", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        pad_token_id=1)
    config._attn_implementation = attn
    return GPT2LMHeadModel(config).eval()


def test_labels_are_the_answer_and_its_end_of_turn_only(chat_dataset, tokenizer):
    examples = chat_dataset.stream("train")
    rows = supervised.Rows(examples, BLOCK, seed=3)
    batch = rows.batch(list(range(4)), pad_id=chat_dataset.info.pad_token_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # two examples packed, then padding: the rows are really packed
    first = ids[starts[0]:starts[1]]
    text = tokenizer.decode(first)
    question, answer = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0], text.split("assistant\n")[1]
    learned = tokenizer.decode(labels[starts[0]:starts[1]][labels[starts[0]:starts[1]] != IGNORE_INDEX])
    a, b = map(int, question.split("+"))
    assert learned == f"{a + b}<|im_end|>" and answer.startswith(learned)
    assert (labels[starts[-1]:] == IGNORE_INDEX).all()  # padding
    assert (labels[starts[:-1]] == IGNORE_INDEX).all()  # no example's first token is a target


def test_a_packed_example_reads_exactly_as_it_does_alone(chat_dataset):
    """Attention never crosses an example boundary: the same logits packed as alone (SDPA and eager)."""
    examples = chat_dataset.stream("train")
    rows = supervised.Rows(examples, BLOCK, seed=3)
    batch = rows.batch([0], pad_id=chat_dataset.info.pad_token_id)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [BLOCK]
    for attn in ("sdpa", "eager"):
        model = tiny_gpt2(chat_dataset.info.vocab_size, attn)
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            for start, end in zip(starts[:2], starts[1:3], strict=True):
                alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits
                torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-5, atol=1e-5)
        # Without restarting positions the second example would see the first: the check can fail.
        with torch.no_grad():
            unpacked = model(input_ids=batch["input_ids"], use_cache=False).logits
        second = model(input_ids=batch["input_ids"][:, starts[1]:starts[2]], use_cache=False).logits
        assert not torch.allclose(unpacked[:, starts[1]:starts[2]], second.detach(), atol=1e-3)


def test_prompt_tokens_carry_no_loss_and_no_gradient(chat_dataset):
    examples = chat_dataset.stream("train")
    pad = chat_dataset.info.pad_token_id
    batch = supervised.Rows(examples, BLOCK, seed=3).batch([0, 1, 2, 3], pad_id=pad)
    model = tiny_gpt2(chat_dataset.info.vocab_size)
    loss = model(**batch, use_cache=False).loss

    # Change every prompt token's target (where the loss mask is 0) of the row's first example: same loss.
    tokens, mask = examples.example(int(supervised.Rows(examples, BLOCK, seed=3).order[0]), BLOCK)
    altered = np.where(mask.astype(bool), tokens, (tokens + 7) % chat_dataset.info.vocab_size)
    assert (altered != tokens).sum() > len(tokens) // 2
    relabelled = batch["labels"].clone()
    relabelled[0, :len(tokens)] = torch.from_numpy(supervised.example_labels(altered, mask))
    torch.testing.assert_close(model(**dict(batch, labels=relabelled), use_cache=False).loss, loss)
    # …whereas the prompt's targets counted (no mask) give another loss: the mask is what removes them.
    prompt = batch["labels"] == IGNORE_INDEX
    unmasked = dict(batch, labels=torch.where(prompt, batch["input_ids"], batch["labels"]))
    assert not torch.isclose(model(**unmasked, use_cache=False).loss, loss)

    # The gradient reaching the logits is zero wherever the next token is not an answer token.
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    logits.retain_grad()
    shifted = batch["labels"][:, 1:]
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(),
                                      ignore_index=IGNORE_INDEX).backward()
    grad = logits.grad[:, :-1].abs().sum(-1)  # [batch, block - 1]
    assert (grad[shifted == IGNORE_INDEX] == 0).all()
    assert (grad[shifted != IGNORE_INDEX] > 0).all()
    # and HF's own loss is that same masked cross-entropy
    torch.testing.assert_close(model(**batch, use_cache=False).loss, loss)


def test_resuming_at_a_position_gives_the_same_rows(chat_dataset):
    examples = chat_dataset.stream("train")
    first = supervised.SupervisedBatches(examples, BLOCK, 4, seed=5, pad_id=0)
    for _ in range(3):
        first.next()
    expected = first.next()
    resumed = supervised.SupervisedBatches(examples, BLOCK, 4, seed=5, pad_id=0, position=12)
    got = resumed.next()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    # every trainable example appears in exactly one row
    rows = resumed.rows
    assert sorted(rows.order.tolist()) == sorted(set(rows.order.tolist()))
    assert len(rows.order) == len(examples)


def make_run(dataset: data.LocalDataset, tmp_path, family: str = "gpt2", **hyper) -> tuple[train.Run, io.StringIO]:
    hp = {"batch_size": 8, "max_steps": 40, "learning_rate": 3e-3, "min_learning_rate": 3e-4, "warmup_steps": 2,
          "eval_interval": 10, "eval_batches": 2, "log_interval": 10, "seed": 11, **hyper}
    spec = JobSpec.from_dict({"dataset": {"name": "chat", "version": 1},
                              "model": {"family": family, "n_layer": 2, "n_head": 2, "n_embd": 32,
                                        "block_size": BLOCK},
                              "hyperparameters": hp})
    sink = io.StringIO()
    run = train.Run(train.Job(tenant="acme", job_id=uuid.uuid4().hex, spec=spec), SINGLE, dataset,
                    work_dir=tmp_path, writer=events.EventWriter(sink))
    return run, sink


def test_the_loss_on_assistant_tokens_falls_during_training(chat_dataset, tmp_path):
    run, sink = make_run(chat_dataset, tmp_path)
    run.setup()
    before = run.evaluate(run.validation_stream)
    assert run.run() == 0
    evals = [json.loads(line) for line in sink.getvalue().splitlines() if '"eval"' in line]
    losses = [event["validation_loss"] for event in evals if event["event"] == "eval"]
    assert len(losses) == 4 and losses[-1] < 0.7 * before, (before, losses)


def test_an_encoder_family_is_refused_on_supervised_data(chat_dataset, tmp_path):
    with pytest.raises(ValidationFailed, match="model.family bert does not train on supervised data"):
        make_run(chat_dataset, tmp_path, family="bert")


def test_the_submit_check_counts_examples_not_tokens():
    """What the coordinator checks at submit for a supervised dataset (services/training/server.py)."""
    spec = JobSpec.from_dict({"dataset": {"name": "chat", "version": 1},
                              "model": {"family": "gpt2", "block_size": 1024}})
    spec.check_supervised_dataset(3, 1)  # three short conversations train a 1024-token block: rows are examples
    with pytest.raises(ValidationFailed, match="dataset has no examples in its validation split"):
        spec.check_supervised_dataset(3, 0)
    t5 = JobSpec.from_dict({"dataset": {"name": "chat", "version": 1}, "model": {"family": "t5"}})
    with pytest.raises(ValidationFailed, match="model.family t5 does not train on supervised data"):
        t5.check_supervised_dataset(3, 1)
