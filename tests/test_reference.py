"""The reference convolutions against each other, scipy.signal, finite differences and the notes' examples."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal
from scipy.sparse.linalg import LinearOperator

from sparseconv import reference as ref
from sparseconv.geometry import ConvGeometry
from sparseconv.testing import assert_allclose, dottest, numerical_gradient

from cases import Case

MODES = ("zeros", "circular", "reflect", "replicate")




# Every padding spelling geometry accepts, per number of spatial dimensions.
PADDINGS = {
    1: [0, 1, (2,), ((1, 2),), "valid", "same", "full"],
    2: [0, 1, (1, 2), ((1, 0), (0, 2)), (1, (2, 0)), "valid", "same", "full"],
    3: [0, 1, (1, 0, 2), ((1, 0), (0, 1), (2, 1)), ((1, 0), 1, (0, 2)), "valid", "same", "full"],
}
SHAPES = {1: ((9,), (3,)), 2: ((7, 6), (3, 2)), 3: ((5, 4, 5), (2, 3, 2))}
STRIDES = {1: [1, 2], 2: [1, 2, (2, 1)], 3: [1, 2, (1, 2, 1)]}
# (groups, C, F): plain, grouped, depthwise (one input channel per group, two filters each).
CHANNELS = [(1, 2, 3), (2, 4, 2), (3, 3, 6)]


def _grid() -> list[Case]:
    """The product of strides, paddings, dilations and modes per dimension; the rest cycles."""
    cases = []
    for ndim, (size, kernel) in SHAPES.items():
        combos = itertools.product(STRIDES[ndim], PADDINGS[ndim], (1, 2), MODES)
        for i, (stride, padding, dilation, mode) in enumerate(combos):
            groups, c, f = CHANNELS[i % 3]
            cases.append(Case(size, kernel, n=1 + i % 2, c=c, f=f, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, padding_mode=mode, flip=bool(i // 3 % 2),
                              dtype="float32" if i % 5 == 0 else "float64"))
    cases += [
        Case((5, 5), (5, 5), c=1, f=1),
        Case((4,), (5,), padding=1, padding_mode="circular"),
        Case((3, 3), (3, 3), padding=3, padding_mode="circular", flip=True),
        Case((2, 3), (3, 3), padding=2, padding_mode="replicate", stride=(1, 2)),
        Case((10, 7), (3, 3), stride=(3, 2), dilation=(2, 1), padding=((2, 1), (0, 3)), padding_mode="reflect"),
        Case((4, 4, 4), (3, 3, 3), c=2, f=2, groups=2, padding=1, padding_mode="circular", flip=True,
             dtype="float32"),
    ]
    return [case for case in cases if case.valid()]


GRID = _grid()
IDS = [case.id for case in GRID]
# Cases for the slow checks (dense weight gradient, finite differences), spread over the grid.
SMALL = [case for case in GRID if case.dtype == "float64" and len(case.in_size) < 3][::5] + \
        [case for case in GRID if case.dtype == "float64" and len(case.in_size) == 3][::16]


def test_grid_covers_every_option():
    for ndim in (1, 2, 3):
        cases = [c for c in GRID if len(c.in_size) == ndim]
        assert {str(c.padding) for c in cases} >= {str(p) for p in PADDINGS[ndim]}
        assert {c.padding_mode for c in cases} == set(MODES)
        assert {(c.groups, c.c) for c in cases} >= {(1, 2), (2, 4), (3, 3)}
        assert {(c.flip, c.dtype) for c in cases} == set(itertools.product((False, True), ("float32", "float64")))
    assert len(set(IDS)) == len(GRID)


# ---------------------------------------------------------------------- worked examples (NOTES section 2)
SEED001_X = np.array([[3, 3, 2, 1, 0], [0, 0, 1, 3, 1], [3, 1, 2, 2, 3], [2, 0, 0, 2, 2], [2, 0, 0, 0, 1]], float)
SEED001_K = np.array([[0, 1, 2], [2, 2, 0], [0, 1, 2]], float)
SEED001_Y = [[12, 12, 17], [10, 17, 19], [9, 6, 14]]
SEED000_W = np.array([[0.2, 0.3], [0.5, 0.6]])
SEED000_DELTA = np.array([[1.0, 1.0], [2.0, 3.0]])
SEED000_DX = [[0.2, 0.5, 0.3], [0.9, 2.3, 1.5], [1.0, 2.7, 1.8]]


@pytest.mark.parametrize("conv", [ref.conv_direct, ref.conv_im2col, ref.conv_dense])
def test_seed001_forward(conv):
    y = conv(SEED001_X[None, None], SEED001_K[None, None])
    np.testing.assert_array_equal(y[0, 0], SEED001_Y)


@pytest.mark.parametrize("backward", [ref.conv_direct_backward, ref.conv_im2col_backward, ref.conv_dense_backward])
def test_seed000_input_sensitivities(backward):
    dx, _, db = backward(np.zeros((1, 1, 3, 3)), SEED000_W[None, None], SEED000_DELTA[None, None])
    assert_allclose(dx[0, 0], SEED000_DX)
    assert dx[0, 0, 1, 1] == pytest.approx(1 * 0.6 + 1 * 0.5 + 2 * 0.3 + 3 * 0.2, rel=1e-15)
    assert db.tolist() == [7.0]


def test_seed004_dense_matrix():
    """A 3x3 image and a 2x2 kernel: a 4x9 matrix, 16 non-zeros, each weight 4 times, one row per window."""
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    dense = ref.dense_matrix(w[None, None], (1, 3, 3))
    expected = np.zeros((4, 9))
    for row, (oy, ox) in enumerate(np.ndindex(2, 2)):
        for ky, kx in np.ndindex(2, 2):
            expected[row, (oy + ky) * 3 + ox + kx] = w[ky, kx]
    np.testing.assert_array_equal(dense, expected)
    assert np.count_nonzero(dense) == 16


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("case", GRID, ids=IDS)
def test_forward_formulations_agree(case: Case):
    x, w, b, _ = case.arrays()
    y = ref.conv_direct(x, w, b, **case.opts)
    assert y.shape == (case.n, *case.geometry().output_shape)
    assert y.dtype == np.dtype(case.dtype)
    assert_allclose(ref.conv_im2col(x, w, b, **case.opts), y)
    y_dense = ref.conv_dense(x, w, b, **case.opts)
    assert y_dense.dtype == y.dtype
    assert_allclose(y_dense, y)


def _scipy_conv(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Zero-padded, ungrouped convolution from scipy.signal: dilation by inserting zeros in the
    kernel, stride by subsampling the valid output, flip by convolving instead of correlating."""
    xp = np.pad(x, ((0, 0), (0, 0), *geom.padding))
    dilated = np.zeros((*w.shape[:2], *(d * (k - 1) + 1 for d, k in zip(geom.dilation, geom.kernel_size))), w.dtype)
    dilated[(slice(None), slice(None), *(slice(None, None, d) for d in geom.dilation))] = w
    op = signal.convolve if geom.flip else signal.correlate
    subsample = tuple(slice(None, None, s) for s in geom.stride)
    def one(n: int, f: int) -> np.ndarray:
        return sum(op(xp[n, c], dilated[f, c], mode="valid", method="direct") for c in range(x.shape[1]))[subsample]

    return np.array([[one(n, f) for f in range(w.shape[0])] for n in range(x.shape[0])])


@pytest.mark.parametrize("case", [c for c in GRID if c.padding_mode == "zeros" and c.groups == 1],
                         ids=[c.id for c in GRID if c.padding_mode == "zeros" and c.groups == 1])
def test_forward_matches_scipy(case: Case):
    x, w, _, _ = case.arrays()
    assert_allclose(ref.conv_direct(x, w, **case.opts), _scipy_conv(x, w, case.geometry()))


@pytest.mark.parametrize("padding", ["valid", "same", "full"])
@pytest.mark.parametrize("flip", [False, True], ids=["correlate", "convolve"])
def test_padding_strings_match_scipy_modes(padding, flip):
    """scipy centres 'same' like geometry does only for odd kernels, hence the 3x5 kernel."""
    rng = np.random.default_rng(7)
    x, k = rng.standard_normal((6, 8)), rng.standard_normal((3, 5))
    op = signal.convolve2d if flip else signal.correlate2d
    y = ref.conv_direct(x[None, None], k[None, None], padding=padding, flip=flip)
    assert_allclose(y[0, 0], op(x, k, mode=padding))


def test_flip_is_correlation_with_the_rotated_kernel():
    x, w, _, _ = Case((6, 5), (3, 2), padding=1, padding_mode="reflect").arrays()
    assert_allclose(ref.conv_direct(x, w, padding=1, padding_mode="reflect", flip=True),
                    ref.conv_direct(x, w[:, :, ::-1, ::-1], padding=1, padding_mode="reflect"))


def test_groups_are_independent_convolutions():
    case = Case((6, 6), (3, 3), c=4, f=6, groups=2, padding=1, padding_mode="circular")
    x, w, _, _ = case.arrays()
    y = ref.conv_direct(x, w, **case.opts)
    for g in range(2):
        part = ref.conv_direct(x[:, 2 * g:2 * g + 2], w[3 * g:3 * g + 3], padding=1, padding_mode="circular")
        assert_allclose(y[:, 3 * g:3 * g + 3], part)


# ---------------------------------------------------------------------- backward
def _as_operator(case: Case, w: np.ndarray) -> LinearOperator:
    """The layer on one flattened sample, with conv_direct_backward's dx as its adjoint."""
    geom = case.geometry()

    def matvec(v):
        return ref.conv_direct(v.reshape(1, *geom.input_shape), w, **case.opts).ravel()

    def rmatvec(v):
        dy = v.reshape(1, *geom.output_shape)
        return ref.conv_direct_backward(np.zeros((1, *geom.input_shape), w.dtype), w, dy, **case.opts)[0].ravel()

    return LinearOperator((geom.n_out, geom.n_in), matvec=matvec, rmatvec=rmatvec, dtype=w.dtype)


@pytest.mark.parametrize("case", GRID, ids=IDS)
def test_backward_formulations_agree(case: Case):
    x, w, _, dy = case.arrays()
    grads = ref.conv_direct_backward(x, w, dy, **case.opts)
    for name, grad, shape in zip(("dx", "dw", "db"), grads, (x.shape, w.shape, (case.f,))):
        assert grad.shape == shape and grad.dtype == np.dtype(case.dtype), name
    for name, grad, grad_i in zip(("dx", "dw", "db"), grads, ref.conv_im2col_backward(x, w, dy, **case.opts)):
        assert_allclose(grad_i, grad, err_msg=f"im2col {name}")
    dottest(_as_operator(case, w))


@pytest.mark.parametrize("case", SMALL, ids=[c.id for c in SMALL])
def test_dense_backward_agrees(case: Case):
    x, w, _, dy = case.arrays()
    for name, grad, grad_d in zip(("dx", "dw", "db"), ref.conv_direct_backward(x, w, dy, **case.opts),
                                  ref.conv_dense_backward(x, w, dy, **case.opts)):
        assert_allclose(grad_d, grad, err_msg=f"dense {name}")


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.slow] if len(c.in_size) == 3 or c.padding_mode == "circular" else [])
    for c in SMALL])
def test_backward_matches_numerical_gradient(case: Case):
    x, w, b, dy = case.arrays()
    dx, dw, db = ref.conv_direct_backward(x, w, dy, **case.opts)
    assert_allclose(dx, numerical_gradient(lambda v: ref.conv_direct(v, w, b, **case.opts), x, dy),
                    finite_differences=True, err_msg="dx")
    assert_allclose(dw, numerical_gradient(lambda v: ref.conv_direct(x, v, b, **case.opts), w, dy),
                    finite_differences=True, err_msg="dw")
    assert_allclose(db, numerical_gradient(lambda v: ref.conv_direct(x, w, v, **case.opts), b, dy),
                    finite_differences=True, err_msg="db")


# ---------------------------------------------------------------------- padding and im2col adjoints
@st.composite
def padding_problems(draw):
    ndim = draw(st.integers(1, 3))
    in_size = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    pairs = tuple((draw(st.integers(0, 5)), draw(st.integers(0, 5))) for _ in range(ndim))
    lead = tuple(draw(st.integers(1, 2)) for _ in range(draw(st.integers(0, 2))))
    return lead, in_size, pairs, draw(st.sampled_from(MODES))


@settings(max_examples=60, deadline=None)
@given(padding_problems())
def test_pad_adjoint_dot_test(problem):
    """Any pads np.pad accepts, even wider than the input: the adjoint is built from np.pad itself."""
    lead, in_size, pairs, mode = problem
    shape = (*lead, *in_size)
    padded_shape = ref.pad(np.zeros(shape), pairs, mode).shape
    op = LinearOperator((int(np.prod(padded_shape)), int(np.prod(shape))),
                        matvec=lambda v: ref.pad(v.reshape(shape), pairs, mode).ravel(),
                        rmatvec=lambda v: ref.pad_adjoint(v.reshape(padded_shape), in_size, pairs, mode).ravel(),
                        dtype=np.float64)
    dottest(op)


def test_pad_adjoint_adds_copies_back():
    # [0 1 2] reflect-padded by 2 at the start is [2 1 | 0 1 2]: positions 1 and 2 gain one copy each.
    assert ref.pad_adjoint(np.ones(5), (3,), [(2, 0)], "reflect").tolist() == [1.0, 2.0, 2.0]
    assert ref.pad_adjoint(np.ones(5), (3,), [(2, 0)], "replicate").tolist() == [3.0, 1.0, 1.0]
    assert ref.pad_adjoint(np.ones(5), (3,), [(2, 0)], "circular").tolist() == [1.0, 2.0, 2.0]
    assert ref.pad_adjoint(np.arange(5.0), (3,), [(2, 0)], "zeros").tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("case", [c for c in GRID if c.n == 1 and c.groups == 1][::3],
                         ids=[c.id for c in GRID if c.n == 1 and c.groups == 1][::3])
def test_col2im_is_adjoint_of_im2col(case: Case):
    geom = case.geometry()
    patch = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, padding_mode=case.padding_mode)
    x, _, _, _ = case.arrays()
    cols_shape = ref.im2col(x, case.kernel, **patch).shape
    op = LinearOperator((int(np.prod(cols_shape)), x.size),
                        matvec=lambda v: ref.im2col(v.reshape(x.shape).astype(x.dtype), case.kernel, **patch).ravel(),
                        rmatvec=lambda v: ref.col2im(v.reshape(cols_shape).astype(x.dtype), geom.input_shape,
                                                     case.kernel, **patch).ravel(),
                        dtype=x.dtype)
    dottest(op)


def test_im2col_columns_are_windows():
    x = np.arange(2 * 5 * 4, dtype=float).reshape(1, 2, 5, 4)
    cols = ref.im2col(x, (2, 2), stride=(2, 1), dilation=(1, 2), padding=((0, 1), (1, 0)))
    xp = np.pad(x, ((0, 0), (0, 0), (0, 1), (1, 0)))
    assert cols.shape == (1, 2 * 4, 3 * 3)
    # Output position (oy, ox) = (1, 1), channel 1, tap (ky, kx) = (1, 0): xpad[1, oy*2 + ky, ox + kx*2].
    assert cols[0, 1 * 4 + 1 * 2 + 0, 1 * 3 + 1] == xp[0, 1, 3, 1]
    np.testing.assert_array_equal(cols[0, :, 1 * 3 + 1].reshape(2, 2, 2), xp[0, :, 2:4, 1:4:2])


# ---------------------------------------------------------------------- random configurations
@st.composite
def conv_problems(draw):
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    return Case(in_size=tuple(draw(st.integers(1, 6)) for _ in range(ndim)),
                kernel=tuple(draw(st.integers(1, 3)) for _ in range(ndim)),
                n=draw(st.integers(1, 2)), c=groups * draw(st.integers(1, 2)), f=groups * draw(st.integers(1, 2)),
                stride=tuple(draw(st.integers(1, 3)) for _ in range(ndim)),
                padding=draw(st.one_of(st.integers(0, 2), st.sampled_from(["valid", "same", "full"]),
                                       st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * ndim))),
                dilation=tuple(draw(st.integers(1, 2)) for _ in range(ndim)),
                groups=groups, padding_mode=draw(st.sampled_from(MODES)), flip=draw(st.booleans()),
                dtype=draw(st.sampled_from(["float32", "float64"])))


@settings(max_examples=80, deadline=None)
@given(conv_problems())
def test_random_configurations_agree(case: Case):
    if not case.valid():
        return
    x, w, b, dy = case.arrays()
    assert_allclose(ref.conv_im2col(x, w, b, **case.opts), ref.conv_direct(x, w, b, **case.opts))
    for grad_i, grad in zip(ref.conv_im2col_backward(x, w, dy, **case.opts),
                            ref.conv_direct_backward(x, w, dy, **case.opts)):
        assert_allclose(grad_i, grad)


# ---------------------------------------------------------------------- dtypes and errors
def test_integers_become_float64_and_float32_stays():
    assert ref.conv_direct(np.ones((1, 1, 4), int), np.ones((1, 1, 2), int)).dtype == np.float64
    assert ref.conv_im2col(np.ones((1, 1, 4), int), np.ones((1, 1, 2), np.float32)).dtype == np.float32
    assert ref.dense_matrix(np.ones((1, 1, 2), np.float32), (1, 4)).dtype == np.float32
    dx, dw, db = ref.conv_dense_backward(np.ones((1, 1, 4), np.float32), np.ones((1, 1, 2), np.float32),
                                         np.ones((1, 1, 3), np.float32))
    assert dx.dtype == dw.dtype == db.dtype == np.float32


@pytest.mark.parametrize("fn", [ref.conv_direct, ref.conv_im2col, ref.conv_dense])
def test_mixed_float_dtypes_are_refused(fn):
    with pytest.raises(TypeError, match="x float32 and weight float64"):
        fn(np.ones((1, 1, 4), np.float32), np.ones((1, 1, 2)))


@pytest.mark.parametrize("backward", [ref.conv_direct_backward, ref.conv_im2col_backward, ref.conv_dense_backward])
def test_dy_is_validated(backward):
    x, w = np.ones((2, 1, 5)), np.ones((3, 1, 2))
    with pytest.raises(ValueError, match=r"dy must have shape \(N, 3, 4\)"):
        backward(x, w, np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\) to match x; got \(1, 3, 4\)"):
        backward(x, w, np.ones((1, 3, 4)))
    with pytest.raises(TypeError, match="dy has dtype float32"):
        backward(x, w, np.ones((2, 3, 4), np.float32))


def test_shape_and_option_errors_name_the_argument():
    x, w = np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, \*spatial\) with 2 spatial"):
        ref.conv_direct(x[0], w)
    with pytest.raises(ValueError, match=r"bias must have shape \(F,\) = \(3,\); got \(2,\)"):
        ref.conv_direct(x, w, np.ones(2))
    with pytest.raises(TypeError, match="float16"):
        ref.conv_direct(x.astype(np.float16), w.astype(np.float16))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        ref.conv_im2col(x, w, padding_mode="edge")
    with pytest.raises(ValueError, match="groups=2 must divide"):
        ref.conv_dense(x, np.ones((3, 1, 3, 3)), groups=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        ref.pad(x, [(1, 1)], "edge")
    with pytest.raises(ValueError, match="padding_pairs must be non-negative"):
        ref.pad(x, [(1, -1)])
    with pytest.raises(ValueError, match=r"xp must end with the padded size \(7,\)"):
        ref.pad_adjoint(np.ones(6), (5,), [(1, 1)])
    with pytest.raises(ValueError, match=r"cols must have shape .* = \(N, 18, 9\)"):
        ref.col2im(np.ones((1, 18, 8)), (2, 5, 5), 3)
    with pytest.raises(ValueError, match="kernel extent 7"):
        ref.im2col(x, 4, dilation=2)


def test_docstring_examples_run():
    result = doctest.testmod(ref, extraglobs={"np": np})
    assert result.failed == 0 and result.attempted > 0
