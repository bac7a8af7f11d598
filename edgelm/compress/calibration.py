"""Calibration data and block-by-block execution for data-aware compression (GPTQ, AWQ, SparseGPT, ...).

Calibration text comes from a file (`--calib FILE`) or, with none, from the model itself (data-free:
sampled continuations of BOS). Never calibrate on the evaluation text.

`BlockRunner` runs the calibration samples through the model one transformer block at a time, so an
algorithm can observe a block's inputs, change the block, and pass the *changed* block's outputs on to the
next one — the sequential scheme GPTQ and AWQ use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgelm.errors import EdgelmError
from edgelm.models.base import Transformer, attention_mask, rope_cos_sin


@dataclass
class Calibration:
    """Token windows [n_samples, seq_len] used to observe activations."""

    tokens: torch.Tensor
    source: str
    sha256: str | None = None  # of the calibration file's bytes (None: self-generated)

    @property
    def n_samples(self) -> int:
        return self.tokens.shape[0]

    def record(self) -> dict:
        """What a model directory keeps about its calibration (so evaluation can refuse to flatter it)."""
        return {"source": self.source, "sha256": self.sha256, "samples": self.n_samples,
                "seq_len": int(self.tokens.shape[1])}


def calibration_from_file(tokenizer, path: str | Path, n_samples: int = 64, seq_len: int = 512,
                          seed: int = 0) -> Calibration:
    """Random windows of the tokenized file, each starting with BOS when the model uses one."""
    path = Path(path)
    if not path.is_file():
        raise EdgelmError(f"{path}: calibration file not found; pass a text file with --calib")
    data = path.read_bytes()
    ids = tokenizer.encode(data, add_bos=False)
    body = seq_len - 1 if tokenizer.add_bos else seq_len
    if len(ids) < body + 1:
        raise EdgelmError(f"{path}: {len(ids)} tokens, fewer than one calibration window of {seq_len}; "
                          "use a longer file or a smaller --calib-seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body, (n_samples,), generator=generator).tolist()
    rows = [([tokenizer.bos_id] if tokenizer.add_bos else []) + ids[s:s + body] for s in starts]
    return Calibration(torch.tensor(rows, dtype=torch.long), str(path), hashlib.sha256(data).hexdigest())


@torch.inference_mode()
def calibration_from_model(model: Transformer, tokenizer, n_samples: int = 16, seq_len: int = 256,
                           seed: int = 0, temperature: float = 1.0) -> Calibration:
    """Data-free calibration: the model's own samples, started from BOS (or a random first token)."""
    from edgelm.runtime.generate import generate_step
    from edgelm.runtime.sampling import Sampler, SamplingParams

    from edgelm.compress.recipe import progress

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in progress(range(n_samples), "calibration samples", "sample"):
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            prompt = [tokenizer.bos_id]
        else:
            prompt = [int(torch.randint(0, model.args.vocab_size, (1,), generator=generator))]
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=seed + i))
        out = list(generate_step(model, prompt, sampler, max_tokens=seq_len - len(prompt)))
        rows.append((prompt + out)[:seq_len])
    return Calibration(torch.tensor(rows, dtype=torch.long), "self-generated")


class BlockRunner:
    """Holds the hidden states of every calibration sample between blocks.

        runner = BlockRunner(model, calibration)
        for i, block in enumerate(model.layers):
            with capture_inputs(linears_of(block)) as seen:   # observe
                runner.run(i)                                  # inputs only, hidden states unchanged
            ... modify block ...
            runner.advance(i)                                  # outputs of the modified block
        final = runner.final_hidden()                          # normed inputs of the output head
    """

    def __init__(self, model: Transformer, calibration: Calibration, batch_size: int = 4):
        self.model, self.batch_size = model, batch_size
        tokens = calibration.tokens
        seq_len = tokens.shape[1]
        positions = torch.arange(seq_len)
        self.cos, self.sin = rope_cos_sin(positions, model.inv_freq)
        self.cos_l, self.sin_l = rope_cos_sin(positions, model.inv_freq_local)
        self.mask = attention_mask(positions, seq_len, None)
        self.mask_local = attention_mask(positions, seq_len, model.args.sliding_window)
        self.positions = positions
        with torch.inference_mode():
            hidden = model.tok_embeddings(tokens)
            if model.embed_scale is not None:
                hidden = hidden * model.embed_scale
        self.hidden = hidden.float()

    def _block_outputs(self, i: int) -> torch.Tensor:
        layer = self.model.layers[i]
        local = self.model.args.is_local(i)
        cos, sin = (self.cos_l, self.sin_l) if local else (self.cos, self.sin)
        mask = self.mask_local if local else self.mask
        outs = []
        with torch.inference_mode():
            for batch in self.hidden.split(self.batch_size):
                outs.append(layer(batch, cos, sin, mask, self.positions, batch.shape[1]))
        return torch.cat(outs)

    def run(self, i: int) -> torch.Tensor:
        """Run block i on the current hidden states (hooks observe its inputs); returns its outputs."""
        return self._block_outputs(i)

    def advance(self, i: int) -> None:
        """Replace the hidden states by block i's outputs (call after modifying the block)."""
        self.hidden = self._block_outputs(i)

    def final_hidden(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.norm(self.hidden)


class SharedGram:
    """Feeds layer inputs to their statistics; statistics built on XᵀX (Hessians) get one product per
    distinct input tensor, so q/k/v (and gate/up), which see the same input, share it."""

    def __init__(self, statistics: dict):
        self.statistics = statistics
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        stat = self.statistics[name]
        if not hasattr(stat, "add_gram"):
            stat.add(x)
            return
        # The last input is kept alive, so an equal data pointer, shape and stride means the very same tensor.
        if self._last is None or not _same_tensor(self._last[0], x):
            self._last = (x, x.T @ x)
        stat.add_gram(self._last[1], x.shape[0])


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


@contextmanager
def capture_inputs(modules: dict[str, nn.Module],
                   observe: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call observe(name, input [tokens, features]) for every forward of the named modules."""
    handles = []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            observe(name, args[0].detach().reshape(-1, args[0].shape[-1]).float())
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def linear_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The nn.Linear children of a block, by their name inside it."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
