"""Small checkpoints built here for tests and benchmarks (no hub is reachable): random weights,
`save_pretrained`, and a byte-level BPE tokenizer trained here. One module, three uses:

- **Serving** (`tiny_model`, `build_checkpoint`, `hf_greedy`): one random model of every decoder architecture
  llmp serves, shaped to exercise what sets it apart —
  `gpt2`: learned positions, LayerNorm, GELU MLP, one key/value head per query head;
  `llama`: RoPE, RMSNorm, SwiGLU, grouped-query attention (4 query heads share 2 key/value heads);
  `qwen2`: Llama's blocks with q/k/v biases, tied embeddings and one key/value head for all 4 query heads;
  `mistral`: grouped-query attention with a `head_dim` (24) that is not hidden_size // n_head (16), and a
  sliding attention window (16 tokens) shorter than the prompts and completions the tests run.
- **Importing** (`build_importable`, `importable_config`, `logits`, `tar_bytes`, `tar_of`): a complete Hugging
  Face directory with its own tokenizer for every architecture the registry imports (`IMPORTABLE`: the
  decoders and a BERT-style encoder), sharded on request, and archives of it (hand-made ones too).
- **Fine-tuning** (`write_checkpoint`, `fine_tune_config`): a grouped-query model of any size sharing a given
  tokenizer (a dataset's), as a registry version a job can `init_from`.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHITECTURES = ("gpt2", "llama", "qwen2", "mistral")  # the decoders: served, imported, fine-tuned
IMPORTABLE = (*ARCHITECTURES, "bert")  # what the registry imports
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


# --- Importing: complete Hugging Face directories, each with its own tokenizer --------------------------

IMPORT_VOCAB = 160  # embedding rows; the trained tokenizer has fewer tokens
IMPORT_TEXT = [f"line {i}: the registry imports checkpoints, verifies them and serves them back." for i in range(200)]


def _import_tokenizer(folder: Path, *, encoder: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (WordPiece-style specials for an encoder) saved as tokenizer.json + config."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if encoder else ["<|endoftext|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]" if encoder else None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()[:120]
    tokenizer.train_from_iterator(IMPORT_TEXT, trainers.BpeTrainer(
        vocab_size=IMPORT_VOCAB - 8, special_tokens=specials, initial_alphabet=alphabet))
    if encoder:
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def importable_config(architecture: str) -> PretrainedConfig:
    """The config `build_importable` saves: hidden size 32, ids 0 for BOS/EOS/PAD, `architectures` set."""
    decoder = dict(vocab_size=IMPORT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=IMPORT_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0, architectures=["GPT2LMHeadModel"])
    if architecture == "llama":  # grouped-query attention: 2 key/value heads for 4 query heads
        return LlamaConfig(**decoder, architectures=["LlamaForCausalLM"])
    if architecture == "qwen2":
        return Qwen2Config(**decoder, architectures=["Qwen2ForCausalLM"])
    if architecture == "mistral":
        return MistralConfig(**decoder, sliding_window=32, architectures=["MistralForCausalLM"])
    if architecture == "bert":
        return BertConfig(vocab_size=IMPORT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, architectures=["BertForMaskedLM"])
    raise ValueError(architecture)


def build_importable(folder: Path, architecture: str, *, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """`save_pretrained` of a random `architecture` (any of IMPORTABLE) with its own tokenizer into `folder`;
    `max_shard_size` splits the weights into shards with an index."""
    torch.manual_seed(seed)
    config = importable_config(architecture)
    model = (AutoModelForMaskedLM if architecture == "bert" else AutoModelForCausalLM).from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    if max_shard_size:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(folder)
    _import_tokenizer(folder, encoder=architecture == "bert")
    return folder


def logits(folder: Path | str, text: str = "the registry imports") -> torch.Tensor:
    """The model's logits for `text`, loaded with from_pretrained."""
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    model = auto.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def tar_bytes(folder: Path, *, gzip: bool = False, prefix: str = "") -> bytes:
    """The folder as a tar (or tar.gz) archive in memory, members under `prefix`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.add(path, arcname=prefix + path.relative_to(folder).as_posix())
    return buffer.getvalue()


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A hand-made archive (links, traversal…): each TarInfo with its bytes (None for links and dirs)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


# --- Fine-tuning: a model sharing a given tokenizer ----------------------------------------------------


def fine_tune_config(architecture: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, positions: int = 256) -> PretrainedConfig:
    """A tiny config of `architecture` for fine-tuning: untied, 256 positions, EOS the last token id; the
    decoders other than GPT-2 use grouped-query attention."""
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
    model = AutoModelForCausalLM.from_config(fine_tune_config(architecture, vocab_size, **sizes))
    model.save_pretrained(folder, safe_serialization=True)
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)
    return model
