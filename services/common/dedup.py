"""Exact and near-duplicate detection and the cross-split leak check, partitioned on local disk.

Dataset builds run it (services/dataset/pipeline.py, shards.py), and so do evaluation jobs, to find the
evaluated documents their model was trained on (services/training/contamination.py).

A build's memory must not grow with its number of documents, so nothing here keeps per-document state in
Python containers. The scan (`Scan.add`, called by the pipeline once per document that passed the length
filters, in corpus order) gives each such document a dense record number and appends, in fixed-size
batches:

- its split to `splits.u1`;
- (exact key, record) and (leak key, record) rows to files hash-partitioned on the key (`exact/`, `leak/`);
- one (band key, record) row per LSH band to files hash-partitioned on the band key (`bands/`): the band
  key is a 64-bit hash of the band's number and its `r` hash values, the bands being those of the
  `datasketch.MinHashLSH` that `cleaning.NearDuplicateIndex` builds (same threshold, weights, b and r).

The signatures themselves are not kept: 512 bytes per record, more than everything else the scan writes (for
one-line documents, ten times the corpus), shipped from every range of a fanned-out build, when only the records
of candidate pairs are ever compared. `signature_stage` computes those again from their texts.

Then stages, each a function from input files to output files (`status.u1`: one byte per record, what
became of it), so they can later run as independent tasks:

1. `exact_stage`: per exact partition, rows sorted by (key, record): all but the first record of a key are
   exact duplicates (first occurrence wins, as before).
2. `pair_stage`: per band partition, records grouped by band key (exact duplicates left out) give candidate
   pairs: a record and the earlier records of its own split (near duplicates), a record and the records of
   every earlier split (leaks; train, validation, test, calibration is the order). Same-split pairs go to
   files range-partitioned on the later record, cross-split pairs to hash partitions.
3. `signature_stage`: the MinHash signatures of the records some pair holds, from their texts (the pipeline's
   spools), into `signatures.u32`, a sparse file: a record's 128 uint32 at its number × 512.
4. `near_stage`: same-split pairs in increasing order of their later record, duplicates across bands
   removed, verified on the two stored signatures (estimated Jaccard similarity at least the threshold,
   as `NearDuplicateIndex.find` does); a record is a near duplicate when a verified earlier record of its
   split is still kept. That is the sequential rule of before (a document is dropped when a kept earlier
   document of its split is a near copy), computed in record order from the pairs alone.
5. `leak_stage` (once per evaluation split, in order): a kept record is removed as `exact` leak when a
   kept record of an earlier split shares its leak key, else as `near` leak when a verified cross-split
   pair joins it to one; what an earlier split lost to leaks no longer counts, as before.

Memory: each partition file is read whole only when it is under `PART_BYTES`; a larger one is split on
further bits of its key (record range for the pair files) into sub-files first, recursively, so the peak
depends on `PART_BYTES` and `BATCH`, not on the corpus. `status.u1`, `splits.u1` and `wanted.u1` are
memory-mapped files, one byte per record each, touched page by page.

Differences from the in-memory algorithm of before, all confined to pathological corpora:
- in a band bucket, a record is paired with at most the first `MAX_PEERS` records of each split in it
  (by record number), so that a bucket of k copies costs O(k) pairs, not O(k²). A near copy whose only
  kept lookalikes all sit past the first `MAX_PEERS` of every bucket they share is kept, where before it
  was dropped; a cluster of copies that all share a bucket still keeps only its first;
- LSH buckets are keyed by a 64-bit hash of the band rather than the band's bytes: two different bands
  colliding (odds ~2⁻⁶⁴ per pair) can only add a candidate, which the signature check then judges;
- a bucket or key group that no split can make smaller than `PART_BYTES` (one key shared by more rows than
  fit) is read whole.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from datasketch import MinHashLSH

from services.common import cleaning
from services.common.contracts import SPLITS

KEPT, EXACT, NEAR, LEAKED_EXACT, LEAKED_NEAR = range(5)
STATUS_NAMES = ("kept", "exact", "near", "leaked_exact", "leaked_near")

PARTS = 64  # hash partitions the scan writes per kind (keys' low 6 bits)
FANOUT = 16  # sub-partitions of an oversized partition (4 more key bits each level)
PART_BYTES = 8 << 20  # a partition read whole stays under this (sorting it takes ~3x); larger ones are split
BATCH = 8192  # documents buffered by the scan before their rows are written
MAX_PEERS = 32  # records of each split a record is paired with in one band bucket
MAX_DEPTH = 8  # levels of splitting before an unsplittable group is read whole

KEY_ROW = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("record", "<u8")])  # exact and leak keys
BAND_ROW = np.dtype([("band", "<u8"), ("record", "<u8")])
PAIR_ROW = np.dtype([("later", "<u8"), ("earlier", "<u8")])  # later: the record being judged
SIGNATURE_BYTES = cleaning.NUM_PERM * 4


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(b, r) of the LSH index `cleaning.NearDuplicateIndex` uses for this threshold."""
    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.15), num_perm=cleaning.NUM_PERM, weights=(0.2, 0.8))
    return lsh.b, lsh.r


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: a hash of each band's number and values (FNV-1a style over 32-bit words, then mixed)."""
    values = signatures[:, :bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        keys = np.full((len(signatures), bands), 0xCBF29CE484222325, dtype=np.uint64)
        keys ^= np.arange(bands, dtype=np.uint64)
        for column in range(rows):
            keys = (keys ^ values[:, :, column]) * np.uint64(0x100000001B3)
            keys ^= keys >> np.uint64(29)
        keys = (keys ^ (keys >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
        keys ^= keys >> np.uint64(33)
    return keys


class Partitions:
    """Rows of one kind appended to `parts` files by a routing function, buffered up to `BATCH`-ish rows."""

    def __init__(self, folder: Path, dtype: np.dtype, parts: int = PARTS) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.dtype, self.parts = folder, dtype, parts
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0

    def path(self, part: int) -> Path:
        return self.folder / f"part-{part:04d}.bin"

    def add(self, rows: np.ndarray, parts: np.ndarray) -> None:
        self._buffer.append((rows, parts))
        self._buffered += len(rows)
        if self._buffered >= BATCH * 8:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        rows = np.concatenate([rows for rows, _ in self._buffer])
        parts = np.concatenate([parts for _, parts in self._buffer])
        self._buffer, self._buffered = [], 0
        order = np.argsort(parts, kind="stable")
        rows, parts = rows[order], parts[order]
        edges = np.searchsorted(parts, np.arange(self.parts + 1))
        for part in range(self.parts):
            if edges[part] < edges[part + 1]:
                with open(self.path(part), "ab") as handle:
                    rows[edges[part]:edges[part + 1]].tofile(handle)

    def files(self) -> list[Path]:
        return [self.path(part) for part in range(self.parts) if self.path(part).exists()]


def bounded(path: Path, dtype: np.dtype, route: Callable[[np.ndarray, int], np.ndarray], depth: int = 1
            ) -> Iterator[np.ndarray]:
    """The rows of `path` in pieces each under `PART_BYTES`: whole, or split by `route(rows, depth)` (values in
    [0, FANOUT), sub-files read in order) recursively. Rows `route` sends to one sub-file stay together."""
    size = path.stat().st_size
    if size <= PART_BYTES or depth > MAX_DEPTH:
        yield np.fromfile(path, dtype=dtype)
        return
    folder = path.with_suffix(f".split{depth}")
    folder.mkdir()
    try:
        subs = Partitions(folder, dtype, FANOUT)
        chunk = max(1, PART_BYTES // dtype.itemsize // 4)
        with open(path, "rb") as handle:
            while len(rows := np.fromfile(handle, dtype=dtype, count=chunk)):
                subs.add(rows, route(rows, depth))
                subs.flush()
        for sub in subs.files():
            yield from bounded(sub, dtype, route, depth + 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _key_route(field: str) -> Callable[[np.ndarray, int], np.ndarray]:
    shift = PARTS.bit_length() - 1

    def route(rows: np.ndarray, depth: int) -> np.ndarray:
        return ((rows[field] >> np.uint64(shift + 4 * (depth - 1))) & np.uint64(FANOUT - 1)).astype(np.intp)
    return route


class Work:
    """The files of one build's dedup, under `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.signatures = folder / "signatures.u32"
        self.splits = folder / "splits.u1"
        self.status = folder / "status.u1"
        self.wanted = folder / "wanted.u1"  # the records whose signatures the verifying stages read
        self.exact = folder / "exact"
        self.leak = folder / "leak"
        self.bands = folder / "bands"
        self.same = folder / "pairs-same"
        self.cross = folder / "pairs-cross"

    def records(self) -> int:
        return self.splits.stat().st_size if self.splits.exists() else 0

    def status_map(self, mode: str = "r") -> np.ndarray:
        return np.memmap(self.status, dtype=np.uint8, mode=mode) if self.records() else np.zeros(0, np.uint8)

    def splits_map(self) -> np.ndarray:
        return np.memmap(self.splits, dtype=np.uint8, mode="r") if self.records() else np.zeros(0, np.uint8)


class Scan:
    """What the pipeline's single pass over the corpus writes for each document that passed the filters."""

    def __init__(self, work: Work, threshold: float) -> None:
        work.folder.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.bands, self.rows = lsh_bands(threshold)
        self.records = 0
        self._splits = open(work.splits, "wb")
        self._exact = Partitions(work.exact, KEY_ROW)
        self._leak = Partitions(work.leak, KEY_ROW)
        self._band = Partitions(work.bands, BAND_ROW)
        self._batch: list[tuple[int, bytes, bytes, str]] = []

    def add(self, split: str, exact_key: bytes, leak_key: bytes, text: str) -> int:
        """Records one document (`text`: what its MinHash signature is made of); returns its record number
        (dense, in corpus order)."""
        self._batch.append((SPLITS.index(split), exact_key, leak_key, text))
        record = self.records
        self.records += 1
        if len(self._batch) >= BATCH:
            self._flush()
        return record

    def _flush(self) -> None:
        if not self._batch:
            return
        count, first = len(self._batch), self.records - len(self._batch)
        records = np.arange(first, first + count, dtype=np.uint64)
        splits = np.fromiter((item[0] for item in self._batch), dtype=np.uint8, count=count)
        signatures = cleaning.signatures([item[3] for item in self._batch])  # a batch at once: a third of the cost
        for partitions, field in ((self._exact, 1), (self._leak, 2)):
            keys = np.frombuffer(b"".join(item[field] for item in self._batch), dtype="<u8").reshape(count, 2)
            rows = np.empty(count, KEY_ROW)
            rows["k0"], rows["k1"], rows["record"] = keys[:, 0], keys[:, 1], records
            partitions.add(rows, (keys[:, 0] & np.uint64(PARTS - 1)).astype(np.intp))
        keys = band_keys(signatures, self.bands, self.rows)
        rows = np.empty(keys.size, BAND_ROW)
        rows["band"], rows["record"] = keys.ravel(), np.repeat(records, self.bands)
        self._band.add(rows, (rows["band"] & np.uint64(PARTS - 1)).astype(np.intp))
        splits.tofile(self._splits)
        self._batch = []

    def finish(self) -> None:
        """Writes what is buffered and the status file: the stages can run."""
        self._flush()
        for partitions in (self._exact, self._leak, self._band):
            partitions.flush()
        self.close()
        with open(self.work.status, "wb") as handle:  # every record kept until a stage says otherwise
            handle.truncate(self.records)

    def close(self) -> None:
        """Closes the file (again, harmlessly); what is still buffered is dropped, as for a build stopped mid-way."""
        self._splits.close()


def _groups(keys: list[np.ndarray]) -> np.ndarray:
    """Start offsets of the runs of equal keys in rows sorted by them (plus the end)."""
    change = np.zeros(len(keys[0]), dtype=bool)
    if len(change):
        change[0] = True
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    return np.append(np.flatnonzero(change), len(change))


def exact_stage(work: Work) -> None:
    """Marks all but the first record of each exact key as an exact duplicate."""
    status = work.status_map("r+")
    for path in Partitions(work.exact, KEY_ROW).files():
        for rows in bounded(path, KEY_ROW, _key_route("k0")):
            rows = rows[np.lexsort((rows["record"], rows["k1"], rows["k0"]))]
            first = np.zeros(len(rows), dtype=bool)
            first[_groups([rows["k0"], rows["k1"]])[:-1]] = True
            status[rows["record"][~first].astype(np.intp)] = EXACT
    status.flush()


SHARED_BITS = 21  # bins of `_may_share`: a 16 MiB count table


def _may_share(keys: np.ndarray) -> np.ndarray:
    """A mask of the rows whose key another row may share: those whose bin (the key's top `SHARED_BITS` bits,
    apart from the low bits that route partitions) holds two rows or more. Most band keys are alone in the corpus:
    sorting only these rows, not all, took the pair stage from 3.2 to 1.2 s at 1 M records."""
    bins = (keys >> np.uint64(64 - SHARED_BITS)).astype(np.intp)
    return np.bincount(bins, minlength=1 << SHARED_BITS)[bins] > 1


def pair_ranges(records: int) -> int:
    """Record ranges the same-split pairs are partitioned into (~ PART_BYTES / 64 records each)."""
    return max(1, -(-records * 64 // PART_BYTES))


def pair_stage(work: Work) -> None:
    """Candidate pairs from the band buckets, exact duplicates left out (see the module docstring)."""
    status, splits = work.status_map(), work.splits_map()
    records = work.records()
    ranges = pair_ranges(records)
    same, cross = Partitions(work.same, PAIR_ROW, ranges), Partitions(work.cross, PAIR_ROW)
    for path in Partitions(work.bands, BAND_ROW).files():
        for rows in bounded(path, BAND_ROW, _key_route("band")):
            rows = rows[status[rows["record"].astype(np.intp)] == KEPT]
            rows = rows[_may_share(rows["band"])]
            rows = rows[np.lexsort((rows["record"], rows["band"]))]
            starts = _groups([rows["band"]])
            sizes = np.diff(starts)
            member_records = rows["record"]
            member_splits = splits[member_records.astype(np.intp)]
            for size in np.unique(sizes[(sizes > 1) & (sizes <= MAX_PEERS)]).tolist():
                _small_buckets(member_records, member_splits, starts[:-1][sizes == size], size, same, records, cross)
            found: list[tuple[int, int]] = []
            found_cross: list[tuple[int, int]] = []
            for group in np.flatnonzero(sizes > MAX_PEERS):
                begin, end = starts[group], starts[group + 1]
                _pairs(member_records[begin:end], member_splits[begin:end], found, found_cross)
                if len(found) + len(found_cross) >= BATCH * 8:  # a partition of big buckets: written as it goes
                    _write_pairs(found, same, records, found_cross, cross)
            _write_pairs(found, same, records, found_cross, cross)
    same.flush()
    cross.flush()


def _small_buckets(member_records: np.ndarray, member_splits: np.ndarray, firsts: np.ndarray, size: int,
                   same: Partitions, records: int, cross: Partitions) -> None:
    """`_pairs` of every bucket of `size` members (at most `MAX_PEERS`, so each member is among the first
    `MAX_PEERS` of its split), whose members start at `firsts`, at once: every ordered pair of members, same-split
    when the earlier record is smaller, cross-split when the earlier one's split comes first. Only the order of
    the rows written differs from `_pairs` (the stages after sort and deduplicate them)."""
    later, earlier = np.nonzero(~np.eye(size, dtype=bool))  # member positions of every ordered pair
    step = max(1, BATCH * 8 // (size * (size - 1)))  # buckets per piece: pairs written BATCH * 8 at a time
    for begin in range(0, len(firsts), step):
        members = firsts[begin:begin + step, None] + np.arange(size)
        bucket_records, bucket_splits = member_records[members], member_splits[members]
        pairs = np.empty(bucket_records[:, later].shape, dtype=PAIR_ROW)
        pairs["later"], pairs["earlier"] = bucket_records[:, later], bucket_records[:, earlier]
        later_splits, earlier_splits = bucket_splits[:, later], bucket_splits[:, earlier]
        same_split = (later_splits == earlier_splits) & (pairs["earlier"] < pairs["later"])
        _add_pairs(pairs[same_split], same, records)
        _add_pairs(pairs[earlier_splits < later_splits], cross, None)


def _add_pairs(pairs: np.ndarray, partitions: Partitions, records: int | None) -> None:
    """Pairs to `partitions`: same-split ones by the later record's range of `records`, cross-split ones (`records`
    None) by hash."""
    if not len(pairs):
        return
    if records is None:
        parts = pairs["later"] & np.uint64(PARTS - 1)
    else:
        parts = pairs["later"] * np.uint64(partitions.parts) // np.uint64(max(records, 1))
    partitions.add(pairs, parts.astype(np.intp))


def _write_pairs(found: list, same: Partitions, records: int, found_cross: list, cross: Partitions) -> None:
    """Same-split pairs to their record range's file, cross-split ones to a hash partition; both lists emptied."""
    for pairs, partitions, by_range in ((found, same, records), (found_cross, cross, None)):
        if pairs:
            _add_pairs(np.array(pairs, dtype=np.uint64).view(PAIR_ROW).ravel(), partitions, by_range)
            pairs.clear()


def _pairs(members: np.ndarray, member_splits: np.ndarray, same: list, cross: list) -> None:
    """The pairs of one bucket (members sorted by record): each with the first `MAX_PEERS` earlier records of
    its own split, and with the first `MAX_PEERS` of each earlier split."""
    firsts: dict[int, list[int]] = {}
    for record, split in zip(members.tolist(), member_splits.tolist(), strict=True):
        own = firsts.setdefault(split, [])
        if len(own) < MAX_PEERS:
            own.append(record)
    for record, split in zip(members.tolist(), member_splits.tolist(), strict=True):
        for earlier in firsts[split]:
            if earlier >= record:
                break
            same.append((record, earlier))
        for other, peers in firsts.items():
            if other < split:
                cross.extend((record, peer) for peer in peers)


Documents = Callable[[np.ndarray], Iterator[tuple[np.ndarray, list[str]]]]
"""`documents(wanted)`: for a mask over record numbers, the texts of the wanted records (each the text its
signature was made of), as (records, texts) blocks in any order (the pipeline reads them from its spools)."""


def signature_stage(work: Work, documents: Documents) -> None:
    """The signatures of every record a candidate pair holds, computed from `documents` into the sparse
    `signatures.u32` that `_Signatures` reads (see the module docstring)."""
    records = work.records()
    with open(work.wanted, "wb") as handle:
        handle.truncate(records)
    wanted = np.memmap(work.wanted, dtype=np.uint8, mode="r+")
    chunk = max(1, PART_BYTES // PAIR_ROW.itemsize)
    for folder in (work.same, work.cross):
        for path in sorted(folder.glob("part-*.bin")):
            with open(path, "rb") as handle:
                while len(rows := np.fromfile(handle, dtype=PAIR_ROW, count=chunk)):
                    wanted[rows["later"].astype(np.intp)] = 1
                    wanted[rows["earlier"].astype(np.intp)] = 1
    expected = sum(int(np.count_nonzero(wanted[start:start + chunk])) for start in range(0, records, chunk))
    found = 0
    descriptor = os.open(work.signatures, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(descriptor, records * SIGNATURE_BYTES)  # holes where no signature is needed
        for numbers, texts in documents(wanted.view(bool)):
            values = cleaning.signatures(texts)
            for record, row in zip(numbers.tolist(), values, strict=True):
                os.pwrite(descriptor, row.tobytes(), record * SIGNATURE_BYTES)
            found += len(numbers)
    finally:
        os.close(descriptor)
        del wanted
        work.wanted.unlink()
    if found != expected:  # a signature missing would read as zeros and judge its pairs wrongly
        raise ValueError(f"{expected} records hold candidate pairs but the documents gave {found}")


class _Signatures:
    """Reads stored signatures by record number (pread: nothing mapped, nothing cached by this process)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, records: np.ndarray) -> np.ndarray:
        data = b"".join(os.pread(self._fd, SIGNATURE_BYTES, record * SIGNATURE_BYTES) for record in records.tolist())
        return np.frombuffer(data, dtype=np.uint32).reshape(len(records), cleaning.NUM_PERM)

    def close(self) -> None:
        os.close(self._fd)


def _verified(rows: np.ndarray, signatures: _Signatures, threshold: float) -> np.ndarray:
    """The distinct pairs of `rows` whose estimated similarity reaches the threshold, sorted by (later, earlier)."""
    if not len(rows):
        return rows
    rows = np.unique(rows)  # sorts by (later, earlier) and drops the copies the other bands found
    records, inverse = np.unique(np.concatenate([rows["later"], rows["earlier"]]), return_inverse=True)
    stored = signatures.read(records)
    later, earlier = stored[inverse[:len(rows)]], stored[inverse[len(rows):]]
    return rows[np.count_nonzero(later == earlier, axis=1) >= threshold * cleaning.NUM_PERM]


def _pair_route(lo: float, hi: float) -> Callable[[np.ndarray, int], np.ndarray]:
    def route(rows: np.ndarray, depth: int) -> np.ndarray:  # record ranges, so sub-files stay in record order
        span = max(1, hi - lo) / FANOUT ** depth
        return ((rows["later"].astype(np.float64) - lo) / span % FANOUT).astype(np.intp)
    return route


def near_stage(work: Work, threshold: float) -> None:
    """Marks near duplicates within each split, in record order (see the module docstring)."""
    status = work.status_map("r+")
    signatures = _Signatures(work.signatures)
    records = work.records()
    ranges = pair_ranges(records)
    try:
        for part, path in enumerate(Partitions(work.same, PAIR_ROW, ranges).path(part) for part in range(ranges)):
            if not path.exists():
                continue
            route = _pair_route(part * records / ranges, (part + 1) * records / ranges)
            for rows in bounded(path, PAIR_ROW, route):  # sub-files in record order too
                rows = _verified(rows, signatures, threshold)
                starts = _groups([rows["later"]])
                later, earlier = rows["later"].astype(np.intp), rows["earlier"].astype(np.intp)
                for group in range(len(starts) - 1):  # in record order: an earlier record's fate is settled
                    begin, end = starts[group], starts[group + 1]
                    if (status[earlier[begin:end]] == KEPT).any():
                        status[later[begin]] = NEAR
    finally:
        signatures.close()
    status.flush()


def verify_cross_stage(work: Work, threshold: float) -> None:
    """Keeps the cross-split pairs whose signatures agree enough, each partition file rewritten in place."""
    signatures = _Signatures(work.signatures)
    try:
        for path in Partitions(work.cross, PAIR_ROW).files():
            kept = path.with_suffix(".verified")
            with open(kept, "wb") as handle:  # piece by piece: only one bounded read is ever in memory
                for rows in bounded(path, PAIR_ROW, _key_route("later")):
                    _verified(rows, signatures, threshold).tofile(handle)
            os.replace(kept, path)
    finally:
        signatures.close()


def leak_stage(work: Work, split: str) -> None:
    """Removes from `split` the kept records an earlier split's kept record shares a leak key or a near pair with."""
    index = SPLITS.index(split)
    status, splits = work.status_map("r+"), work.splits_map()
    for path in Partitions(work.leak, KEY_ROW).files():
        for rows in bounded(path, KEY_ROW, _key_route("k0")):
            rows = rows[np.lexsort((rows["k1"], rows["k0"]))]
            record = rows["record"].astype(np.intp)
            kept = status[record] == KEPT
            earlier = kept & (splits[record] < index)
            starts = _groups([rows["k0"], rows["k1"]])
            if not len(rows):
                continue
            leaked = np.repeat(np.maximum.reduceat(earlier, starts[:-1]), np.diff(starts))
            status[record[leaked & kept & (splits[record] == index)]] = LEAKED_EXACT
    for path in Partitions(work.cross, PAIR_ROW).files():
        for rows in bounded(path, PAIR_ROW, _key_route("later")):
            later, earlier = rows["later"].astype(np.intp), rows["earlier"].astype(np.intp)
            hit = (splits[later] == index) & (status[later] == KEPT) & (status[earlier] == KEPT)
            status[later[hit]] = LEAKED_NEAR
    status.flush()


def run(work: Work, threshold: float, documents: Documents, report: Callable[[], None] = lambda: None) -> None:
    """Every stage in order, on one machine; `documents` gives the texts `signature_stage` needs."""
    if not work.records():
        return
    exact_stage(work)
    report()
    pair_stage(work)
    report()
    signature_stage(work, documents)
    report()
    near_stage(work, threshold)
    report()
    verify_cross_stage(work, threshold)
    for split in SPLITS[1:]:
        leak_stage(work, split)
        report()


def counts(work: Work) -> np.ndarray:
    """(splits, statuses) record counts."""
    table = np.zeros((len(SPLITS), len(STATUS_NAMES)), dtype=np.int64)
    status, splits = work.status_map(), work.splits_map()
    step = 1 << 20
    for start in range(0, len(status), step):
        codes = splits[start:start + step].astype(np.int64) * len(STATUS_NAMES) + status[start:start + step]
        table += np.bincount(codes, minlength=table.size).reshape(table.shape)
    return table
