"""Method ``implicit``: the compiled tap-list engine (:mod:`sparseconv.engines.implicit`, extra
``fast``), no matrix stored; skipped with the reason where numba is missing or the layer's
padding is not zeros."""

from ._engine import engine_method

NAME = "implicit"
RANK = 32
prepare = engine_method(NAME, "implicit")
