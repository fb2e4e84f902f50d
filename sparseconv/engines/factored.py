"""The ``"factored"`` engine: tap gathers and one BLAS GEMM per group (:mod:`sparseconv.factored`).

The mathematics (the factorisation ``W = (I ⊗ B) S``, the tap tables, chunking) lives in
:mod:`sparseconv.factored`; this module adapts it to the engine protocol: column blocks
``(size, N)`` in, column blocks out, tables from the shared :class:`~sparseconv.engines.base.Structure`.

Non-finite values: the gathers multiply padding taps and masked weights as explicit zeros, so
``0 * inf`` gives NaN at outputs where such a tap meets a non-finite weight or input, where
the ``"csr"`` engine (which multiplies stored entries only) and PyTorch give a finite value.
For finite weights and inputs both engines agree to rounding.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..factored import adjoint_taps, forward_taps, weight_grad_taps
from .base import Engine, Structure

__all__ = ["FactoredEngine", "ENGINE"]


class FactoredEngine(Engine):
    """Products through the tap tables: a gather, then a GEMM.

    Parameters
    ----------
    structure : Structure
    """

    name = "factored"

    @classmethod
    def estimate_nbytes(cls, structure: Structure, product: str) -> int:
        extra = structure.adjoint_tables_nbytes() if product == "adjoint" else 0
        return structure.forward_table_nbytes() + extra

    def prepare(self, product: str) -> None:
        self.structure.forward_table()
        if product == "adjoint":
            self.structure.adjoint_tables()

    def _channels(self, a: np.ndarray, channels: int) -> np.ndarray:
        """Columns ``(channels * positions, N)`` as the ``(N, channels, positions)`` batch view."""
        return a.T.reshape(a.shape[1], channels, -1)

    def matmat(self, X: np.ndarray, threads: Optional[int]) -> np.ndarray:
        s = self.structure
        g = s.geometry
        z = forward_taps(self._channels(X, g.in_channels), s.kernel(X.dtype), g, s.forward_table(), threads)
        return z.reshape(X.shape[1], -1).T

    def rmatmat(self, D: np.ndarray, threads: Optional[int]) -> np.ndarray:
        s = self.structure
        g = s.geometry
        dx = adjoint_taps(self._channels(D, g.out_channels), s.kernel(D.dtype), g, s.forward_table(),
                          s.adjoint_tables(), threads)
        return dx.reshape(D.shape[1], -1).T

    def weight_grad(self, X: np.ndarray, D: np.ndarray, threads: Optional[int]) -> np.ndarray:
        s = self.structure
        g = s.geometry
        grad = weight_grad_taps(self._channels(X, g.in_channels), self._channels(D, g.out_channels), g,
                                s.forward_table(), threads)
        return s.finish_grad(grad)


ENGINE = FactoredEngine
