"""Singular values and spectral norms of lowered layers: exact answers from the explicit matrix.

A convolution or pooling layer is the matrix ``W`` of shape ``(m, n) = (F * prod(out),
C * prod(in))``, so its singular values are a question for :mod:`scipy.sparse.linalg`:

- :func:`singular_values` returns the ``k`` largest or smallest singular values of a
  :class:`~sparseconv.conv.ConvOperator`, of anything with a ``.matrix`` (pooling operators),
  of a ``scipy.sparse`` matrix or array, a 2-D ndarray or a ``LinearOperator``; small
  operators take a dense SVD, large ones ARPACK (see :func:`singular_values` for the methods
  and why).
- :func:`spectral_norm` is the largest singular value to a requested relative accuracy.
- :func:`fft_singular_values` is the closed form of Sedghi, Gupta and Long (ICLR 2019) for
  circular padding at stride 1: *all* the singular values, from the kernel's DFT.
- :func:`network_lipschitz_bound` multiplies layer norms; :func:`composed_norm` is the exact
  norm of the composed linear maps, which shows how loose that product is.

Every function computes in float64, whatever the operator's dtype.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh, splu

from .geometry import IntOrTuple, conv_geometry, resolve_dtype

__all__ = [
    "DENSE_MAX_DIM",
    "DENSE_MAX_ENTRIES",
    "singular_values",
    "spectral_norm",
    "fft_singular_values",
    "network_lipschitz_bound",
    "composed_norm",
]

#: The dense path is taken (with ``method="auto"``) when ``min(m, n) <= DENSE_MAX_DIM`` and
#: ``m * n <= DENSE_MAX_ENTRIES``: the LAPACK SVD of such a matrix costs at most
#: ``m n min(m, n) <= 4e9`` flops and 64 MiB, well under a second here, and it returns every
#: singular value to full accuracy. Beyond that ARPACK, whose cost grows with ``nnz``, wins.
DENSE_MAX_DIM = 512
#: See :data:`DENSE_MAX_DIM`.
DENSE_MAX_ENTRIES = 1 << 23

# ARPACK's Lanczos basis size for the largest values: 40 vectors instead of scipy's default
# 20 cut restarts; on the 64->64 3x3 56x56 layer it saves 5-15% of the products (80 or 128
# save nothing more and cost more orthogonalisation).
_NCV_LARGEST = 40
# Matrices with fewer stored entries are multiplied on one thread: below this the product
# takes well under a millisecond and thread start-up would dominate.
_THREAD_MIN_NNZ = 1 << 20
# Shift of the shift-invert factorisation below zero, relative to ||G||_1 >= ||G||_2:
# keeps G + delta I positive definite (and factorisable) when W is rank deficient, while
# leaving the eigenvectors of every eigenvalue above delta untouched.
_SHIFT_RELATIVE = 1e-12

_WHICH = ("largest", "smallest")
_METHODS = ("auto", "dense", "eigsh")

# What the functions accept: a ConvOperator or anything with a sparse ``.matrix`` (pooling
# operators), a scipy.sparse matrix or array, a 2-D ndarray, or a LinearOperator.
Operand = object


# ---------------------------------------------------------------------- operands
def _worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _SparseProducts(LinearOperator):
    """``W @ X`` and ``W.T @ Y`` for a float64 CSR matrix, split by rows over threads.

    scipy's sparse products run on one core but release the GIL, so row blocks of equal
    ``nnz`` multiplied on parallel threads scale with the cores (1.75x on 2 cores for a
    110M-entry matrix). The blocks are views: no entry is copied. ``W.T @ Y`` is the sum over
    blocks of ``block.T @ Y[block rows]``, so no transposed copy is made either.
    """

    def __init__(self, matrix: sp.csr_array):
        super().__init__(dtype=np.dtype(np.float64), shape=matrix.shape)
        self.matrix = matrix
        workers = _worker_count() if matrix.nnz >= _THREAD_MIN_NNZ else 1
        targets = np.linspace(0, matrix.nnz, workers + 1)
        bounds = np.unique(np.searchsorted(matrix.indptr, targets).clip(0, matrix.shape[0]))
        bounds[0], bounds[-1] = 0, matrix.shape[0]
        self._blocks = []
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            e0, e1 = matrix.indptr[r0], matrix.indptr[r1]
            block = sp.csr_array((matrix.data[e0:e1], matrix.indices[e0:e1], matrix.indptr[r0:r1 + 1] - e0),
                                 shape=(int(r1 - r0), matrix.shape[1]))
            self._blocks.append((slice(int(r0), int(r1)), block))

    def _map(self, fn: Callable[[tuple[slice, sp.csr_array]], np.ndarray],
             items: list[tuple[slice, sp.csr_array]]) -> list[np.ndarray]:
        if len(items) == 1:
            return [fn(items[0])]
        with ThreadPoolExecutor(len(items)) as pool:
            return list(pool.map(fn, items))

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate(self._map(lambda b: b[1] @ x, self._blocks))

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        return sum(self._map(lambda b: b[1].T @ y[b[0]], self._blocks))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.ravel(x))

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self._rmatmat(np.ravel(y))


class _Float64Operator(LinearOperator):
    """A LinearOperator of another real dtype, seen in float64 so that ARPACK runs in double."""

    def __init__(self, op: LinearOperator):
        super().__init__(dtype=np.dtype(np.float64), shape=op.shape)
        self._op = op

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._op.matmat(x), dtype=np.float64)

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(self._op.rmatmat(y), dtype=np.float64)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._op.matvec(x), dtype=np.float64)

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(self._op.rmatvec(y), dtype=np.float64)


class _Chain(LinearOperator):
    """``A_L ... A_2 A_1``: the maps applied in list order, never multiplied out."""

    def __init__(self, ops: Sequence[LinearOperator]):
        super().__init__(dtype=np.dtype(np.float64), shape=(ops[-1].shape[0], ops[0].shape[1]))
        self._ops = list(ops)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        for op in self._ops:
            x = op.matmat(x)
        return x

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        for op in reversed(self._ops):
            y = op.rmatmat(y)
        return y

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(x.reshape(-1, 1)).ravel()

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self._rmatmat(y.reshape(-1, 1)).ravel()


def _check_real(dtype: np.dtype, name: str) -> None:
    if np.dtype(dtype).kind not in "biuf":
        raise TypeError(f"{name} must be real (bool, integer or float); got dtype {np.dtype(dtype)}")


def _operand(op: Operand, name: str) -> tuple[LinearOperator, Optional[sp.csr_array]]:
    """The float64 LinearOperator of ``op`` and, when ``op`` is explicit, its CSR matrix."""
    if isinstance(op, LinearOperator):
        _check_real(op.dtype if op.dtype is not None else np.float64, name)
        lin = op if np.dtype(op.dtype) == np.float64 else _Float64Operator(op)
        return lin, None
    if sp.issparse(op) or isinstance(op, np.ndarray):
        if op.ndim != 2:
            raise ValueError(f"{name} must be a matrix (2 axes); got shape {op.shape}")
        _check_real(op.dtype, name)
        # Shares the arrays of a float64 CSR input (a ConvOperator's matrix is not copied).
        matrix = sp.csr_array(op, dtype=np.float64)
        return _SparseProducts(matrix), matrix
    matrix = getattr(op, "matrix", None)
    if matrix is not None and (sp.issparse(matrix) or isinstance(matrix, np.ndarray)):
        return _operand(matrix, f"{name}.matrix")
    raise TypeError(
        f"{name} must be a ConvOperator, an object with a sparse .matrix (such as a PoolOperator), a "
        f"scipy.sparse matrix or array, a 2-D ndarray or a scipy LinearOperator; got {type(op).__name__}"
        + (" (max pooling is not linear: pass its selection_matrix(x) for a given batch)"
           if hasattr(op, "selection_matrix") else ""))


def _check_rtol(rtol: float) -> float:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.integer, np.floating)) or not 0 < rtol < 1:
        raise ValueError(f"rtol must be a number with 0 < rtol < 1; got {rtol!r}")
    return float(rtol)


# ---------------------------------------------------------------------- methods
def _dense_matrix(lin: LinearOperator, matrix: Optional[sp.csr_array]) -> np.ndarray:
    if matrix is not None:
        return matrix.toarray()
    m, n = lin.shape
    # Materialise through the cheaper side: n products with unit vectors, or m adjoint ones.
    return lin.matmat(np.eye(n)) if n <= m else lin.rmatmat(np.eye(m)).T


def _gram(lin: LinearOperator) -> LinearOperator:
    """``W^T W`` (n <= m) or ``W W^T`` (n > m) as an operator: the smaller Gram matrix."""
    m, n = lin.shape
    if n <= m:
        return LinearOperator((n, n), matvec=lambda v: lin.rmatvec(lin.matvec(v)),
                              matmat=lambda v: lin.rmatmat(lin.matmat(v)), dtype=np.float64)
    return LinearOperator((m, m), matvec=lambda v: lin.matvec(lin.rmatvec(v)),
                          matmat=lambda v: lin.matmat(lin.rmatmat(v)), dtype=np.float64)


def _ritz_values(lin: LinearOperator, basis: np.ndarray) -> np.ndarray:
    """Singular values of ``W`` restricted to the span of ``basis`` (a Gram eigenvector block).

    Computed from ``W`` itself, not from the Gram eigenvalues: an error ``e`` in a vector
    changes them by ``O(e^2)``, and they never square the condition number.
    """
    q, _ = np.linalg.qr(basis)
    m, n = lin.shape
    image = lin.matmat(q) if n <= m else lin.rmatmat(q)
    return np.linalg.svd(image, compute_uv=False)


def _dominant_eigenvectors(op: LinearOperator, k: int, tol: float, ncv: Optional[int] = None) -> np.ndarray:
    """Orthonormal eigenvectors of the ``k`` algebraically largest eigenvalues of a symmetric
    operator, repeated eigenvalues counted with their multiplicity.

    A single-vector Krylov method such as ARPACK's Lanczos sees one direction per eigenspace
    (the start vector's component), so it can return ``[a, b, c]`` when the spectrum starts
    ``[a, b, b, c]`` -- which every circular convolution's does, since ``omega`` and
    ``-omega`` give the same values. For ``k > 1`` the result is therefore verified: ARPACK
    runs again on the operator deflated by the vectors found, and a value it finds above the
    ``k``-th is merged in by Rayleigh-Ritz, until none is.
    """
    p = op.shape[0]
    # A fixed seed makes every result reproducible bit for bit.
    rng = np.random.default_rng(0)
    _, vectors = eigsh(op, k=k, which="LA", tol=tol, ncv=ncv, v0=rng.standard_normal(p))
    if k == 1:
        return vectors
    # Each round that merges a vector adds one direction of the wanted invariant subspace,
    # so k rounds suffice; the bound only guards against rounding noise looping forever.
    for _ in range(k):
        q, kth = _top_ritz_vectors(op, vectors, k)

        def deflated(v: np.ndarray) -> np.ndarray:
            # The operator on the complement of span(q), and kth on span(q): anything ARPACK
            # finds above kth is a direction the first run missed.
            c = q.T @ v
            w = op.matvec(v - q @ c)
            return w - q @ (q.T @ w) + kth * (q @ c)

        # A fresh start vector: the first one's component in a repeated eigenspace is exactly
        # the direction already found, so deflated it would see none of the others.
        start = deflated(rng.standard_normal(p))
        candidate, new = eigsh(LinearOperator((p, p), matvec=deflated, dtype=np.float64), k=1, which="LA",
                               tol=tol, ncv=ncv, v0=start)
        if candidate[0] <= kth + tol * abs(kth):
            return q
        vectors = np.hstack([q, new])
    return _top_ritz_vectors(op, vectors, k)[0]


def _top_ritz_vectors(op: LinearOperator, vectors: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Rayleigh-Ritz for a symmetric operator on span(vectors): the ``k`` top Ritz vectors
    (orthonormal) and the ``k``-th largest Ritz value."""
    q, _ = np.linalg.qr(vectors)
    values, rotation = np.linalg.eigh(q.T @ op.matmat(q))
    return q @ rotation[:, -k:], float(values[-k])


def _largest(lin: LinearOperator, k: int, rtol: float) -> np.ndarray:
    gram = _gram(lin)
    # ARPACK stops when the Ritz residual is below tol * theta; the eigenvalue theta = sigma^2
    # is then within that residual, so sigma is within tol / 2 relative: tol = 2 rtol.
    ncv = min(gram.shape[0], max(2 * k + 1, _NCV_LARGEST))
    return _ritz_values(lin, _dominant_eigenvectors(gram, k, 2 * rtol, ncv))


def _smallest(lin: LinearOperator, matrix: Optional[sp.csr_array], k: int, rtol: float) -> np.ndarray:
    m, n = lin.shape
    p = min(m, n)
    if matrix is None:
        # Nothing to factorise: plain Lanczos on -G, slow to converge at the bottom of the
        # spectrum but the only option without the matrix.
        return _ritz_values(lin, _dominant_eigenvectors(-_gram(lin), k, 2 * rtol))
    gram = (matrix.T @ matrix if n <= m else matrix @ matrix.T).tocsc()
    delta = _SHIFT_RELATIVE * float(abs(gram).sum(axis=0).max())
    lu = splu((gram + delta * sp.eye_array(p, format="csc")).tocsc(), permc_spec="MMD_AT_PLUS_A")
    # Shift-invert: the largest eigenvalues of (G + delta I)^-1 belong to the smallest of G,
    # and they are well separated, so Lanczos converges in a few dozen solves.
    inverse = LinearOperator((p, p), matvec=lu.solve, matmat=lu.solve, dtype=np.float64)
    return _ritz_values(lin, _dominant_eigenvectors(inverse, k, 2 * rtol))


# ---------------------------------------------------------------------- public API
def singular_values(op: Operand, k: int = 6, which: str = "largest", *, rtol: float = 1e-10,
                    method: str = "auto") -> np.ndarray:
    """The ``k`` largest or smallest singular values of a lowered layer or any linear map.

    Parameters
    ----------
    op : ConvOperator, object with ``.matrix``, sparse matrix/array, 2-D ndarray or LinearOperator
        ``W`` of shape ``(m, n)``; for a layer, ``(F * prod(out), C * prod(in))`` (the bias
        is not part of it).
    k : int, default 6
        How many; ``1 <= k <= min(m, n)``.
    which : {"largest", "smallest"}, default "largest"
        The smallest are the smallest of the ``min(m, n)`` singular values; the zeros
        contributed by the null space of a wide or tall matrix are not among them.
    rtol : float, default 1e-10
        Relative accuracy asked of the iterative method (the dense one is always exact to
        rounding).
    method : {"auto", "dense", "eigsh"}, default "auto"
        ``"auto"`` takes the dense SVD when ``min(m, n) <= DENSE_MAX_DIM`` and
        ``m n <= DENSE_MAX_ENTRIES``, or when ``k > min(m, n) / 2``, and ARPACK otherwise.

    Returns
    -------
    ndarray of shape (k,), float64
        Sorted in descending order (as :func:`numpy.linalg.svd`): with ``which="smallest"``
        the last entry is the smallest singular value.

    Raises
    ------
    TypeError
        If ``op`` is none of the accepted kinds, or complex.
    ValueError
        If ``k`` is out of range (the message names ``min(m, n)``), ``which``, ``method`` or
        ``rtol`` is invalid, or ``method="eigsh"`` is asked for ``k >= min(m, n)``.

    Notes
    -----
    The singular values of ``W`` are the square roots of the eigenvalues of the smaller
    Gram matrix ``G = W^T W`` (``n <= m``) or ``W W^T``; ARPACK (:func:`scipy.sparse.linalg.eigsh`)
    finds Gram eigenvectors, and the values returned are always the Rayleigh-Ritz values
    ``svd(W Q)`` of ``W`` itself on the orthonormalised eigenvectors ``Q``.

    - **largest**: Lanczos on ``G`` applied as ``W^T (W v)`` (two sparse products, split
      over the cores). ARPACK's test ``||G v - theta v|| <= tol theta`` with
      ``tol = 2 rtol`` bounds the relative error of ``sigma = sqrt(theta)`` by ``rtol``.
      Squaring is harmless at the top of the spectrum.
    - **smallest**: shift-invert Lanczos, factorising ``G + delta I`` once (sparse LU;
      ``delta = 1e-12 ||G||_1`` keeps it non-singular when ``W`` is rank deficient): the
      wanted eigenvalues become the dominant ones of the inverse and converge in a few dozen
      solves, where plain Lanczos needs thousands of products and
      ``svds(which="SM")`` was 60-100x slower in our trials. The eigenvalues of ``G`` are
      only accurate to about ``eps ||W||^2``, i.e. ``sigma_min`` to ``eps kappa^2 / 2``
      relative; the eigenvectors are far less sensitive, and the Rayleigh-Ritz values from
      ``W`` bring the error back to about ``eps kappa``, the dense SVD's. (On the test
      suite's layer with ``kappa = 1.3e6``: ``6e-6`` from the shift-invert eigenvalue,
      ``4e-5`` from a dense ``eigvalsh(W^T W)``, ``6e-11`` returned.) The factorisation's
      fill-in grows faster than ``nnz``: practical up to about ``1e5`` columns with a few
      channels. A ``LinearOperator`` cannot be factorised and gets plain Lanczos on ``-G``
      (slow).
    - **repeated values**: a single-vector Lanczos run sees one direction per eigenspace,
      and circular layers have pairs (``omega`` and ``-omega``); for ``k > 1`` the result
      is verified by ARPACK on ``G`` deflated by the vectors found (from a fresh start
      vector), and a value above the ``k``-th is merged in by Rayleigh-Ritz: one more
      ``k = 1`` run to confirm, plus one per missing copy.

    Examples
    --------
    >>> import numpy as np, sparseconv as sc
    >>> from sparseconv.spectral import singular_values
    >>> op = sc.ConvOperator(np.ones((1, 1, 2)), (1, 4))
    >>> singular_values(op, k=3).round(6)
    array([1.847759, 1.414214, 0.765367])
    """
    lin, matrix = _operand(op, "op")
    m, n = lin.shape
    p = min(m, n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int; got {k!r}")
    if not 1 <= k <= p:
        raise ValueError(f"k must be between 1 and min(m, n) = {p}, the number of singular values of "
                         f"this {m}x{n} operator; got k={k}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}; got {which!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    rtol = _check_rtol(rtol)
    k = int(k)
    if method == "auto":
        small = p <= DENSE_MAX_DIM and m * n <= DENSE_MAX_ENTRIES
        method = "dense" if small or 2 * k > p else "eigsh"
    if method == "dense":
        values = np.linalg.svd(_dense_matrix(lin, matrix), compute_uv=False)
        return values[:k] if which == "largest" else values[p - k:]
    if k >= p:
        raise ValueError(f"method='eigsh' (ARPACK) needs k < min(m, n) = {p}; got k={k}; use method='dense'")
    if matrix is not None and not np.any(matrix.data):
        return np.zeros(k)
    values = _largest(lin, k, rtol) if which == "largest" else _smallest(lin, matrix, k, rtol)
    return np.sort(values)[::-1]


def spectral_norm(op: Operand, rtol: float = 1e-6, *, method: str = "auto") -> float:
    """The largest singular value ``||W||_2``, to relative accuracy ``rtol``.

    Parameters
    ----------
    op : ConvOperator, object with ``.matrix``, sparse matrix/array, 2-D ndarray or LinearOperator
    rtol : float, default 1e-6
        ``0 < rtol < 1``.
    method : {"auto", "dense", "eigsh"}
        As in :func:`singular_values`.

    Returns
    -------
    float
        A Rayleigh-Ritz value, so never above the true norm (up to rounding).

    Notes
    -----
    ``||W||_2 = max_x ||W x|| / ||x||``, the layer's Lipschitz constant. See
    :func:`singular_values` for the method.

    Examples
    --------
    >>> import numpy as np, sparseconv as sc
    >>> from sparseconv.spectral import spectral_norm
    >>> round(spectral_norm(sc.ConvOperator(np.ones((1, 1, 3, 3)), (1, 8, 8), padding=1)), 6)
    8.290859
    """
    return float(singular_values(op, 1, "largest", rtol=rtol, method=method)[0])


def fft_singular_values(weight: np.ndarray, input_shape: tuple[int, ...], *, dilation: IntOrTuple = 1,
                        groups: int = 1) -> np.ndarray:
    """All singular values of a circular, stride-1, size-preserving convolution, by FFT.

    Parameters
    ----------
    weight : ndarray of shape (F, C // groups, *kernel)
        1, 2 or 3 kernel dimensions.
    input_shape : tuple of int
        ``(C, *in)``.
    dilation : int or tuple of int, default 1
    groups : int, default 1

    Returns
    -------
    ndarray of shape (prod(in) * min(F, C),), float64
        Sorted in descending order.

    Notes
    -----
    The operator is ``ConvOperator(weight, input_shape, padding="same",
    padding_mode="circular", dilation=dilation, groups=groups)``, and any circular
    stride-1 convolution whose output has the input's size (``p_lo + p_hi = d (k - 1)``):
    ``p_lo`` only shifts the output cyclically, which does not change singular values.

    Each (filter, channel) block is then circulant and diagonalised by the DFT on the
    ``in`` grid (Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers",
    ICLR 2019). With the kernel folded onto that grid,
    ``a[f, c, q] = sum_{t : t d = q (mod in)} w[f, c, t]`` (zero-padding when the dilated
    kernel fits, aliasing otherwise), and its DFT ``A(omega) = sum_q a[:, :, q]
    exp(-2 pi i <omega, q / in>)``, an ``F x C`` matrix per frequency ``omega``,

    .. math:: \\sigma(W) = \\bigcup_{\\omega} \\sigma(A(\\omega)),

    ``prod(in)`` SVDs of ``F x C`` matrices instead of one of ``F prod(in) x C prod(in)``.
    (Correlation gives ``A(-omega)`` up to a phase, the same set.) A grouped weight is
    expanded to its block-diagonal ``(F, C, *kernel)`` form first.

    Examples
    --------
    >>> import numpy as np
    >>> from sparseconv.spectral import fft_singular_values
    >>> fft_singular_values(np.array([[[1.0, 1.0]]]), (1, 4)).round(6)
    array([2.      , 1.414214, 1.414214, 0.      ])
    """
    weight = np.asarray(weight)
    resolve_dtype(weight, "weight")
    geom = conv_geometry(weight.shape, input_shape, padding="same", dilation=dilation, groups=groups,
                         padding_mode="circular")
    f, c, ng = geom.out_channels, geom.in_channels, geom.groups
    full = np.zeros((f, c, *geom.kernel_size))
    fg, cg = f // ng, c // ng
    for g in range(ng):
        full[g * fg:(g + 1) * fg, g * cg:(g + 1) * cg] = weight[g * fg:(g + 1) * fg]
    folded = np.zeros((f, c, *geom.in_size))
    taps = np.ix_(*[(np.arange(k) * d) % i for k, d, i in zip(geom.kernel_size, geom.dilation, geom.in_size)])
    # add.at, not assignment: taps that wrap onto the same position add up.
    np.add.at(folded, (slice(None), slice(None), *taps), full)
    spatial = tuple(range(2, 2 + geom.ndim))
    spectrum = np.moveaxis(np.fft.fftn(folded, axes=spatial), (0, 1), (-2, -1))
    return np.sort(np.linalg.svd(spectrum, compute_uv=False).ravel())[::-1]


def _check_ops(ops: Sequence[Operand], name: str) -> list[tuple[LinearOperator, Optional[sp.csr_array]]]:
    if isinstance(ops, (str, bytes)) or not isinstance(ops, Sequence):
        raise TypeError(f"{name} must be a list of operators; got {type(ops).__name__}")
    if len(ops) == 0:
        raise ValueError(f"{name} must hold at least one operator; got an empty list")
    return [_operand(op, f"{name}[{i}]") for i, op in enumerate(ops)]


def network_lipschitz_bound(ops: Sequence[Operand], rtol: float = 1e-6) -> float:
    """Product of the layers' spectral norms: an upper bound on the network's Lipschitz constant.

    Parameters
    ----------
    ops : list of ConvOperator, object with ``.matrix``, sparse matrix, ndarray or LinearOperator
        The linear layers, in any order (shapes need not chain).
    rtol : float, default 1e-6
        Relative accuracy of each norm; the product is accurate to about ``len(ops) * rtol``.

    Returns
    -------
    float

    Notes
    -----
    For ``f = W_L o phi o ... o phi o W_1`` with 1-Lipschitz nonlinearities ``phi`` (ReLU,
    tanh, max pooling over non-overlapping windows; average pooling is linear and belongs
    among the ``W_l``),

    .. math:: \\mathrm{Lip}(f) \\le \\prod_l \\|W_l\\|_2,

    biases do not count. Compare :func:`composed_norm` for how loose this is.
    """
    norms = [spectral_norm(lin if matrix is None else matrix, rtol)
             for lin, matrix in _check_ops(ops, "ops")]
    return float(np.prod(norms))


def composed_norm(ops: Sequence[Operand], rtol: float = 1e-6, *, method: str = "auto") -> float:
    """Spectral norm of the composed linear map ``W_L ... W_2 W_1`` itself, not a bound.

    Parameters
    ----------
    ops : list of ConvOperator, object with ``.matrix``, sparse matrix, ndarray or LinearOperator
        In application order: ``ops[0]`` acts first, so ``ops[i + 1]`` must have as many
        columns as ``ops[i]`` has rows.
    rtol : float, default 1e-6
        Relative accuracy.
    method : {"auto", "dense", "eigsh"}
        As in :func:`singular_values`; the dense path materialises the product.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If consecutive shapes do not chain, naming both operators and shapes.

    Notes
    -----
    ARPACK applies the product factor by factor (``W_L (... (W_1 x))``) and never multiplies
    it out: the product of sparse convolution matrices fills in (two 3x3 layers make a 5x5
    one with all channels mixed). By submultiplicativity
    ``||W_L ... W_1||_2 <= prod_l ||W_l||_2 =`` :func:`network_lipschitz_bound`; the ratio
    measures how much the product bound over-estimates the linear part of a network.
    """
    operands = _check_ops(ops, "ops")
    for i in range(1, len(operands)):
        prev, cur = operands[i - 1][0].shape, operands[i][0].shape
        if cur[1] != prev[0]:
            raise ValueError(
                f"ops[{i}] has shape {cur} and cannot follow ops[{i - 1}] of shape {prev}: it needs "
                f"{prev[0]} columns (ops are in application order, ops[0] first)")
    if len(operands) == 1:
        lin, matrix = operands[0]
        return spectral_norm(lin if matrix is None else matrix, rtol, method=method)
    return spectral_norm(_Chain([lin for lin, _ in operands]), rtol, method=method)
