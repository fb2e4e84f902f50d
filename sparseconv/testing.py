"""Checkers that ship with the package: tolerances, closeness, dot tests and gradient checks.

Every test in the project takes its tolerances from here, so that "how close is close" is
decided once:

- :data:`TOLERANCES` / :func:`tolerance` / :func:`assert_allclose` compare two computations
  of the same exact quantity (sparse product against a reference), which differ only by
  rounding.
- :data:`FINITE_DIFFERENCE_RTOL` bounds the disagreement between an analytic derivative and
  a central difference, which also carries the step's truncation and cancellation error.
- :func:`dottest` checks that an operator's adjoint is its transpose.
- :func:`gradcheck` and :func:`numerical_gradient` check gradients by central differences,
  in float64 only.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, aslinearoperator

__all__ = [
    "TOLERANCES",
    "FINITE_DIFFERENCE_RTOL",
    "tolerance",
    "assert_allclose",
    "dottest",
    "gradcheck",
    "numerical_gradient",
]

#: ``(rtol, atol)`` per dtype. ``atol`` is relative too: it is multiplied by the largest
#: magnitude of the expected array (see :func:`assert_allclose`), so an entry that is a sum of
#: many terms and cancels to nearly zero is judged against the size of the data, not its own.
#: float64 keeps about 4 decimal digits of headroom over the unit roundoff (1.1e-16) for sums
#: of up to thousands of terms; float32 (unit roundoff 6e-8) keeps about 2.
TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float32): (1e-5, 1e-5),
    np.dtype(np.float64): (1e-12, 1e-12),
}

#: Relative tolerance for central differences in float64: with the default steps the
#: truncation and cancellation errors are around 1e-10, and a wrong gradient is off by O(1).
FINITE_DIFFERENCE_RTOL = 1e-6

Seed = Union[None, int, np.random.Generator]


def tolerance(dtype: object) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing computations in ``dtype``.

    Integer and boolean data are exact, so they get the float64 tolerances.

    Examples
    --------
    >>> tolerance(np.float32)
    (1e-05, 1e-05)
    """
    dt = np.dtype(dtype)
    if dt.kind in "biu":
        dt = np.dtype(np.float64)
    if dt not in TOLERANCES:
        raise TypeError(f"dtype must be one of {[str(d) for d in TOLERANCES]} (or an integer type); got {dt}")
    return TOLERANCES[dt]


def assert_allclose(actual: object, desired: object, *, dtype: object = None, scale: Optional[float] = None,
                    finite_differences: bool = False, err_msg: str = "") -> None:
    """Assert that two arrays have the same shape and agree to the working precision.

    The test is ``|actual - desired| <= rtol * |desired| + atol * scale`` element-wise, with
    ``(rtol, atol)`` from :func:`tolerance` and ``scale = max |desired|``. NaNs never match.

    Parameters
    ----------
    actual, desired : array_like
        Shapes must be equal (no broadcasting).
    dtype : dtype, optional
        Precision the comparison is judged in. Default: the coarser of the two arrays'
        dtypes, so a float32 result is never held to float64 accuracy.
    scale : float, optional
        The magnitude the absolute tolerance is relative to. Default ``max |desired|``, or 1
        when ``desired`` is all zeros.
    finite_differences : bool
        Compare an analytic derivative with a finite-difference one: ``rtol`` and ``atol``
        are both :data:`FINITE_DIFFERENCE_RTOL` (``dtype`` must then be float64).
    err_msg : str
        Prepended to the failure message.

    Raises
    ------
    AssertionError
        On a shape mismatch or a value outside the tolerance.

    Examples
    --------
    >>> assert_allclose(np.float32([1, 2]), np.float64([1, 2 + 1e-7]))
    >>> assert_allclose(np.zeros(2), np.zeros(3))
    Traceback (most recent call last):
    ...
    AssertionError: shapes differ: actual (2,), desired (3,)
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    if actual.shape != desired.shape:
        raise AssertionError(f"{err_msg + ': ' if err_msg else ''}shapes differ: actual {actual.shape}, "
                             f"desired {desired.shape}")
    if dtype is None:
        dtype = np.dtype(np.float32) if np.float32 in (actual.dtype, desired.dtype) else np.dtype(np.float64)
    if finite_differences:
        if np.dtype(dtype) != np.dtype(np.float64):
            raise TypeError(f"finite-difference comparisons are float64 only; got dtype {np.dtype(dtype)}")
        rtol = atol = FINITE_DIFFERENCE_RTOL
    else:
        rtol, atol = tolerance(dtype)
    if scale is None:
        peak = float(np.max(np.abs(desired))) if desired.size else 0.0
        scale = peak if peak > 0 else 1.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol * scale, equal_nan=False,
                               err_msg=f"{err_msg} (dtype {np.dtype(dtype)}, rtol {rtol:g}, "
                                       f"atol {atol:g} x scale {scale:g})".lstrip())


# ---------------------------------------------------------------------- dot test
def _linear_operator(op: object) -> LinearOperator:
    if isinstance(op, LinearOperator):
        return op
    if sp.issparse(op) or isinstance(op, np.ndarray):
        if op.ndim != 2:
            raise ValueError(f"op must be a matrix (2 axes); got shape {op.shape}")
        return aslinearoperator(op)
    hint = (" (max pooling is not linear: pass its selection_matrix(x) for a given batch)"
            if hasattr(op, "selection_matrix") else "")
    raise TypeError("op must be a scipy LinearOperator (every sparseconv linear operator is one), a scipy "
                    f"sparse matrix or array, or a 2-D ndarray; got {type(op).__name__}{hint}")


def dottest(op: object, *, rng: Seed = None, rtol: Optional[float] = None, n_trials: int = 3) -> tuple[float, float]:
    """Check that the adjoint of ``op`` is its transpose: ``<A u, v> == <u, A^T v>``.

    Parameters
    ----------
    op : LinearOperator, sparse matrix/array or 2-D ndarray
        ``A``, of shape ``(m, n)``; its adjoint is ``rmatvec``.
    rng : None, int or numpy Generator
        Source of the random ``u`` and ``v``; ``None`` is seed 0, so failures reproduce.
    rtol : float, optional
        Default: the ``rtol`` of :func:`tolerance` for the operator's dtype.
    n_trials : int
        Number of random pairs ``(u, v)``.

    Returns
    -------
    (lhs, rhs) : tuple of float
        ``<A u, v>`` and ``<u, A^T v>`` of the last trial.

    Raises
    ------
    AssertionError
        With both numbers and the relative error, when they disagree.

    Notes
    -----
    ``u`` and ``v`` are standard normal in the operator's dtype; the two inner products are
    accumulated in float64 so that only the operator's own rounding is measured. The error is
    relative to the magnitude the inner products have for random vectors,
    ``max(|A u| |v| / sqrt(m), |u| |A^T v| / sqrt(n))``, rather than to their values, which
    may cancel to nearly zero by chance.

    Examples
    --------
    >>> lhs, rhs = dottest(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    >>> bool(abs(lhs - rhs) < 1e-12)
    True
    """
    lin = _linear_operator(op)
    m, n = lin.shape
    dtype = np.dtype(lin.dtype) if lin.dtype is not None else np.dtype(np.float64)
    if dtype.kind in "biu":
        dtype = np.dtype(np.float64)
    if rtol is None:
        rtol = tolerance(dtype)[0]
    gen = np.random.default_rng(0 if rng is None else rng)
    lhs = rhs = 0.0
    for trial in range(n_trials):
        u = gen.standard_normal(n).astype(dtype)
        v = gen.standard_normal(m).astype(dtype)
        au = np.asarray(lin.matvec(u), dtype=np.float64).ravel()
        atv = np.asarray(lin.rmatvec(v), dtype=np.float64).ravel()
        u64, v64 = u.astype(np.float64), v.astype(np.float64)
        lhs, rhs = float(au @ v64), float(u64 @ atv)
        scale = max(np.linalg.norm(au) * np.linalg.norm(v64) / np.sqrt(m),
                    np.linalg.norm(u64) * np.linalg.norm(atv) / np.sqrt(n))
        error = abs(lhs - rhs) / scale if scale > 0 else 0.0
        if error > rtol:
            raise AssertionError(
                f"dot test failed (trial {trial}, operator {m}x{n}, dtype {dtype}): <A u, v> = {lhs!r} but "
                f"<u, A^T v> = {rhs!r}; relative error {error:.3g} > rtol {rtol:g}")
    return lhs, rhs


# ---------------------------------------------------------------------- finite differences
def _require_float64(array: object, name: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype != np.float64:
        raise TypeError(
            f"{name} must be float64; got {arr.dtype}. Central differences cancel all but about half of "
            "the significant digits, which in float32 leaves too few to tell a right gradient from a "
            f"wrong one; convert with {name}.astype(np.float64)")
    return arr


def _scalar(value: object) -> float:
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"f must return a scalar; got an array of shape {arr.shape}")
    return float(_require_float64(arr, "f(x)"))


def gradcheck(f: Callable[[np.ndarray], float], x: np.ndarray, grad: np.ndarray, *, eps: Optional[float] = None,
              rtol: Optional[float] = None, rng: Seed = None, n_directions: int = 3) -> float:
    """Check ``grad`` against central differences of ``f`` along random unit directions.

    For each direction ``v``: ``(f(x + eps v) - f(x - eps v)) / (2 eps)`` must match
    ``<grad, v>``.

    Parameters
    ----------
    f : callable
        Maps a float64 array shaped like ``x`` to a float64 scalar. It must not modify its input.
    x : ndarray of float64
        Where the gradient is checked.
    grad : ndarray of float64, same shape as ``x``
        The claimed gradient of ``f`` at ``x``.
    eps : float, optional
        Step length. Default ``cbrt(2.2e-16) * max(1, max |x|)`` (about 6e-6 for data of unit
        size), which balances the step's truncation error against cancellation in ``f``.
    rtol : float, optional
        Default :data:`FINITE_DIFFERENCE_RTOL`.
    rng : None, int or numpy Generator
        Source of the directions; ``None`` is seed 0.
    n_directions : int

    Returns
    -------
    float
        The worst relative error over the directions.

    Raises
    ------
    TypeError
        If ``x``, ``grad`` or ``f(x)`` is not float64: central differences need the precision.
    AssertionError
        With the direction, both derivatives and the error, on a mismatch.

    Notes
    -----
    The error is ``|numeric - analytic| / max(|numeric|, |analytic|, |grad| / sqrt(x.size))``;
    the last term is the typical size of ``<grad, v>`` for a random unit ``v``, so a
    direction nearly orthogonal to ``grad`` by chance does not fail a correct gradient.

    Examples
    --------
    >>> x = np.array([1.0, -2.0, 0.5])
    >>> err = gradcheck(lambda z: float(np.sum(np.sin(z))), x, np.cos(x))
    >>> bool(err < 1e-8)
    True
    """
    x = _require_float64(x, "x")
    grad = _require_float64(grad, "grad")
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x, {x.shape}; got {grad.shape}")
    if x.size == 0:
        raise ValueError("x must have at least one element")
    if eps is None:
        eps = np.cbrt(np.finfo(np.float64).eps) * max(1.0, float(np.max(np.abs(x))))
    if rtol is None:
        rtol = FINITE_DIFFERENCE_RTOL
    gen = np.random.default_rng(0 if rng is None else rng)
    typical = np.linalg.norm(grad) / np.sqrt(x.size)
    worst = 0.0
    for direction in range(n_directions):
        v = gen.standard_normal(x.shape)
        v /= np.linalg.norm(v)
        numeric = (_scalar(f(x + eps * v)) - _scalar(f(x - eps * v))) / (2 * eps)
        analytic = float(np.vdot(grad, v))
        scale = max(abs(numeric), abs(analytic), typical)
        error = abs(numeric - analytic) / scale if scale > 0 else 0.0
        worst = max(worst, error)
        if error > rtol:
            raise AssertionError(
                f"gradient check failed along direction {direction}: central difference {numeric!r} but "
                f"<grad, v> = {analytic!r}; relative error {error:.3g} > rtol {rtol:g} (eps {eps:g})")
    return worst


def numerical_gradient(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dy: np.ndarray, *,
                       eps: float = 1e-6) -> np.ndarray:
    """Vector-Jacobian product ``J(x)^T dy`` by element-wise central differences.

    ``g[i] = sum(dy * (f(x + eps e_i) - f(x - eps e_i))) / (2 eps)``: two calls of ``f`` per
    element of ``x``, so for small problems only.

    Parameters
    ----------
    f : callable
        Maps a float64 array shaped like ``x`` to a float64 array shaped like ``dy``.
    x : ndarray of float64
    dy : array_like, shape of ``f(x)``
        The output sensitivities (converted to float64, which is exact).
    eps : float
        Step length.

    Returns
    -------
    ndarray of float64, shape of ``x``

    Notes
    -----
    Two choices keep the rounding error small: the outputs are subtracted before they are
    weighted and summed, so outputs that do not depend on ``x[i]`` cancel exactly; and the
    divisor is the step actually taken, ``(x[i] + eps) - (x[i] - eps)`` in floating point,
    not ``2 eps``. Compare the result with ``assert_allclose(..., finite_differences=True)``.

    Examples
    --------
    >>> x = np.array([1.0, 2.0])
    >>> g = numerical_gradient(lambda z: z ** 2, x, np.ones(2))
    >>> bool(np.allclose(g, 2 * x))
    True
    """
    x = _require_float64(x, "x")
    y = _require_float64(f(x.copy()), "f(x)")
    dy = np.asarray(dy)
    if dy.dtype.kind not in "biuf":
        raise TypeError(f"dy must be real; got dtype {dy.dtype}")
    if dy.shape != y.shape:
        raise ValueError(f"dy must have the shape of f(x), {y.shape}; got {dy.shape}")
    dy = dy.astype(np.float64)
    grad = np.empty_like(x)
    for i in range(x.size):
        # Fresh copies: f may keep or return its argument, so it must never be mutated later.
        x_plus, x_minus = x.copy(), x.copy()
        x_plus.flat[i] += eps
        x_minus.flat[i] -= eps
        step = x_plus.flat[i] - x_minus.flat[i]
        diff = _require_float64(f(x_plus), "f(x)") - _require_float64(f(x_minus), "f(x)")
        grad.flat[i] = np.sum(dy * diff) / step
    return grad
