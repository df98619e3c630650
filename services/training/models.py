"""The three model families, built from Transformers configs, and the objective each trains on.

- `gpt2`: `GPT2LMHeadModel`, causal LM: predict every next token of the block.
- `bert`: `BertForMaskedLM`, masked LM (BERT's recipe: 15% of positions chosen; of those 80% become
  the mask token, 10% a random token, 10% stay). Token datasets have no mask token, so the model's
  vocabulary is the dataset's plus one: id `vocab_size` is `[MASK]`.
- `t5`: `T5ForConditionalGeneration`, prefix-to-continuation: the encoder reads the first half of
  the block and the decoder learns to produce the second half (the decoder starts from the pad id).
  Simpler than T5's span corruption, needs no sentinel tokens, and trains both stacks on every token.

Every objective's randomness (BERT's masking) comes from a generator the caller seeds from the data
position, so a resumed run draws exactly the same masks as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from services.common.errors import ValidationFailed
from services.training.spec import ModelSpec

IGNORE_INDEX = -100  # label value the Transformers losses skip


@dataclass(frozen=True)
class Vocabulary:
    """What the model needs to know about the dataset's tokenizer."""

    size: int  # token ids are in [0, size)
    eos_token_id: int
    pad_token_id: int


def model_config(spec: ModelSpec, vocab: Vocabulary) -> PretrainedConfig:
    """The Transformers config of `spec` for a dataset with vocabulary `vocab`."""
    if spec.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab.size, n_positions=spec.block_size, n_embd=spec.n_embd, n_layer=spec.n_layer,
            n_head=spec.n_head, resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout,
            bos_token_id=vocab.eos_token_id, eos_token_id=vocab.eos_token_id, pad_token_id=vocab.pad_token_id,
        )
    if spec.family == "bert":
        return BertConfig(
            vocab_size=vocab.size + 1,  # + [MASK]
            hidden_size=spec.n_embd, num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
            intermediate_size=4 * spec.n_embd, max_position_embeddings=spec.block_size,
            hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout,
            pad_token_id=vocab.pad_token_id, eos_token_id=vocab.eos_token_id, type_vocab_size=1,
        )
    if spec.family == "t5":
        return T5Config(
            vocab_size=vocab.size, d_model=spec.n_embd, d_kv=spec.n_embd // spec.n_head, d_ff=4 * spec.n_embd,
            num_layers=spec.n_layer, num_decoder_layers=spec.n_layer, num_heads=spec.n_head,
            dropout_rate=spec.dropout, pad_token_id=vocab.pad_token_id, eos_token_id=vocab.eos_token_id,
            decoder_start_token_id=vocab.pad_token_id, tie_word_embeddings=True,
        )
    raise ValidationFailed(f"model.family {spec.family!r} is not one of gpt2, bert, t5")


_CLASSES: dict[str, type[PreTrainedModel]] = {
    "gpt2": GPT2LMHeadModel, "bert": BertForMaskedLM, "t5": T5ForConditionalGeneration,
}


def build_model(spec: ModelSpec, vocab: Vocabulary, *, seed: int, init_dir: Path | None = None) -> PreTrainedModel:
    """A freshly initialised model (weights drawn from `seed`), or one loaded from a saved model dir.

    A saved model must be of the same family and vocabulary; its architecture wins over `spec`'s sizes.
    """
    if spec.family not in _CLASSES:
        model_config(spec, vocab)  # raises the error naming the field
    cls = _CLASSES[spec.family]
    if init_dir is not None:
        model = cls.from_pretrained(init_dir)
        expected = model_config(spec, vocab).vocab_size
        if model.config.vocab_size != expected:
            raise ValidationFailed(f"model.init_from has a vocabulary of {model.config.vocab_size} tokens, "
                                   f"the dataset needs {expected}")
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(model_config(spec, vocab))


def mask_token_id(vocab: Vocabulary) -> int:
    """BERT's `[MASK]`: the id just past the dataset's vocabulary."""
    return vocab.size


def model_inputs(family: str, tokens: torch.Tensor, vocab: Vocabulary, generator: torch.Generator | None = None,
                 mlm_probability: float = 0.15) -> dict[str, torch.Tensor]:
    """The keyword arguments that make `model(**inputs).loss` the family's objective.

    tokens: int64 [batch, block_size], windows of the token stream.
    """
    if family == "gpt2":
        return {"input_ids": tokens, "labels": tokens}  # the model shifts labels by one itself
    if family == "bert":
        return _masked_lm(tokens, vocab, generator, mlm_probability)
    if family == "t5":
        half = tokens.shape[1] // 2
        return {"input_ids": tokens[:, :half].contiguous(), "labels": tokens[:, half:].contiguous()}
    raise ValidationFailed(f"model.family {family!r} is not one of gpt2, bert, t5")


def _masked_lm(tokens: torch.Tensor, vocab: Vocabulary, generator: torch.Generator | None,
               probability: float) -> dict[str, torch.Tensor]:
    draw = torch.rand(tokens.shape, generator=generator)  # [batch, block]
    chosen = draw < probability
    # Guarantee at least one target per sequence, so the loss is never empty.
    chosen[:, 0] |= ~chosen.any(dim=1)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    action = torch.rand(tokens.shape, generator=generator)
    random_ids = torch.randint(0, vocab.size, tokens.shape, generator=generator)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(tokens, mask_token_id(vocab)), tokens)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return {"input_ids": inputs, "labels": labels}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: PreTrainedModel, block_size: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's estimate: 6N + 12 * L * H * Q * T."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    return 6 * parameter_count(model) + 12 * layers * hidden * block_size
