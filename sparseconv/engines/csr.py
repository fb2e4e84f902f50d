"""The ``"csr"`` engine: scipy's CSR kernels on the explicit tied-parameter matrix.

Products run on :func:`sparseconv.parallel.csr_matmat` / :func:`~sparseconv.parallel.csr_rmatmat`
(row blocks on sparseconv's thread pool, no transposed copy). The kernel gradient is the
literal definition: for each stored entry ``e`` the batch sum ``g[e] = sum_n D[row(e), n]
X[col(e), n]``, formed in bounded chunks of whole rows and scatter-added to the weight(s) ``e``
is tied to. Only stored entries are multiplied, so padding and masked weights never meet a
non-finite value (the rule PyTorch's convolutions follow).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from ..parallel import csr_matmat, csr_rmatmat
from .base import Engine, GuardedMatrix, Structure

__all__ = ["CsrEngine", "ENGINE", "GRAD_CHUNK_ELEMENTS"]

#: Elements of the (entries x batch) scratch of the kernel gradient: a few MB whatever the layer.
GRAD_CHUNK_ELEMENTS = 1 << 20


class CsrEngine(Engine):
    """Products with the explicit CSR matrix, built when first prepared.

    Parameters
    ----------
    structure : Structure
    """

    name = "csr"

    def __init__(self, structure: Structure) -> None:
        super().__init__(structure)
        self._matrix: Optional[GuardedMatrix] = None
        # float64 values of a float32 matrix, for float64 blocks (LinearOperator users such as
        # ARPACK): built at the first such product, charged to the budget, kept in sync.
        self._promoted: Optional[sp.csr_array] = None

    @classmethod
    def estimate_nbytes(cls, structure: Structure, product: str) -> int:
        return structure.pattern_nbytes()

    def prepare(self, product: str) -> None:
        if self._matrix is not None:
            return
        p = self.structure.pattern()
        # The layout's checks need scratch of up to one byte per entry: run them before the
        # values exist, so that the scratch stays under the finished matrix's peak.
        self.structure.value_layout()
        self._matrix = GuardedMatrix(np.empty(p.nnz, dtype=self.structure.dtype), p.indices, p.indptr, p.shape)
        self.refresh(self.structure.weight)

    @property
    def nbytes(self) -> int:
        promoted = 0 if self._promoted is None else self._promoted.data.nbytes
        return promoted + (0 if self._matrix is None else self._matrix.nbytes)

    def _in_dtype(self, dtype: np.dtype) -> sp.csr_array:
        """The private matrix with values in ``dtype`` (the structure's, or float64)."""
        m = self.private
        if dtype == m.dtype:
            return m
        if self._promoted is None:
            self.structure.reserve(m.nnz * np.dtype(dtype).itemsize, "a float64 copy of the matrix values")
            self._promoted = sp.csr_array((m.data.astype(dtype), m.indices, m.indptr), shape=m.shape)
        return self._promoted

    @property
    def matrix(self) -> sp.csr_array:
        """The public, read-only view of the matrix (built on first access)."""
        self.prepare("forward")
        return self._matrix.public()

    @property
    def private(self) -> sp.csr_array:
        """The matrix the products read (never handed out)."""
        self.prepare("forward")
        return self._matrix.private

    def hand_over(self) -> sp.csr_array:
        """The matrix with writeable arrays, for an owner about to be discarded (no copy)."""
        self.prepare("forward")
        matrix, self._matrix = self._matrix.hand_over(), None
        return matrix

    def check(self) -> None:
        if self._matrix is not None:
            self._matrix.check()

    def release(self) -> None:
        """Detach the public matrix (see :meth:`GuardedMatrix.detach`)."""
        if self._matrix is not None:
            self._matrix.detach()

    def refresh(self, weight: np.ndarray) -> None:
        """Write the value array from the weight.

        Rows of output positions whose taps fall on the input the same way repeat one row per
        filter (see :class:`~sparseconv.pattern.ValueLayout`), so most layers are written as a
        few strided broadcasts at the speed of a copy; the others by a gather through the tying
        map.
        """
        if self._matrix is None:
            return
        data = self._matrix.writer
        layout = self.structure.value_layout()
        p = self.structure.pattern()
        if layout is not None:
            layout.write(weight, data)
        elif p.param_index is not None:
            # Indices are in range, so any mode gives the same values; "wrap" is numpy's
            # fastest (no buffered copy as for "raise", no per-element clamp as for "clip").
            np.take(weight.reshape(-1), p.param_index, out=data, mode="wrap")
        else:
            data[...] = p.tying @ weight.reshape(-1)
        if self._promoted is not None:
            self._promoted.data[...] = data

    def matmat(self, X: np.ndarray, threads: Optional[int]) -> np.ndarray:
        return csr_matmat(self._in_dtype(X.dtype), X, threads=threads)

    def rmatmat(self, D: np.ndarray, threads: Optional[int]) -> np.ndarray:
        return csr_rmatmat(self._in_dtype(D.dtype), D, threads=threads)

    def weight_grad(self, X: np.ndarray, D: np.ndarray, threads: Optional[int]) -> np.ndarray:
        m = self.private
        p = self.structure.pattern()
        xt = np.ascontiguousarray(X)
        dt = np.ascontiguousarray(D)
        indptr, indices = m.indptr, m.indices
        n_rows = m.shape[0]
        chunk = max(1, GRAD_CHUNK_ELEMENTS // X.shape[1])
        grad = np.zeros(self.structure.geometry.n_params, dtype=np.float64)
        r0 = 0
        while r0 < n_rows:
            # Whole rows per chunk: the last row whose entries still fit (at least one row).
            r1 = max(r0 + 1, int(np.searchsorted(indptr, indptr[r0] + chunk, side="right")) - 1)
            r1 = min(r1, n_rows)
            e0, e1 = int(indptr[r0]), int(indptr[r1])
            rows = np.repeat(np.arange(r0, r1), np.diff(indptr[r0:r1 + 1]))
            g = np.einsum("ij,ij->i", dt[rows], xt[indices[e0:e1]])
            if p.param_index is not None:
                grad += np.bincount(p.param_index[e0:e1], weights=g, minlength=grad.size)
            else:
                grad += p.tying[e0:e1].T @ g
            r0 = r1
        return self.structure.finish_grad(grad)


ENGINE = CsrEngine
