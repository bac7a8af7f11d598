"""Token sampling: the llama.cpp chain penalties -> top-k -> top-p -> min-p -> temperature -> draw.

Temperature 0 is greedy decoding (argmax), which is deterministic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgelm.errors import GenerationError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    min_p: float = 0.05  # 0.0 disables
    repeat_penalty: float = 1.0  # 1.0 disables
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0 (1.0 disables it), got {self.repeat_penalty}"),
            (self.repeat_last_n >= 0, f"repeat_last_n must be >= 0, got {self.repeat_last_n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Stateful sampler: remembers recent tokens for the repetition penalty and owns its RNG."""

    def __init__(self, params: SamplingParams | None = None):
        import torch  # here, not at module level: the CLI reads SamplingParams' defaults for --help

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

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution the next token is drawn from (one-hot for greedy), over the full vocabulary."""
        import torch

        logits = self.penalized(logits.float())
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
        import torch

        if self.params.greedy:
            token = int(self.penalized(logits.float()).argmax())
        else:
            token = int(torch.multinomial(self.probabilities(logits), 1, generator=self.generator))
        self.accept(token)
        return token

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        penalty = self.params.repeat_penalty
        if penalty == 1.0 or not self.recent or self.params.repeat_last_n == 0:
            return logits
        logits = logits.clone()
        ids = torch.tensor(sorted(set(self.recent)), dtype=torch.long)
        values = logits[ids]
        # llama.cpp's rule: shrink positive logits, push negative ones further down.
        logits[ids] = torch.where(values > 0, values / penalty, values * penalty)
        return logits
