"""The three families build from Transformers configs, train on their objective, and reload exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForMaskedLM, GPT2LMHeadModel, T5ForConditionalGeneration

from services.common.errors import ValidationFailed
from services.training import models
from services.training.spec import ModelSpec

VOCAB = models.Vocabulary(size=50, eos_token_id=49, pad_token_id=49)


def tiny(family: str) -> ModelSpec:
    return ModelSpec(family=family, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


@pytest.mark.parametrize(("family", "cls"), [
    ("gpt2", GPT2LMHeadModel), ("bert", BertForMaskedLM), ("t5", T5ForConditionalGeneration),
])
def test_each_family_builds_and_learns_a_batch(family, cls):
    model = models.build_model(tiny(family), VOCAB, seed=0)
    assert isinstance(model, cls)
    tokens = torch.randint(0, VOCAB.size, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):  # overfit one batch: the objective is wired to the labels
        inputs = models.model_inputs(family, tokens, VOCAB, torch.Generator().manual_seed(2))
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_sizes_follow_the_spec():
    gpt2 = models.build_model(tiny("gpt2"), VOCAB, seed=0).config
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.n_positions, gpt2.vocab_size) == (2, 2, 32, 16, 50)
    bert = models.build_model(tiny("bert"), VOCAB, seed=0).config
    assert (bert.num_hidden_layers, bert.hidden_size, bert.max_position_embeddings) == (2, 32, 16)
    assert bert.vocab_size == VOCAB.size + 1  # room for [MASK]
    t5 = models.build_model(tiny("t5"), VOCAB, seed=0).config
    assert (t5.num_layers, t5.num_decoder_layers, t5.d_model, t5.d_kv) == (2, 2, 32, 16)


def test_same_seed_same_weights_and_the_global_rng_is_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = models.build_model(tiny("gpt2"), VOCAB, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = models.build_model(tiny("gpt2"), VOCAB, seed=5)
    c = models.build_model(tiny("gpt2"), VOCAB, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_a_saved_model_reloads_bit_exactly(family, tmp_path):
    model = models.build_model(tiny(family), VOCAB, seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    loaded = models.build_model(tiny(family), VOCAB, seed=999, init_dir=tmp_path)
    for (name, x), (_, y) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_init_from_a_model_with_another_vocabulary_is_refused(tmp_path):
    models.build_model(tiny("gpt2"), VOCAB, seed=0).save_pretrained(tmp_path)
    other = models.Vocabulary(size=80, eos_token_id=0, pad_token_id=0)
    with pytest.raises(ValidationFailed, match="model.init_from"):
        models.build_model(tiny("gpt2"), other, seed=0, init_dir=tmp_path)


def test_masked_lm_masks_about_15_percent_deterministically():
    tokens = torch.randint(0, VOCAB.size, (64, 16), generator=torch.Generator().manual_seed(0))
    a = models.model_inputs("bert", tokens, VOCAB, torch.Generator().manual_seed(9))
    b = models.model_inputs("bert", tokens, VOCAB, torch.Generator().manual_seed(9))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    targets = a["labels"] != models.IGNORE_INDEX
    assert 0.10 < targets.float().mean().item() < 0.20
    assert torch.equal(a["labels"][targets], tokens[targets])
    assert (a["input_ids"] == models.mask_token_id(VOCAB)).sum() > 0.6 * targets.sum()
    assert torch.equal(a["input_ids"][~targets], tokens[~targets])  # only chosen positions change


def test_t5_reads_the_first_half_and_predicts_the_second():
    tokens = torch.arange(32).reshape(2, 16)
    inputs = models.model_inputs("t5", tokens, VOCAB)
    assert torch.equal(inputs["input_ids"], tokens[:, :8]) and torch.equal(inputs["labels"], tokens[:, 8:])
