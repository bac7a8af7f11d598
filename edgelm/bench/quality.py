"""Quality metrics. Perplexity follows llama-perplexity exactly, so numbers compare with llama.cpp's:

read the file as bytes (CRLF kept), drop one trailing newline, tokenize once with BOS, cut into
len // ctx non-overlapping chunks, put BOS at each chunk's first position, and score the tokens at
positions ctx/2 + 1 .. ctx - 1 with the logits of the positions before them. PPL = exp(mean NLL), with
llama.cpp's standard error.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgelm.errors import EdgelmError


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float  # standard error of the PPL estimate
    tokens_scored: int
    chunks: int
    ctx: int
    seconds: float
    chunk_ppls: list[float]
    # Against a reference model (the uncompressed one), on the same scored positions:
    reference_ppl: float | None = None
    kld: float | None = None  # mean KL(reference || model) of the next-token distributions
    top1_agreement: float | None = None  # fraction of positions where both pick the same top token

    def summary(self) -> str:
        text = (f"PPL = {self.ppl:.4f} +/- {self.stderr:.5f}  ({self.tokens_scored} tokens scored in "
                f"{self.chunks} chunks of {self.ctx}, {self.seconds:.1f} s)")
        if self.kld is not None:
            text += (f"\nreference PPL = {self.reference_ppl:.4f}, mean KLD = {self.kld:.5f}, "
                     f"same top token = {100 * self.top1_agreement:.2f} %")
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def read_eval_text(path: str | Path) -> bytes:
    """The evaluation text as llama-perplexity sees it: raw bytes minus one trailing newline."""
    path = Path(path)
    if not path.is_file():
        raise EdgelmError(f"{path}: no such file; pass the text file to evaluate with -f")
    data = path.read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


@torch.inference_mode()
def perplexity(model, tokens: list[int], ctx: int = 512, chunks: int | None = None,
               bos_id: int | None = None, progress: bool = True, reference=None) -> PerplexityResult:
    """Perplexity of a tokenized text, chunked as llama-perplexity does (see module docstring).

    With a reference model, also the mean KL divergence and top-token agreement against it, as
    llama-perplexity's --kl-divergence does.
    """
    if ctx < 4 or ctx % 2:
        raise EdgelmError(f"--ctx must be an even number >= 4, got {ctx}")
    if ctx > model.args.max_context:
        raise EdgelmError(f"--ctx {ctx} exceeds the model's context of {model.args.max_context}")
    available = len(tokens) // ctx
    if available == 0:
        raise EdgelmError(f"the text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}; "
                          "use a longer text or a smaller --ctx")
    n_chunks = available if chunks is None else min(chunks, available)
    if n_chunks <= 0:
        raise EdgelmError(f"--chunks must be >= 1, got {chunks}")

    first = ctx // 2
    all_tokens = torch.tensor(tokens[: n_chunks * ctx], dtype=torch.long).view(n_chunks, ctx)
    nll_sum, nll2_sum, count = 0.0, 0.0, 0
    ref_nll_sum, kld_sum, agree = 0.0, 0.0, 0
    chunk_ppls = []
    start = time.perf_counter()
    bar = _progress(n_chunks, progress)
    for i in range(n_chunks):
        chunk = all_tokens[i].clone()
        if bos_id is not None:
            chunk[0] = bos_id
        # Logits at positions first .. ctx-2 predict the tokens at first+1 .. ctx-1.
        logp = torch.log_softmax(model(chunk[None], logits_at=slice(first, ctx - 1))[0].float(), dim=-1)
        targets = chunk[first + 1:]
        nll = -logp.gather(1, targets[:, None])[:, 0].double()
        if reference is not None:
            ref_logp = torch.log_softmax(reference(chunk[None], logits_at=slice(first, ctx - 1))[0].float(), -1)
            ref_nll_sum -= float(ref_logp.gather(1, targets[:, None]).double().sum())
            kld_sum += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += nll.numel()
        chunk_ppls.append(math.exp(float(nll.mean())))
        if bar is not None:
            bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    mean = nll_sum / count
    variance = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    stderr = ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
    result = PerplexityResult(ppl, stderr, count, n_chunks, ctx, time.perf_counter() - start, chunk_ppls)
    if reference is not None:
        result.reference_ppl = math.exp(ref_nll_sum / count)
        result.kld = kld_sum / count
        result.top1_agreement = agree / count
    return result


def perplexity_of_file(model, tokenizer, path: str | Path, ctx: int = 512, chunks: int | None = None,
                       progress: bool = True, reference=None) -> PerplexityResult:
    tokens = tokenizer.encode(read_eval_text(path))  # BOS only where the model wants one, as llama.cpp
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return perplexity(model, tokens, ctx=ctx, chunks=chunks, bos_id=bos, progress=progress, reference=reference)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="perplexity", unit="chunk", dynamic_ncols=True)
