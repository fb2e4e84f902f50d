"""Method ``numba``: the compiled CSR engine (:mod:`sparseconv.engines.numba`, extra ``fast``) for
every product and the kernel gradient; skipped with the reason where numba is missing."""

from ._engine import engine_method

NAME = "numba"
RANK = 30
prepare = engine_method(NAME, "numba")
