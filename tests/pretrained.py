"""Small pretrained-style checkpoints built here (random weights, `save_pretrained`), for fine-tuning tests
and the fine-tune benchmark: no hub is reachable, and these have the shapes that matter (Llama's
grouped-query attention: fewer key/value heads than query heads; Qwen2's and Mistral's variants; GPT-2).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PreTrainedModel, Qwen2Config

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2")


def config_for(architecture: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, positions: int = 256):
    """A tiny config of `architecture`; the decoders other than GPT-2 use grouped-query attention."""
    common = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "max_position_embeddings": positions, "tie_word_embeddings": False, "bos_token_id": 0,
              "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}
    if architecture == "llama":
        return LlamaConfig(**common)
    if architecture == "qwen2":
        return Qwen2Config(**common)
    if architecture == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
                          bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    raise ValueError(architecture)


def write_checkpoint(folder: Path, architecture: str, tokenizer_dir: Path, vocab_size: int, *, seed: int = 0,
                     **sizes) -> PreTrainedModel:
    """A random `architecture` model saved in `folder` with the tokenizer files of `tokenizer_dir` beside it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(architecture, vocab_size, **sizes))
    model.save_pretrained(folder, safe_serialization=True)
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)
    return model
