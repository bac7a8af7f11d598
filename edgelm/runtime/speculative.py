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

The draft scores only part of the vocabulary (`draft_vocab`, DraftVocabulary): its output matrix is a
large share of what a small model reads per token (qwen2.5-coder-0.5b: 151,936 x 896 of ~500M weights),
and the tokens worth proposing are few: the first ids of a BPE or SentencePiece vocabulary (its earliest
merges, the most frequent pieces) and the tokens already in the context (a program's identifiers). This
stays lossless: q is zero outside that set, and the target's verification (min(1, p/q), residual
max(0, p - q)) still yields the target's distribution; the cost is that the draft can never propose a
token outside it, which is then the target's correction.

Rejected positions need no rollback: the KV caches are static and indexed by position, and a later round
overwrites those slots before anything attends to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

from edgelm import kernels
from edgelm.errors import GenerationError
from edgelm.runtime.engine import KernelEngine
from edgelm.runtime.generate import GenerationStats, check_lengths, decode_step, decode_steps, prefill
from edgelm.runtime.sampling import Sampler

if TYPE_CHECKING:  # PyTorch only for PyTorch models: engines speculate without it
    from edgelm.models.base import Transformer

    Model = Union[Transformer, KernelEngine]

# Token ids the draft scores by default: the first 32768 (plus the context's). On the benchmark's code
# prompts 3.6 % of qwen2.5-coder's greedy tokens lie above it, most of them identifiers of the prompt.
DEFAULT_DRAFT_VOCAB = 32768


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0  # proposing (the draft's steps and its sampling)
    verify_seconds: float = 0.0  # the target's batched steps over each round's drafts

    @property
    def draft_ms_per_round(self) -> float:
        return self._ms_per_round(self.draft_seconds)

    @property
    def verify_ms_per_round(self) -> float:
        return self._ms_per_round(self.verify_seconds)

    def _ms_per_round(self, seconds: float) -> float:
        return 1000 * seconds / self.rounds if self.rounds else 0.0

    @property
    def acceptance(self) -> float:
        """Accepted draft tokens ÷ drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per round (each round also emits one token of the target's own)."""
        return self.accepted / self.rounds if self.rounds else 0.0


def check_draft(target: Model, draft: Model) -> None:
    if draft is target:  # one object has one KV cache: the draft's steps would overwrite the target's
        raise GenerationError("a model cannot be its own draft object: load the draft separately (or use a "
                              "smaller model, or --draft BITS for an any-precision directory)")
    if draft.args.vocab_size != target.args.vocab_size:
        raise GenerationError(f"the draft model's vocabulary ({draft.args.vocab_size} tokens) differs from the "
                              f"target's ({target.args.vocab_size}); use a draft of the same tokenizer family")


def speculative_generate_step(target: Model, draft: Model, prompt: Sequence[int],
                              sampler: Sampler | None = None, max_tokens: int = 256, num_draft: int = 3,
                              stats: GenerationStats | None = None,
                              spec_stats: SpeculativeStats | None = None,
                              draft_vocab: int | None = None) -> Iterator[int]:
    """Yield the target's tokens, generated with draft proposals; same contract as generate_step. Target
    and draft are PyTorch models or kernels-only engines, in any combination. `draft_vocab`: the draft
    scores only the first that many token ids and the context's (None: DEFAULT_DRAFT_VOCAB; 0: all)."""
    if num_draft < 1:
        raise GenerationError(f"--num-draft must be >= 1, got {num_draft}")
    if draft_vocab is not None and draft_vocab < 0:
        raise GenerationError(f"--draft-vocab must be >= 0 (0: the whole vocabulary), got {draft_vocab}")
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
        proposer = DraftProposer(draft, sampler, DEFAULT_DRAFT_VOCAB if draft_vocab is None else draft_vocab,
                                 prompt)
        token = sampler.sample(logits)
        proposer.see([token])
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
            round_start = time.perf_counter()
            drafts, draft_probs = proposer.propose(draft_pending + [token], pos - len(draft_pending), k)
            drafted_at = time.perf_counter()
            # The target scores `token` and every draft in one batch: logits for k + 1 next positions.
            target_logits = decode_steps(target, [token, *drafts], pos)
            spec.draft_seconds += drafted_at - round_start
            spec.verify_seconds += time.perf_counter() - drafted_at
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
            proposer.see(emitted)
        stats.generation_seconds = time.perf_counter() - start - stats.prompt_seconds
    finally:
        target.clear_caches()
        draft.clear_caches()


class DraftProposer:
    """The draft's side of a round: k tokens and the distributions they were drawn from."""

    def __init__(self, draft: Model, sampler: Sampler, vocab_size: int | None, context: Sequence[int]):
        self.draft, self.sampler = draft, sampler
        self.final_hidden = _final_hidden(draft)
        self.vocabulary = None
        if vocab_size and vocab_size < draft.args.vocab_size and self.final_hidden is not None:
            self.vocabulary = DraftVocabulary.build(draft, vocab_size, context)

    def see(self, tokens: Sequence[int]) -> None:
        """Tokens now in the context (the round's output): the draft may propose them from now on."""
        if self.vocabulary is not None:
            self.vocabulary.add(tokens)

    def _logits(self, tokens: list[int], pos: int):
        """Draft logits after the last of `tokens` (from position pos)."""
        if self.vocabulary is None:
            return decode_steps(self.draft, tokens, pos)[-1]
        return self.vocabulary.logits(self.final_hidden(tokens, pos)[-1:])[0]

    def propose(self, feed: list[int], pos: int, k: int) -> tuple[list[int], list[np.ndarray]]:
        """k draft tokens after `feed` (which starts at position pos) and their draft distributions."""
        logits = self._logits(feed, pos)
        pos += len(feed)
        recent = list(self.sampler.recent)
        tokens, probs = [], []
        for i in range(k):
            q = self.sampler.probabilities(logits, recent)
            token = int(q.argmax()) if self.sampler.params.greedy else self.sampler.draw(q)
            tokens.append(token)
            probs.append(q)
            recent.append(token)
            if i + 1 < k:
                logits = self._logits([token], pos)
                pos += 1
        return tokens, probs


def _final_hidden(model: Model) -> Callable[[list[int], int], np.ndarray] | None:
    """The model's step up to the final norm (hidden states [T, dim], float32), where it has one."""
    if isinstance(model, KernelEngine):
        return model.final_hidden
    from edgelm.runtime.native import native_decoder

    native = native_decoder(model)
    return None if native is None else native.final_hidden


@dataclass
class OutputRows:
    """A model's output matrix as the kernels hold it: packed parts with the token ids of their rows (one
    part, or one per row tier), any row dequantized to float32 (rows of no part: low-rank tiers), and
    the final logit soft-cap."""

    parts: list[tuple[kernels.KernelMatrix, np.ndarray]]
    dequantize: Callable[[np.ndarray], np.ndarray]
    softcap: float | None


def output_rows(model: Model) -> OutputRows | None:
    """The output matrix of an engine or of a PyTorch model whose output is packed (else None)."""
    if isinstance(model, KernelEngine):
        out = model.output
        ids = [np.arange(out.rows)] if out.tier is None else [i.astype(np.int64) for i in out.matrix.out_indices]

        def rows_of_engine(wanted: np.ndarray) -> np.ndarray:
            rows = np.empty((wanted.size, out.cols), dtype=np.float32)
            for i, token in enumerate(wanted.tolist()):
                out.row_into(token, rows[i:i + 1])
            return rows

        return OutputRows(list(zip(out.parts, ids)), rows_of_engine, model.softcap)
    import torch

    from edgelm.compress.quant.modules import PackedWeight, RowTieredWeight

    module = model.output if model.output is not None else model.tok_embeddings
    weight = getattr(module, "weight_q", None)
    if getattr(module, "bias", None) is not None or getattr(weight, "scale_gain", None) is not None:
        return None
    if isinstance(weight, PackedWeight):
        matrix = weight.kernel()
        parts = None if matrix is None else [(matrix, np.arange(weight.out_features))]
    elif isinstance(weight, RowTieredWeight):
        joined = weight.kernel_parts()  # its packed tiers (low-rank ones are not in it)
        parts = None if joined is None else [(m, np.asarray(ids, dtype=np.int64))
                                             for m, ids in zip(joined.matrices, joined.out_indices)]
    else:
        return None
    if parts is None:
        return None

    def rows_of_model(wanted: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return weight.dequantize(rows=torch.from_numpy(wanted)).numpy()

    return OutputRows(parts, rows_of_model, model.final_softcap)


class DraftVocabulary:
    """A model's output matrix restricted to a set of token ids: logits of the others are -inf.

    The first ids' rows are copied out of the packed matrix once per model (each tier of a row-tiered
    matrix gives one part of a single kernel job); ids added per generation (tokens of the context outside
    them) are few and kept as dequantized float32 rows.
    """

    def __init__(self, rows: OutputRows, parts: kernels.KernelParts, ids: np.ndarray, vocab_size: int,
                 extra_ids: np.ndarray, extra_rows: np.ndarray):
        self.rows, self.parts = rows, parts
        self.members = np.zeros(vocab_size, dtype=bool)
        self.members[ids] = True
        self.members[extra_ids] = True
        self.member_ids = np.flatnonzero(self.members)
        self.extra_ids, self.extra_rows = extra_ids, extra_rows

    @classmethod
    def build(cls, model: Model, size: int, context: Sequence[int] = ()) -> DraftVocabulary | None:
        """The first `size` ids and those of `context`; None when the output matrix is not on the kernels."""
        rows = output_rows(model)
        if rows is None:
            return None
        # The copied rows are kept with the model for its next generations, as long as its output matrix
        # is the same (a replaced or reloaded weight gets new kernel matrices).
        key = f"_draft_vocabulary_{size}"
        cached = model.__dict__.get(key)
        matrices = [m for m, _ in rows.parts]  # compared by identity (KernelMatrix has no __eq__)
        if cached is None or cached[0] != matrices:
            first = _first_rows(rows, size)
            if first is None:
                return None
            parts, covered, rest = first
            rest_rows = rows.dequantize(rest) if rest.size else np.zeros((0, parts.cols), dtype=np.float32)
            cached = (matrices, parts, covered, rest, rest_rows)
            model.__dict__[key] = cached
        _, parts, covered, rest, rest_rows = cached
        vocabulary = cls(rows, parts, covered, model.args.vocab_size, rest, rest_rows)
        vocabulary.add(context)
        return vocabulary

    def add(self, tokens) -> None:
        new = np.unique(np.asarray(tokens, dtype=np.int64))
        new = new[(new >= 0) & (new < self.members.size)]
        new = new[~self.members[new]]
        if not new.size:
            return
        self.members[new] = True
        self.member_ids = np.flatnonzero(self.members)
        self.extra_ids = np.concatenate([self.extra_ids, new])
        self.extra_rows = np.concatenate([self.extra_rows, self.rows.dequantize(new)])

    def logits(self, h: np.ndarray) -> np.ndarray:
        """h [T, dim] (final-normed, float32) -> logits [T, vocab]: the set's, -inf elsewhere."""
        out = np.full((h.shape[0], self.members.size), -np.inf, dtype=np.float32)
        self.parts.matvec(h, out=out)
        if self.extra_ids.size:
            out[:, self.extra_ids] = h @ self.extra_rows.T
        softcap = self.rows.softcap
        if softcap:  # on the set only: the rest stays -inf (and is not worth a tanh per token)
            out[:, self.member_ids] = np.tanh(out[:, self.member_ids] / softcap) * softcap
        return out


def _first_rows(rows: OutputRows, size: int) -> tuple[kernels.KernelParts, np.ndarray, np.ndarray] | None:
    """Rows 0..size-1 copied out of each packed part as one kernel job, the ids it covers, and the ids
    of no part (low-rank tiers: float rows); None when no packed part holds any of them."""
    matrices, ids = [], []
    for matrix, part_ids in rows.parts:
        mine = np.nonzero(part_ids < size)[0]
        if mine.size:
            matrices.append(matrix.select_rows(mine))
            ids.append(part_ids[mine])
    if not matrices:
        return None
    covered = np.concatenate(ids)
    first = np.arange(size)
    return kernels.KernelParts(matrices, ids), covered, first[~np.isin(first, covered)]


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
