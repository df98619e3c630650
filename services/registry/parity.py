"""Parity checks: does an exported model compute what the PyTorch model computes?

Each check runs the reference (the Transformers model from the version's `save_pretrained` folder) and
the export on the same held-out token windows and reports the largest absolute logit difference;
the ONNX decoder is also checked on incremental decoding (prefill, then one token with the returned
past key/values). An encoder export (embeddings) is checked on its last hidden states and their masked mean instead
(`encoder_report`). INT8 exports are lossy by design, so they also report the perplexity of both on the
test split and pass only if it rose by less than a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# Logits of the exported model for input_ids [batch, seq] -> [batch, seq, vocab] float32.
LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Thresholds:
    """What an export must meet to pass; a failing export is FAILED and cannot be deployed."""

    max_abs_logit_diff: float = 1e-3  # fp32 exports: float reordering only
    int8_max_abs_logit_diff: float = 2.0  # int8: reported, with a loose bound against broken graphs
    int8_max_perplexity_increase: float = 0.10  # int8: relative perplexity change on the test split


def reference_logits(model: torch.nn.Module, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(input_ids), use_cache=False).logits.float().numpy()


def perplexity(logits: np.ndarray, input_ids: np.ndarray) -> float:
    """exp of the mean next-token cross-entropy of `logits` [b, s, v] over `input_ids` [b, s]."""
    shifted = torch.from_numpy(logits[:, :-1].astype(np.float32))
    targets = torch.from_numpy(input_ids[:, 1:])
    loss = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1))
    return float(math.exp(loss.item()))


def compare(reference: np.ndarray, exported: np.ndarray) -> float:
    if reference.shape != exported.shape:
        return math.inf
    difference = np.abs(reference.astype(np.float64) - exported.astype(np.float64))
    return float(difference.max()) if difference.size else 0.0


def logits_report(model: torch.nn.Module, exported: LogitsFn, inputs: np.ndarray, threshold: float) -> dict:
    """Max abs logit difference on `inputs` [batch, seq]; passed when finite and within `threshold`."""
    diff = compare(reference_logits(model, inputs), exported(inputs))
    return {"max_abs_logit_diff": diff, "threshold": threshold, "inputs": list(inputs.shape),
            "passed": bool(math.isfinite(diff) and diff <= threshold)}


def perplexity_report(model: torch.nn.Module, exported: LogitsFn, test_windows: np.ndarray, threshold: float) -> dict:
    reference = perplexity(reference_logits(model, test_windows), test_windows)
    candidate = perplexity(exported(test_windows), test_windows)
    change = (candidate - reference) / reference
    return {"reference": reference, "exported": candidate, "relative_change": change, "threshold": threshold,
            "windows": list(test_windows.shape),
            "passed": bool(math.isfinite(candidate) and change <= threshold)}


def onnx_feeds(session, input_ids: np.ndarray, past: list[np.ndarray] | None, past_length: int, n_kv_head: int,
               head_dim: int) -> dict[str, np.ndarray]:
    """Inputs of the ONNX decoder (docs/CONTRACTS.md) for `input_ids` after `past_length` cached tokens."""
    batch, seq = input_ids.shape
    feeds = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": np.ones((batch, past_length + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_length, past_length + seq, dtype=np.int64),
                                        (batch, seq)).copy(),
    }
    kv_names = [item.name for item in session.get_inputs() if item.name.startswith("past_key_values.")]
    empty = np.zeros((batch, n_kv_head, 0, head_dim), dtype=np.float32)
    for index, name in enumerate(kv_names):
        feeds[name] = past[index] if past is not None else empty
    return feeds


def onnx_logits_fn(session, n_kv_head: int, head_dim: int) -> LogitsFn:
    def run(input_ids: np.ndarray) -> np.ndarray:
        return session.run(["logits"], onnx_feeds(session, input_ids, None, 0, n_kv_head, head_dim))[0]

    return run


def incremental_report(model: torch.nn.Module, session, inputs: np.ndarray, n_kv_head: int, head_dim: int,
                       threshold: float) -> dict:
    """Prefill all but the last token, then decode the last one with the returned past: same logits?"""
    reference = reference_logits(model, inputs)[:, -1]
    outputs = [item.name for item in session.get_outputs()]
    prefill = session.run(outputs, onnx_feeds(session, inputs[:, :-1], None, 0, n_kv_head, head_dim))
    presents = [value for name, value in zip(outputs, prefill, strict=True) if name.startswith("present.")]
    step = session.run(["logits"], onnx_feeds(session, inputs[:, -1:], presents, inputs.shape[1] - 1, n_kv_head,
                                              head_dim))[0][:, -1]
    diff = compare(reference, step)
    return {"max_abs_logit_diff": diff, "threshold": threshold,
            "passed": bool(math.isfinite(diff) and diff <= threshold)}


def mean_pooled(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Embeddings [batch, hidden]: the mean of each row's last hidden states over its real tokens."""
    mask = attention_mask.astype(np.float32)[..., None]
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def encoder_report(model: torch.nn.Module, session, inputs: np.ndarray, threshold: float) -> dict:
    """An exported encoder against the PyTorch one on `inputs` [batch, seq], every row but the first
    right-padded by a different amount (so masking is checked too): the largest absolute difference of
    the hidden states of real tokens and of the mean-pooled embeddings."""
    batch, seq = inputs.shape
    mask = np.ones_like(inputs, dtype=np.int64)
    for row in range(1, batch):
        mask[row, max(1, seq - row):] = 0
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(inputs), attention_mask=torch.from_numpy(mask)
                          ).last_hidden_state.float().numpy()
    exported = session.run(["last_hidden_state"], {"input_ids": inputs.astype(np.int64), "attention_mask": mask})[0]
    if exported.shape != reference.shape:
        hidden_diff = pooled_diff = math.inf
    else:
        hidden_diff = compare(reference * mask[..., None], exported * mask[..., None])
        pooled_diff = compare(mean_pooled(reference, mask), mean_pooled(exported, mask))
    return {"max_abs_hidden_diff": hidden_diff, "max_abs_embedding_diff": pooled_diff, "threshold": threshold,
            "inputs": list(inputs.shape),
            "passed": bool(math.isfinite(hidden_diff) and max(hidden_diff, pooled_diff) <= threshold)}
