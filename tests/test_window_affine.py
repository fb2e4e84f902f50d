"""LeNet-5's sub-sampling in one pass: ``elementwise.window_affine`` / ``window_affine_grad``.

References, computed without the code under test: the window sums are the pooling matrix of
:func:`sparseconv.reference.dense_matrix` (the direct convolution of unit inputs with a
per-channel kernel of ones) applied in float64; the parameter gradients are float64 sums of the
float64-cast terms. The compiled kernel and the numpy fallback (taken for blocks that are not
C-contiguous) must give the same bits, and ``Subsampling2d``'s column path must agree with its
batch-first path (the pooling operator) and with PyTorch's ``avg_pool2d`` where installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseconv.nn as nn
from sparseconv.engines import elementwise as ew
from sparseconv.engines.numba import available
from sparseconv.reference import dense_matrix
from sparseconv.testing import assert_allclose


def abs_scale(A: np.ndarray, B: np.ndarray) -> float:
    """The largest sum of absolute terms of ``A @ B``: the magnitude its rounding is relative to."""
    return float((np.abs(A) @ np.abs(B.astype(np.float64))).max(initial=0.0)) or 1.0

GEOMETRIES = [
    # (C, H, W), kernel, stride
    ((6, 28, 28), (2, 2), (2, 2)),     # LeNet-5's S2
    ((16, 10, 10), (2, 2), (2, 2)),    # S4
    ((3, 7, 9), (3, 2), (2, 3)),       # uneven, windows overlap along H
    ((2, 5, 5), (3, 3), (1, 1)),       # overlapping in both directions
    ((1, 4, 4), (4, 4), (1, 1)),       # one window covering the plane
    ((2, 5, 6), (2, 2), (3, 3)),       # gaps: some inputs in no window
]
IDS = [f"{'x'.join(map(str, s))}-k{k[0]}{k[1]}-s{t[0]}{t[1]}" for s, k, t in GEOMETRIES]


def _pool_matrix(shape, kernel, stride):
    """The window-sum matrix in float64 from the direct convolution with a depthwise kernel of ones."""
    c = shape[0]
    return dense_matrix(np.ones((c, 1, *kernel)), shape, stride=stride, groups=c)


def _out_rows(shape, kernel, stride):
    c, h, w = shape
    return c * ((h - kernel[0]) // stride[0] + 1) * ((w - kernel[1]) // stride[1] + 1)


def _data(shape, kernel, stride, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[0]
    X = rng.standard_normal((int(np.prod(shape)), n)).astype(dtype)
    D = rng.standard_normal((_out_rows(shape, kernel, stride), n)).astype(dtype)
    return X, D, rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 5, 64], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
def test_against_pooling_matrix(geom, n, dtype):
    shape, kernel, stride = geom
    X, D, scale, shift = _data(shape, kernel, stride, n, dtype)
    P = _pool_matrix(shape, kernel, stride)
    c, per = shape[0], P.shape[0] // shape[0]
    down, Y = ew.window_affine(X, shape, kernel, stride, scale, shift)
    want = P @ X.astype(np.float64)
    mags = abs_scale(P, X)
    assert_allclose(down, want, scale=mags)
    assert_allclose(Y, want * np.repeat(scale, per)[:, None] + np.repeat(shift, per)[:, None],
                    scale=mags * np.abs(scale).max() + np.abs(shift).max())
    dX, dscale, dshift = ew.window_affine_grad(D, down, shape, kernel, stride, scale)
    scaled = D.astype(np.float64) * np.repeat(scale, per)[:, None].astype(np.float64)
    assert_allclose(dX, P.T @ scaled, scale=abs_scale(P.T, scaled))
    dd, d64 = D.astype(np.float64).reshape(c, -1), down.astype(np.float64).reshape(c, -1)
    # float64 accumulation: the float64 tolerance on the sums of absolute terms.
    assert_allclose(dscale, (dd * d64).sum(axis=1), dtype=np.float64, scale=np.abs(dd * d64).sum())
    assert_allclose(dshift, dd.sum(axis=1), dtype=np.float64, scale=np.abs(dd).sum())
    assert dscale.dtype == dshift.dtype == np.float64


@pytest.mark.skipif(not available(), reason="numba not installed: only the numpy path exists")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=IDS)
def test_compiled_and_numpy_paths_same_bits(geom, dtype):
    """F-ordered blocks take the numpy path; C-ordered ones the kernel."""
    shape, kernel, stride = geom
    X, D, scale, shift = _data(shape, kernel, stride, 7, dtype, seed=1)
    down, Y = ew.window_affine(X, shape, kernel, stride, scale, shift)
    down_np, Y_np = ew.window_affine(np.asfortranarray(X), shape, kernel, stride, scale, shift)
    np.testing.assert_array_equal(down, down_np)
    np.testing.assert_array_equal(Y, Y_np)
    dX, ds, db = ew.window_affine_grad(D, down, shape, kernel, stride, scale)
    dX_np, ds_np, db_np = ew.window_affine_grad(np.asfortranarray(D), np.asfortranarray(down), shape, kernel,
                                                stride, scale)
    overlap = max(-(-kernel[0] // stride[0]), 1) * max(-(-kernel[1] // stride[1]), 1)
    if overlap <= 2:  # two terms add the same in either order
        np.testing.assert_array_equal(dX, dX_np)
    else:
        assert_allclose(dX, dX_np)
    assert_allclose(ds, ds_np, dtype=np.float64, scale=np.abs(ds).max() + 1)
    assert_allclose(db, db_np, dtype=np.float64, scale=np.abs(db).max() + 1)


def test_parameter_gradients_only():
    shape, kernel, stride = GEOMETRIES[0]
    X, D, scale, shift = _data(shape, kernel, stride, 3, np.float32)
    down, _ = ew.window_affine(X, shape, kernel, stride, scale, shift)
    full = ew.window_affine_grad(D, down, shape, kernel, stride, scale)
    dX, ds, db = ew.window_affine_grad(D, down, shape, kernel, stride, scale, input_grad=False)
    assert dX is None
    np.testing.assert_array_equal(ds, full[1])
    np.testing.assert_array_equal(db, full[2])


def test_empty_batch():
    shape, kernel, stride = GEOMETRIES[0]
    X = np.zeros((int(np.prod(shape)), 0), np.float32)
    down, Y = ew.window_affine(X, shape, kernel, stride, np.ones(6, np.float32), np.zeros(6, np.float32))
    assert down.shape == Y.shape == (6 * 14 * 14, 0)
    dX, ds, db = ew.window_affine_grad(Y, down, shape, kernel, stride, np.ones(6, np.float32))
    assert dX.shape == X.shape and not ds.any() and not db.any()


@pytest.mark.parametrize("call, match", [
    (lambda X: ew.window_affine(X, (6, 28), (2, 2), (2, 2), np.ones(6), np.ones(6)), "shape must be"),
    (lambda X: ew.window_affine(X, (6, 28, 28), (2,), (2, 2), np.ones(6), np.ones(6)), "kernel must be"),
    (lambda X: ew.window_affine(X, (6, 28, 28), (2, 2), (0, 2), np.ones(6), np.ones(6)), "stride must be"),
    (lambda X: ew.window_affine(X, (6, 28, 28), (2, True), (2, 2), np.ones(6), np.ones(6)), "kernel must be"),
    (lambda X: ew.window_affine(X, (6, 28, 28), (29, 2), (2, 2), np.ones(6), np.ones(6)), "larger than the plane"),
    (lambda X: ew.window_affine(X, (5, 28, 28), (2, 2), (2, 2), np.ones(5), np.ones(5)), "column block of shape"),
    (lambda X: ew.window_affine(X, (6, 28, 28), (2, 2), (2, 2), np.ones(5), np.ones(6)), "scale must have shape"),
    (lambda X: ew.window_affine(X[:, 0], (6, 28, 28), (2, 2), (2, 2), np.ones(6), np.ones(6)),
     "column block of shape"),
    (lambda X: ew.window_affine_grad(np.ones((10, 2), np.float32), np.ones((10, 2), np.float32), (6, 28, 28),
                                     (2, 2), (2, 2), np.ones(6)), "D must be a column block"),
], ids=["shape-2d", "kernel-1", "stride-0", "kernel-bool", "kernel-too-big", "rows", "scale-shape", "1-d", "grad-rows"])
def test_invalid_input_refused(call, match):
    X = np.ones((6 * 28 * 28, 2), np.float32)
    with pytest.raises(ValueError, match=match):
        call(X)


def test_dtype_rules():
    X = np.ones((6 * 28 * 28, 2), np.int64)
    with pytest.raises(TypeError, match="X must be a float32 or float64 array"):
        ew.window_affine(X, (6, 28, 28), (2, 2), (2, 2), np.ones(6), np.ones(6))
    X = np.ones((6 * 28 * 28, 2), np.float32)
    down, _ = ew.window_affine(X, (6, 28, 28), (2, 2), (2, 2), np.ones(6), np.ones(6))
    with pytest.raises(TypeError, match="one dtype"):
        ew.window_affine_grad(down.astype(np.float64), down, (6, 28, 28), (2, 2), (2, 2), np.ones(6))
    with pytest.raises(TypeError, match="scale must be a real"):
        ew.window_affine(X, (6, 28, 28), (2, 2), (2, 2), np.ones(6, complex), np.ones(6))


@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 4), sw=st.integers(1, 4), n=st.integers(1, 9), f64=st.booleans())
def test_fuzz_against_pooling_matrix(c, h, w, kh, kw, sh, sw, n, f64):
    if kh > h or kw > w:
        with pytest.raises(ValueError, match="larger than the plane"):
            ew.window_affine(np.ones((c * h * w, n)), (c, h, w), (kh, kw), (sh, sw), np.ones(c), np.ones(c))
        return
    dtype = np.float64 if f64 else np.float32
    shape, kernel, stride = (c, h, w), (kh, kw), (sh, sw)
    X, D, scale, shift = _data(shape, kernel, stride, n, dtype, seed=c * 1000 + h * 100 + w)
    P = _pool_matrix(shape, kernel, stride)
    down, _ = ew.window_affine(X, shape, kernel, stride, scale, shift)
    assert_allclose(down, P @ X.astype(np.float64), scale=abs_scale(P, X))
    dX, _, _ = ew.window_affine_grad(D, down, shape, kernel, stride, scale)
    scaled = D.astype(np.float64) * np.repeat(scale, P.shape[0] // c)[:, None]
    assert_allclose(dX, P.T @ scaled, scale=abs_scale(P.T, scaled))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_subsampling_columns_against_batch_first(dtype):
    """The layer's column path (window kernels) against its batch-first path (the pooling matrix)."""
    rng = np.random.default_rng(3)
    layers = [nn.Subsampling2d(4, dtype=dtype), nn.Subsampling2d(4, dtype=dtype)]
    beta, bias = rng.standard_normal(4).astype(dtype), rng.standard_normal(4).astype(dtype)
    for layer in layers:
        layer.params["beta"].data, layer.params["bias"].data = beta, bias
    x = rng.standard_normal((5, 4, 9, 8)).astype(dtype)
    dy = rng.standard_normal((5, 4, 4, 4)).astype(dtype)
    y = layers[0].forward(x)
    dx = layers[0].backward(dy)
    X = np.ascontiguousarray(x.reshape(5, -1).T)
    Y, out = layers[1].forward_columns(X, (4, 9, 8))
    assert out == (4, 4, 4)
    dX = layers[1].backward_columns(np.ascontiguousarray(dy.reshape(5, -1).T), out)
    assert_allclose(Y.T.reshape(y.shape), y)
    assert_allclose(dX.T.reshape(dx.shape), dx)
    for name in ("beta", "bias"):
        assert_allclose(layers[1].params[name].grad, layers[0].params[name].grad)


def test_subsampling_columns_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    layer = nn.Subsampling2d(3, kernel_size=(2, 3), stride=(1, 2))
    beta, bias = rng.standard_normal(3), rng.standard_normal(3)
    layer.params["beta"].data, layer.params["bias"].data = beta, bias
    x = rng.standard_normal((2, 3, 6, 7))
    Y, out = layer.forward_columns(np.ascontiguousarray(x.reshape(2, -1).T), (3, 6, 7))
    xt = torch.from_numpy(x)
    want = (torch.nn.functional.avg_pool2d(xt, (2, 3), stride=(1, 2)) * 6 * torch.from_numpy(beta)[:, None, None]
            + torch.from_numpy(bias)[:, None, None]).numpy()
    assert_allclose(Y.T.reshape(want.shape), want)
    assert out == want.shape[1:]


def test_subsampling_columns_parameters_changed_between_passes_refused():
    layer = nn.Subsampling2d(2)
    X = np.ones((2 * 4 * 4, 3))
    Y, out = layer.forward_columns(X, (2, 4, 4))
    layer.params["beta"].data = np.array([2.0, 3.0])
    with pytest.raises(ValueError, match="changed between forward"):
        layer.backward_columns(np.ones_like(Y), out)
