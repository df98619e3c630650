"""Assign documents to splits and keep evaluation splits free of training data.

A document's split is a pure function of its normalised text and the dataset's split seed: a keyed
hash mapped to [0, 1) and cut at the cumulative fractions. Adding documents to a corpus therefore
never moves the documents already there, and the same corpus with the same options always splits
the same way.

Because exact duplicates hash alike, they always land in the same split; what can leak across
splits are copies that differ in case, punctuation or a few words. The leakage check compares each
document of a non-train split with every earlier split (train, then validation, then test) and
removes it from its own split when an exact copy (`cleaning.leak_key`) or a near copy (MinHash LSH)
sits there. Training data is never removed.

A build runs that check partitioned on disk (`services.common.dedup`); `SplitIndex` and `find_leaks` are its
in-memory form, for a handful of documents, and the reference the partitioned stages are tested against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from datasketch import MinHash

from services.common.cleaning import NearDuplicateIndex
from services.common.contracts import SPLITS
from services.dataset.options import Fractions

_SCALE = float(2**64)


def split_point(text: str, seed: int) -> float:
    """Where the document falls in [0, 1) for this seed."""
    key = seed.to_bytes(16, "little", signed=True)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / _SCALE


def assign(text: str, seed: int, fractions: Fractions) -> str:
    """The split of a normalised document."""
    point, edge = split_point(text, seed), 0.0
    for name, share in zip(SPLITS, fractions.as_tuple(), strict=True):
        edge += share
        if point < edge and share > 0:
            return name
    # Rounding can leave the top sliver of [0, 1) past the last edge: it belongs to the last split with a share.
    return next(name for name, share in zip(reversed(SPLITS), reversed(fractions.as_tuple()), strict=True) if share > 0)


@dataclass
class SplitIndex:
    """What one split holds, for duplicate and leak lookups: its near-duplicate index and leak keys."""

    near: NearDuplicateIndex
    leak_keys: set[bytes] = field(default_factory=set)


@dataclass(frozen=True)
class Candidate:
    """A non-train document awaiting the leakage check (already in its split's near index)."""

    doc_id: int
    leak_key: bytes
    minhash: MinHash


def find_leaks(candidates: dict[str, Iterable[Candidate]], indices: dict[str, SplitIndex]) -> dict[int, str]:
    """Check the non-train splits in order; return {doc_id: "exact" | "near"} of the documents to remove.

    `indices["train"]` must already hold every training document. Each kept candidate joins its split's
    leak keys, so later splits are checked against it too; each removed one leaves its split's index.
    """
    removed: dict[int, str] = {}
    earlier = [indices["train"]]
    for name in SPLITS[1:]:
        own = indices[name]
        for candidate in candidates.get(name, ()):
            if any(candidate.leak_key in index.leak_keys for index in earlier):
                removed[candidate.doc_id] = "exact"
            elif any(index.near.find(candidate.minhash) for index in earlier):
                removed[candidate.doc_id] = "near"
            else:
                own.leak_keys.add(candidate.leak_key)
                continue
            own.near.remove(candidate.doc_id)
        earlier.append(own)
    return removed
