"""The model families, built from Transformers configs or loaded from a registry version, and the
objective each trains on.

- `gpt2`: `GPT2LMHeadModel`, causal LM: predict every next token of the block.
- `bert`: `BertForMaskedLM`, masked LM (BERT's recipe: 15% of positions chosen; of those 80% become
  the mask token, 10% a random token, 10% stay). Token datasets have no mask token, so the model's
  vocabulary is the dataset's plus one: id `vocab_size` is `[MASK]`.
- `t5`: `T5ForConditionalGeneration`, prefix-to-continuation: the encoder reads the first half of
  the block and the decoder learns to produce the second half (the decoder starts from the pad id).
  Simpler than T5's span corruption, needs no sentinel tokens, and trains both stacks on every token.

A fine-tune (`model.init_from`) loads the version's own architecture: the three above, and the causal
decoders people import (`llama`, with grouped-query attention, `qwen2`, `mistral`), which train on
gpt2's objective (`CAUSAL_FAMILIES`).

Every objective's randomness (BERT's masking) comes from a generator the caller seeds from the data
position, so a resumed run draws exactly the same masks as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
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
CAUSAL_FAMILIES = frozenset({"gpt2", "llama", "qwen2", "mistral"})  # next-token prediction


def _class_of(family: str):
    return AutoModelForCausalLM if family in CAUSAL_FAMILIES else _CLASSES[family]


def context_length(config: PretrainedConfig) -> int | None:
    """The most positions the architecture can attend over (None: no fixed limit, as T5's relative ones)."""
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def build_model(spec: ModelSpec, vocab: Vocabulary, *, seed: int, init_dir: Path | None = None) -> PreTrainedModel:
    """A freshly initialised model (weights drawn from `seed`), or one loaded from a saved model dir.

    A saved model's architecture wins over `spec`'s sizes (`spec.family` empty: whatever it is); it must
    embed every token id of the dataset (a larger embedding, padded for speed, is fine) and the block.
    """
    if init_dir is not None:
        config = PretrainedConfig.get_config_dict(init_dir)[0]
        family = spec.family or config.get("model_type", "")
        if family != config.get("model_type"):
            raise ValidationFailed(f"model.family is {family} but model.init_from is a "
                                   f"{config.get('model_type')} model")
        if family not in CAUSAL_FAMILIES and family not in _CLASSES:
            raise ValidationFailed(f"model.init_from is a {family} model, which llmp cannot fine-tune")
        # Never remote code: only architectures Transformers itself implements load.
        model = _class_of(family).from_pretrained(init_dir, trust_remote_code=False, dtype=torch.float32)
        needed = vocab.size + (1 if family == "bert" else 0)
        if model.config.vocab_size < needed:
            raise ValidationFailed(f"model.init_from embeds {model.config.vocab_size} tokens, "
                                   f"the dataset needs {needed}")
        limit = context_length(model.config)
        if limit is not None and spec.block_size > limit:
            raise ValidationFailed(f"model.block_size is {spec.block_size} but model.init_from attends over "
                                   f"at most {limit} positions")
        return model
    if spec.family not in _CLASSES:
        model_config(spec, vocab)  # raises the error naming the field
    cls = _CLASSES[spec.family]
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
    if family in CAUSAL_FAMILIES:
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


def parameter_count(model: torch.nn.Module, *, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of AdamW's two moments for the trainable parameters (what LoRA shrinks)."""
    return sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def flops_per_token(model: PreTrainedModel, block_size: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's estimate: 6N + 12 * L * H * Q * T."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    return 6 * parameter_count(model) + 12 * layers * hidden * block_size
