"""The evaluation figures from their running sums: what a direct computation over all tokens gives, the same
however the tokens are batched (so a resumed evaluation ends where an uninterrupted one does)."""

import math

import numpy as np
import torch

from services.training.evaluation import ECE_BINS, Sums


def direct(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    probs = torch.softmax(logits.double(), -1)
    loss = float(torch.nn.functional.cross_entropy(logits.double(), targets))
    confidence, predicted = probs.max(-1)
    hit = (predicted == targets).double()
    ece = 0.0
    for b in range(ECE_BINS):
        low, high = b / ECE_BINS, (b + 1) / ECE_BINS
        inside = (confidence >= low) & ((confidence < high) if b < ECE_BINS - 1 else (confidence <= high))
        if inside.any():
            ece += float(inside.double().mean()) * abs(float(hit[inside].mean()) - float(confidence[inside].mean()))
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": float(hit.mean()),
            "expected_calibration_error": ece, "tokens": float(len(targets))}


def test_figures_match_a_direct_computation_whatever_the_batching():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(900, 50, generator=generator) * 3
    targets = torch.randint(0, 50, (900,), generator=generator)
    expected = direct(logits, targets)
    for cuts in ([900], [1, 299, 600], [450, 450]):
        sums, start = Sums(), 0
        for size in cuts:
            sums.add(logits[start:start + size], targets[start:start + size])
            start += size
        resumed = Sums.from_dict(sums.as_dict())  # what a checkpoint event carries
        figures = resumed.metrics()
        for name, value in expected.items():
            assert math.isclose(figures[name], value, rel_tol=1e-6, abs_tol=1e-9), (name, cuts, figures, expected)


def test_a_perfectly_confident_right_model_is_calibrated():
    targets = torch.tensor(np.arange(20) % 7)
    logits = torch.full((20, 7), -1e4)
    logits[torch.arange(20), targets] = 1e4
    sums = Sums()
    sums.add(logits, targets)
    figures = sums.metrics()
    assert figures["token_accuracy"] == 1.0 and figures["expected_calibration_error"] < 1e-9
    assert figures["loss"] < 1e-6
