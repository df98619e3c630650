"""A supervised (format=chat) dataset version written locally by the dataset service's own pipeline: no server.

The conversations are additions (user "12+30", assistant "42"): short, so rows pack several, and a tiny
model learns the answer's shape in a few dozen steps, so a falling loss on the assistant's tokens is a
real signal.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from services.common import contracts
from services.dataset import pipeline
from services.dataset.options import DatasetOptions, Fractions


def addition_chats(count: int, seed: int = 0) -> list[str]:
    """`count` JSON lines of format=chat: a question and its answer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                              {"role": "assistant", "content": f"{a + b}"}]}))
    return lines


def write_supervised_dataset(root: Path, lines: list[str], *, fmt: str = "chat", tokenizer: str = "char",
                             shard_tokens: int = 4096) -> contracts.DatasetManifest:
    """Build `lines` with the dataset pipeline into `root` (manifest.json with keys relative to it); return
    the manifest. Small shards, so readers cross shard boundaries."""
    corpus = root.parent / f"{root.name}.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    options = DatasetOptions(name="chat", format=fmt, tokenizer=tokenizer, vocab_size=400,
                             fractions=Fractions(0.8, 0.1, 0.1, 0.0)).validated()
    root.mkdir(parents=True, exist_ok=True)
    built = pipeline.build(corpus, options, root, shard_tokens=shard_tokens)

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    splits = {name: contracts.SplitManifest(**result.stats(), shards=tuple(rel(p) for p in result.shards),
                                            loss_masks=tuple(rel(p) for p in result.loss_masks),
                                            examples=rel(result.examples) if result.examples else "")
              for name, result in built.splits.items()}
    info = built.tokenizer
    manifest = contracts.DatasetManifest(
        name="chat", version=1, tenant="acme", format=fmt, digest="", dtype=built.dtype.name,
        vocab_size=info.vocab_size, eos_token_id=info.eos_token_id, pad_token_id=info.pad_token_id,
        tokenizer=contracts.TokenizerManifest(info.kind, info.vocab_size, "tokenizer/", sha256=info.sha256),
        splits=splits, options=options.as_dict())
    (root / contracts.DATASET_MANIFEST).write_text(manifest.to_json())
    return manifest


# A model's own template, not ChatML: BOS first, "[role] content" lines, answers closed by EOS.
MODEL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
)


def model_tokenizer_folder(folder: Path, chat_template: str | None = MODEL_CHAT_TEMPLATE) -> Path:
    """A tokenizer as a pretrained model brings it: byte-level BPE whose post-processor adds BOS `<s>`, EOS
    `</s>`, pad `<pad>`, its chat template saved the way transformers 5 saves it (chat_template.jinja)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["What is the sum of two numbers? The answer is a number."] * 20, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))
    return folder
