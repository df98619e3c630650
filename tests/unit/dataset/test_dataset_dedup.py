"""The partitioned dedup and leak stages decide what the in-memory algorithm they replaced decided, and a
build's peak memory does not grow with its number of documents."""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from services.common import cleaning, dedup
from services.common.contracts import SPLITS
from services.dataset import splits
from services.dataset.options import Fractions

ROOT = Path(__file__).resolve().parents[3]
FRACTIONS = Fractions(0.55, 0.15, 0.15, 0.15)  # big evaluation splits: many leaks to judge


def corpus(n: int, seed: int) -> list[str]:
    """Documents with exact copies, case variants (same shingles) and near copies of earlier ones, which land
    in other splits as often as in their own."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)]
    docs: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if docs and roll < 0.08:
            docs.append(rng.choice(docs))
        elif docs and roll < 0.16:
            docs.append(rng.choice(docs).upper())
        elif docs and roll < 0.30:
            docs.append(rng.choice(docs) + " " + rng.choice(words))
        elif docs and roll < 0.34:  # a short document: one shingle, so its copies share every band
            docs.append(" ".join(rng.choices(words[:5], k=2)))
        else:
            docs.append(" ".join(rng.choices(words, k=rng.randint(6, 14))))
    return docs


def reference(docs: list[str], threshold: float) -> list[str]:
    """What the pipeline decided before it was partitioned: one index per split, all in memory."""
    indices = {name: splits.SplitIndex(cleaning.NearDuplicateIndex(threshold)) for name in SPLITS}
    candidates: dict[str, list[splits.Candidate]] = {name: [] for name in SPLITS[1:]}
    seen: set[bytes] = set()
    status = ["kept"] * len(docs)
    for number, text in enumerate(docs):
        key = cleaning.exact_key(text)
        if key in seen:
            status[number] = "exact"
            continue
        seen.add(key)
        name = splits.assign(text, 0, FRACTIONS)
        minhash = cleaning.signature(text)
        if indices[name].near.find(minhash):
            status[number] = "near"
            continue
        indices[name].near.add(number, minhash)
        if name == "train":
            indices[name].leak_keys.add(cleaning.leak_key(text))
        else:
            candidates[name].append(splits.Candidate(number, cleaning.leak_key(text), minhash))
    for number, kind in splits.find_leaks(candidates, indices).items():
        status[number] = f"leaked_{kind}"
    return status


def texts_of(docs: list[str]) -> dedup.Documents:
    """The texts of the wanted records, in two blocks out of record order (the stage must not assume it)."""
    def documents(wanted):
        chosen = np.flatnonzero(wanted)[::-1]
        for block in (chosen[::2], chosen[1::2]):
            yield block, [docs[record] for record in block]
    return documents


def scanned(docs: list[str], threshold: float, folder: Path) -> dedup.Work:
    """The dedup scan's files of `docs` in `folder`."""
    work = dedup.Work(folder)
    scan = dedup.Scan(work, threshold)
    for text in docs:
        scan.add(splits.assign(text, 0, FRACTIONS), cleaning.exact_key(text), cleaning.leak_key(text), text)
    scan.finish()
    return work


def partitioned(docs: list[str], threshold: float, folder: Path) -> list[str]:
    work = scanned(docs, threshold, folder)
    dedup.run(work, threshold, texts_of(docs))
    return [dedup.STATUS_NAMES[code] for code in work.status_map()]


@pytest.mark.parametrize("part_bytes", [dedup.PART_BYTES, 2048], ids=["whole-partitions", "split-partitions"])
def test_partitioned_stages_decide_as_the_in_memory_algorithm(tmp_path, monkeypatch, part_bytes):
    monkeypatch.setattr(dedup, "PART_BYTES", part_bytes)  # 2 KiB: every partition is split, some twice
    if part_bytes < dedup.PART_BYTES:
        monkeypatch.setattr(dedup, "SHARED_BITS", 3)  # 8 bins: keys alone in the corpus share one, and are sorted
    docs = corpus(3000, seed=5)
    expected = reference(docs, 0.8)
    got = partitioned(docs, 0.8, tmp_path / "dedup")
    kinds = {kind: expected.count(kind) for kind in dedup.STATUS_NAMES}
    assert all(kinds[kind] > 20 for kind in dedup.STATUS_NAMES), kinds  # every outcome is exercised
    assert got == expected


def test_a_bucket_of_many_copies_pairs_each_with_few_records(tmp_path):
    docs = ["one two"] + [f"One two{'!' * i}" for i in range(1, 200)]  # 200 texts, one shingle, one bucket
    got = partitioned(docs, 0.8, tmp_path / "dedup")
    assert got == reference(docs, 0.8)
    pairs = sum(path.stat().st_size for path in (tmp_path / "dedup" / "pairs-same").glob("*.bin"))
    bands, _ = dedup.lsh_bands(0.8)
    assert pairs <= bands * len(docs) * dedup.MAX_PEERS * dedup.PAIR_ROW.itemsize  # not 200² per band


CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from bench.dataset_scale import generate
    from services.dataset import pipeline
    from services.dataset.options import DatasetOptions
    # Shrink the fixed-size buffers, so that at these sizes they are already full and only what grows with the
    # corpus can tell the two builds apart (absent names: the code under test has no such buffer).
    if hasattr(pipeline, "PACK_BATCH_CHARS"):
        pipeline.PACK_BATCH_CHARS = 1 << 14
    if hasattr(pipeline, "dedup"):
        pipeline.dedup.BATCH = 512
    documents, folder = int(sys.argv[1]), Path(sys.argv[2])
    generate(folder / "corpus.txt", documents)
    (folder / "work").mkdir()
    options = DatasetOptions(name="m", format="text", document_mode="line", tokenizer="char").validated()
    built = pipeline.build(folder / "corpus.txt", options, folder / "work")
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "kept": built.cleaning.documents_out}))
""")


def peak_kib(documents: int, folder: Path) -> int:
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(documents), str(folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kept"] > documents * 0.9
    return result["peak_kib"]


def test_peak_memory_of_a_build_does_not_grow_with_its_documents(tmp_path):
    """Two builds of the same kind of corpus, 3,000 and 15,000 short documents: the in-memory pipeline of before
    held ~8 KiB per document (~95 MiB more for the larger one); a bounded one differs by noise."""
    small, large = peak_kib(3000, tmp_path / "small"), peak_kib(15000, tmp_path / "large")
    assert large - small < 16 * 1024, f"peak RSS {small / 1024:.0f} MiB -> {large / 1024:.0f} MiB"


def test_only_the_records_of_candidate_pairs_get_their_signatures_computed(tmp_path):
    docs = corpus(600, seed=3)
    work = scanned(docs, 0.8, tmp_path / "dedup")
    assert not work.signatures.exists()  # the scan writes band keys, not signatures
    asked: list[int] = []
    given = texts_of(docs)

    def documents(wanted):
        for records, texts in given(wanted):
            asked.extend(records.tolist())
            yield records, texts
    dedup.exact_stage(work)
    dedup.pair_stage(work)
    dedup.signature_stage(work, documents)
    paired = set()
    for path in [*work.same.glob("part-*.bin"), *work.cross.glob("part-*.bin")]:
        rows = np.fromfile(path, dtype=dedup.PAIR_ROW)
        paired |= set(rows["later"].tolist()) | set(rows["earlier"].tolist())
    assert 0 < len(asked) < len(docs) / 2 and sorted(asked) == sorted(paired)
    stored = np.fromfile(work.signatures, dtype=np.uint32).reshape(len(docs), cleaning.NUM_PERM)
    for record in range(len(docs)):
        expected = cleaning.signature(docs[record]).hashvalues if record in paired else np.zeros(cleaning.NUM_PERM)
        assert (stored[record] == expected).all(), record


def test_a_wanted_record_the_documents_do_not_give_fails_the_stage(tmp_path):
    docs = corpus(300, seed=4)
    work = scanned(docs, 0.8, tmp_path / "dedup")
    dedup.exact_stage(work)
    dedup.pair_stage(work)
    given = texts_of(docs)

    def short_one(wanted):
        for records, texts in given(wanted):
            yield records[1:], texts[1:]
    with pytest.raises(ValueError, match="records hold candidate pairs but the documents gave"):
        dedup.signature_stage(work, short_one)
