"""Tiny random checkpoints of every decoder architecture llmp serves, and a tokenizer trained here.

No hub is reachable in tests, so each architecture is built from its Transformers config with random
weights: small enough to export and serve in seconds, shaped to exercise what sets it apart.
- `gpt2`: learned positions, LayerNorm, GELU MLP, one key/value head per query head;
- `llama`: RoPE, RMSNorm, SwiGLU, grouped-query attention (4 query heads share 2 key/value heads);
- `qwen2`: Llama's blocks with q/k/v biases, tied embeddings and one key/value head for all 4 query heads;
- `mistral`: grouped-query attention with a `head_dim` (24) that is not hidden_size // n_head (16), and a
  sliding attention window (16 tokens) shorter than the prompts and completions the tests run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHITECTURES = ("gpt2", "llama", "qwen2", "mistral")
EOS = "<|endoftext|>"
# What each architecture's served spec must say: (n_head, n_kv_head, head_dim).
HEADS = {"gpt2": (2, 2, 32), "llama": (4, 2, 16), "qwen2": (4, 1, 16), "mistral": (4, 2, 24)}


def tiny_model(arch: str, vocab_size: int, *, context: int = 64, eos_token_id: int = 0, seed: int = 0,
               n_layer: int = 2) -> PreTrainedModel:
    """A random causal LM of `arch` (hidden size 64), in eval mode."""
    torch.manual_seed(seed)
    special = {"eos_token_id": eos_token_id, "bos_token_id": eos_token_id}
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=2, n_embd=64, vocab_size=vocab_size,
                                          n_positions=context, **special)).eval()
    llama_like = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": n_layer, "num_attention_heads": 4, "max_position_embeddings": context,
                  **special}
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **llama_like)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **llama_like)).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(num_key_value_heads=2, head_dim=24, sliding_window=16,
                                                **llama_like)).eval()
    raise ValueError(f"unknown architecture {arch!r}")


def train_tokenizer(text: str, out: Path | None = None, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `text`, with `EOS`; saved to `out` when given."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    if out is not None:
        fast.save_pretrained(out)
    return fast


def build_checkpoint(arch: str, folder: Path, tokenizer: PreTrainedTokenizerFast, *, context: int = 64,
                     seed: int = 0) -> PreTrainedModel:
    """`save_pretrained` of a random `arch` model and `tokenizer` into `folder` (what a user would import)."""
    model = tiny_model(arch, len(tokenizer), context=context, eos_token_id=tokenizer.eos_token_id, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def hf_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompt: str, max_tokens: int) -> list[int]:
    """Transformers' greedy `generate` after `prompt`: the token ids a served completion must equal (up to EOS)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    generated = out[0, len(ids):].tolist()
    eos = tokenizer.eos_token_id
    return generated[:generated.index(eos)] if eos in generated else generated
