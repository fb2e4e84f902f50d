"""The sparse convolution operator against the independent references, on grids of options."""

from __future__ import annotations

import copy
import itertools
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

import sparseconv as sc
from sparseconv import reference as ref
from sparseconv.geometry import conv_geometry
from sparseconv.testing import assert_allclose, dottest, gradcheck, numerical_gradient

from cases import Case, supported_engines as _supported
from magnitudes import magnitudes


def _grid() -> list[Case]:
    cases = []
    shapes = {1: ((9,), (3,)), 2: ((7, 6), (3, 2)), 3: ((5, 4, 6), (2, 3, 2))}
    for ndim, (size, kernel) in shapes.items():
        paddings = [0, 1, "valid", "same", "full", tuple((1, 0) if a % 2 else (0, 2) for a in range(ndim))]
        if ndim == 3:
            paddings = [0, "same", "full", ((1, 0), 1, (0, 2))]
        for i, (stride, padding, dilation, mode) in enumerate(itertools.product(
                (1, 2), paddings, (1, 2), ("zeros", "circular", "reflect", "replicate"))):
            for groups, c, f in ((1, 2, 3), (2, 4, 2)):
                case = Case(size, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode,
                            groups=groups, c=c, f=f, flip=bool((i + groups) % 2),
                            dtype="float32" if i % 3 == 0 else "float64", n=1 + i % 2)
                if ndim < 3 or (i + groups) % 2 == 0:
                    cases.append(case)
    cases += [
        Case((8, 8), (3, 3), c=4, f=4, groups=4, padding=1, stride=2),
        Case((8, 8), (3, 3), c=3, f=6, groups=3, padding="same", padding_mode="reflect"),
        Case((5, 9), (1, 1), c=3, f=2),
        Case((6, 5), (6, 5), c=1, f=1),
        Case((4,), (5,), padding=1, padding_mode="circular"),
        Case((3, 3), (3, 3), padding=3, padding_mode="circular", flip=True),
        Case((2, 3), (3, 3), padding=2, padding_mode="replicate", stride=(1, 2)),
        Case((10, 7), (3, 3), stride=(3, 2), dilation=(2, 1), padding=((2, 1), (0, 3))),
        Case((6, 6, 6), (3, 3, 3), c=2, f=2, groups=2, padding=1, padding_mode="circular", flip=True),
    ]
    return [c for c in cases if c.valid()]


GRID = _grid()


def _reference_outputs(case: Case, w, b, x, dy):
    y = ref.conv_direct(x, w, b, **case.opts)
    dx, dw, db = ref.conv_direct_backward(x, w, dy, **case.opts)
    return y, dx, dw, db


# The 3-D cases take most of the grid's time: marked slow (deselect with -m "not slow").
GRID_PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if len(c.in_size) == 3 else []) for c in GRID]


@pytest.mark.parametrize("case", GRID_PARAMS)
def test_matches_references(case: Case):
    x, w, b, dy = case.arrays()
    op = sc.ConvOperator(w, (case.c, *case.in_size), bias=b, **case.opts)
    y_ref, dx_ref, dw_ref, db_ref = _reference_outputs(case, w, b, x, dy)
    sy, sdx, sdw = magnitudes(x, w, dy, case.opts)
    sy += float(np.abs(b).max())

    # Every registered engine, whatever "auto" would pick for this shape.
    for engine in _supported(op, "forward"):
        y = op.forward(x, engine=engine)
        assert y.dtype == np.dtype(case.dtype)
        assert_allclose(y, y_ref, scale=sy)
        assert_allclose(y, ref.conv_im2col(x, w, b, **case.opts), scale=sy)
    dense = ref.dense_matrix(w, (case.c, *case.in_size), **case.opts)
    assert_allclose(op.matrix.toarray(), dense)
    assert_allclose((op.matrix @ x.reshape(case.n, -1).T).T, ref.conv_dense(x, w, **case.opts).reshape(case.n, -1),
                    scale=sy)

    dx_i, dw_i, db_i = ref.conv_im2col_backward(x, w, dy, **case.opts)
    dx_d, dw_d, _ = ref.conv_dense_backward(x, w, dy, **case.opts)
    for engine in _supported(op, "adjoint"):
        dx = op.backward_input(dy, engine=engine)
        assert dx.dtype == np.dtype(case.dtype)
        assert_allclose(dx, dx_ref, scale=sdx)
        assert_allclose(dx, dx_i, scale=sdx)
        assert_allclose(dx, dx_d, scale=sdx)
    for engine in _supported(op, "weight_grad"):
        dw = op.weight_grad(x, dy, engine=engine)
        assert dw.dtype == np.dtype(case.dtype) and dw.shape == w.shape
        assert_allclose(dw, dw_ref, scale=sdw)
        assert_allclose(dw, dw_i, scale=sdw)
        assert_allclose(dw, dw_d, scale=sdw)
    assert_allclose(op.bias_grad(dy), db_ref, scale=float(np.abs(dy).sum(axis=(0, *range(2, dy.ndim))).max()))
    dottest(op)
    for engine in _supported(op, "forward", "adjoint"):
        dottest(op.as_linear_operator(engine))


@pytest.mark.parametrize("case", [c for c in GRID if c.dtype == "float64"][::4],
                         ids=[c.id for c in GRID if c.dtype == "float64"][::4])
def test_finite_differences(case: Case):
    x, w, b, dy = case.arrays(2)
    op = sc.ConvOperator(w, (case.c, *case.in_size), bias=b, **case.opts)

    def loss_x(xv):
        return float(np.sum(dy * op.forward(xv)))

    gradcheck(loss_x, x, op.backward_input(dy))

    def loss_w(wv):
        op.set_weight(wv)
        return float(np.sum(dy * op.forward(x)))

    grad_w = op.weight_grad(x, dy)
    gradcheck(loss_w, w, grad_w)
    op.set_weight(w)

    def loss_b(bv):
        op.set_bias(bv)
        return float(np.sum(dy * op.forward(x)))

    gradcheck(loss_b, b, op.bias_grad(dy))


def test_elementwise_numerical_gradient_small():
    case = Case((4, 5), (2, 3), padding=1, padding_mode="reflect", stride=(2, 1))
    x, w, b, dy = case.arrays(4)
    op = sc.ConvOperator(w, (case.c, 4, 5), bias=b, **case.opts)
    assert_allclose(op.backward_input(dy), numerical_gradient(op.forward, x, dy), finite_differences=True)


# ---------------------------------------------------------------------- worked examples
def test_seed001_forward():
    x = np.array([[3, 3, 2, 1, 0], [0, 0, 1, 3, 1], [3, 1, 2, 2, 3], [2, 0, 0, 2, 2], [2, 0, 0, 0, 1]], float)
    k = np.array([[0, 1, 2], [2, 2, 0], [0, 1, 2]], float)
    op = sc.ConvOperator(k[None, None], (1, 5, 5))
    np.testing.assert_array_equal(op.forward(x[None, None])[0, 0], [[12, 12, 17], [10, 17, 19], [9, 6, 14]])


def test_seed000_input_sensitivities():
    w = np.array([[0.2, 0.3], [0.5, 0.6]])
    delta = np.array([[1.0, 1.0], [2.0, 3.0]])
    op = sc.ConvOperator(w[None, None], (1, 3, 3))
    dx = op.backward_input(delta[None, None])[0, 0]
    np.testing.assert_allclose(dx, [[0.2, 0.5, 0.3], [0.9, 2.3, 1.5], [1.0, 2.7, 1.8]], rtol=0, atol=1e-15)
    assert dx[1, 1] == pytest.approx(1 * 0.6 + 1 * 0.5 + 2 * 0.3 + 3 * 0.2, abs=1e-15)


def test_seed004_matrix():
    """3x3 image, 2x2 kernel: a 4x9 matrix, 16 non-zeros, 4 parameters (36 if fully connected)."""
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    op = sc.ConvOperator(w[None, None], (1, 3, 3))
    assert op.matrix.shape == (4, 9) and op.nnz == 16 and op.n_params == 4
    assert len(np.unique(op.param_index)) == 4
    expected = np.array([[1, 2, 0, 3, 4, 0, 0, 0, 0],
                         [0, 1, 2, 0, 3, 4, 0, 0, 0],
                         [0, 0, 0, 1, 2, 0, 3, 4, 0],
                         [0, 0, 0, 0, 1, 2, 0, 3, 4]], float)
    np.testing.assert_array_equal(op.matrix.toarray(), expected)
    np.testing.assert_array_equal(op.param_index, np.tile([0, 1, 2, 3], 4))


def test_flip_is_true_convolution():
    from scipy.signal import convolve2d
    rng = np.random.default_rng(0)
    x, k = rng.standard_normal((6, 7)), rng.standard_normal((3, 2))
    op = sc.ConvOperator(k[None, None], (1, 6, 7), flip=True)
    assert_allclose(op.forward(x[None, None])[0, 0], convolve2d(x, k, mode="valid"))
    full = sc.ConvOperator(k[None, None], (1, 6, 7), flip=True, padding="full")
    assert_allclose(full.forward(x[None, None])[0, 0], convolve2d(x, k, mode="full"))


def test_same_padding_puts_extra_at_end():
    g = conv_geometry((1, 1, 4, 2), (1, 5, 5), padding="same")
    assert g.padding == ((1, 2), (0, 1)) and g.out_size == (5, 5)


# ---------------------------------------------------------------------- structure and values
def test_matrix_format_and_index_dtype():
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3))
    op = sc.ConvOperator(w, (3, 9, 8), padding=1, stride=2)
    m = op.matrix
    assert isinstance(m, sp.csr_array)
    assert m.indices.dtype == np.int32 and m.indptr.dtype == np.int32
    assert m.has_canonical_format
    assert np.all(m.data != 0)
    assert op.param_index.dtype == np.int32


def test_index_dtype_switches_to_int64():
    from sparseconv.pattern import index_dtype
    assert index_dtype(10, 2**31 - 2) == np.int32
    assert index_dtype(10, 2**31 - 1) == np.int64
    assert index_dtype(2**40) == np.int64


def test_set_weight_keeps_pattern_and_buffers():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3))
    op = sc.ConvOperator(w, (2, 6, 6), padding=1)
    data, indices, indptr = op.matrix.data, op.matrix.indices, op.matrix.indptr
    w2 = rng.standard_normal(w.shape)
    op.set_weight(w2)
    assert op.matrix.data is data and op.matrix.indices is indices and op.matrix.indptr is indptr
    assert_allclose(op.matrix.toarray(), sc.ConvOperator(w2, (2, 6, 6), padding=1).matrix.toarray())
    np.testing.assert_array_equal(op.matrix.data, w2.ravel()[op.param_index])


@pytest.mark.parametrize("case", GRID[::3], ids=[c.id for c in GRID[::3]])
def test_set_weight_writes_every_value(case: Case):
    """Whatever writes the values (strided blocks of repeated rows, or the gather), a new
    weight lands exactly where the tying map says, and the old one leaves no trace."""
    _, w, _, _ = case.arrays()
    op = sc.ConvOperator(w, (case.c, *case.in_size), **case.opts)
    w2 = np.random.default_rng(7).standard_normal(w.shape).astype(case.dtype)
    op.matrix  # built, then poisoned through the engine's private writer
    op._engines["csr"]._matrix.writer[...] = np.nan
    op.set_weight(w2)
    np.testing.assert_array_equal(op.matrix.data, (op.tying @ w2.ravel().astype(np.float64)).astype(case.dtype))


@pytest.mark.parametrize("size, kernel, opts, mask, blocks", [
    pytest.param((8, 8), (3, 3), dict(padding=1), False, 9, id="2d-pad1-9-classes"),
    pytest.param((8, 8), (3, 3), dict(padding=1, flip=True, stride=2), False, 4, id="2d-flip-stride2"),
    pytest.param((6, 5, 7), (3, 3, 3), dict(padding="same"), False, 27, id="3d-same"),
    pytest.param((10,), (5,), dict(), False, 1, id="1d-valid-one-class"),
    pytest.param((9, 9), (3, 3), dict(padding=1, padding_mode="circular"), False, 9, id="circular"),
    pytest.param((8, 8), (3, 3), dict(padding=1), True, 27, id="masked-per-filter"),
    pytest.param((9, 9), (9, 9), dict(padding=8), False, None, id="too-many-classes-gathers"),
])
def test_value_layout_blocks(size, kernel, opts, mask, blocks):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, *kernel))
    weight_mask = rng.random(w.shape) > 0.3 if mask else None
    if mask:
        w = w * weight_mask
    op = sc.ConvOperator(w, (2, *size), weight_mask=weight_mask, **opts)
    layout = op._structure.value_layout()
    assert (None if layout is None else len(layout.blocks)) == blocks
    w2 = rng.standard_normal(w.shape) * (1 if weight_mask is None else weight_mask)
    op.set_weight(w2)
    np.testing.assert_array_equal(op.matrix.data, w2.ravel()[op.param_index])


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda op: pickle.loads(pickle.dumps(op))], ids=["deepcopy", "pickle"])
def test_copied_operator_set_weight_updates_its_own_matrix(copier):
    rng = np.random.default_rng(0)
    w, w2 = rng.standard_normal((2, 4, 3, 3, 3))
    x = rng.standard_normal((2, 3, 6, 6))
    op = sc.ConvOperator(w, (3, 6, 6), padding=1)
    op.matrix
    assert op._structure.value_layout() is not None
    twin = copier(op)
    twin.set_weight(w2)
    for engine in _supported(op, "forward"):
        assert_allclose(twin.forward(x, engine=engine), ref.conv_direct(x, w2, padding=1))
        assert_allclose(op.forward(x, engine=engine), ref.conv_direct(x, w, padding=1))
    assert_allclose(twin.matrix.toarray(), sc.conv_matrix(w2, (3, 6, 6), padding=1).toarray())
    assert_allclose(op.matrix.toarray(), sc.conv_matrix(w, (3, 6, 6), padding=1).toarray())


def test_tying_map_reproduces_values_everywhere():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 1, 3, 3))
    for mode in ("zeros", "circular", "reflect", "replicate"):
        op = sc.ConvOperator(w, (1, 2, 3), padding=(1, 2), padding_mode=mode)
        np.testing.assert_allclose(op.matrix.data, op.tying @ w.ravel(), rtol=1e-15, atol=1e-15)
        assert op.tying.shape == (op.nnz, w.size)


def test_multi_weight_entries_have_no_param_index():
    op = sc.ConvOperator(np.ones((1, 1, 3)), (1, 2), padding=1, padding_mode="replicate")
    with pytest.raises(ValueError, match="tying"):
        op.param_index
    assert op.tying.sum(axis=1).max() == 2


def test_weight_mask_removes_entries_and_gradients():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3))
    mask = rng.random(w.shape) > 0.5
    w = w * mask
    op = sc.ConvOperator(w, (3, 7, 7), padding=1, weight_mask=mask)
    full = sc.ConvOperator(w, (3, 7, 7), padding=1)
    assert op.nnz < full.nnz
    assert np.all(mask.ravel()[op.param_index])
    assert_allclose(op.matrix.toarray(), full.matrix.toarray())
    x = rng.standard_normal((2, 3, 7, 7))
    dy = rng.standard_normal((2, *op.out_shape))
    for engine in _supported(op, "weight_grad"):
        assert_allclose(op.weight_grad(x, dy, engine=engine), full.weight_grad(x, dy) * mask)
    with pytest.raises(ValueError, match="weight_mask is False"):
        op.set_weight(rng.standard_normal(w.shape))


def test_operator_is_a_linear_operator():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3))
    op = sc.ConvOperator(w, (2, 6, 5), padding=1, stride=(2, 1))
    lin = op
    assert isinstance(lin, LinearOperator) and lin.shape == op.shape and lin.dtype == op.dtype
    x = rng.standard_normal((4, 2, 6, 5))
    assert_allclose(lin.matmat(x.reshape(4, -1).T).T, op.forward(x).reshape(4, -1))
    dy = rng.standard_normal((4, *op.out_shape))
    assert_allclose(lin.rmatmat(dy.reshape(4, -1).T).T, op.backward_input(dy).reshape(4, -1))
    assert_allclose(lin.H.matvec(dy[0].ravel()), op.backward_input(dy[:1]).ravel())
    dottest(lin)
    from scipy.sparse.linalg import svds
    s = svds(lin, k=1, return_singular_vectors=False, random_state=0)
    assert_allclose(s, np.linalg.svd(op.to_dense(), compute_uv=False)[:1])


def test_float32_stays_float32():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 2, 3)).astype(np.float32)
    op = sc.ConvOperator(w, (2, 8), bias=np.zeros(2, np.float32))
    assert op.matrix.dtype == np.float32
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    dy = rng.standard_normal((3, *op.out_shape)).astype(np.float32)
    for out in (op.forward(x), op.backward_input(dy), op.weight_grad(x, dy), op.weight_grad(x, dy, engine="csr"),
                op.bias_grad(dy)):
        assert out.dtype == np.float32
    with pytest.raises(TypeError, match="float64.*float32"):
        op.forward(x.astype(np.float64))


def test_integer_weight_becomes_float64():
    op = sc.ConvOperator(np.ones((1, 1, 2), dtype=int), (1, 4))
    assert op.dtype == np.float64
    np.testing.assert_array_equal(op.forward(np.arange(4)[None, None]), [[[1, 3, 5]]])


def test_conv_matrix_function_equals_operator_matrix():
    w = np.random.default_rng(0).standard_normal((2, 1, 3, 3, 2))
    W = sc.conv_matrix(w, (2, 4, 5, 3), groups=2, padding="same", padding_mode="circular")
    op = sc.ConvOperator(w, (2, 4, 5, 3), groups=2, padding="same", padding_mode="circular")
    assert (W != op.matrix).nnz == 0


def test_memory_budget_refuses_before_allocating():
    w = np.ones((64, 64, 3, 3))
    with pytest.raises(sc.MemoryBudgetError, match=r"would need .*MiB.*memory_budget=") as info:
        sc.ConvOperator(w, (64, 56, 56), padding=1, memory_budget=10 * 2**20, engine="csr")
    assert "SPARSECONV_MEMORY_BUDGET" in str(info.value)


def test_memory_budget_counts_only_what_the_engines_build():
    """The factored engines of a wide layer need tables of a few hundred KiB, not the matrix:
    the layer fits a budget its matrix would not, and the matrix is refused when asked for."""
    w = np.ones((64, 64, 3, 3))
    op = sc.ConvOperator(w, (64, 56, 56), padding=1, memory_budget="10MiB")
    assert (op.engine("forward"), op.engine("adjoint")) == ("factored", "factored")
    assert 0 < op.nbytes < 2**20
    before = op.nbytes
    with pytest.raises(sc.MemoryBudgetError, match=r"sparse matrix .*would need .*GiB"):
        op.matrix
    assert op.nbytes == before and "csr" not in op._engines


def test_memory_budget_environment(monkeypatch):
    monkeypatch.setenv("SPARSECONV_MEMORY_BUDGET", "1000")
    with pytest.raises(sc.MemoryBudgetError):
        sc.ConvOperator(np.ones((2, 2, 3, 3)), (2, 8, 8))
    monkeypatch.setenv("SPARSECONV_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="SPARSECONV_MEMORY_BUDGET"):
        sc.ConvOperator(np.ones((2, 2, 3, 3)), (2, 8, 8))
