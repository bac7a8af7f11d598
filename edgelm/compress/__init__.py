"""Compression: recipes of typed steps applied to a model (`compress(model, [RTN(bits=4)])`)."""

from edgelm.compress.distill import QAT, BlackBoxDistill, DistillScales
from edgelm.compress.quant.anyprec import AnyPrecision, set_precision
from edgelm.compress.quant.mixed import MixedPrecision
from edgelm.compress.quant.rtn import RTN
from edgelm.compress.recipe import STEPS, Step, compress, parse_recipe

__all__ = ["compress", "parse_recipe", "Step", "STEPS", "RTN", "MixedPrecision", "AnyPrecision", "set_precision", "DistillScales", "QAT", "BlackBoxDistill"]
