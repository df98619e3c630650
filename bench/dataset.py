"""Tokenize + pack throughput of the dataset service's pipeline, against what users do today.

Three ways to turn the same documents into one flat array of token ids (each document followed by
EOS) with the same byte-level BPE tokenizer, best of `--repeats` runs each, in one process:

- project:  `services.dataset.packing.pack` (batched `encode_batch_fast`, straight into uint16 shards);
- baseline: `datasets.Dataset.map(batched=True)` calling the tokenizer through transformers'
  `PreTrainedTokenizerFast`, then the ids concatenated and written to disk (the usual nanoGPT recipe);
- limit:    the bare `tokenizers.Tokenizer.encode_batch` over the documents, no packing at all
            (and, for reference, `encode_batch_fast`, which skips offsets and is what the project calls).

Throughput is megabytes of UTF-8 input per second. The BENCH line's ratio is project / baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import harness
from services.dataset import packing
from services.dataset import tokenizer as tokenizers

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each run over `repeats` rounds, interleaved so a busy moment hurts all alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="UTF-8 text, documents separated by blank lines")
    parser.add_argument("--copies", type=int, default=4, help="times the corpus is repeated (default 4)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()

    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    documents = [doc for doc in options.corpus.read_text(encoding="utf-8").split("\n\n") if doc.strip()]
    documents = documents * options.copies
    megabytes = sum(len(doc.encode("utf-8")) for doc in documents) / 1e6
    tokenizer = tokenizers.train_bpe(documents, options.vocab_size)
    info = tokenizers.info(tokenizer, "bpe")
    eos = info.eos_token_id
    dtype = packing.dtype_for(info.vocab_size)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        tokenizers.save(tokenizer, "bpe", folder / "tokenizer")
        fast = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))

        def project() -> int:
            writer = packing.ShardWriter(folder / "project", dtype)
            tokens = packing.pack(tokenizer, documents, eos, writer)
            writer.close()
            return tokens

        def baseline() -> int:
            dataset = datasets.Dataset.from_dict({"text": documents})
            mapped = dataset.map(lambda batch: {"ids": [ids + [eos] for ids in fast(batch["text"])["input_ids"]]},
                                 batched=True, remove_columns=["text"])
            ids = np.concatenate([np.asarray(row, dtype=dtype) for row in mapped["ids"]])
            ids.tofile(folder / "baseline.bin")
            return ids.size

        def limit() -> int:
            return sum(len(encoding.ids) for encoding in tokenizer.encode_batch(documents))

        def limit_fast() -> int:  # for reference: the offsets-free variant the project itself calls
            return sum(len(encoding.ids) for encoding in tokenizer.encode_batch_fast(documents))

        project_tokens, baseline_tokens = project(), baseline()
        assert project_tokens == baseline_tokens, (project_tokens, baseline_tokens)
        assert np.array_equal(np.fromfile(folder / "baseline.bin", dtype=dtype),
                              packing.read_tokens(sorted((folder / "project").iterdir()), dtype))
        runs = {"project": project, "baseline": baseline, "limit": limit, "limit_fast": limit_fast}
        rates = {name: megabytes / seconds for name, seconds in best_seconds(runs, options.repeats).items()}

    print(f"corpus: {len(documents)} documents, {megabytes:.2f} MB, {project_tokens} tokens, vocab {info.vocab_size}")
    for name, rate in rates.items():
        print(f"{name:>9}: {rate:7.2f} MB/s")
    print(f"project / limit = {rates['project'] / rates['limit']:.2f}, "
          f"project / limit_fast = {rates['project'] / rates['limit_fast']:.2f}")
    harness.report("dataset", rates["project"], rates["baseline"], "MB/s",
                   f"datasets.Dataset.map(batched=True) with the same tokenizer; bare encode_batch "
                   f"limit={rates['limit']:.2f}MB/s", digits=2)


if __name__ == "__main__":
    main()
