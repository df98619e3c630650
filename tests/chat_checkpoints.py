"""A tiny chat model built here, as a `save_pretrained` folder a user could import: a byte-level BPE
tokenizer with the ChatML special tokens and llmp's default chat template, and a 2-layer GPT-2 trained
for a moment on a few conversations rendered with that template, so it answers them and ends its turn
with `<|im_end|>` (the same recipe as tests/integration/inference/test_openai_sdk.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from services.common.contracts import CHAT_SPECIAL_TOKENS, DEFAULT_CHAT_TEMPLATE

EOS = "<|endoftext|>"
CONVERSATIONS = [("say hi", "hello there"), ("count to three", "one two three"), ("name a king", "king lear")]
FILLER = "the quick brown fox jumps over the lazy dog while the king counts his men and says hello. " * 40


def build_chat_model(folder: Path, *, steps: int = 150, seed: int = 0) -> tuple[GPT2LMHeadModel,
                                                                                PreTrainedTokenizerFast]:
    """Writes the model and its tokenizer to `folder` and returns them (the model in eval mode)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS, *CHAT_SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([FILLER] + [f"user\n{q}\nassistant\n{a}\n" for q, a in CONVERSATIONS] * 20,
                                  trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, chat_template=DEFAULT_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(fast), n_positions=128,
                        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    model = GPT2LMHeadModel(config)
    rows = [fast.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False) for q, a in CONVERSATIONS]
    encoded = [fast.encode(row, add_special_tokens=False) for row in rows]
    width = max(map(len, encoded))
    batch = torch.tensor([ids + [fast.eos_token_id] * (width - len(ids)) for ids in encoded])
    labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in encoded])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.1, f"the tiny chat model did not learn its conversations (loss {loss.item():.3f})"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return model, fast
