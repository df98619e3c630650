"""An evaluation's contamination check: llmp's partitioned one against an in-memory MinHash LSH index.

An evaluation job compares the evaluated documents with the train split of every dataset version of the
model's lineage (services/training/contamination.py). Both sides get the same train split, `--documents`
one-line documents (bench/dataset_scale.py's generator) written as a dataset version on disk (character
tokenizer, one shard), and the same `EVALUATED` evaluated documents: a tenth exact copies of training
documents, a tenth near copies (one word appended), the rest fresh:

- project:  `contamination.measure`, partitioned on local disk (services/common/dedup.py);
- baseline: the usual way, and llmp's before: a `datasketch.MinHashLSH` index of every training document
  (through `cleaning.NearDuplicateIndex`) and a set of their leak keys, in memory, then one query per
  evaluated document.

Each side runs alone in its own process, which prints its seconds and its peak anonymous memory (RssAnon
sampled every 20 ms, less what the process held before it started); both must flag the same documents. The
BENCH line's ratio is training documents checked per second, project / baseline; the memories are beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import harness
from bench.dataset_scale import ROOT, generate

EVALUATED = 2_000


def write_version(root: Path, texts: list[str]) -> None:
    """`texts` as the train split of a dataset version in `root`, in the layout evaluation jobs download."""
    from services.common import contracts
    from services.dataset import tokenizer as tokenizers

    tokenizer = tokenizers.build_char(sorted(set("".join(texts))))
    tokenizers.save(tokenizer, "char", root / contracts.DATASET_TOKENIZER)
    info = tokenizers.info(tokenizer, "char")
    key = contracts.dataset_shard_key("bench", "training", 1, "train", 0)
    shard = root / contracts.within_dataset_version(key)
    shard.parent.mkdir(parents=True, exist_ok=True)
    tokens = 0
    with open(shard, "wb") as out:
        for start in range(0, len(texts), 10_000):
            encoded = tokenizer.encode_batch(texts[start:start + 10_000])
            ids = [[*encoding.ids, info.eos_token_id] for encoding in encoded]
            block = np.fromiter((token for document in ids for token in document), dtype="<u2")
            block.tofile(out)
            tokens += len(block)
    splits = {split: contracts.SplitManifest(0, 0, 0, ()) for split in contracts.SPLITS}
    splits["train"] = contracts.SplitManifest(len(texts), tokens, tokens * 2, (key,))
    manifest = contracts.DatasetManifest(
        name="training", version=1, tenant="bench", format="text", digest="bench", dtype="uint16",
        vocab_size=info.vocab_size, eos_token_id=info.eos_token_id, pad_token_id=info.pad_token_id,
        tokenizer=contracts.TokenizerManifest("char", info.vocab_size, "tokenizer/"), splits=splits)
    (root / contracts.DATASET_MANIFEST).write_text(manifest.to_json())


def evaluated_documents(texts: list[str], seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    copies = [texts[i] for i in rng.integers(0, len(texts), EVALUATED // 10)]
    near = [texts[i] + " zounds" for i in rng.integers(0, len(texts), EVALUATED // 10)]
    return copies + near


def side(name: str, root: Path, evaluated: Path, work: Path) -> None:
    """Runs in the measured process: one side's check, its figures as JSON on stdout."""
    from services.common import cleaning
    from services.training import contamination, data

    peak = {"anon": 0}

    def sample() -> None:
        while True:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        peak["anon"] = max(peak["anon"], int(line.split()[1]))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    dataset = data.LocalDataset.open(root)
    texts = [cleaning.normalise(line) for line in evaluated.read_text().splitlines()]
    time.sleep(0.1)
    before = peak["anon"]
    started = time.perf_counter()
    if name == "project":
        flagged = list(contamination.measure(lambda: iter(texts), {"training@1": dataset}, work).flagged)
    else:
        index, keys = cleaning.NearDuplicateIndex(cleaning.DEFAULT_NEAR_DUP_THRESHOLD), set()
        for number, text in enumerate(contamination.documents(dataset, ("train",))):
            if text:
                keys.add(cleaning.leak_key(text))
                index.add(number, cleaning.signature(text))
        flagged = [ordinal for ordinal, text in enumerate(texts)
                   if text and (cleaning.leak_key(text) in keys or index.find(cleaning.signature(text)))]
    seconds = time.perf_counter() - started
    time.sleep(0.05)
    print(json.dumps({"seconds": seconds, "peak_anon_mib": (peak["anon"] - before) / 1024, "flagged": flagged}))


def run_side(name: str, root: Path, evaluated: Path, work: Path) -> dict:
    command = [sys.executable, "-m", "bench.contamination", "--side", name, str(root), str(evaluated), str(work)]
    path = [str(ROOT), str(ROOT / "gen"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {name} side failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=400_000, help="training documents")
    parser.add_argument("--side", nargs=4, metavar=("NAME", "ROOT", "EVALUATED", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        name, root, evaluated, work = args.side
        side(name, Path(root), Path(evaluated), Path(work))
        return
    print(harness.load())
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        generate(scratch / "training.txt", args.documents)
        texts = (scratch / "training.txt").read_text(encoding="utf-8").splitlines()
        write_version(scratch / "version", texts)
        generate(scratch / "fresh.txt", EVALUATED - 2 * (EVALUATED // 10), seed=2)
        evaluated = evaluated_documents(texts) + (scratch / "fresh.txt").read_text(encoding="utf-8").splitlines()
        np.random.default_rng(3).shuffle(evaluated)
        (scratch / "evaluated.txt").write_text("\n".join(evaluated) + "\n", encoding="utf-8")
        del texts
        results = {name: run_side(name, scratch / "version", scratch / "evaluated.txt", scratch / f"work-{name}")
                   for name in ("project", "baseline")}
    project, baseline = results["project"], results["baseline"]
    if project["flagged"] != baseline["flagged"]:
        raise SystemExit(f"the sides flagged different documents: {len(project['flagged'])} and "
                         f"{len(baseline['flagged'])}")
    for name, result in results.items():
        print(f"{name}: {result['seconds']:.1f} s, peak anonymous memory +{result['peak_anon_mib']:.0f} MiB, "
              f"{len(result['flagged'])} of {EVALUATED} evaluated documents flagged")
    harness.report("eval-contamination", args.documents / project["seconds"], args.documents / baseline["seconds"],
                   " docs/s", f"datasketch MinHashLSH in memory; {args.documents} training documents; peak "
                   f"anonymous memory +{project['peak_anon_mib']:.0f} MiB vs +{baseline['peak_anon_mib']:.0f} MiB",
                   digits=0)


if __name__ == "__main__":
    main()
