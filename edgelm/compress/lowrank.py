"""Low-rank factorization (SVD) and low-rank compensation of quantization error (LoRC).

SVD replaces a Linear W [out, in] by two thin factors U [out, r] V [r, in] from its truncated SVD, the rank
chosen per layer by retained energy (the fraction of Σσ² kept). Data-free.

LoRC (Yao et al. 2023, ZeroQuant-V2) keeps a quantized layer and adds a rank-r correction of its error:
    E = W_float - Q(W),  E ≈ U V (truncated SVD),  y = Q(W) x + U (V x)
It needs the float weights the quantizer replaced: compress() keeps the uncompressed model while a recipe
that needs it runs, so LoRC goes after the quantizer in the same recipe:

    compress(model, [RTN(bits=3), LoRC(rank=8)])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.compress.quant.modules import QuantizedEmbedding, QuantizedLinear
from edgelm.compress.recipe import Step, progress, reference_model, replace_module, target_modules
from edgelm.errors import RecipeError

__all__ = ["SVD", "LoRC", "LowRankLinear", "LoRCLinear", "LoRCEmbedding", "truncated_factors", "rank_for_energy"]


# -- SVD helpers --------------------------------------------------------------------------------------------
def _svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(w.detach().float(), full_matrices=False)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least `energy` of Σσ²."""
    power = singular_values.double().pow(2)
    total = float(power.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(power, 0) / total
    # Tolerance so that energy=1.0 does not demand more than the numerically non-zero spectrum.
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def truncated_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U [out, r], V [r, in] with U V the best rank-r approximation of w; √σ goes to both sides so that
    neither factor has a large range (they may be stored in float16)."""
    return _factors_from_svd(*_svd(w), rank)


def _factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    # Row-major copies: LAPACK returns column-major factors, and a saved-and-loaded (row-major) model must
    # run the very same matmuls to give bit-identical outputs.
    return (u[:, :rank] * root).contiguous(), (root[:, None] * vh[:rank]).contiguous()


# -- modules ------------------------------------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """y = (x Vᵀ) Uᵀ + b: a Linear whose weight is stored as U [out, r] V [r, in]."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.U = nn.Parameter(U.detach().clone(memory_format=torch.contiguous_format))
        self.V = nn.Parameter(V.detach().clone(memory_format=torch.contiguous_format))
        self.out_features, self.rank = U.shape
        self.in_features = V.shape[1]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def empty(cls, out_features: int, in_features: int, rank: int, bias: bool,
              dtype: torch.dtype = torch.float32) -> LowRankLinear:
        """Placeholder of the right shapes, filled by load_state_dict (artifact loading)."""
        return cls(torch.empty(out_features, rank, dtype=dtype), torch.empty(rank, in_features, dtype=dtype),
                   torch.empty(out_features, dtype=dtype) if bias else None)

    @property
    def weight(self) -> torch.Tensor:
        """The dense product U V, for code that inspects layers (not a stored tensor)."""
        return self.U @ self.V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, rank={self.rank}, bias={self.bias is not None}"


class LoRCLinear(nn.Module):
    """A QuantizedLinear plus a float16 low-rank correction of its error: y = Q(W) x + U (V x)."""

    def __init__(self, quantized: QuantizedLinear, U: torch.Tensor, V: torch.Tensor):
        super().__init__()
        self.quantized = quantized
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.rank = U.shape[1]
        # Buffers, not parameters: they are stored bytes of the same weight, not extra weights.
        self.register_buffer("U", U.detach().to(torch.float16).clone(memory_format=torch.contiguous_format))
        self.register_buffer("V", V.detach().to(torch.float16).clone(memory_format=torch.contiguous_format))

    @property
    def weight(self) -> torch.Tensor:
        return self.quantized.weight + self.U.float() @ self.V.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x) + F.linear(F.linear(x, self.V.to(x.dtype)), self.U.to(x.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class LoRCEmbedding(nn.Module):
    """A QuantizedEmbedding plus a float16 low-rank correction; `.weight` (the tied output matrix) is
    compensated as well as the token lookup."""

    def __init__(self, quantized: QuantizedEmbedding, U: torch.Tensor, V: torch.Tensor):
        super().__init__()
        self.quantized = quantized
        self.num_embeddings, self.embedding_dim = quantized.num_embeddings, quantized.embedding_dim
        self.rank = U.shape[1]
        self.register_buffer("U", U.detach().to(torch.float16).clone(memory_format=torch.contiguous_format))
        self.register_buffer("V", V.detach().to(torch.float16).clone(memory_format=torch.contiguous_format))

    @property
    def weight(self) -> torch.Tensor:
        return self.quantized.weight + self.U.float() @ self.V.float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.quantized(ids)
        return rows + (self.U[ids.reshape(-1)].float() @ self.V.float()).reshape(rows.shape).to(rows.dtype)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.quantized.project(h) + F.linear(F.linear(h, self.V.to(h.dtype)), self.U.to(h.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


# -- steps --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SVD(Step):
    """Factorize each Linear by truncated SVD, keeping `energy` of Σσ²; layers that would not shrink stay
    dense. The embedding is never factorized (its lookup reads rows, the tied output needs it dense)."""

    name: ClassVar[str] = "svd"

    energy: float = 0.95
    max_rank_ratio: float | None = None  # cap: rank <= ratio * min(out, in)
    ignore: tuple[str, ...] = ()  # module-name globs left dense

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise RecipeError(f"svd: energy is the fraction of Σσ² kept, in (0, 1], got {self.energy}")
        if self.max_rank_ratio is not None and not 0.0 < self.max_rank_ratio <= 1.0:
            raise RecipeError(f"svd: max_rank_ratio must be in (0, 1] or null, got {self.max_rank_ratio}")

    def rank_for(self, singular_values: torch.Tensor, out_features: int, in_features: int) -> int | None:
        """Rank for a layer, or None to leave it dense (a factorization no smaller than the dense matrix)."""
        rank = max(rank_for_energy(singular_values, self.energy), 1)
        if self.max_rank_ratio is not None:
            rank = min(rank, max(1, int(self.max_rank_ratio * min(out_features, in_features))))
        if rank * (out_features + in_features) >= out_features * in_features:
            return None
        return rank

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        for name, module in progress(target_modules(model, embedding=False, ignore=self.ignore), "svd", "tensor"):
            u, s, vh = _svd(module.weight)
            rank = self.rank_for(s, module.out_features, module.in_features)
            if rank is None:
                continue
            U, V = _factors_from_svd(u, s, vh, rank)
            dtype = module.weight.dtype
            replace_module(model, name, LowRankLinear(U.to(dtype), V.to(dtype), module.bias))
        return model


@dataclass(frozen=True)
class LoRC(Step):
    """Low-rank compensation of the error of whichever quantizer ran before it in the same recipe."""

    name: ClassVar[str] = "lorc"
    needs_reference: ClassVar[bool] = True  # the float weights from before quantization

    rank: int = 8
    embedding: bool = False  # also compensate the quantized token embedding (the tied output matrix)
    ignore: tuple[str, ...] = ()  # module-name globs left uncompensated

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise RecipeError(f"lorc: rank must be a positive integer, got {self.rank}")

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        import fnmatch

        reference = reference_model(model, "lorc")
        kinds = (QuantizedLinear, QuantizedEmbedding) if self.embedding else (QuantizedLinear,)
        picked = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, kinds) and not any(fnmatch.fnmatchcase(name, p) for p in self.ignore)]
        if not picked:
            raise RecipeError("lorc found no quantized layers: put it after a quantization step, e.g. [rtn, lorc]")
        for name, module in progress(picked, "lorc", "tensor"):
            quantized_weight = module.weight_q.dequantize()
            before = reference.get_submodule(name)
            if not isinstance(before, (nn.Linear, nn.Embedding)):
                raise RecipeError("lorc compensates the error of a quantizer, so it needs the float weights from "
                                  "before quantization: put lorc after a quantization step in the same recipe, "
                                  "e.g. [rtn, lorc]")
            original = before.weight.detach().float()
            if original.shape != quantized_weight.shape:
                raise RecipeError(f"lorc: layer '{name}' changed shape since the recipe started; put lorc right "
                                  "after the quantization step")
            error = original - quantized_weight
            U, V = truncated_factors(error, min(self.rank, *error.shape))
            wrapper = LoRCEmbedding if isinstance(module, QuantizedEmbedding) else LoRCLinear
            replace_module(model, name, wrapper(module, U, V))
        return model
