"""The ``"implicit"`` engine (tap lists, no stored matrix) against the dense matrix and the direct convolution.

Forward, adjoint and kernel gradient are compared with :func:`sparseconv.reference.dense_matrix`
(the direct convolution of unit inputs) and :func:`sparseconv.reference.conv_direct_backward`
in float64, on a grid of geometries chosen for the engine's tables: strides larger than the
kernel (stride phases no tap reaches), dilation, groups, flipped kernels, asymmetric padding,
kernels wider than the input, padding beyond the kernel's reach, masks that empty a filter or an
input channel, 1-D to 3-D, and batch widths on both sides of every vector-chunk edge. Random
geometries are drawn by hypothesis.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sparseconv as sc
from sparseconv import reference as ref
from sparseconv.testing import assert_allclose, dottest

from cases import Case
from column_refs import check_products, columns, dense, masked_weight

pytest.importorskip("numba", reason="the implicit engine is compiled by numba (pip install 'sparseconv[fast]')")

from sparseconv.engines.implicit import ENGINE, ImplicitEngine, ImplicitProtocolEngine  # noqa: E402

# Chunk edges: the main chunk is 32 float32 / 16 float64 lanes, the masked tail 16 / 8.
WIDTHS = (1, 3, 15, 16, 17, 31, 32, 33, 65)
DTYPES = ("float32", "float64")

CASES = [
    Case((9,), (3,)),
    Case((11,), (3,), stride=4, padding=1),                              # stride > kernel
    Case((10,), (3,), dilation=3, padding=((4, 1),), flip=True),
    Case((3,), (5,), padding=2),                                         # kernel wider than the input
    Case((7, 6), (3, 3), padding=1),
    Case((10, 7), (3, 3), stride=(3, 2), dilation=(2, 1), padding=((2, 1), (0, 3))),
    Case((9, 8), (2, 2), stride=3, padding=1),                           # stride > kernel
    Case((6, 6), (3, 3), c=4, f=4, groups=4, padding=1, flip=True),      # depthwise
    Case((8, 7), (3, 2), c=4, f=6, groups=2, stride=2, padding="full"),
    Case((3, 4), (5, 5), padding=2),                                     # kernel larger than the input
    Case((4, 4), (3, 3), padding=4, flip=True),                          # padding beyond the kernel's reach
    Case((5, 9), (1, 1), stride=2),
    Case((8, 8), (3, 3), c=5, f=7, dilation=2, padding="same"),
    Case((5, 4, 6), (2, 3, 2), c=4, f=2, groups=2, stride=(2, 1, 3), padding=((1, 0), 1, (0, 2)), flip=True),
    Case((6, 6, 5), (3, 3, 3), dilation=(2, 1, 1), padding=1, stride=(1, 2, 1)),
]
assert all(c.valid() for c in CASES)


def _with(case: Case, **changes) -> Case:
    return dataclasses.replace(case, **changes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.id[:-3] for c in CASES])
def test_products_against_dense_matrix(case, dtype):
    """Every batch width of ``WIDTHS`` on 1, 2 and 3 threads (3 is capped at numba's pool)."""
    case = _with(case, dtype=dtype)
    w = masked_weight(case, None, seed=len(case.id))
    eng = ImplicitEngine(case.geometry(), w)
    assert eng.name == "implicit" and eng.shape == (case.geometry().n_out, case.geometry().n_in)
    assert eng.n_taps == w.size
    matrix = dense(case, w)
    for i, n in enumerate(WIDTHS):
        check_products(eng, case, w, n, threads=1 + i % 3, seed=i, matrix=matrix)


@pytest.mark.parametrize("case", [CASES[5], CASES[13]], ids=["2d", "3d"])
def test_operator_products_on_the_implicit_engine(case):
    """Through ``ConvOperator(engine="implicit")``: batches, bias, LinearOperator and dot test."""
    x, w, b, dy = case.arrays(3)
    op = sc.ConvOperator(w, (case.c, *case.in_size), bias=b, engine="implicit", **case.opts)
    assert {op.engine(p) for p in ("forward", "adjoint", "weight_grad")} == {"implicit"}
    dx_ref, dw_ref, _ = ref.conv_direct_backward(x, w, dy, **case.opts)
    assert_allclose(op.forward(x), ref.conv_direct(x, w, b, **case.opts))
    assert_allclose(op.backward_input(dy), dx_ref)
    assert_allclose(op.weight_grad(x, dy), dw_ref)
    assert_allclose(op.weight_grad(columns(x), columns(dy), layout="columns"), dw_ref)
    assert_allclose(op @ columns(x), dense(case, w) @ columns(x))
    dottest(op)
    dottest(op.as_linear_operator("implicit"))


MASKS = {
    "random-70%-zeros": lambda shape, rng: rng.random(shape) >= 0.7,
    "filter-1-empty": lambda shape, rng: np.where(np.arange(shape[0])[:, None, None, None] == 1, False,
                                                  rng.random(shape) >= 0.3),
    "channel-2-empty": lambda shape, rng: np.where(np.arange(shape[1])[None, :, None, None] == 2, False,
                                                   rng.random(shape) >= 0.3),
    "all-masked": lambda shape, rng: np.zeros(shape, dtype=bool),
    "one-tap": lambda shape, rng: np.arange(int(np.prod(shape))).reshape(shape) == 40,
}
MASK_CASES = [Case((7, 6), (3, 3), c=3, f=4, padding=1),
              Case((7, 6), (3, 3), c=3, f=4, stride=2, padding=((2, 0), (0, 1))),
              Case((9, 7), (3, 3), c=3, f=4, stride=3, dilation=2, padding=3, flip=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: c.id[:-3])
@pytest.mark.parametrize("kind", sorted(MASKS))
def test_masked_layers(kind, case, dtype):
    """Only kept taps are stored; an empty filter gives zero rows, an empty input channel zero
    adjoint rows, masked taps a zero gradient."""
    case = _with(case, dtype=dtype)
    mask = MASKS[kind](case.weight_shape, np.random.default_rng(7))
    w = masked_weight(case, mask, seed=3)
    eng = ImplicitEngine(case.geometry(), w, weight_mask=mask)
    assert eng.n_taps == int(mask.sum())
    matrix = dense(case, w)
    for i, n in enumerate((1, 17, 33)):
        check_products(eng, case, w, n, threads=1 + i % 2, mask=mask, seed=i, matrix=matrix)
    # The same layer through the operator (structure, protocol engine, masked gradient).
    x, _, _, dy = case.arrays(5)
    op = sc.ConvOperator(w, (case.c, *case.in_size), weight_mask=mask, engine="implicit", **case.opts)
    y = op.forward(x)
    assert_allclose(y, ref.conv_direct(x, w, None, **case.opts))
    if kind == "filter-1-empty":
        assert not np.any(y[:, 1])
    if kind == "channel-2-empty":
        assert not np.any(op.backward_input(dy)[:, 2])
    g = op.weight_grad(x, dy)
    assert_allclose(g, np.where(mask, ref.conv_direct_backward(x, w, dy, **case.opts)[1], 0))
    assert not np.any(g[~mask])


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_adjoint_do_not_depend_on_thread_count(dtype):
    """Each output row is summed by one thread in a fixed order: the same bits on 1, 2 and 3
    threads; the kernel gradient's per-thread sums may differ in the last bits only."""
    case = Case((20, 18), (3, 3), c=6, f=5, stride=(2, 1), padding=((2, 1), 1), dtype=dtype)
    w = masked_weight(case, None, seed=1)
    eng = ImplicitEngine(case.geometry(), w)
    rng = np.random.default_rng(2)
    for n in (1, 17, 40):
        X = rng.standard_normal((case.geometry().n_in, n)).astype(dtype)
        D = rng.standard_normal((case.geometry().n_out, n)).astype(dtype)
        y1, z1, g1 = eng.matmat(X, 1), eng.rmatmat(D, 1), eng.weight_grad(X, D, 1)
        for threads in (2, 3):
            assert np.array_equal(eng.matmat(X, threads), y1), (n, threads)
            assert np.array_equal(eng.rmatmat(D, threads), z1), (n, threads)
            assert_allclose(eng.weight_grad(X, D, threads), g1)
        # Vectors: the (in_size,) form gives the first column of the block form.
        assert np.array_equal(eng.matmat(np.ascontiguousarray(X[:, 0]), 2), eng.matmat(X[:, :1], 1)[:, 0])
        assert eng.rmatmat(np.ascontiguousarray(D[:, 0]), 1).shape == (case.geometry().n_in,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_bands(dtype):
    """A block of several MiB is split into more bands than threads (each band's input rows fit
    in L2): the products still match the direct convolution, bit for bit across threads."""
    case = Case((32, 30), (3, 3), c=16, f=8, stride=(1, 2), padding=((1, 2), 1), dtype=dtype)
    x, w, _, dy = dataclasses.replace(case, n=65).arrays(3)
    mask = np.random.default_rng(0).random(w.shape) >= 0.5
    w = np.where(mask, w, 0).astype(dtype)
    eng = ImplicitEngine(case.geometry(), w, weight_mask=mask)
    X, D = columns(x), columns(dy)
    assert X.nbytes > 4 * (1 << 19)  # several bands of the engine's L2 budget
    y = eng.matmat(X, 1)
    z = eng.rmatmat(D, 1)
    assert np.array_equal(eng.matmat(X, 2), y) and np.array_equal(eng.rmatmat(D, 2), z)
    dx, dw, _ = ref.conv_direct_backward(x, w, dy, **case.opts)
    assert_allclose(y, columns(ref.conv_direct(x, w, None, **case.opts)))
    assert_allclose(z, columns(dx))
    for threads in (1, 2):
        assert_allclose(eng.weight_grad(X, D, threads), np.where(mask, dw, 0))


def test_pickled_operator_keeps_its_implicit_engine():
    case = Case((7, 6), (3, 3), c=3, f=4, stride=2, padding=1)
    x, w, b, dy = case.arrays(0)
    op = sc.ConvOperator(w, (case.c, *case.in_size), bias=b, engine="implicit", **case.opts)
    op.backward_input(dy)
    twin = pickle.loads(pickle.dumps(op))
    assert twin.engine("forward") == "implicit"
    twin.set_weight(2 * w)
    assert_allclose(twin.forward(x), ref.conv_direct(x, 2 * w, b, **case.opts))
    assert_allclose(twin.backward_input(dy), ref.conv_direct_backward(x, 2 * w, dy, **case.opts)[0])
    assert_allclose(op.forward(x), ref.conv_direct(x, w, b, **case.opts))


def test_float64_blocks_on_a_float32_engine_compute_in_float64():
    """A float64 block is never rounded to float32: the float32 weights promote exactly."""
    case = Case((7, 8), (3, 3), c=3, f=4, stride=2, padding=1, flip=True, dtype="float32")
    w = masked_weight(case, None, seed=4)
    eng = ImplicitEngine(case.geometry(), w)
    matrix = dense(case, w)
    rng = np.random.default_rng(0)
    for n in (1, 9, 33):
        X = rng.standard_normal((case.geometry().n_in, n)) * (1 + 1e-9)  # not representable in float32
        D = rng.standard_normal((case.geometry().n_out, n))
        y = eng.matmat(X, 2)
        assert y.dtype == np.float64
        assert_allclose(y, matrix @ X, dtype=np.float64)
        z = eng.rmatmat(D, 2)
        assert z.dtype == np.float64
        assert_allclose(z, matrix.T @ D, dtype=np.float64)
        x = X.T.reshape(n, *case.geometry().input_shape)
        dy = D.T.reshape(n, *case.geometry().output_shape)
        g = eng.weight_grad(X, D.astype(np.float32), 2)  # mixed: computed in float64
        assert g.dtype == np.float32  # the gradient of float32 weights
        assert_allclose(g, ref.conv_direct_backward(x, w.astype(np.float64), dy.astype(np.float32).astype(np.float64),
                                                    **case.opts)[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_refresh_and_set_weight_after_construction(dtype):
    """New values reach the forward and the transposed tables built before the refresh."""
    case = Case((6, 7), (3, 3), c=3, f=4, stride=2, padding=1, flip=True, dtype=dtype)
    mask = np.random.default_rng(0).random(case.weight_shape) >= 0.4
    w = masked_weight(case, mask, seed=1)
    w2 = masked_weight(case, mask, seed=2)
    eng = ImplicitEngine(case.geometry(), w, weight_mask=mask)
    eng.rmatmat(np.ones((case.geometry().n_out, 3), dtype))  # builds the transposed tables
    eng.refresh(w2)
    check_products(eng, case, w2, 17, threads=2, mask=mask)
    # Through the operator: set_weight refreshes the implicit engine it has built.
    x, _, _, dy = case.arrays(1)
    op = sc.ConvOperator(w, (case.c, *case.in_size), weight_mask=mask, engine="implicit", **case.opts)
    op.backward_input(dy)
    op.set_weight(w2)
    assert_allclose(op.forward(x), ref.conv_direct(x, w2, None, **case.opts))
    assert_allclose(op.backward_input(dy), ref.conv_direct_backward(x, w2, dy, **case.opts)[0])


def test_bad_input_is_refused_and_leaves_the_engine_unchanged():
    case = Case((5, 6), (3, 3), c=2, f=3, padding=1, dtype="float32")
    w = masked_weight(case, None, seed=0)
    eng = ImplicitEngine(case.geometry(), w)
    X = np.random.default_rng(0).standard_normal((case.geometry().n_in, 4)).astype(np.float32)
    D = np.ones((case.geometry().n_out, 4), np.float32)
    before = eng.matmat(X)
    with pytest.raises(ValueError, match=r"X must have shape \(60, N\)"):
        eng.matmat(X[:-1])
    with pytest.raises(ValueError, match=r"D must have shape \(90, N\)"):
        eng.rmatmat(D[:-1])
    with pytest.raises(TypeError, match="without loss"):
        eng.matmat(X.astype(np.complex64))
    with pytest.raises(ValueError, match="same number of vectors"):
        eng.weight_grad(X, D[:, :2])
    with pytest.raises(ValueError, match="weight must be a float32 array of shape"):
        eng.refresh(np.ones((3, 2, 3, 2), np.float32))
    with pytest.raises(ValueError, match="weight must be a float32 array"):
        eng.refresh(w.astype(np.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        ImplicitEngine(case.geometry(), w.astype(np.int64))
    with pytest.raises(ValueError, match="weight_mask must be a bool array"):
        ImplicitEngine(case.geometry(), w, weight_mask=np.ones(w.shape, dtype=np.int8))
    with pytest.raises(ValueError, match="weight_mask must be a bool array"):
        ImplicitEngine(case.geometry(), w, weight_mask=np.ones(w.shape[1:], dtype=bool))
    assert np.array_equal(eng.matmat(X), before)
    # Other memory orders and lossless casts are accepted.
    assert np.array_equal(eng.matmat(np.asfortranarray(X)), before)
    assert np.array_equal(eng.matmat(X[:, ::-1].copy()[:, ::-1]), before)
    assert np.array_equal(eng.matmat(X.astype(np.float16)), eng.matmat(X.astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_only_zero_padding_is_accepted(mode):
    """The taps of a repeating padding mode read real inputs: the engine refuses such layers."""
    case = Case((6, 7), (3, 3), padding=1, padding_mode=mode)
    w = masked_weight(case, None, seed=0)
    assert not ImplicitEngine.applicable(case.geometry())
    with pytest.raises(ValueError, match="zero padding"):
        ImplicitEngine(case.geometry(), w)
    op = sc.ConvOperator(w, (case.c, *case.in_size), **case.opts)
    for product in ("forward", "adjoint", "weight_grad"):
        assert not op.supports("implicit", product)
    with pytest.raises(ValueError, match="engine 'implicit' cannot run the forward product"):
        op.forward(case.arrays()[0], engine="implicit")
    with pytest.raises(ValueError, match="engine 'implicit' cannot run"):
        sc.ConvOperator(w, (case.c, *case.in_size), engine="implicit", **case.opts)
    # Zero padding of the same layer is accepted.
    zeros = _with(case, padding_mode="zeros")
    op = sc.ConvOperator(w, (case.c, *case.in_size), **zeros.opts)
    assert all(op.supports("implicit", p) for p in ("forward", "adjoint", "weight_grad"))
    assert ENGINE is ImplicitProtocolEngine


@pytest.mark.parametrize("dtype", DTYPES)
def test_nbytes_stay_within_the_estimate(dtype):
    case = Case((9, 8), (3, 3), c=4, f=5, stride=2, padding=1, dtype=dtype)
    mask = np.random.default_rng(0).random(case.weight_shape) >= 0.5
    w = masked_weight(case, mask, seed=0)
    g = case.geometry()
    eng = ImplicitEngine(g, w, weight_mask=mask)
    forward_only = ImplicitEngine.estimate_nbytes(g, eng.n_taps, dtype, adjoint=False)
    assert 0 < eng.nbytes <= forward_only
    eng.build_adjoint()
    assert forward_only < eng.nbytes <= ImplicitEngine.estimate_nbytes(g, eng.n_taps, dtype)
    # The operator charges the budget with the estimates, before building.
    op = sc.ConvOperator(w, (case.c, *case.in_size), weight_mask=mask, engine="implicit", **case.opts)
    assert op.nbytes == ImplicitEngine.estimate_nbytes(g, eng.n_taps, dtype)
    with pytest.raises(sc.MemoryBudgetError):
        sc.ConvOperator(w, (case.c, *case.in_size), weight_mask=mask, engine="implicit", memory_budget=forward_only - 1,
                        **case.opts)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_hold_their_own_values(how):
    case = Case((6, 7), (3, 3), c=2, f=3, padding=1, dtype="float32")
    w = masked_weight(case, None, seed=0)
    eng = ImplicitEngine(case.geometry(), w)
    eng.build_adjoint()
    twin = copy.deepcopy(eng) if how == "deepcopy" else pickle.loads(pickle.dumps(eng))
    twin.refresh(2 * w)
    check_products(twin, case, 2 * w, 5, threads=2)
    check_products(eng, case, w, 5, threads=2)


# ---------------------------------------------------------------------- random geometries
@st.composite
def zero_padded_layers(draw):
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    c, f = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    size = tuple(draw(st.integers(1, 8 if ndim < 3 else 5)) for _ in range(ndim))
    padding = draw(st.one_of(st.integers(0, 3), st.sampled_from(["valid", "full"]),
                             st.tuples(*[st.tuples(st.integers(0, 4), st.integers(0, 4)) for _ in range(ndim)])))
    case = Case(size, kernel, c=c, f=f, stride=stride, padding=padding, dilation=dilation, groups=groups,
                flip=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)))
    masked = draw(st.booleans())
    return case, masked, draw(st.sampled_from(WIDTHS)), draw(st.integers(1, 3)), draw(st.integers(0, 2**16))


@settings(max_examples=50, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(zero_padded_layers().filter(lambda drawn: drawn[0].valid()))
def test_random_zero_padded_layers(drawn):
    case, masked, n, threads, seed = drawn
    rng = np.random.default_rng(seed)
    mask = rng.random(case.weight_shape) >= 0.5 if masked else None
    w = masked_weight(case, mask, seed)
    eng = ImplicitEngine(case.geometry(), w, weight_mask=mask)
    check_products(eng, case, w, n, threads, mask=mask, seed=seed)
