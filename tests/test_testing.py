"""The shipped checkers: they pass correct code and, as importantly, they fail wrong code."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, aslinearoperator

import sparseconv as sc
from sparseconv import reference as ref
from sparseconv import testing
from sparseconv.testing import (
    FINITE_DIFFERENCE_RTOL,
    TOLERANCES,
    assert_allclose,
    dottest,
    gradcheck,
    numerical_gradient,
    tolerance,
)

RNG = np.random.default_rng(42)
MATRIX = RNG.standard_normal((7, 5))


# ---------------------------------------------------------------------- tolerances
def test_tolerance_table():
    assert set(TOLERANCES) == {np.dtype(np.float32), np.dtype(np.float64)}
    assert tolerance(np.float64) == TOLERANCES[np.dtype(np.float64)]
    assert tolerance("float32") == TOLERANCES[np.dtype(np.float32)]
    assert tolerance(np.int64) == tolerance(np.float64)
    assert tolerance(np.float32)[0] > tolerance(np.float64)[0]
    for dtype in (np.float16, np.complex128, object):
        with pytest.raises(TypeError, match="dtype must be one of"):
            tolerance(dtype)


def test_assert_allclose_passes_rounding_differences():
    desired = RNG.standard_normal(50)
    assert_allclose(desired * (1 + 1e-14), desired)
    assert_allclose((desired * (1 + 1e-6)).astype(np.float32), desired.astype(np.float32))
    # An entry that cancelled to almost zero is judged against the size of the data.
    assert_allclose(np.array([100.0, 1e-13]), np.array([100.0, 0.0]))
    assert_allclose(np.zeros(3), np.zeros(3))


@pytest.mark.parametrize("actual, desired", [
    (np.array([1.0, 2.0 + 1e-9]), np.array([1.0, 2.0])),
    (np.float32([1.0, 2.0001]), np.float32([1.0, 2.0])),
    (np.array([1.0, np.nan]), np.array([1.0, np.nan])),
    (np.array([1e-11, 0.0]), np.zeros(2)),
], ids=["float64-1e-9", "float32-5e-5", "nan", "zeros-absolute"])
def test_assert_allclose_catches_differences(actual, desired):
    with pytest.raises(AssertionError):
        assert_allclose(actual, desired)


def test_assert_allclose_judges_float32_against_float64_in_float32():
    assert_allclose(np.float32([1 / 3]), np.array([1 / 3]))
    with pytest.raises(AssertionError):
        assert_allclose(np.float32([1 / 3]), np.array([1 / 3]), dtype=np.float64)


def test_assert_allclose_never_broadcasts():
    with pytest.raises(AssertionError, match=r"shapes differ: actual \(\), desired \(3,\)"):
        assert_allclose(1.0, np.ones(3))
    with pytest.raises(AssertionError, match=r"layer 3: shapes differ"):
        assert_allclose(np.ones((3, 1)), np.ones(3), err_msg="layer 3")


def test_assert_allclose_scale_and_message():
    with pytest.raises(AssertionError):
        assert_allclose(np.array([1.0 + 1e-10]), np.array([1.0]))
    assert_allclose(np.array([1.0 + 1e-10]), np.array([1.0]), scale=1e3)
    with pytest.raises(AssertionError, match="dx.*rtol 1e-12"):
        assert_allclose(np.array([2.0]), np.array([1.0]), err_msg="dx")


def test_assert_allclose_finite_differences():
    assert_allclose(np.array([1.0 + 1e-8]), np.array([1.0]), finite_differences=True)
    with pytest.raises(AssertionError):
        assert_allclose(np.array([1.0 + 1e-4]), np.array([1.0]), finite_differences=True)
    with pytest.raises(TypeError, match="float64 only"):
        assert_allclose(np.float32([1.0]), np.float32([1.0]), finite_differences=True)


# ---------------------------------------------------------------------- dottest
_CONV = sc.ConvOperator(np.random.default_rng(0).standard_normal((3, 2, 3, 3)), (2, 6, 6), padding=1)
_POOL = sc.PoolOperator((3, 6, 6), 2)


@pytest.mark.parametrize("op", [
    MATRIX,
    MATRIX.astype(np.float32),
    np.arange(12).reshape(3, 4),
    sp.csr_matrix(np.where(MATRIX > 0, MATRIX, 0)),
    sp.csr_array(np.where(MATRIX > 0, MATRIX, 0).astype(np.float32)),
    aslinearoperator(MATRIX),
    _CONV,
    _CONV.H,
    _POOL @ _CONV,
    np.zeros((3, 2)),
], ids=["ndarray", "ndarray-float32", "int", "csr_matrix", "csr_array-float32", "LinearOperator",
        "ConvOperator", "ConvOperator.H", "composition", "zero"])
def test_dottest_passes_true_adjoints(op):
    lhs, rhs = dottest(op)
    assert isinstance(lhs, float) and isinstance(rhs, float)
    assert lhs == pytest.approx(rhs, rel=1e-5, abs=1e-12)


def test_dottest_is_reproducible():
    assert dottest(MATRIX, rng=3) == dottest(MATRIX, rng=3)
    assert dottest(MATRIX, rng=3) != dottest(MATRIX, rng=4)


def _wrong_adjoint(adjoint: np.ndarray) -> LinearOperator:
    return LinearOperator(MATRIX.shape, matvec=lambda u: MATRIX @ u, rmatvec=lambda v: adjoint @ v,
                          dtype=np.float64)


@pytest.mark.parametrize("adjoint", [
    MATRIX[::-1].T,  # rows in the wrong order
    MATRIX.T * (1 + 1e-9),  # a scale error far below any plot's resolution
    np.where(np.arange(MATRIX.size).reshape(MATRIX.shape).T == 17, 0.0, MATRIX.T),  # one entry lost
], ids=["permuted", "scaled-1e-9", "one-entry"])
def test_dottest_catches_wrong_adjoints(adjoint):
    with pytest.raises(AssertionError, match=r"<A u, v> = .* but <u, A\^T v> = .*relative error"):
        dottest(_wrong_adjoint(adjoint))


def test_dottest_catches_a_convolution_adjoint_without_rot180():
    """The classic mistake: back-propagating with the kernel as is instead of rotated."""
    w = RNG.standard_normal((1, 1, 3, 3))
    shape_in, shape_out = (1, 1, 5, 5), (1, 1, 3, 3)
    op = LinearOperator((9, 25), matvec=lambda u: ref.conv_direct(u.reshape(shape_in), w).ravel(),
                        rmatvec=lambda v: ref.conv_direct(v.reshape(shape_out), w, padding="full").ravel(),
                        dtype=np.float64)
    with pytest.raises(AssertionError, match="dot test failed"):
        dottest(op)

    def full_convolution(v):
        return ref.conv_direct(v.reshape(shape_out), w, padding="full", flip=True).ravel()

    dottest(LinearOperator((9, 25), matvec=op.matvec, rmatvec=full_convolution, dtype=np.float64))


def test_dottest_float32_tolerance_is_dtype_aware():
    op32 = _wrong_adjoint(MATRIX.T * (1 + 1e-9))
    op32.dtype = np.dtype(np.float32)
    dottest(op32)
    with pytest.raises(AssertionError):
        dottest(op32, rtol=1e-12)


def test_dottest_rejects_what_is_not_an_operator():
    with pytest.raises(TypeError, match="op must be a scipy LinearOperator"):
        dottest([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"matrix \(2 axes\); got shape \(2, 2, 2\)"):
        dottest(np.ones((2, 2, 2)))


# ---------------------------------------------------------------------- gradcheck
A = RNG.standard_normal((6, 4))
X = RNG.standard_normal(4)


def _loss(x: np.ndarray) -> float:
    return float(np.sum(np.tanh(A @ x) ** 2))


def _loss_grad(x: np.ndarray) -> np.ndarray:
    t = np.tanh(A @ x)
    return A.T @ (2 * t * (1 - t ** 2))


def test_gradcheck_passes_a_correct_gradient():
    worst = gradcheck(_loss, X, _loss_grad(X), n_directions=5)
    assert 0 <= worst < FINITE_DIFFERENCE_RTOL


@pytest.mark.parametrize("wrong", [
    lambda g: -g,
    lambda g: g * 1.001,
    lambda g: g + np.eye(4)[2] * 1e-3 * np.abs(g).max(),
    lambda g: np.zeros_like(g),
], ids=["sign", "scale-1e-3", "one-entry-1e-3", "zero"])
def test_gradcheck_catches_a_wrong_gradient(wrong):
    with pytest.raises(AssertionError, match=r"central difference .* but <grad, v> = .*relative error"):
        gradcheck(_loss, X, wrong(_loss_grad(X)))


def test_gradcheck_catches_a_convolution_gradient_that_ignores_flip():
    x, w = RNG.standard_normal((2, 2, 5, 4)), RNG.standard_normal((3, 2, 2, 3))
    opts = dict(padding=1, padding_mode="reflect", flip=True)
    dy = RNG.standard_normal(ref.conv_direct(x, w, **opts).shape)

    def loss_w(v):
        return float(np.sum(dy * ref.conv_direct(x, v, **opts)))

    gradcheck(loss_w, w, ref.conv_direct_backward(x, w, dy, **opts)[1])
    unflipped = ref.conv_direct_backward(x, w, dy, padding=1, padding_mode="reflect")[1]
    with pytest.raises(AssertionError, match="gradient check failed"):
        gradcheck(loss_w, w, unflipped)


def test_gradcheck_is_float64_only():
    with pytest.raises(TypeError, match="x must be float64; got float32. Central differences"):
        gradcheck(_loss, X.astype(np.float32), _loss_grad(X))
    with pytest.raises(TypeError, match="grad must be float64"):
        gradcheck(_loss, X, _loss_grad(X).astype(np.float32))
    with pytest.raises(TypeError, match=r"f\(x\) must be float64"):
        gradcheck(lambda x: np.float32(_loss(x)), X, _loss_grad(X))


def test_gradcheck_validates_shapes():
    with pytest.raises(ValueError, match=r"grad must have the shape of x, \(4,\); got \(3,\)"):
        gradcheck(_loss, X, np.ones(3))
    with pytest.raises(ValueError, match=r"f must return a scalar; got an array of shape \(6,\)"):
        gradcheck(lambda x: A @ x, X, _loss_grad(X))


# ---------------------------------------------------------------------- numerical_gradient
def test_numerical_gradient_is_the_vector_jacobian_product():
    dy = RNG.standard_normal(6)
    t = np.tanh(A @ X)
    assert_allclose(numerical_gradient(lambda x: np.tanh(A @ x), X, dy), A.T @ (dy * (1 - t ** 2)),
                    finite_differences=True)


def test_numerical_gradient_catches_a_wrong_gradient():
    dy = RNG.standard_normal(6)
    numeric = numerical_gradient(lambda x: np.tanh(A @ x), X, dy)
    with pytest.raises(AssertionError):
        assert_allclose(A.T @ dy, numeric, finite_differences=True)  # the derivative of tanh forgotten


def test_numerical_gradient_survives_functions_that_return_their_input():
    x = RNG.standard_normal((2, 3))
    dy = RNG.standard_normal((2, 3))
    assert_allclose(numerical_gradient(lambda v: v, x, dy), dy, finite_differences=True)


def test_numerical_gradient_validates_its_arguments():
    with pytest.raises(TypeError, match="x must be float64"):
        numerical_gradient(np.sin, X.astype(np.float32), np.ones(4))
    with pytest.raises(TypeError, match=r"f\(x\) must be float64"):
        numerical_gradient(lambda x: x.astype(np.float32), X, np.ones(4))
    with pytest.raises(ValueError, match=r"dy must have the shape of f\(x\), \(6,\); got \(4,\)"):
        numerical_gradient(lambda x: A @ x, X, np.ones(4))
    with pytest.raises(TypeError, match="dy must be real"):
        numerical_gradient(np.sin, X, np.ones(4, complex))


def test_docstring_examples_run():
    result = doctest.testmod(testing, extraglobs={"np": np}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
