"""Singular values and spectral norms of lowered layers and of any linear map.

A convolution or pooling layer is the matrix ``W`` of shape ``(m, n) = (F * prod(out),
C * prod(in))``, so its singular values are a question for LAPACK and :mod:`scipy.sparse.linalg`:

- :func:`singular_values` returns the ``k`` largest or smallest singular values of anything
  :func:`scipy.sparse.linalg.aslinearoperator` accepts (a ``LinearOperator``, a
  ``scipy.sparse`` matrix or array, a 2-D ndarray), of sparseconv's operators and of any object
  with ``as_linear_operator()``; operators whose dense SVD is cheap take it, the others ARPACK
  (see :func:`singular_values` for the methods and why).
- :func:`spectral_norm` is the largest singular value to a requested relative accuracy.
- :func:`fft_singular_values` is the closed form of Sedghi, Gupta and Long (ICLR 2019) for
  circular padding at stride 1: *all* the singular values, from the kernel's DFT.
- :func:`network_lipschitz_bound` multiplies layer norms; :func:`composed_norm` is the exact
  norm of the composed linear maps, which shows how loose that product is.

Every function computes in float64, whatever the operator's dtype, and refuses an operator
whose values or products are not finite. Threaded sparse products run on the one thread pool
of :mod:`sparseconv.parallel` (its :func:`~sparseconv.parallel.threads` setting applies).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, aslinearoperator, eigsh, splu

from .geometry import IntOrTuple, conv_geometry, resolve_dtype
from .parallel import csr_matmat, csr_rmatmat

__all__ = [
    "DENSE_MAX_WORK",
    "DENSE_MAX_ENTRIES",
    "singular_values",
    "spectral_norm",
    "fft_singular_values",
    "network_lipschitz_bound",
    "composed_norm",
]

#: ``method="auto"`` takes the dense LAPACK SVD when its work ``min(m, n)**2 * max(m, n)`` is
#: at most this (about half a second here: a 676 x 1248 operator, 5.7e8, takes 0.13 s) and
#: the matrix fits :data:`DENSE_MAX_ENTRIES`. It returns every singular value to full
#: accuracy, repeated ones included, where ARPACK's cost grows with ``k`` and the restarts.
DENSE_MAX_WORK = 2e9
#: Largest ``m * n`` materialised for a dense SVD (256 MiB of float64), also with
#: ``method="auto"`` when ``k > min(m, n) / 2``, where ARPACK has no advantage.
DENSE_MAX_ENTRIES = 1 << 25

# ARPACK's Lanczos basis size for the largest values: 40 vectors instead of scipy's default
# 20 cut restarts; on the 64->64 3x3 56x56 layer it saves 5-15% of the products (80 or 128
# save nothing more and cost more orthogonalisation).
_NCV_LARGEST = 40
# Shift of the shift-invert factorisation below zero, relative to ||G||_1 >= ||G||_2:
# keeps G + delta I positive definite (and factorisable) when W is rank deficient, while
# leaving the eigenvectors of every eigenvalue above delta untouched.
_SHIFT_RELATIVE = 1e-12
# Operators whose largest entry (or probed gain) is outside [2^-_SCALE_EXP, 2^_SCALE_EXP] are
# scaled by a power of two (exact) before the Gram products, which square magnitudes and would
# otherwise underflow to zero or overflow to inf.
_SCALE_EXP = 200
# Rounds of ARPACK runs (each deflated by the vectors accepted so far) before giving up, and
# unconverged final checks in a row before giving up.
_MAX_ROUNDS = 64
_MAX_STALLS = 3

_WHICH = ("largest", "smallest")
_METHODS = ("auto", "dense", "eigsh")

# What the functions accept: see _operand.
Operand = object


# ---------------------------------------------------------------------- operands
class _CsrProducts(LinearOperator):
    """``W @ X`` and ``W.T @ Y`` for a float64 CSR matrix, row blocks on sparseconv's thread pool.

    :func:`~sparseconv.parallel.csr_matmat` splits the rows over the threads of
    :func:`~sparseconv.parallel.get_threads` (scipy's kernels release the GIL), and
    :func:`~sparseconv.parallel.csr_rmatmat` forms ``W.T @ Y`` without a transposed copy.
    """

    def __init__(self, matrix: sp.csr_array):
        super().__init__(dtype=np.dtype(np.float64), shape=matrix.shape)
        self.matrix = matrix

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return csr_matmat(self.matrix, x)

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        return csr_rmatmat(self.matrix, y)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return csr_matmat(self.matrix, np.ravel(x))

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return csr_rmatmat(self.matrix, np.ravel(y))


class _CheckedProducts(LinearOperator):
    """Another LinearOperator seen in float64, divided by ``scale``, every product checked finite.

    A non-finite product of a finite vector means non-finite values in the operator (or an
    overflow): it is refused here, before ARPACK or LAPACK turn it into noise.
    """

    def __init__(self, op: LinearOperator, name: str, scale: float = 1.0):
        super().__init__(dtype=np.dtype(np.float64), shape=op.shape)
        self._op, self._name, self._inverse_scale = op, name, 1.0 / scale

    def _checked(self, y: object, product: str) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self._inverse_scale != 1.0:
            y = y * self._inverse_scale
        if not np.all(np.isfinite(y)):
            raise ValueError(f"{self._name} gave a non-finite (NaN or inf) product {product} for a finite input: "
                             f"its values must be finite (singular values of such an operator are undefined)")
        return y

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return self._checked(self._op.matmat(x), "W @ x")

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        return self._checked(self._op.rmatmat(y), "W.T @ y")

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._checked(self._op.matvec(x), "W @ x")

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self._checked(self._op.rmatvec(y), "W.T @ y")


@dataclass
class _Operand:
    """An operand reduced to what the methods need.

    ``W = scale * lin``; ``scale`` is a power of two (so the division is exact) that brings the
    operator's magnitude near 1. ``matrix()`` returns ``W / scale`` as a float64 CSR matrix when
    one is available (built on demand: a sparseconv operator may build it lazily), else None.
    """

    lin: LinearOperator
    scale: float
    zero: bool
    matrix: Callable[[], Optional[sp.csr_array]]


def _check_real(dtype: object, name: str) -> None:
    if dtype is None or np.dtype(dtype).kind not in "biuf":
        raise TypeError(f"{name} must be real (bool, integer or float); got dtype {dtype}")


def _power_of_two_scale(magnitude: float) -> float:
    """1.0, or the power of two nearest ``magnitude`` when it is outside ``2^+-_SCALE_EXP``."""
    if magnitude == 0 or 2.0 ** -_SCALE_EXP <= magnitude <= 2.0 ** _SCALE_EXP:
        return 1.0
    return float(np.ldexp(1.0, int(np.round(np.log2(magnitude)))))


def _csr(a: object, name: str) -> sp.csr_array:
    """A 2-D sparse matrix or ndarray as a finite float64 CSR array (a float64 CSR is shared)."""
    if a.ndim != 2:
        raise ValueError(f"{name} must be a matrix (2 axes); got shape {a.shape}")
    _check_real(a.dtype, name)
    matrix = sp.csr_array(a, dtype=np.float64)
    if not np.all(np.isfinite(matrix.data)):
        raise ValueError(f"{name} holds non-finite values (NaN or inf); singular values of such a matrix are "
                         f"undefined")
    return matrix


def _from_matrix(a: object, name: str) -> _Operand:
    matrix = _csr(a, name)
    peak = float(np.max(np.abs(matrix.data))) if matrix.nnz else 0.0
    scale = _power_of_two_scale(peak)
    if scale != 1.0:
        matrix = matrix * (1.0 / scale)
    return _Operand(_CsrProducts(matrix), scale, peak == 0, lambda: matrix)


def _has_matrix(op: object) -> bool:
    """Whether ``op`` offers a sparse ``.matrix`` -- asked without building a lazy one."""
    if "matrix" in getattr(op, "__dict__", {}):
        return True
    return isinstance(getattr(type(op), "matrix", None), (property, functools.cached_property))


def _from_linear_operator(op: LinearOperator, name: str, matrix_source: Optional[Callable[[], object]] = None,
                          scale: float = 1.0) -> _Operand:
    """Probe ``op`` once each way (finite? zero? magnitude? is there an adjoint?) and wrap it."""
    _check_real(op.dtype, name)
    m, n = op.shape
    rng = np.random.default_rng(0)
    probe = _CheckedProducts(op, name)
    try:
        forward = probe.matvec(rng.standard_normal(n))
        backward = probe.rmatvec(rng.standard_normal(m))
    except NotImplementedError as exc:
        raise TypeError(f"{name} must define both products, W @ x and the adjoint W.T @ y (rmatvec); "
                        f"{type(op).__name__} does not: {exc}") from None
    # The largest entry, not a norm: a norm of 1e200-sized entries overflows.
    gain = float(max(np.max(np.abs(forward), initial=0.0), np.max(np.abs(backward), initial=0.0)))
    # A nonzero operator maps a random Gaussian vector to zero with probability zero.
    zero = not np.any(forward) and not np.any(backward)
    local = _power_of_two_scale(gain)

    def matrix() -> Optional[sp.csr_array]:
        if matrix_source is None:
            return None
        explicit = _csr(matrix_source(), f"{name}.matrix")
        return explicit * (1.0 / local) if local != 1.0 else explicit

    return _Operand(_CheckedProducts(op, name, local), scale * local, zero, matrix)


def _operand(op: Operand, name: str) -> _Operand:
    """Anything accepted, as an :class:`_Operand` (raises naming ``name`` otherwise)."""
    if sp.issparse(op) or isinstance(op, np.ndarray):
        return _from_matrix(op, name)
    if isinstance(op, LinearOperator):
        if _has_matrix(op) and np.dtype(op.dtype) != np.float64:
            # Its own products would run in its lower precision; the matrix's values are exact
            # in float64.
            return _from_matrix(op.matrix, f"{name}.matrix")
        return _from_linear_operator(op, name, (lambda: op.matrix) if _has_matrix(op) else None)
    if _has_matrix(op) and (sp.issparse(op.matrix) or isinstance(op.matrix, np.ndarray)):
        return _from_matrix(op.matrix, f"{name}.matrix")
    if callable(getattr(op, "as_linear_operator", None)):
        return _operand(aslinearoperator(op.as_linear_operator()), f"{name}.as_linear_operator()")
    if hasattr(op, "shape") and hasattr(op, "matvec"):
        return _operand(aslinearoperator(op), name)
    raise TypeError(
        f"{name} must be a scipy LinearOperator, a scipy.sparse matrix or array, a 2-D ndarray, a sparseconv "
        f"operator or an object with as_linear_operator(); got {type(op).__name__}"
        + (" (max pooling is not linear: pass its selection_matrix(x) for a given batch)"
           if hasattr(op, "selection_matrix") else ""))


# ---------------------------------------------------------------------- arguments
def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int; got {k!r} of type {type(k).__name__}")
    return int(k)


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}; got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def _check_rtol(rtol: object) -> float:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.integer, np.floating)):
        raise TypeError(f"rtol must be a number with 0 < rtol < 1; got {rtol!r} of type {type(rtol).__name__}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be a number with 0 < rtol < 1; got {rtol!r}")
    return float(rtol)


def _dense_fits(m: int, n: int) -> bool:
    return min(m, n) ** 2 * max(m, n) <= DENSE_MAX_WORK and m * n <= DENSE_MAX_ENTRIES


# ---------------------------------------------------------------------- methods
def _tall(operand: _Operand) -> LinearOperator:
    """``W`` (``n <= m``) or ``W^T``: the side whose Gram matrix ``A^T A`` is the smaller one."""
    m, n = operand.lin.shape
    return operand.lin if n <= m else operand.lin.H


def _dense_values(operand: _Operand) -> np.ndarray:
    """Every singular value of ``W / scale`` by LAPACK, descending."""
    matrix = operand.matrix()
    if matrix is not None:
        dense = matrix.toarray()
    else:
        a = _tall(operand)
        # Materialised through the cheaper side: p = min(m, n) products with unit vectors.
        dense = a.matmat(np.eye(a.shape[1]))
    return np.linalg.svd(dense, compute_uv=False)


def _ritz(a: LinearOperator, q: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rayleigh-Ritz for ``A`` (``r x p``, ``p <= r``) on the span of the orthonormal ``q``.

    Returns the Ritz values ``svd(A q)`` (singular values of ``A`` itself, so the condition
    number is not squared), the Ritz vectors and their Gram residuals ``||A^T A v - s^2 v||``,
    wanted end first.
    """
    image = a.matmat(q)
    _, values, vh = np.linalg.svd(image, full_matrices=False)
    vectors = q @ vh.T
    residuals = np.linalg.norm(a.rmatmat(image @ vh.T) - vectors * values ** 2, axis=0)
    order = slice(None) if which == "largest" else slice(None, None, -1)
    return values[order], vectors[:, order], residuals[order]


def _arpack(solver: LinearOperator, basis: np.ndarray, want: int, tol: float, ncv_min: int,
            rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Eigenvectors of the ``want`` largest eigenvalues of ``solver`` on the orthogonal
    complement of ``basis`` (orthonormal columns), as far as ARPACK gets, and whether it
    converged."""
    p = solver.shape[0]

    def project(x: np.ndarray) -> np.ndarray:
        return x - basis @ (basis.T @ x) if basis.shape[1] else x

    def deflated(x: np.ndarray) -> np.ndarray:
        x = project(x)
        return project(solver.matmat(x) if x.ndim == 2 else solver.matvec(x))

    op = LinearOperator((p, p), matvec=deflated, matmat=deflated, dtype=np.float64)
    start = project(rng.standard_normal(p))
    try:
        _, vectors = eigsh(op, k=want, which="LA", tol=tol, ncv=min(p, max(2 * want + 1, ncv_min)), v0=start)
    except ArpackNoConvergence as exc:
        return project(np.asarray(exc.eigenvectors).reshape(p, -1)), False
    except ArpackError:
        # ARPACK stops when the operator is zero on the complement ("starting vector is zero"):
        # then every vector there is an eigenvector, and random ones serve.
        vectors = rng.standard_normal((p, want))
    return project(np.asarray(vectors).reshape(p, -1)), True


def _extend(basis: np.ndarray, found: np.ndarray) -> np.ndarray:
    """``basis`` (orthonormal) extended by an orthonormal basis of ``found`` (already orthogonal
    to it), numerically dependent columns dropped."""
    if found.shape[1] == 0:
        return basis
    # A second projection: one Gram-Schmidt pass leaves O(eps kappa) components along basis.
    q, r = np.linalg.qr(found - basis @ (basis.T @ found))
    diagonal = np.abs(np.diag(r))
    keep = diagonal > diagonal.max() * found.shape[0] * np.finfo(np.float64).eps
    return np.hstack([basis, q[:, keep]])


def _iterative_values(a: LinearOperator, solver: LinearOperator, k: int, which: str, rtol: float,
                      gram_norm: Optional[float], ncv_min: int) -> np.ndarray:
    """The ``k`` wanted singular values of ``A`` (``r x p``, ``p <= r``) from ARPACK on ``solver``,
    an operator whose largest eigenvalues belong to the wanted Gram eigenvectors.

    ARPACK runs in rounds. After each, the Ritz vectors of ``A`` on everything found so far are
    ranked, and those of the ``k`` best whose Gram residual is below
    ``4 rtol ||A||^2`` are *accepted*; the next run works on the complement of the accepted
    vectors (deflation). This recovers what one run misses: copies of a repeated value (one
    Lanczos start vector sees one direction per eigenspace) and the vectors a shift-invert
    solve swamps with rounding error along a null space. Once ``k`` are accepted, one more run
    on the complement must find nothing better than the values accepted (for ``k > 1``: the
    largest value alone cannot be missed). ``gram_norm`` is ``||A||^2`` (to about 1%); None
    takes the largest Ritz value found, for the largest values, where it is that.
    """
    p = a.shape[1]
    rng = np.random.default_rng(0)
    # ARPACK's test bounds a converged vector's Gram residual by about tol ||G|| (the largest
    # values: tol theta; shift-invert: ||G + delta I|| tol / theta * theta); accepting at 4x
    # that leaves room for the estimate of ||G|| and rounding, and still rejects the vectors
    # a solve has buried in rounding error (residuals of 1e-4 ||G|| and more).
    tol = rtol
    relative = max(rtol, 1e3 * np.finfo(np.float64).eps)
    accepted = np.zeros((p, 0))
    values = None
    stalls = 0
    for _ in range(_MAX_ROUNDS):
        verifying = accepted.shape[1] == k
        found, converged = _arpack(solver, accepted, max(k - accepted.shape[1], 1), tol, ncv_min, rng)
        ritz, vectors, residuals = _ritz(a, _extend(accepted, found), which)
        if ritz.size < k:
            continue
        norm = gram_norm if gram_norm is not None else float(ritz[0]) ** 2
        accept, floor = 4 * relative * norm, relative * np.sqrt(norm)
        if verifying:
            # The Ritz values on a larger subspace are at least as good, value by value
            # (Courant-Fischer); the round counts only if one of them moved beyond rtol.
            # Below ``floor`` (rtol of the largest value) changes are rounding: Ritz values of
            # a null space are ~1e-13 ||W|| and shrink a little with every null vector added.
            change = ritz[:k] - values if which == "largest" else values - ritz[:k]
            moved = change > rtol * values + floor
            if not np.any(moved):
                if converged:
                    return values
                # An unconverged check proves nothing: try again from another start vector.
                stalls += 1
                if stalls == _MAX_STALLS:
                    break
                continue
        values = ritz[:k]
        good = residuals[:k] <= accept
        accepted = vectors[:, :k][:, good]
        if accepted.shape[1] == k and k == 1:
            return values
    raise np.linalg.LinAlgError(
        f"ARPACK could not find (or confirm) the {k} {which} singular values to rtol={rtol:g}; "
        f"use method='dense' or a larger rtol")


def _largest(operand: _Operand, k: int, rtol: float) -> np.ndarray:
    a = _tall(operand)
    gram = a.H @ a
    ncv = min(a.shape[1], max(2 * k + 1, _NCV_LARGEST))
    # ARPACK stops when the Ritz residual is below tol * theta; the eigenvalue theta = sigma^2
    # is then within that residual, so sigma is within tol / 2 <= rtol relative.
    return _iterative_values(a, gram, k, "largest", rtol, None, ncv)


def _gram_norm(gram: LinearOperator) -> float:
    """``||G||_2`` to about 1%: scales the acceptance test and the shift of ``c I - G``."""
    v0 = np.random.default_rng(1).standard_normal(gram.shape[0])
    try:
        value = eigsh(gram, k=1, which="LA", tol=1e-3, v0=v0, return_eigenvectors=False)[0]
    except ArpackError:
        value = float(np.linalg.norm(gram.matvec(v0)) / np.linalg.norm(v0))
    return float(abs(value))


def _smallest(operand: _Operand, k: int, rtol: float) -> np.ndarray:
    a = _tall(operand)
    p = a.shape[1]
    gram = a.H @ a
    norm = _gram_norm(gram)
    matrix = operand.matrix()
    if matrix is None and _dense_fits(*operand.lin.shape):
        # Plain Lanczos at the bottom of the spectrum can converge to a value while a smaller
        # one (a cluster, a null space) has not emerged yet; where the dense SVD is cheap it is
        # the answer.
        return _dense_values(operand)[p - k:]
    if matrix is None:
        # Nothing to factorise: Lanczos on c I - G (c ~ ||G||), whose largest eigenvalues are the
        # smallest of G; slow to converge at the bottom of the spectrum, but its tolerance is
        # relative to c, so zero singular values converge too.
        shifted = LinearOperator((p, p), matvec=lambda v: norm * v - gram.matvec(v),
                                 matmat=lambda v: norm * v - gram.matmat(v), dtype=np.float64)
        return _iterative_values(a, shifted, k, "smallest", rtol, norm, 20)
    tall = matrix if matrix.shape[1] <= matrix.shape[0] else matrix.T
    explicit = (tall.T @ tall).tocsc()
    delta = _SHIFT_RELATIVE * float(abs(explicit).sum(axis=0).max())
    lu = splu((explicit + delta * sp.eye_array(p, format="csc")).tocsc(), permc_spec="MMD_AT_PLUS_A")
    # Shift-invert: the largest eigenvalues of (G + delta I)^-1 belong to the smallest of G,
    # and they are well separated, so Lanczos converges in a few dozen solves.
    inverse = LinearOperator((p, p), matvec=lu.solve, matmat=lu.solve, dtype=np.float64)
    return _iterative_values(a, inverse, k, "smallest", rtol, norm, 20)


def _singular_values(operand: _Operand, k: int, which: str, rtol: float, method: str) -> np.ndarray:
    m, n = operand.lin.shape
    p = min(m, n)
    if not 1 <= k <= p:
        raise ValueError(f"k must be between 1 and min(m, n) = {p}, the number of singular values of "
                         f"this {m}x{n} operator; got k={k}")
    if method == "auto":
        fits = _dense_fits(m, n) or (2 * k > p and m * n <= DENSE_MAX_ENTRIES)
        method = "dense" if fits or k == p else "eigsh"
    if method == "dense":
        if m * n > 16 * DENSE_MAX_ENTRIES:
            raise ValueError(f"method='dense' would materialise a {m}x{n} float64 matrix "
                             f"({m * n * 8 / 2 ** 30:.1f} GiB); use method='eigsh'")
        values = _dense_values(operand)
        values = values[:k] if which == "largest" else values[p - k:]
    elif k >= p:
        raise ValueError(f"method='eigsh' (ARPACK) needs k < min(m, n) = {p}; got k={k}; use method='dense'")
    elif operand.zero:
        values = np.zeros(k)
    else:
        try:
            values = _largest(operand, k, rtol) if which == "largest" else _smallest(operand, k, rtol)
        except np.linalg.LinAlgError:
            # No wrong numbers: an answer ARPACK could not confirm is replaced by the dense
            # SVD where that is cheap, and refused otherwise.
            if not _dense_fits(m, n):
                raise
            values = _dense_values(operand)
            values = values[:k] if which == "largest" else values[p - k:]
    return np.sort(values)[::-1] * operand.scale


# ---------------------------------------------------------------------- public API
def singular_values(op: Operand, k: int = 6, which: str = "largest", *, rtol: float = 1e-10,
                    method: str = "auto") -> np.ndarray:
    """The ``k`` largest or smallest singular values of a lowered layer or any linear map.

    Parameters
    ----------
    op : LinearOperator, sparse matrix/array, 2-D ndarray, sparseconv operator or object with ``as_linear_operator()``
        ``W`` of shape ``(m, n)``; for a layer, ``(F * prod(out), C * prod(in))`` (the bias
        is not part of it). Real values only, all finite.
    k : int, default 6
        How many; ``1 <= k <= min(m, n)``.
    which : {"largest", "smallest"}, default "largest"
        The smallest are the smallest of the ``min(m, n)`` singular values; the zeros
        contributed by the null space of a wide or tall matrix are not among them.
    rtol : float, default 1e-10
        Relative accuracy asked of the iterative method, ``0 < rtol < 1`` (the dense one is
        always exact to rounding).
    method : {"auto", "dense", "eigsh"}, default "auto"
        ``"auto"`` takes the dense SVD when its work ``min(m, n)**2 * max(m, n)`` is at most
        :data:`DENSE_MAX_WORK` and ``m n <= DENSE_MAX_ENTRIES``, or when
        ``k > min(m, n) / 2`` and the matrix fits, and ARPACK otherwise.

    Returns
    -------
    ndarray of shape (k,), float64
        Sorted in descending order (as :func:`numpy.linalg.svd`): with ``which="smallest"``
        the last entry is the smallest singular value.

    Raises
    ------
    TypeError
        If ``op`` is none of the accepted kinds, complex, or a LinearOperator without an
        adjoint; if ``k`` is not an int, ``which``/``method`` not a string or ``rtol`` not a
        number.
    ValueError
        If ``k`` is out of range (the message names ``min(m, n)``), ``which``, ``method`` or
        ``rtol`` is invalid, ``method="eigsh"`` is asked for ``k >= min(m, n)``, or the
        operator's values or products are not finite.
    numpy.linalg.LinAlgError
        If ARPACK cannot find or confirm the values and the dense SVD is too large to take
        its place (see Notes).

    Notes
    -----
    The singular values of ``W`` are the square roots of the eigenvalues of the smaller
    Gram matrix ``G = W^T W`` (``n <= m``) or ``W W^T``; ARPACK (:func:`scipy.sparse.linalg.eigsh`)
    finds Gram eigenvectors, and the values returned are always the Rayleigh-Ritz values
    ``svd(W Q)`` of ``W`` itself on the orthonormalised eigenvectors ``Q``.

    - **largest**: Lanczos on ``G`` applied as ``W^T (W v)`` (two products: sparse ones split
      over sparseconv's thread pool, an operator's own otherwise). ARPACK's test
      ``||G v - theta v|| <= tol theta`` with ``tol = rtol`` bounds the relative error of
      ``sigma = sqrt(theta)`` by ``rtol / 2``. Squaring is harmless at the top of the spectrum.
    - **smallest**: shift-invert Lanczos, factorising ``G + delta I`` once (sparse LU;
      ``delta = 1e-12 ||G||_1`` keeps it non-singular when ``W`` is rank deficient): the
      wanted eigenvalues become the dominant ones of the inverse and converge in a few dozen
      solves, where plain Lanczos needs thousands of products and
      ``svds(which="SM")`` was 60-100x slower in our trials. The eigenvalues of ``G`` are
      only accurate to about ``eps ||W||^2``, i.e. ``sigma_min`` to ``eps kappa^2 / 2``
      relative; the eigenvectors are far less sensitive, and the Rayleigh-Ritz values from
      ``W`` bring the error back to about ``eps kappa``, the dense SVD's. (On the test
      suite's layer with ``kappa = 1.3e6``: ``6e-6`` from the shift-invert eigenvalue,
      ``4e-5`` from a dense ``eigvalsh(W^T W)``, ``6e-11`` returned.) That holds for an
      isolated small value; values below ``sqrt(eps) ||W||`` packed in a cluster (a null space
      perturbed by ``1e-9 ||W||``) are resolved to about ``3e-9 ||W||`` only. The factorisation's
      fill-in grows faster than ``nnz``: practical up to about ``1e5`` columns with a few
      channels. An operator without an explicit matrix cannot be factorised: it takes the
      dense SVD (through ``min(m, n)`` products) when that is within :data:`DENSE_MAX_WORK`,
      and plain Lanczos on ``c I - G`` with ``c ~ ||G||`` beyond. That is slow, and where the
      smallest values are clustered within about ``1e-3 ||W||^2`` of each other it can return a
      value while a smaller one has not emerged: a known limit of single-vector Lanczos, which
      the rounds below reduce but cannot exclude.
    - **rounds and deflation**: a single-vector Lanczos run sees one direction per
      eigenspace (circular layers have pairs, ``omega`` and ``-omega``; separable kernels
      fours), and next to a null space the shift-invert solves bury the other vectors in
      rounding error. So ARPACK runs in rounds: a Ritz vector is *accepted* when its Gram
      residual is below ``4 rtol ||G||``, the next round runs on the complement of the
      accepted vectors, and for ``k > 1`` a final round on that complement must find nothing
      better than the values accepted (by more than ``rtol`` of each value plus ``rtol``
      of the largest). When ARPACK cannot converge or confirm (plain Lanczos at the bottom of
      a clustered spectrum), the dense SVD answers if its work is within
      :data:`DENSE_MAX_WORK`, and a ``numpy.linalg.LinAlgError`` is raised otherwise.
    - **scaling and zeros**: an operator whose magnitude is beyond ``2^+-200`` is divided by a
      power of two first (the Gram products would underflow or overflow); an all-zero
      operator returns zeros by every method.

    Examples
    --------
    >>> import numpy as np, sparseconv as sc
    >>> from sparseconv.spectral import singular_values
    >>> op = sc.ConvOperator(np.ones((1, 1, 2)), (1, 4))
    >>> singular_values(op, k=3).round(6)
    array([1.847759, 1.414214, 0.765367])
    """
    k = _check_k(k)
    which = _check_choice(which, "which", _WHICH)
    method = _check_choice(method, "method", _METHODS)
    rtol = _check_rtol(rtol)
    return _singular_values(_operand(op, "op"), k, which, rtol, method)


def spectral_norm(op: Operand, rtol: float = 1e-6, *, method: str = "auto") -> float:
    """The largest singular value ``||W||_2``, to relative accuracy ``rtol``.

    Parameters
    ----------
    op : LinearOperator, sparse matrix/array, 2-D ndarray, sparseconv operator or object with ``as_linear_operator()``
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


def _check_ops(ops: Sequence[Operand], name: str) -> list[_Operand]:
    if isinstance(ops, (str, bytes)) or not isinstance(ops, Sequence):
        raise TypeError(f"{name} must be a list of operators; got {type(ops).__name__}")
    if len(ops) == 0:
        raise ValueError(f"{name} must hold at least one operator; got an empty list")
    return [_operand(op, f"{name}[{i}]") for i, op in enumerate(ops)]


def network_lipschitz_bound(ops: Sequence[Operand], rtol: float = 1e-6) -> float:
    """Product of the layers' spectral norms: an upper bound on the network's Lipschitz constant.

    Parameters
    ----------
    ops : list of operators, each as ``op`` of :func:`singular_values`
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
    rtol = _check_rtol(rtol)
    norms = [_singular_values(operand, 1, "largest", rtol, "auto")[0] for operand in _check_ops(ops, "ops")]
    return float(np.prod(norms))


def composed_norm(ops: Sequence[Operand], rtol: float = 1e-6, *, method: str = "auto") -> float:
    """Spectral norm of the composed linear map ``W_L ... W_2 W_1`` itself, not a bound.

    Parameters
    ----------
    ops : list of operators, each as ``op`` of :func:`singular_values`
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
    rtol = _check_rtol(rtol)
    method = _check_choice(method, "method", _METHODS)
    operands = _check_ops(ops, "ops")
    for i in range(1, len(operands)):
        prev, cur = operands[i - 1].lin.shape, operands[i].lin.shape
        if cur[1] != prev[0]:
            raise ValueError(
                f"ops[{i}] has shape {cur} and cannot follow ops[{i - 1}] of shape {prev}: it needs "
                f"{prev[0]} columns (ops are in application order, ops[0] first)")
    if len(operands) == 1:
        operand = operands[0]
    elif any(o.zero for o in operands):
        return 0.0
    else:
        # scipy's product operator applies the factors one after the other (W_L (... (W_1 x)));
        # it is probed and scaled again, as the product's magnitude can leave the safe range.
        chain = functools.reduce(lambda inner, outer: outer @ inner, [o.lin for o in operands])
        operand = _from_linear_operator(chain, "the product of ops", scale=float(np.prod([o.scale for o in operands])))
    return float(_singular_values(operand, 1, "largest", rtol, method)[0])
