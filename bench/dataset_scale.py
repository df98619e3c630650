"""Peak memory of a dataset build as the corpus grows: it must not grow with the number of documents.

Generates corpora of short one-line documents (no download: a seeded generator over a synthetic
vocabulary, with ~2% exact copies, ~2% near copies (one word appended) and ~1% case variants of earlier
documents), builds each through `services.dataset.pipeline.build` (BPE 4096, line mode) in a child
process of its own, and reads that child's peak RSS from `os.wait4`. Two sizes: `--small` and `--large`
(defaults 100,000 and 400,000 documents, a few minutes here; `--small 1000000 --large 10000000` is the
issue's figure).

The BENCH line: project = peak RSS of the smaller build / peak RSS of the larger one (1.0: memory does not
grow; ≥ 1/1.2 = 0.83 is the target), baseline = 1.0 (flat memory). Both peaks and docs/s are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import harness

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 10_000
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def vocabulary(size: int = 8000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = set()
    while len(words) < size:
        syllables = rng.integers(1, 4)
        words.add("".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                          for _ in range(syllables)))
    return np.array(sorted(words))


def generate(path: Path, documents: int, seed: int = 0) -> int:
    """Writes `documents` one-line documents to `path`; returns its size in bytes. Same arguments, same file."""
    words = vocabulary(seed=seed)
    size = 0
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, documents, CHUNK):
            rng = np.random.default_rng([seed, start])
            count = min(CHUNK, documents - start)
            lengths = rng.integers(5, 11, count)
            picks = rng.integers(0, len(words), int(lengths.sum()))
            kinds = rng.random(count)
            lines: list[str] = []
            offset = 0
            for number in range(count):
                line = " ".join(words[picks[offset:offset + lengths[number]]])
                offset += lengths[number]
                if lines and kinds[number] < 0.02:  # an exact copy of an earlier document of the chunk
                    line = lines[rng.integers(len(lines))]
                elif lines and kinds[number] < 0.04:  # a near copy: one word appended
                    line = lines[rng.integers(len(lines))] + " " + words[rng.integers(len(words))]
                elif lines and kinds[number] < 0.05:  # a case variant: the same shingles, another exact key
                    line = lines[rng.integers(len(lines))].capitalize()
                lines.append(line)
            text = "\n".join(lines) + "\n"
            size += len(text.encode("utf-8"))
            out.write(text)
    return size


def child(corpus: Path, work: Path, tokenizer: str, vocab_size: int) -> None:
    """Runs in the measured process: one build, its counts as JSON on stdout."""
    from services.dataset import pipeline
    from services.dataset.options import DatasetOptions

    options = DatasetOptions(name="scale", format="text", document_mode="line", tokenizer=tokenizer,
                             vocab_size=vocab_size).validated()
    started = time.perf_counter()
    built = pipeline.build(corpus, options, work)
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "cleaning": vars(built.cleaning),
                      "tokens": sum(split.tokens for split in built.splits.values())}))


def measure(documents: int, scratch: Path, tokenizer: str, vocab_size: int) -> dict:
    corpus = scratch / f"corpus-{documents}.txt"
    size = generate(corpus, documents)
    work = scratch / f"work-{documents}"
    work.mkdir()
    command = [sys.executable, "-m", "bench.dataset_scale", "--child", str(corpus), str(work),
               "--tokenizer", tokenizer, "--vocab-size", str(vocab_size)]
    path = [str(ROOT), str(ROOT / "gen"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"the build of {documents} documents failed ({process.returncode})")
    result = json.loads(output.decode().strip().splitlines()[-1])
    corpus.unlink()
    result.update(documents=documents, megabytes=size / 1e6, peak_rss_mib=usage.ru_maxrss / 1024)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100_000, help="documents of the smaller corpus")
    parser.add_argument("--large", type=int, default=400_000, help="documents of the larger corpus")
    parser.add_argument("--tokenizer", default="bpe", choices=("bpe", "char"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--scratch", type=Path, default=None, help="where corpora and builds go (default: a temp dir)")
    parser.add_argument("--child", nargs=2, type=Path, metavar=("CORPUS", "WORK"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(*options.child, options.tokenizer, options.vocab_size)
        return

    print(harness.load())
    figures = []
    with tempfile.TemporaryDirectory(dir=options.scratch) as scratch:
        for documents in (options.small, options.large):
            figure = measure(documents, Path(scratch), options.tokenizer, options.vocab_size)
            figures.append(figure)
            counts = figure["cleaning"]
            print(f"{documents:>10} documents ({figure['megabytes']:.1f} MB): peak RSS "
                  f"{figure['peak_rss_mib']:.0f} MiB, {figure['seconds']:.1f} s, {documents / figure['seconds']:.0f} "
                  f"docs/s; kept {counts['documents_out']}, "
                  f"exact {counts['exact_duplicates']}, near {counts['near_duplicates']}, "
                  f"leaked {counts['leaked_exact']}+{counts['leaked_near']}", flush=True)
    small, large = figures
    harness.report("dataset-scale", small["peak_rss_mib"] / large["peak_rss_mib"], 1.0, "",
                   f"peak RSS of the build of {small['documents']} documents / of {large['documents']}: "
                   f"{small['peak_rss_mib']:.0f} MiB / {large['peak_rss_mib']:.0f} MiB, "
                   f"{small['documents'] / small['seconds']:.0f} / {large['documents'] / large['seconds']:.0f} docs/s; "
                   f"1.0 = flat, target >= 0.83", digits=2)


if __name__ == "__main__":
    main()
