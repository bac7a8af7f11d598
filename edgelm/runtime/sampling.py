"""Token sampling: the llama.cpp chain penalties -> top-k -> top-p -> min-p -> temperature -> draw.

Temperature 0 is greedy decoding (argmax), which is deterministic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

from edgelm.runtime.sampling_params import SamplingParams

__all__ = ["Sampler", "SamplingParams"]


class Sampler:
    """Stateful sampler: remembers recent tokens for the repetition penalty and owns its RNG."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()
        self.recent: deque[int] = deque(maxlen=max(self.params.repeat_last_n, 1))

    def accept(self, token: int) -> None:
        """Record a token of the context (prompt or generated) for the repetition penalty."""
        self.recent.append(token)

    def probabilities(self, logits: torch.Tensor, recent: Iterable[int] | None = None) -> torch.Tensor:
        """The distribution the next token is drawn from (one-hot for greedy), over the full vocabulary;
        `recent` replaces the remembered tokens for the repetition penalty (speculative decoding scores
        positions ahead of what has been accepted)."""
        logits = self.penalized(logits.float(), recent)
        p = self.params
        if p.greedy:
            probs = torch.zeros_like(logits)
            probs[logits.argmax()] = 1.0
            return probs
        keep = torch.ones_like(logits, dtype=torch.bool)
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            keep &= logits >= kth
        masked = logits.masked_fill(~keep, float("-inf"))
        if p.top_p < 1.0:
            probs = torch.softmax(masked, dim=-1)
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
            before = torch.cumsum(sorted_probs, 0) - sorted_probs
            drop = order[before >= p.top_p]
            masked[drop] = float("-inf")
        if p.min_p > 0.0:
            probs = torch.softmax(masked, dim=-1)
            masked = masked.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return torch.softmax(masked / p.temperature, dim=-1)

    def sample(self, logits: torch.Tensor) -> int:
        """Draw the next token from 1-D logits and record it."""
        if self.params.greedy:
            token = int(self.penalized(logits.float()).argmax())
        else:
            token = int(torch.multinomial(self.probabilities(logits), 1, generator=self.generator))
        self.accept(token)
        return token

    def penalized(self, logits: torch.Tensor, recent: Iterable[int] | None = None) -> torch.Tensor:
        penalty = self.params.repeat_penalty
        window = self.recent if recent is None else list(recent)[-self.recent.maxlen:]
        if penalty == 1.0 or not window or self.params.repeat_last_n == 0:
            return logits
        logits = logits.clone()
        ids = torch.tensor(sorted(set(window)), dtype=torch.long)
        values = logits[ids]
        # llama.cpp's rule: shrink positive logits, push negative ones further down.
        logits[ids] = torch.where(values > 0, values / penalty, values * penalty)
        return logits
