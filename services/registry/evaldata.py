"""Token windows for parity checks, read from a dataset version's splits (docs/CONTRACTS.md layout).

Held-out inputs and perplexity windows come from the `test` split, INT8 calibration windows from the
`calibration` split. Without a dataset in the lineage, parity runs on seeded random tokens (and INT8,
which needs calibration data, is refused). A manifest that cannot be read (e.g. no dtype) fails the export.
"""

from __future__ import annotations

import numpy as np

from services.common import contracts
from services.common.errors import NotFound, ValidationFailed
from services.common.s3 import ObjectStore
from services.registry.exporters import EvalData

HELD_OUT = (4, 32)  # parity windows: count, tokens
TEST = (16, 64)  # perplexity windows
CALIBRATION = (32, 64)  # int8 calibration windows


def read_split(store: ObjectStore, manifest: contracts.DatasetManifest, split: str, tokens: int) -> np.ndarray:
    """The first `tokens` token ids of a split (fewer if the split is smaller), as int64."""
    dtype = np.dtype(manifest.numpy_dtype)
    if not manifest.shards(split):
        raise ValidationFailed(f"dataset {manifest.name} v{manifest.version} has no {split} split")
    parts, have = [], 0
    for key in manifest.shards(split):
        ids = np.frombuffer(store.get_bytes(key), dtype=dtype).astype(np.int64)
        parts.append(ids[: tokens - have])
        have += len(parts[-1])
        if have >= tokens:
            break
    return np.concatenate(parts)


def windows(ids: np.ndarray, count: int, length: int) -> np.ndarray:
    """Up to `count` non-overlapping windows of `length` tokens (length shrinks for tiny splits)."""
    length = max(2, min(length, len(ids) // max(1, min(count, len(ids) // 2))))
    usable = min(count, len(ids) // length)
    if usable < 1:
        raise ValidationFailed(f"split too small for parity windows ({len(ids)} tokens)")
    return ids[: usable * length].reshape(usable, length).copy()


def load(store: ObjectStore, tenant: str, dataset_name: str, dataset_version: int, *, vocab_size: int,
         context_length: int, seed: int = 0) -> EvalData:
    """Evaluation windows for a model with `vocab_size` and `context_length`, from the lineage dataset if any."""
    if dataset_name:
        key = contracts.dataset_manifest_key(tenant, dataset_name, dataset_version)
        try:
            manifest = contracts.DatasetManifest.from_json(store.get_bytes(key))
        except NotFound:
            manifest = None
        if manifest is not None:
            def cap(shape: tuple[int, int]) -> tuple[int, int]:
                return shape[0], min(shape[1], context_length)

            test = read_split(store, manifest, "test", cap(TEST)[0] * cap(TEST)[1])
            calibration = read_split(store, manifest, "calibration", cap(CALIBRATION)[0] * cap(CALIBRATION)[1])
            if int(max(test.max(initial=0), calibration.max(initial=0))) >= vocab_size:
                raise ValidationFailed(f"dataset {dataset_name} v{dataset_version} has token ids beyond the "
                                       f"model's vocabulary ({vocab_size})")
            return EvalData(held_out=windows(test, *cap(HELD_OUT)), test=windows(test, *cap(TEST)),
                            calibration=windows(calibration, *cap(CALIBRATION)),
                            source=f"dataset {dataset_name} v{dataset_version} test/calibration splits")
    rng = np.random.default_rng(seed)
    length = min(HELD_OUT[1], context_length)
    return EvalData(held_out=rng.integers(0, vocab_size, (HELD_OUT[0], length), dtype=np.int64),
                    source="seeded random tokens (no dataset in the lineage)")
