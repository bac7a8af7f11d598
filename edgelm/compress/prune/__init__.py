"""Pruning steps: weights set to exact zeros inside the dense layers (unstructured or N:M sparsity)."""

from edgelm.compress.prune.common import prunable_linears, sparsity_of
from edgelm.compress.prune.magnitude import Magnitude
from edgelm.compress.prune.sparsegpt import SparseGPT
from edgelm.compress.prune.wanda import Wanda

__all__ = ["Magnitude", "Wanda", "SparseGPT", "sparsity_of", "prunable_linears"]
