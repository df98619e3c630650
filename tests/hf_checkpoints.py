"""Small Hugging Face checkpoints built here, one per architecture llmp imports: random weights,
`save_pretrained` (safetensors), and a byte-level BPE tokenizer trained here on a few lines. No hub.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

VOCAB = 160  # embedding rows; the trained tokenizer has fewer tokens
TEXT = [f"line {i}: the registry imports checkpoints, verifies them and serves them back." for i in range(200)]
ARCHITECTURES = ("gpt2", "llama", "qwen2", "mistral", "bert")


def train_tokenizer(folder: Path, *, encoder: bool = False):
    """A byte-level BPE (WordPiece-style specials for an encoder) saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if encoder else ["<|endoftext|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]" if encoder else None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:120]))
    if encoder:
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def config_for(architecture: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    decoder = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0, architectures=["GPT2LMHeadModel"])
    if architecture == "llama":  # grouped-query attention: 2 key/value heads for 4 query heads
        return LlamaConfig(**decoder, architectures=["LlamaForCausalLM"])
    if architecture == "qwen2":
        return Qwen2Config(**decoder, architectures=["Qwen2ForCausalLM"])
    if architecture == "mistral":
        return MistralConfig(**decoder, sliding_window=32, architectures=["MistralForCausalLM"])
    if architecture == "bert":
        return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, architectures=["BertForMaskedLM"])
    raise ValueError(architecture)


def build(folder: Path, architecture: str, *, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """save_pretrained of a random `architecture` model with its tokenizer into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(seed)
    config = config_for(architecture)
    model = (AutoModelForMaskedLM if architecture == "bert" else AutoModelForCausalLM).from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    if max_shard_size:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(folder)
    train_tokenizer(folder, encoder=architecture == "bert")
    return folder


def logits(folder: Path | str, text: str = "the registry imports") -> "torch.Tensor":  # noqa: F821
    """The model's logits for `text`, loaded with from_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

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
