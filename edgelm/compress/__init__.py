"""Compression: recipes of typed steps applied to a model (`compress(model, [RTN(bits=4)])`).

Importing this package registers every step, so `parse_recipe` knows all methods by name.
"""

from edgelm.compress.distill import QAT, BlackBoxDistill, DistillScales, DistillWeights
from edgelm.compress.lowrank import SVD, LoRC
from edgelm.compress.prune import Magnitude, SparseGPT, StructuredPrune, Wanda
from edgelm.compress.quant.anyprec import AnyPrecision, set_precision
from edgelm.compress.quant.awq import AWQ
from edgelm.compress.quant.gptq import GPTQ
from edgelm.compress.quant.mixed import MixedPrecision
from edgelm.compress.quant.rtn import RTN
from edgelm.compress.quant.source import KeepSource
from edgelm.compress.recipe import STEPS, Step, compress, parse_recipe

__all__ = ["compress", "parse_recipe", "Step", "STEPS", "RTN", "GPTQ", "AWQ", "MixedPrecision", "AnyPrecision",
           "set_precision", "KeepSource", "DistillScales", "DistillWeights", "BlackBoxDistill", "QAT", "Magnitude", "Wanda", "SparseGPT", "StructuredPrune", "SVD",
           "LoRC"]
