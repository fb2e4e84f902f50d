"""A test-only engine: the dense matrix, built from the structure's tying map.

It shows what adding an engine takes (a module defining ``ENGINE`` plus one registry entry)
and checks that the operators use nothing but the protocol.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sparseconv.engines.base import Engine, Structure


class DenseEngine(Engine):
    name = "dense"
    built = []

    def __init__(self, structure: Structure) -> None:
        super().__init__(structure)
        self._dense: Optional[np.ndarray] = None

    @classmethod
    def applicable(cls, structure: Structure, product: str) -> bool:
        return structure.geometry.n_in * structure.geometry.n_out <= 10**6

    @classmethod
    def estimate_nbytes(cls, structure: Structure, product: str) -> int:
        return structure.geometry.n_in * structure.geometry.n_out * structure.dtype.itemsize

    def prepare(self, product: str) -> None:
        if self._dense is None:
            g = self.structure.geometry
            self.structure.reserve(self.estimate_nbytes(self.structure, product), "the dense matrix")
            self._dense = np.zeros((g.n_out, g.n_in), dtype=self.structure.dtype)
            DenseEngine.built.append(product)
            self.refresh(self.structure.weight)

    @property
    def nbytes(self) -> int:
        return 0 if self._dense is None else self._dense.nbytes

    def _entries(self):
        p = self.structure.pattern()
        rows = np.repeat(np.arange(p.shape[0]), np.diff(p.indptr))
        tying = p.tying if p.tying is not None else None
        return rows, p.indices, p.param_index, tying

    def refresh(self, weight: np.ndarray) -> None:
        if self._dense is None:
            return
        rows, cols, index, tying = self._entries()
        values = weight.reshape(-1)[index] if tying is None else tying @ weight.reshape(-1)
        self._dense[...] = 0
        self._dense[rows, cols] = values

    def matmat(self, X, threads):
        return self._dense.astype(X.dtype, copy=False) @ X

    def rmatmat(self, D, threads):
        return self._dense.T.astype(D.dtype, copy=False) @ D

    def weight_grad(self, X, D, threads):
        rows, cols, index, tying = self._entries()
        per_entry = np.einsum("in,in->i", D[rows].astype(np.float64), X[cols].astype(np.float64))
        n = self.structure.geometry.n_params
        grad = np.bincount(index, weights=per_entry, minlength=n) if tying is None else tying.T @ per_entry
        return self.structure.finish_grad(grad)


ENGINE = DenseEngine
