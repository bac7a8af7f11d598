"""Token sampling: the llama.cpp chain penalties -> top-k -> top-p -> min-p -> temperature -> draw.

Temperature 0 is greedy decoding (argmax), which is deterministic. Written with numpy, so that the
kernels-only runtime samples without PyTorch; PyTorch logits (CPU tensors) are read in place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

from edgelm.runtime.sampling_params import SamplingParams

__all__ = ["Sampler", "SamplingParams"]


class Sampler:
    """Stateful sampler: remembers recent tokens for the repetition penalty and owns its RNG."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)  # seed None: fresh entropy
        self.recent: deque[int] = deque(maxlen=max(self.params.repeat_last_n, 1))

    def accept(self, token: int) -> None:
        """Record a token of the context (prompt or generated) for the repetition penalty."""
        self.recent.append(token)

    def probabilities(self, logits, recent: Iterable[int] | None = None) -> np.ndarray:
        """The distribution (float32) the next token is drawn from (one-hot for greedy), over the full
        vocabulary; `recent` replaces the remembered tokens for the repetition penalty (speculative decoding
        scores positions ahead of what has been accepted)."""
        logits = self.penalized(logits, recent)
        p = self.params
        if p.greedy:
            probs = np.zeros_like(logits)
            probs[logits.argmax()] = 1.0
            return probs
        # The chain runs on the candidates only (top-k's survivors, or every finite logit: a restricted draft
        # vocabulary leaves -inf elsewhere): sorting 40 values for top-p instead of the whole vocabulary.
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, logits.size - p.top_k)[logits.size - p.top_k]
            ids = np.flatnonzero(logits >= kth)  # ties at the k-th value stay, as llama.cpp keeps them
        else:
            ids = np.flatnonzero(logits > -np.inf)
        masked = logits[ids].astype(np.float32)
        if p.top_p < 1.0:
            keep = _top_p_prefix(_softmax(masked), p.top_p)
            dropped = np.ones(masked.size, dtype=bool)
            dropped[keep] = False
            masked[dropped] = -np.inf
        if p.min_p > 0.0:
            probs = _softmax(masked)
            masked[probs < np.float32(p.min_p) * probs.max()] = -np.inf  # in float32, as the probabilities
        out = np.zeros(logits.size, dtype=np.float32)
        out[ids] = _softmax(masked / p.temperature)
        return out

    def sample(self, logits) -> int:
        """Draw the next token from 1-D logits and record it."""
        if self.params.greedy:
            token = int(self.penalized(logits).argmax())
        else:
            token = self.draw(self.probabilities(logits))
        self.accept(token)
        return token

    def draw(self, probs: np.ndarray) -> int:
        """One index drawn from a distribution (weights need not sum to 1), with this sampler's RNG."""
        cumulative = np.cumsum(probs, dtype=np.float64)
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return min(index, len(cumulative) - 1)

    def uniform(self) -> float:
        """A uniform draw in [0, 1) from this sampler's RNG (speculative acceptance)."""
        return float(self.rng.random())

    def penalized(self, logits, recent: Iterable[int] | None = None) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float32)
        penalty = self.params.repeat_penalty
        window = self.recent if recent is None else list(recent)[-self.recent.maxlen:]
        if penalty == 1.0 or not window or self.params.repeat_last_n == 0:
            return logits
        logits = logits.copy()
        ids = np.array(sorted(set(window)), dtype=np.int64)
        values = logits[ids]
        # llama.cpp's rule: shrink positive logits, push negative ones further down.
        logits[ids] = np.where(values > 0, values / penalty, values * penalty)
        return logits


def _top_p_prefix(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest prefix of the tokens by descending probability (ties in index order) whose mass reaches
    top_p, the token crossing it included. Sorts only the largest probabilities when they hold the mass (a
    whole 262k vocabulary takes ~20 ms to sort): their order and running sums are the full sort's prefix,
    and every later token's preceding mass is at least theirs (the margin covers float32 rounding)."""
    n, m = probs.size, 256
    while True:
        if m >= n:
            order = np.argsort(-probs, kind="stable")
        else:
            kth = np.partition(probs, n - m)[n - m]
            largest = np.flatnonzero(probs >= kth)  # ascending ids: the stable sort keeps ties in order
            order = largest[np.argsort(-probs[largest], kind="stable")]
        sorted_probs = probs[order]
        cumulative = np.cumsum(sorted_probs)
        if m >= n or cumulative[-1] >= top_p + 1e-6:
            before = cumulative - sorted_probs
            return order[before < top_p]
        m *= 8


def _softmax(x: np.ndarray) -> np.ndarray:
    """float32 probabilities, computed in float64 (so each is the correctly rounded value)."""
    e = np.exp(x.astype(np.float64) - float(x.max()))
    return (e / e.sum()).astype(np.float32)
