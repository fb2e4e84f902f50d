"""The one place sparseconv touches scipy's private sparse kernels.

:mod:`sparseconv.parallel` runs scipy's compiled CSR kernels (the ones behind ``A @ X`` and
``A.T @ X``) on row blocks of a matrix, writing each block's rows of a preallocated output in
place. Those kernels live in the private ``scipy.sparse._sparsetools``, whose names and
signatures scipy may change at any release. This shim imports them and checks, at import, that
they still compute what the public API computes on a small matrix with one and several
right-hand sides. If the import fails or any check disagrees, every kernel here is None and
the callers take the public path (a ``csr_array`` per block), which is slower but always right.

Attributes
----------
csr_matvec, csr_matvecs, csc_matvec, csc_matvecs : callable or None
    scipy's kernels, or None when unavailable.
available : bool
    True when the private kernels passed the check.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import scipy.sparse as sp

__all__ = ["available", "csr_matvec", "csr_matvecs", "csc_matvec", "csc_matvecs"]


def _self_check(kernels: tuple[Callable, Callable, Callable, Callable]) -> bool:
    """Whether the kernels agree with scipy's public products on a small rectangular matrix."""
    csr_mv, csr_mvs, csc_mv, csc_mvs = kernels
    a = sp.csr_array(np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 0.0, 5.0], [0.0, 0.0, 6.0]]))
    m, k = a.shape
    x = np.arange(1.0, 7.0).reshape(k, 2)
    y = np.arange(1.0, 9.0).reshape(m, 2)
    out = [np.zeros(m), np.zeros((m, 2)), np.zeros(k), np.zeros((k, 2))]
    csr_mv(m, k, a.indptr, a.indices, a.data, x[:, 0].copy(), out[0])
    csr_mvs(m, k, 2, a.indptr, a.indices, a.data, x.ravel(), out[1].reshape(-1))
    # A CSR matrix's arrays are the CSC arrays of its transpose.
    csc_mv(k, m, a.indptr, a.indices, a.data, y[:, 0].copy(), out[2])
    csc_mvs(k, m, 2, a.indptr, a.indices, a.data, y.ravel(), out[3].reshape(-1))
    want = [a @ x[:, 0], a @ x, a.T @ y[:, 0], a.T @ y]
    return all(np.array_equal(o, w) for o, w in zip(out, want))


def _load() -> tuple[Optional[Callable], Optional[Callable], Optional[Callable], Optional[Callable]]:
    try:
        from scipy.sparse._sparsetools import csc_matvec, csc_matvecs, csr_matvec, csr_matvecs
        kernels = (csr_matvec, csr_matvecs, csc_matvec, csc_matvecs)
        if _self_check(kernels):
            return kernels
    except Exception:  # noqa: BLE001 - any failure of a private API means: use the public one
        pass
    return None, None, None, None


csr_matvec, csr_matvecs, csc_matvec, csc_matvecs = _load()
available = csr_matvec is not None
