"""Generation: prefill -> decode_step -> generate_step (token ids) -> stream_generate (text) -> generate.

The layering follows MLX-LM: `generate_step` yields token ids and knows nothing about text,
`stream_generate` turns them into text increments that never split a UTF-8 character and applies stop
strings, `generate` collects the text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgelm.errors import GenerationError
from edgelm.runtime.engine import KernelEngine
from edgelm.runtime.sampling import Sampler, SamplingParams

if TYPE_CHECKING:  # PyTorch is imported by the functions that run PyTorch models, not by this module
    import torch

    from edgelm.models.base import Transformer

PREFILL_CHUNK = 256  # bounds the scratch memory of long prompts (512 costs ~6 MB more peak RSS, no faster)


def prefill(model: Transformer | KernelEngine, tokens: Sequence[int], start_pos: int = 0,
            chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run the prompt through the model (KV caches must be set up); logits of its last position."""
    if isinstance(model, KernelEngine):  # no PyTorch: numpy logits
        return model.prefill(tokens, start_pos)
    import torch

    from edgelm import kernels
    from edgelm.compress.quant.modules import batched_matmul_dtype

    if not tokens:
        raise GenerationError("the prompt is empty: give at least one token (models that add BOS do so)")
    model.restore_torch_threads()  # batched matmuls want every thread again
    device = model.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    logits = None
    with torch.inference_mode(), batched_matmul_dtype(kernels.batched_dtype()):
        for begin in range(0, len(tokens), chunk):
            part = ids[begin:begin + chunk]
            pos = torch.arange(start_pos + begin, start_pos + begin + len(part), device=device)
            logits = model(part[None], pos, logits_at=slice(-1, None))
    return _host_logits(logits[0, -1])


def _host_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the sampler takes them: float32 in host memory (a GPU model's come back from the device)."""
    import torch

    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits
    return logits.float().cpu()


def decode_step(model: Transformer | KernelEngine, token: int, pos: int) -> torch.Tensor:
    """One token in, next-token logits out (on the compiled step when the model can run there)."""
    return decode_steps(model, [token], pos)[0]


def decode_steps(model: Transformer | KernelEngine, tokens: list[int], pos: int):
    """Logits [T, vocab] after each of `tokens` (from position pos), as decoding them one by one computes
    them: the compiled step's batches are bit-identical to its single steps (speculative verification)."""
    if isinstance(model, KernelEngine):
        return model.steps(tokens, pos)
    import torch

    from edgelm.runtime.native import native_decoder

    with torch.inference_mode():
        native = native_decoder(model)
        if native is not None:
            return native.steps(tokens, pos)
        device = model.device
        logits = model(torch.tensor([tokens], device=device), torch.arange(pos, pos + len(tokens), device=device))
        return _host_logits(logits[0])


def check_lengths(prompt_tokens: int, max_tokens: int, context: int) -> None:
    if max_tokens < 0:
        raise GenerationError(f"max_tokens must be >= 0, got {max_tokens}")
    if prompt_tokens + max_tokens > context:
        raise GenerationError(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"model's context of {context}; shorten the prompt or lower max_tokens")


def generate_step(model: Transformer | KernelEngine, prompt: Sequence[int], sampler: Sampler | None = None,
                  max_tokens: int = 256, stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield generated token ids, one per step, until max_tokens (the caller stops at EOS). `model` is a
    PyTorch model or the kernels-only runtime (runtime/engine.py)."""
    check_lengths(len(prompt), max_tokens, model.args.max_context)
    sampler = sampler or Sampler()
    stats = stats if stats is not None else GenerationStats()
    total = len(prompt) + max_tokens
    for token in prompt:
        sampler.accept(token)
    model.setup_caches(total)
    try:
        start = time.perf_counter()
        logits = prefill(model, prompt)
        stats.prompt_tokens = len(prompt)
        stats.prompt_seconds = time.perf_counter() - start
        pos = len(prompt)
        for i in range(max_tokens):
            token = sampler.sample(logits)
            stats.generation_tokens = i + 1
            if i == 0:
                stats.first_token_seconds = time.perf_counter() - start
            yield token
            if i + 1 == max_tokens:
                break
            logits = decode_step(model, token, pos)
            pos += 1
        stats.generation_seconds = time.perf_counter() - start - stats.prompt_seconds
    finally:
        model.clear_caches()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    first_token_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        # The first token comes from the prefill; decode speed counts the steps after it.
        steps = self.generation_tokens - 1
        decode_seconds = self.generation_seconds - (self.first_token_seconds - self.prompt_seconds)
        return steps / decode_seconds if steps > 0 and decode_seconds > 0 else 0.0


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response
    token: int | None  # the token just generated (None for the final flush)
    finish_reason: str | None  # "stop" (EOS or stop string), "length", or None while running
    stats: GenerationStats


def stream_generate(model: Transformer | KernelEngine, tokenizer, prompt: str | Sequence[int], *,
                    max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                    add_bos: bool | None = None, draft: Transformer | KernelEngine | None = None,
                    num_draft: int = 3,
                    spec_stats=None, draft_vocab: int | None = None) -> Iterator[GenerationResponse]:
    """Yield text increments as tokens are generated; stops at EOS, a stop string, or max_tokens.

    With a `draft` model, tokens come from speculative decoding (runtime/speculative.py): the same
    distribution (greedy: the same text), fewer target steps; `spec_stats` collects its acceptance and
    `draft_vocab` bounds the token ids the draft scores (None: its default, 0: all)."""
    ids = tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
    stats = GenerationStats()
    if draft is not None:
        from edgelm.runtime.speculative import speculative_generate_step

        steps = speculative_generate_step(model, draft, ids, Sampler(sampling), max_tokens, num_draft, stats,
                                          spec_stats, draft_vocab)
    else:
        steps = generate_step(model, ids, Sampler(sampling), max_tokens, stats)
    detok = tokenizer.detokenizer()
    stops = [s for s in stop if s]
    pending = ""  # text held back because it might be the start of a stop string
    finish, stopped_by_string = "length", False
    for token in steps:
        if token in tokenizer.eos_ids:
            finish = "stop"
            break
        emit, pending, stopped_by_string = _split_at_stop(pending + detok.add(token), stops)
        if emit:
            yield GenerationResponse(emit, token, None, stats)
        if stopped_by_string:
            finish = "stop"
            break
    tail = ""
    if not stopped_by_string:  # flush held-back text and any incomplete UTF-8 bytes
        tail, _, _ = _split_at_stop(pending + detok.finalize(), stops, final=True)
    yield GenerationResponse(tail, None, finish, stats)


def _split_at_stop(text: str, stops: Sequence[str], final: bool = False) -> tuple[str, str, bool]:
    """(text safe to emit, text to hold back, whether a stop string was found)."""
    if not stops:
        return text, "", False
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if first >= 0:
        return text[:first], "", True
    if final:
        return text, "", False
    # Hold back the longest tail that is a prefix of some stop string.
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[:len(text) - hold], text[len(text) - hold:], False


def generate(model: Transformer | KernelEngine, tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole completion as a string (see stream_generate for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
