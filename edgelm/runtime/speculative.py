"""Speculative decoding, lossless: a cheap draft proposes tokens, the target checks them in one batched step.

Each round the draft model decodes `num_draft` tokens one by one; the target then runs the last accepted
token and all drafts as one batch (the fused kernels read its weights once for the whole batch) and
accepts draft i with probability min(1, p_i(d_i) / q_i(d_i)), where p and q are the target's and the
draft's sampling distributions (penalties, top-k/p, min-p and temperature applied). At the first rejection
a token is drawn from max(0, p_i − q_i), renormalized; when all drafts pass, one more comes from the
target's next distribution. Every emitted token is then distributed exactly as the target alone would
produce it (Leviathan et al., 2023; Chen et al., 2023); with greedy sampling p and q are one-hot and the
output is the target's own greedy text.

The draft is a smaller model with the same vocabulary (qwen2.5-coder-0.5b-instruct for -1.5b), or the
target itself at fewer bits (an any-precision model directory loaded with bits=N), as LLMCad does.
Rejected positions need no rollback: the KV caches are static and indexed by position, and a later round
overwrites those slots before anything attends to them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgelm.errors import GenerationError
from edgelm.models.base import Transformer
from edgelm.runtime.generate import GenerationStats, check_lengths, decode_step, prefill
from edgelm.runtime.native import native_decoder
from edgelm.runtime.sampling import Sampler


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """Accepted draft tokens ÷ drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per round (each round also emits one token of the target's own)."""
        return self.accepted / self.rounds if self.rounds else 0.0


def check_draft(target: Transformer, draft: Transformer) -> None:
    from edgelm.runtime.engine import KernelEngine

    if isinstance(target, KernelEngine) or isinstance(draft, KernelEngine):
        raise GenerationError("speculative decoding runs on PyTorch models: load target and draft with "
                              "edgelm.load")
    if draft.args.vocab_size != target.args.vocab_size:
        raise GenerationError(f"the draft model's vocabulary ({draft.args.vocab_size} tokens) differs from the "
                              f"target's ({target.args.vocab_size}); use a draft of the same tokenizer family")


@torch.inference_mode()
def speculative_generate_step(target: Transformer, draft: Transformer, prompt: Sequence[int],
                              sampler: Sampler | None = None, max_tokens: int = 256, num_draft: int = 4,
                              stats: GenerationStats | None = None,
                              spec_stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Yield the target's tokens, generated with draft proposals; same contract as generate_step."""
    if num_draft < 1:
        raise GenerationError(f"--num-draft must be >= 1, got {num_draft}")
    check_draft(target, draft)
    limit = min(target.args.max_context, draft.args.max_context)
    check_lengths(len(prompt), max_tokens, limit)
    sampler = sampler or Sampler()
    stats = stats if stats is not None else GenerationStats()
    spec = spec_stats if spec_stats is not None else SpeculativeStats()
    total = min(len(prompt) + max_tokens + num_draft + 1, limit)  # room for the last round's drafts
    for token in prompt:
        sampler.accept(token)
    target.setup_caches(total)
    draft.setup_caches(total)
    try:
        start = time.perf_counter()
        logits = prefill(target, prompt)
        stats.prompt_tokens = len(prompt)
        stats.prompt_seconds = time.perf_counter() - start
        prefill(draft, prompt)
        if max_tokens == 0:
            return
        token = sampler.sample(logits)
        stats.generation_tokens = 1
        stats.first_token_seconds = time.perf_counter() - start
        yield token
        pos = len(prompt)  # position of `token`, which neither cache holds yet
        draft_pending: list[int] = []  # accepted tokens the draft's cache still lacks, before `token`
        while stats.generation_tokens < max_tokens:
            k = min(num_draft, max_tokens - stats.generation_tokens, total - pos - 1)
            if k < 1:  # no room to draft: one plain step
                token = sampler.sample(decode_step(target, token, pos))
                pos += 1
                stats.generation_tokens += 1
                yield token
                continue
            drafts, draft_probs = _draft(draft, sampler, draft_pending + [token], pos - len(draft_pending), k)
            # The target scores `token` and every draft in one batch: logits for k + 1 next positions.
            target_logits = _score(target, [token, *drafts], pos)
            emitted = _accept(sampler, drafts, draft_probs, target_logits)
            n_accepted = len(emitted) - 1
            spec.rounds += 1
            spec.drafted += k
            spec.accepted += n_accepted
            # The draft's cache holds `token` and drafts[:k-1]: when all k passed, drafts[-1] is missing.
            draft_pending = [drafts[-1]] if n_accepted == k else []
            pos += 1 + n_accepted
            for out in emitted:
                stats.generation_tokens += 1
                yield out
                if stats.generation_tokens >= max_tokens:
                    break
            token = emitted[-1]
        stats.generation_seconds = time.perf_counter() - start - stats.prompt_seconds
    finally:
        target.clear_caches()
        draft.clear_caches()


def _score(model: Transformer, tokens: list[int], pos: int) -> torch.Tensor:
    """Logits [T, vocab] after each of `tokens` (from position pos), as plain decoding would compute them:
    the compiled step's batches are bit-identical to its single steps, so greedy output cannot drift."""
    native = native_decoder(model)
    if native is not None:
        return native.steps(tokens, pos)
    return model(torch.tensor([tokens]), torch.arange(pos, pos + len(tokens)))[0]


def _draft(draft: Transformer, sampler: Sampler, feed: list[int], pos: int, k: int) -> tuple[list[int], list[np.ndarray]]:
    """k draft tokens and the draft distributions they were drawn from; `feed` starts at position pos."""
    logits = decode_step(draft, feed[0], pos) if len(feed) == 1 else _score(draft, feed, pos)[-1]
    pos += len(feed)
    recent = list(sampler.recent)
    tokens, probs = [], []
    for i in range(k):
        q = sampler.probabilities(logits, recent)
        token = int(q.argmax()) if sampler.params.greedy else sampler.draw(q)
        tokens.append(token)
        probs.append(q)
        recent.append(token)
        if i + 1 < k:
            logits = decode_step(draft, token, pos)
            pos += 1
    return tokens, probs


def _accept(sampler: Sampler, drafts: list[int], draft_probs: list[np.ndarray], target_logits) -> list[int]:
    """The tokens this round emits: the accepted drafts, then one token of the target's (correction or
    bonus). Records them in the sampler's penalty window."""
    emitted: list[int] = []
    recent = list(sampler.recent)
    for i, token in enumerate(drafts):
        p = sampler.probabilities(target_logits[i], recent)
        q = draft_probs[i]
        if sampler.params.greedy:
            ok = bool(p[token] > 0)
        else:
            ratio = float(p[token] / q[token]) if q[token] > 0 else 0.0
            ok = sampler.uniform() < min(1.0, ratio)
        if not ok:
            residual = np.maximum(p - q, 0.0)
            if sampler.params.greedy or float(residual.sum()) <= 0:
                correction = int(p.argmax())
            else:
                correction = sampler.draw(residual)
            emitted.append(correction)
            break
        emitted.append(token)
        recent.append(token)
    else:
        p = sampler.probabilities(target_logits[len(drafts)], recent)
        bonus = int(p.argmax()) if sampler.params.greedy else sampler.draw(p)
        emitted.append(bonus)
    for token in emitted:
        sampler.accept(token)
    return emitted
