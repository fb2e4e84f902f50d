"""Method ``csr``: the operator held to its literal matrix -- scipy's CSR kernels for ``W @ x`` and
``W.T @ dy``, the kernel gradient as the per-entry scatter-add over the tying map."""

from ._engine import engine_method

NAME = "csr"
RANK = 10
prepare = engine_method(NAME, "csr")
