"""Normalise documents and find duplicates: exact (hash of the normalised text) and near (MinHash LSH).

Normalisation (what "the same document" means):
- Unicode NFC; line breaks to `\\n`; control characters other than `\\n` and `\\t` removed;
- on each line: trailing whitespace removed, runs of whitespace after the indentation collapsed to one
  space (indentation is kept: code and verse depend on it);
- at most one blank line in a row; no blank lines at the start or end.

Near duplicates are documents whose word-trigram sets have a Jaccard similarity of at least the
threshold, estimated with `datasketch`'s MinHash and found through its LSH index. `signatures` computes
the MinHash values of a batch of documents at once, bit for bit those of `datasketch.MinHash`.

Shared: the dataset service dedups and checks leaks between splits with it, and an evaluation measures
contamination with it, so "the same document" means the same thing in both.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Hashable, Sequence
from itertools import chain
from operator import methodcaller

import numpy as np
from datasketch import MinHash, MinHashLSH
from datasketch.minhash import _fmix  # its own pre-mix of affine32, so `signatures` follows any change to it

DEFAULT_NEAR_DUP_THRESHOLD = 0.8  # Jaccard similarity of near duplicates, unless a dataset asks otherwise
NUM_PERM = 128  # MinHash permutations: ~0.09 standard error on a Jaccard estimate
SHINGLE_WORDS = 3  # words per shingle

_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_INNER_SPACE = re.compile(r"(?<=\S)[^\S\n]+")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")
_NOT_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """The canonical form of a document (see the module docstring)."""
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _INNER_SPACE.sub(" ", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")


def exact_key(text: str) -> bytes:
    """Key of exact duplicates: a 128-bit hash of the normalised text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def leak_key(text: str) -> bytes:
    """Key of exact duplicates for the leakage check: case, punctuation and spacing ignored."""
    return hashlib.blake2b(_NOT_WORD.sub("", text.casefold()).encode("utf-8"), digest_size=16).digest()


def shingles(text: str) -> set[bytes]:
    """Word trigrams of the case-folded text (the whole text for documents of fewer words)."""
    words = _WORD.findall(text.casefold())
    if len(words) <= SHINGLE_WORDS:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + SHINGLE_WORDS]).encode("utf-8") for i in range(len(words) - SHINGLE_WORDS + 1)}


_DEFAULT = MinHash(num_perm=NUM_PERM)  # datasketch's permutations for seed 1, drawn once rather than per document
# shingle × permutation values `signatures` holds at once: 256 KiB of uint32, which stay in a core's cache
# (blocks of 1-8 MiB measured up to twice as slow)
_PERMUTED_CELLS = 1 << 16
_digest = methodcaller("digest")


def signatures(texts: Sequence[str]) -> np.ndarray:
    """MinHash values of each document's shingles: (len(texts), NUM_PERM) uint32, row i that of texts[i].

    The same values as `datasketch.MinHash.update_batch` (scheme affine32, `_DEFAULT`'s permutations,
    sha1_hash32 of each shingle), but the permutations and minima run over the whole batch's shingles as
    a few numpy operations instead of a MinHash object and its calls per document. The shingles are
    permuted a bounded number at a time, so memory stays bounded whatever the documents' lengths.
    """
    shingle_sets = [shingles(text) for text in texts]  # each at least one: a text of no words has the empty one
    counts = np.fromiter(map(len, shingle_sets), dtype=np.int64, count=len(shingle_sets))
    digests = b"".join(map(_digest, map(hashlib.sha1, chain.from_iterable(shingle_sets))))
    # sha1_hash32: the first 4 bytes of each 20-byte SHA-1 digest, little-endian
    hashes = _fmix(np.frombuffer(digests, dtype="<u4").reshape(-1, 5)[:, 0].astype(np.uint32), 32)
    starts = np.cumsum(counts) - counts  # each document's first shingle in `hashes`, strictly increasing
    multipliers, increments = _DEFAULT.permutations
    values = np.tile(_DEFAULT.hashvalues, (len(texts), 1))  # datasketch's initial values, the empty sketch's
    rows = max(1, _PERMUTED_CELLS // NUM_PERM)
    for low in range(0, len(hashes), rows):
        high = min(low + rows, len(hashes))
        # the documents with shingles in [low, high): the one holding `low` to the last starting before `high`
        first = int(np.searchsorted(starts, low, side="right")) - 1
        end = int(np.searchsorted(starts, high, side="left"))
        permuted = hashes[low:high, None] * multipliers + increments  # uint32: wraps, as datasketch's does
        minima = np.minimum.reduceat(permuted, np.maximum(starts[first:end], low) - low, axis=0)
        np.minimum(values[first:end], minima, out=values[first:end])
    return values


def signature(text: str) -> MinHash:
    """MinHash of one document's shingles, for an LSH index (`NearDuplicateIndex`): datasketch's own.

    Its hash values are `signatures([text])[0]`. Batches go through `signatures`, which costs a third of this
    per document in batches of thousands but more than this for one (its numpy calls cost the same per batch).
    """
    minhash = MinHash(num_perm=NUM_PERM, permutations=_DEFAULT.permutations, scheme=_DEFAULT.scheme)
    minhash.update_batch(list(shingles(text)))
    return minhash


class NearDuplicateIndex:
    """An LSH index of MinHash signatures that answers "is there a near copy of this already?".

    LSH banding is a soft threshold: pairs just above it are missed a quarter of the time with the
    textbook parameters. The index therefore asks LSH for candidates at a lower threshold, weighted
    against false negatives, and keeps the candidates whose estimated Jaccard similarity (from the
    stored signatures) reaches the real threshold.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=max(0.3, threshold - 0.15), num_perm=NUM_PERM, weights=(0.2, 0.8))
        self._signatures: dict[Hashable, np.ndarray] = {}

    def find(self, minhash: MinHash) -> list[Hashable]:
        """Keys of indexed documents whose estimated similarity to `minhash` reaches the threshold."""
        values = minhash.hashvalues
        return [key for key in self._lsh.query(minhash)
                if np.count_nonzero(self._signatures[key] == values) >= self.threshold * NUM_PERM]

    def add(self, key: Hashable, minhash: MinHash) -> None:
        self._lsh.insert(key, minhash)
        self._signatures[key] = minhash.hashvalues.astype(np.uint32)  # hash values are 32-bit

    def remove(self, key: Hashable) -> None:
        self._lsh.remove(key)
        del self._signatures[key]
