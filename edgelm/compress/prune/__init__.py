"""Pruning steps: weights set to exact zeros inside the dense layers (unstructured or N:M sparsity), or
whole channels, heads and blocks removed (structured: a smaller dense model)."""

from edgelm.compress.prune.common import prunable_linears, sparsity_of
from edgelm.compress.prune.magnitude import Magnitude
from edgelm.compress.prune.sparsegpt import SparseGPT
from edgelm.compress.prune.structured import StructuredPrune
from edgelm.compress.prune.wanda import Wanda

__all__ = ["Magnitude", "Wanda", "SparseGPT", "StructuredPrune", "sparsity_of", "prunable_linears"]
