"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p (nucleus).

The same order of operations as Hugging Face's logits warpers (temperature, then top-k, then top-p),
on numpy, with a per-request `numpy.random.Generator` so a seed reproduces a sample exactly. Before
them, OpenAI's presence and frequency penalties lower the logits of the tokens already generated (as
vLLM does: the generated tokens count, not the prompt's); log-probabilities are reported from those
penalised logits, the distribution the sampler starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.contracts import MAX_PENALTY, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, MAX_TEMPERATURE
from services.common.errors import ValidationFailed


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy (top_k/top_p/seed are then ignored)."""

    temperature: float = 0.0  # 0 = greedy; else logits are divided by it (0 < t <= MAX_TEMPERATURE)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (0 < p <= 1)
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    seed: int | None = None  # makes sampling reproducible; None = fresh entropy
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    presence_penalty: float = 0.0  # subtracted once from each already generated token's logit
    frequency_penalty: float = 0.0  # subtracted per occurrence of an already generated token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> "SamplingParams":
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValidationFailed(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValidationFailed(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValidationFailed(f"top_k must be 0 (off) or positive, not {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValidationFailed(f"seed must be between 0 and 2^63-1, not {self.seed}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValidationFailed(f"at most {MAX_STOP_SEQUENCES} stop sequences, not {len(self.stop)}")
        for stop in self.stop:
            if not stop or len(stop) > MAX_STOP_LENGTH:
                raise ValidationFailed(f"each stop sequence must have 1-{MAX_STOP_LENGTH} characters")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValidationFailed(f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, "
                                       f"not {getattr(self, name)}")
        return self

    def rng(self, choice: int = 0) -> np.random.Generator:
        """The generator of choice `choice`: choice 0 samples as a lone request with the same seed does, the
        others from (seed, choice), so the n choices of one seeded request differ and each is reproducible."""
        if self.seed is None or choice == 0:
            return np.random.default_rng(self.seed)
        return np.random.default_rng([self.seed, choice])


class Penalties:
    """The counts of the tokens a sequence generated, and the penalised logits they give."""

    def __init__(self, params: SamplingParams, vocab: int) -> None:
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.counts = np.zeros(vocab, np.float32) if params.penalized else None

    def apply(self, logits: np.ndarray) -> np.ndarray:
        if self.counts is None:
            return logits
        return logits - self.frequency * self.counts - self.presence * (self.counts > 0)

    def add(self, token: int) -> None:
        if self.counts is not None and 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities of a [vocab] logits vector, in float64."""
    scores = logits.astype(np.float64)
    shifted = scores - scores.max()
    return shifted - np.log(np.exp(shifted).sum())


def most_likely(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob), most likely first (ties by lower id)."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[0])
    top = np.argpartition(-logprobs, k - 1)[:k]
    top = top[np.lexsort((top, -logprobs[top]))]
    return [(int(token), float(logprobs[token])) for token in top]


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token id from a [vocab] logits vector."""
    if params.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scores.shape[0]:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep every token up to and including the one that crosses top_p (at least one).
        cut = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        keep = np.zeros_like(probs, dtype=bool)
        keep[order[:cut]] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


class StopScanner:
    """Incremental text with stop sequences: what may be shown so far, and whether a stop was hit.

    Text that could still turn into a stop sequence (a suffix that is a prefix of one) and an
    incomplete multi-byte character are held back until the next token decides.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.emitted = 0  # characters of the text already released
        self.stopped = False

    def feed(self, text: str) -> str:
        """Given the whole generated text so far, return the newly releasable part."""
        for stop in self.stops:
            index = text.find(stop)
            if index != -1:
                self.stopped = True
                release = text[self.emitted:index] if index > self.emitted else ""
                self.emitted = max(self.emitted, index)
                return release
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text) - 1
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:length]):
                    safe = min(safe, len(text) - length)
                    break
        if safe <= self.emitted:
            return ""
        release = text[self.emitted:safe]
        self.emitted = safe
        return release

    def flush(self, text: str) -> str:
        """At the end (no stop hit): release what was held back."""
        if self.stopped or len(text) <= self.emitted:
            return ""
        release = text[self.emitted:]
        self.emitted = len(text)
        return release
