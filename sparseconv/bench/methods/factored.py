"""Method ``factored``: the operator's factored engine -- a tap gather and one BLAS GEMM per group
(:mod:`sparseconv.factored`) for every product and the kernel gradient."""

from ._engine import engine_method

NAME = "factored"
RANK = 20
prepare = engine_method(NAME, "factored")
