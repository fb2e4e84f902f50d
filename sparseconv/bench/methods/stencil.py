"""Method ``stencil``: the compiled direct convolution of zero-padded, stride-1 image layers
(:mod:`sparseconv.engines.stencil`, extra ``fast``); skipped with the reason elsewhere."""

from ._engine import engine_method

NAME = "stencil"
RANK = 35
prepare = engine_method(NAME, "stencil")
