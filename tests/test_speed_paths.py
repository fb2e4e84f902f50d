"""Correctness of the fast code paths: threaded products, the tap-gather kernel gradient,
chunk boundaries and dtype preservation. No timing here (see ``benchmarks/bench_speed.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import sparseconv as sc
from sparseconv import _sparsetools, factored, parallel
from sparseconv import reference as ref
from sparseconv.engines import policy
from sparseconv.engines import csr as csr_engine
from sparseconv.models import lenet5
from sparseconv.nn import SGD, CrossEntropyLoss
from sparseconv.testing import assert_allclose, dottest

from cases import supported_engines
from magnitudes import magnitudes

DTYPES = ["float32", "float64"]
THREADS = [1, 2, 3, 7]

# (N, C, F, size, kernel, options): odd sizes, strides, groups, dilation, repeating padding.
LAYERS = {
    "N3-C2-F3-9x7-k3-p1": (3, 2, 3, (9, 7), (3, 3), dict(padding=1)),
    "N2-C4-F6-11x11-k3-s2-g2": (2, 4, 6, (11, 11), (3, 3), dict(stride=2, padding=1, groups=2)),
    "N1-C3-F2-13x10-k2x3-d2": (1, 3, 2, (13, 10), (2, 3), dict(dilation=2)),
    "N4-C2-F2-5x5-k5-circular": (4, 2, 2, (5, 5), (5, 5), dict(padding=4, padding_mode="circular")),
    "N5-C1-F4-17-k4-s3-1d": (5, 1, 4, (17,), (4,), dict(stride=3, padding=((2, 1),))),
    "N2-C2-F2-5x6x4-k3-3d-flip": (2, 2, 2, (5, 6, 4), (3, 3, 3), dict(padding="same", flip=True)),
    # Output much smaller than input: the factored adjoint scatters (col2im) in rounds.
    "N3-C4-F4-10x9-k8x6-valid-scatter": (3, 4, 4, (10, 9), (8, 6), dict(stride=(1, 2), groups=2)),
}


def _case(key: str, dtype: str, seed: int = 0):
    n, c, f, size, kernel, opts = LAYERS[key]
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((f, c // opts.get("groups", 1), *kernel)).astype(dtype)
    x = rng.standard_normal((n, c, *size)).astype(dtype)
    op = sc.ConvOperator(w, (c, *size), **opts)
    dy = rng.standard_normal((n, *op.out_shape)).astype(dtype)
    return op, w, x, dy, opts


@pytest.fixture
def small_blocks(monkeypatch):
    """Split even tiny products into many row blocks, so the threaded paths really run."""
    monkeypatch.setattr(parallel, "_MIN_BLOCK_WORK", 1)
    monkeypatch.setattr(factored, "_MIN_THREAD_BLOCK", 1)


# ---------------------------------------------------------------------- parallel module
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("shape", [(1, 1), (37, 23), (200, 150)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n_vecs", [1, 5], ids=lambda n: f"n{n}")
def test_csr_products_match_scipy(small_blocks, dtype, threads, shape, n_vecs):
    a = sp.random_array(shape, density=0.2, format="csr", rng=1, dtype=dtype)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((shape[1], n_vecs)).astype(dtype)
    y = rng.standard_normal((shape[0], n_vecs)).astype(dtype)
    # Forward rows are summed by one thread in storage order: bit-identical.
    out = parallel.csr_matmat(a, x, threads=threads)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, a @ x)
    back = parallel.csr_rmatmat(a, y, threads=threads)
    assert back.dtype == np.dtype(dtype)
    # The scatter's partial sums are added in block order: equal up to rounding.
    assert_allclose(back, a.T @ y, scale=float((abs(a).T @ np.abs(y)).max()) or 1.0)
    if threads == 1:
        np.testing.assert_array_equal(back, a.T @ y)


def test_csr_products_vector_and_out(small_blocks):
    a = sp.random_array((40, 30), density=0.3, format="csr", rng=0)
    x, y = np.arange(30.0), np.arange(40.0)
    assert parallel.csr_matmat(a, x, threads=2).shape == (40,)
    np.testing.assert_allclose(parallel.csr_rmatmat(a, y, threads=2), a.T @ y)
    out = np.full((40, 1), np.nan)
    assert parallel.csr_matmat(a, x[:, None], out=out, threads=2) is out
    np.testing.assert_allclose(out[:, 0], a @ x)
    with pytest.raises(ValueError, match="out must be a C-contiguous float64 array of shape"):
        parallel.csr_matmat(a, x[:, None], out=np.zeros((40, 2)))


def test_empty_rows_and_matrix(small_blocks):
    a = sp.csr_array((np.ones(2), [0, 4], [0, 0, 0, 1, 2, 2]), shape=(5, 6))
    x = np.ones((6, 3))
    for t in THREADS:
        np.testing.assert_array_equal(parallel.csr_matmat(a, x, threads=t), a @ x)
        np.testing.assert_array_equal(parallel.csr_rmatmat(a, np.ones((5, 3)), threads=t), a.T @ np.ones((5, 3)))
    empty = sp.csr_array((4, 3))
    np.testing.assert_array_equal(parallel.csr_matmat(empty, np.ones((3, 2)), threads=2), np.zeros((4, 2)))


def test_row_blocks_balance_nnz():
    indptr = np.array([0, 10, 10, 11, 12, 30, 31])
    bounds = parallel.row_blocks(indptr, 3)
    assert bounds[0] == 0 and bounds[-1] == 6 and np.all(np.diff(bounds) > 0)
    assert parallel.row_blocks(indptr, 1).tolist() == [0, 6]
    assert parallel.row_blocks(np.array([0]), 4).tolist() == [0, 0]


def test_threads_context_is_scoped():
    default = parallel.get_threads()
    assert default == parallel.available_cores()
    with parallel.threads(3) as n:
        assert n == 3 and parallel.get_threads() == 3
        with parallel.threads(1):
            assert parallel.get_threads() == 1
        assert parallel.get_threads() == 3
        assert parallel.get_threads(2) == 2
    assert parallel.get_threads() == default
    with pytest.raises(RuntimeError):
        with parallel.threads(2):
            raise RuntimeError("boom")
    assert parallel.get_threads() == default


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        with parallel.threads(bad):
            pass
    with pytest.raises(ValueError, match="threads must be a positive int"):
        parallel.get_threads(bad)


def test_block_errors_propagate(small_blocks):
    def fail(lo, hi):
        if lo > 0:
            raise ZeroDivisionError("block failed")

    with pytest.raises(ZeroDivisionError, match="block failed"):
        parallel.run_blocks(fail, [0, 1, 2, 3], 2)


# ---------------------------------------------------------------------- the operator
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key, engine", [(key, engine) for key in LAYERS
                                         for engine in supported_engines(_case(key, "float64")[0], "forward", "adjoint")])
def test_operator_threads_agree(small_blocks, key, dtype, engine):
    op, w, x, dy, opts = _case(key, dtype)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    sy, sdx, sdw = magnitudes(x64, w64, dy64, opts)
    y1 = op.forward(x, engine=engine, threads=1)
    dx1 = op.backward_input(dy, engine=engine, threads=1)
    dw1 = op.weight_grad(x, dy, threads=1)
    assert_allclose(y1, ref.conv_im2col(x64, w64, **opts), dtype=dtype, scale=sy)
    assert_allclose(dx1, ref.conv_im2col_backward(x64, w64, dy64, **opts)[0], dtype=dtype, scale=sdx)
    for t in THREADS[1:]:
        y = op.forward(x, engine=engine, threads=t)
        dx = op.backward_input(dy, engine=engine, threads=t)
        dw = op.weight_grad(x, dy, threads=t)
        assert y.dtype == dx.dtype == dw.dtype == np.dtype(dtype)
        # Threads split rows (CSR) or samples (gathers): each output is summed by one
        # thread in a fixed order, so the forward does not depend on the thread count.
        np.testing.assert_array_equal(y, y1)
        assert_allclose(dx, dx1, dtype=dtype, scale=sdx)
        assert_allclose(dw, dw1, dtype=dtype, scale=sdw)
    with parallel.threads(2):
        np.testing.assert_array_equal(op.forward(x, engine=engine), y1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", list(LAYERS))
def test_weight_grad_engines_match_reference_in_both_layouts(key, dtype):
    op, w, x, dy, opts = _case(key, dtype, seed=3)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    _, _, sdw = magnitudes(x64, w64, dy64, opts)
    _, dw_ref, _ = ref.conv_im2col_backward(x64, w64, dy64, **opts)
    n = x.shape[0]
    xc, dc = np.ascontiguousarray(x.reshape(n, -1).T), np.ascontiguousarray(dy.reshape(n, -1).T)
    for engine in [*supported_engines(op, "weight_grad"), "auto"]:
        dw = op.weight_grad(x, dy, engine=engine)
        assert dw.dtype == np.dtype(dtype)
        assert_allclose(dw, dw_ref, dtype=dtype, scale=sdw)
        assert_allclose(op.weight_grad(xc, dc, engine=engine, layout="columns"), dw_ref, dtype=dtype, scale=sdw)


@pytest.mark.parametrize("chunk", [1, 7, 50, 400], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("key", ["N3-C2-F3-9x7-k3-p1", "N2-C4-F6-11x11-k3-s2-g2", "N4-C2-F2-5x5-k5-circular",
                                 "N3-C4-F4-10x9-k8x6-valid-scatter"])
def test_chunk_boundaries(monkeypatch, key, chunk):
    """Scratch chunks smaller than one output row, than one sample, and not dividing the batch."""
    op, w, x, dy, opts = _case(key, "float64", seed=5)
    # The chunked scratch of the csr and factored kernel gradients (the compiled engines have none).
    full = {m: op.weight_grad(x, dy, engine=m) for m in ("csr", "factored")}
    y, dx = op.forward(x, engine="factored"), op.backward_input(dy, engine="factored")
    monkeypatch.setattr(csr_engine, "GRAD_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(factored, "CHUNK_ELEMENTS", chunk)
    for m in full:
        assert_allclose(op.weight_grad(x, dy, engine=m), full[m])
    assert_allclose(op.forward(x, engine="factored"), y)
    assert_allclose(op.backward_input(dy, engine="factored"), dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", list(LAYERS))
def test_factored_products_are_adjoint(key, dtype):
    op = _case(key, dtype)[0]
    lin = op.as_linear_operator("factored")
    dottest(lin)
    u = np.random.default_rng(1).standard_normal((op.shape[1], 3)).astype(dtype)
    assert_allclose(lin @ u, op.matrix @ u, dtype=dtype, scale=float((abs(op.matrix) @ np.abs(u)).max()))


@pytest.mark.parametrize("engine", supported_engines(_case("N3-C2-F3-9x7-k3-p1", "float32")[0], "forward", "adjoint"))
def test_linear_operator_inputs_of_other_dtypes(engine):
    """A float32 operator: complex blocks in two real parts; float64 blocks computed in float64
    with the float32 weights (not rounded to float32); integer blocks promoted as numpy does."""
    op = _case("N3-C2-F3-9x7-k3-p1", "float32")[0]
    lin = op.as_linear_operator(engine)
    w64 = op.matrix.astype(np.float64)
    rng = np.random.default_rng(0)
    u = rng.standard_normal(op.shape[1]).astype(np.float32)
    v = rng.standard_normal(op.shape[1]).astype(np.float32)
    z = lin.matvec(u + 1j * v)
    assert np.iscomplexobj(z)
    assert_allclose(z.real, op.matrix @ u, dtype="float32")
    assert_allclose(z.imag, op.matrix @ v, dtype="float32")
    u64 = rng.standard_normal((op.shape[1], 2))
    for block, adjoint in ((u64, False), (rng.standard_normal((op.shape[0], 2)), True)):
        got = lin.rmatmat(block) if adjoint else lin.matmat(block)
        assert got.dtype == np.float64
        assert_allclose(got, (w64.T if adjoint else w64) @ block, dtype="float64")
    ints = np.arange(op.shape[1], dtype=np.int16)
    assert lin.matvec(ints).dtype == np.float32
    with pytest.raises(TypeError, match="would be rounded"):
        lin.matvec(u.astype(np.longdouble))


@pytest.mark.parametrize("key", list(LAYERS))
def test_tap_tables_factor_the_matrix(key):
    """W = (I_P kron B) S per group: rebuild W densely from the tables and the weight alone."""
    op, w, _, _, _ = _case(key, "float64")
    g = op.geometry
    forward = op._structure.forward_table()
    n_in, groups = int(np.prod(g.in_size)), g.groups
    cin_g, f_per_g = g.in_channels // groups, g.out_channels // groups
    kernel = w.reshape(g.out_channels, cin_g, -1)
    dense = np.zeros((g.out_channels, forward.shape[0], g.in_channels, n_in + 1))
    for f in range(g.out_channels):
        for c in range(cin_g):
            channel = (f // f_per_g) * cin_g + c
            for t in range(kernel.shape[2]):
                np.add.at(dense[f, :, channel], (np.arange(forward.shape[0]), forward[:, t]), kernel[f, c, t])
    assert_allclose(dense[..., :n_in].reshape(op.shape), op.matrix.toarray())
    # The inverse tables list every (output, tap) reading each input position exactly once,
    # and their phases partition the input positions.
    n_read, produced = 0, []
    phases = factored.gather_tables(g, op._structure.spatial)
    for phase in phases:
        positions = np.arange(n_in) if phase.positions is None else phase.positions
        produced.append(positions)
        read = phase.table != forward.shape[0]
        n_read += int(read.sum())
        r, slot = np.nonzero(read)
        np.testing.assert_array_equal(forward[phase.table[r, slot], phase.taps[slot]], positions[r])
    assert n_read == op._structure.spatial.n_items
    np.testing.assert_array_equal(np.sort(np.concatenate(produced)), np.arange(n_in))
    # The engine rule counts the slots without building the tables.
    scatter, slots = factored.adjoint_plan(g, op._structure.spatial)
    assert slots == (forward.size if scatter else sum(p.table.size for p in phases))


def test_strided_adjoint_phases_have_no_holes():
    # Stride 2, 3x3, padding 1: four phases reading 1, 2, 2 and 4 taps (9 in all, not 4 x 9).
    op = sc.ConvOperator(np.ones((8, 8, 3, 3)), (8, 8, 8), stride=2, padding=1)
    assert sorted(p.taps.size for p in op._structure.adjoint_tables().phases) == [1, 2, 2, 4]
    assert factored.adjoint_plan(op.geometry, op._structure.spatial) == (False, 16 * 9)
    assert op.engine("adjoint") == "factored"


def test_scatter_adjoint_rounds_read_disjoint_positions():
    for flip in (False, True):
        op = sc.ConvOperator(np.ones((4, 2, 8, 6)), (4, 10, 9), stride=(1, 2), groups=2, flip=flip)
        tables = op._structure.adjoint_tables()
        rounds, forward = tables.scatter_rounds, op._structure.forward_table()
        assert tables.phases == () and len(rounds) > 1
        n_in = int(np.prod(op.geometry.in_size))
        assert sorted(np.concatenate(rounds).tolist()) == list(range(forward.shape[1]))
        for taps in rounds:
            read = forward[:, taps].reshape(-1)
            read = read[read != n_in]
            assert np.unique(read).size == read.size
    # 1-D valid convolution 10 -> 3 with an 8-tap kernel: taps {0,3,6}, {1,4,7}, {2,5}.
    op1 = sc.ConvOperator(np.ones((1, 1, 8)), (1, 10))
    assert [r.tolist() for r in op1._structure.adjoint_tables().scatter_rounds] == [[0, 3, 6], [1, 4, 7], [2, 5]]


def test_tables_are_built_only_for_the_products_that_use_them():
    # Replicate padding of a 7x7 kernel would need inverse tables 16x the input: never built
    # unless the factored adjoint runs (its one channel sends every product to the CSR kernel).
    op = sc.ConvOperator(np.ones((1, 1, 7, 7), np.float32), (1, 64, 64), padding=3, padding_mode="replicate")
    x = np.ones((2, 1, 64, 64), np.float32)
    op.backward_input(op.forward(x))
    assert op._structure._forward_table is None and op._structure._adjoint_tables is None
    op.weight_grad(x, x)
    assert op._structure._forward_table is not None and op._structure._adjoint_tables is None


def test_tap_tables_multiplicity_when_circular_wraps_twice():
    # 9 outputs read a 5-long circular input: each (position, tap) pair is read twice.
    op = sc.ConvOperator(np.ones((1, 1, 5)), (1, 5), padding=4, padding_mode="circular")
    (phase,) = op._structure.adjoint_tables().phases
    assert phase.table.shape == (5, 10) and phase.taps.tolist() == [t for t in range(5) for _ in range(2)]
    dy = np.random.default_rng(0).standard_normal((2, 1, 9))
    assert_allclose(op.backward_input(dy, engine="factored"), op.backward_input(dy, engine="csr"))


@pytest.mark.parametrize("layer, forward, adjoint", [
    pytest.param(dict(c=1, f=6, size=32, k=5), "csr", "csr", id="lenet-C1-one-channel"),
    pytest.param(dict(c=6, f=16, size=14, k=5), "factored", "csr", id="lenet-C3-adjoint-too-narrow"),
    pytest.param(dict(c=16, f=16, size=32, k=3, padding=1), "factored", "factored", id="cifar-16-16"),
    pytest.param(dict(c=16, f=32, size=32, k=3, padding=1, stride=2), "factored", "factored", id="stride2-phases"),
    pytest.param(dict(c=16, f=120, size=5, k=5), "factored", "factored", id="lenet-C5-adjoint-scatters"),
    pytest.param(dict(c=16, f=16, size=32, k=3, padding=1, prune=0.9), "csr", "csr", id="pruned-90"),
    pytest.param(dict(c=16, f=16, size=32, k=3, padding=1, prune=0.6), "factored", "factored", id="pruned-60-wide"),
    pytest.param(dict(c=8, f=8, size=32, k=3, padding=1, prune=0.6), "csr", "csr", id="pruned-60-narrow"),
    pytest.param(dict(c=16, f=16, size=8, k=3, padding=1, groups=16), "csr", "csr", id="depthwise"),
])
def test_auto_engine_rule(uncompiled_policy, layer, forward, adjoint):
    c, f, size, k = layer["c"], layer["f"], layer["size"], layer["k"]
    groups = layer.get("groups", 1)
    mask = None
    if "prune" in layer:
        mask = np.random.default_rng(0).random((f, c // groups, k, k)) >= layer["prune"]
    w = np.ones((f, c // groups, k, k)) if mask is None else mask * 1.0
    op = sc.ConvOperator(w, (c, size, size), padding=layer.get("padding", 0), stride=layer.get("stride", 1),
                         groups=groups, weight_mask=mask)
    assert (op.engine("forward"), op.engine("adjoint"), op.engine("weight_grad")) == (forward, adjoint, "factored")
    # Only what the chosen engines need is built: the matrix only for a CSR product.
    assert (op._structure._pattern is not None) == ("csr" in (forward, adjoint))


@pytest.mark.parametrize("layer, engines", [
    pytest.param(dict(c=1, f=6, size=32, k=5), ("numba", "numba", "factored"), id="lenet-C1-csr-becomes-numba"),
    pytest.param(dict(c=6, f=16, size=14, k=5), ("factored", "numba", "factored"), id="lenet-C3-adjoint"),
    pytest.param(dict(c=16, f=16, size=32, k=3, padding=1), ("factored",) * 3, id="dense-keeps-blas"),
    pytest.param(dict(c=16, f=16, size=32, k=3, padding=1, prune=0.6), ("numba",) * 3, id="pruned-60"),
    pytest.param(dict(c=16, f=16, size=32, k=3, padding=1, prune=0.9), ("numba",) * 3, id="pruned-90"),
    pytest.param(dict(c=1, f=1, size=64, k=7, padding=3), ("stencil",) * 3, id="image-operator"),
    pytest.param(dict(c=1, f=1, size=64, k=7, padding=3, stride=2), ("numba", "numba", "factored"),
                 id="image-strided-no-stencil"),
])
def test_auto_engine_rule_with_numba(layer, engines):
    """With numba importable: the compiled CSR engine where scipy's kernel ran or at most half the
    weights are kept, the stencil for single-channel images, BLAS for dense multi-channel layers."""
    pytest.importorskip("numba")
    c, f, size, k = layer["c"], layer["f"], layer["size"], layer["k"]
    mask = None
    if "prune" in layer:
        mask = np.random.default_rng(0).random((f, c, k, k)) >= layer["prune"]
    w = np.ones((f, c, k, k)) if mask is None else mask * 1.0
    op = sc.ConvOperator(w, (c, size, size), padding=layer.get("padding", 0), stride=layer.get("stride", 1),
                         weight_mask=mask)
    assert tuple(op.engine(p) for p in ("forward", "adjoint", "weight_grad")) == engines


def test_engine_rule_rejects_unknown_product():
    op = sc.ConvOperator(np.ones((2, 2, 3)), (2, 8))
    with pytest.raises(ValueError, match=r"product must be one of \('forward', 'adjoint', 'weight_grad'\); got 'both'"):
        policy.choose_engine(op._structure, "both")


def test_weight_grad_masked_and_after_set_weight(small_blocks):
    rng = np.random.default_rng(4)
    mask = rng.random((4, 3, 3, 3)) > 0.4
    w = rng.standard_normal(mask.shape) * mask
    op = sc.ConvOperator(w, (3, 8, 8), padding=1, weight_mask=mask)
    x = rng.standard_normal((3, 3, 8, 8))
    dy = rng.standard_normal((3, *op.out_shape))
    _, dw_ref, _ = ref.conv_im2col_backward(x, w, dy, padding=1)
    assert_allclose(op.weight_grad(x, dy, threads=2), dw_ref * mask)
    w2 = rng.standard_normal(mask.shape) * mask
    op.set_weight(w2)
    assert_allclose(op.forward(x, threads=2), ref.conv_im2col(x, w2, padding=1))
    assert_allclose(op.backward_input(dy, threads=2), ref.conv_im2col_backward(x, w2, dy, padding=1)[0])


def test_pooling_threads(small_blocks):
    x = np.random.default_rng(0).standard_normal((3, 2, 9, 9)).astype(np.float32)
    pool = sc.PoolOperator((2, 9, 9), 3, stride=2, dtype=np.float32)
    with parallel.threads(1):
        y1, dx1 = pool.forward(x), pool.backward_input(np.ones((3, *pool.out_shape), np.float32))
    with parallel.threads(4):
        y4, dx4 = pool.forward(x), pool.backward_input(np.ones((3, *pool.out_shape), np.float32))
    assert y4.dtype == dx4.dtype == np.float32
    np.testing.assert_array_equal(y4, y1)
    np.testing.assert_array_equal(dx4, dx1)


# ---------------------------------------------------------------------- float32 end to end
def test_lenet5_float32_never_upcasts(small_blocks):
    """Every activation, gradient, parameter and optimiser state stays float32 in training."""
    net = lenet5(dtype=np.float32, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 1, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 5)
    opt = SGD(net.parameters(), 0.01, momentum=0.9, weight_decay=1e-3)
    loss = CrossEntropyLoss()
    for _ in range(2):
        opt.zero_grad()
        h = x
        for layer in net:
            h = layer.forward(h)
            assert h.dtype == np.float32, layer
        loss(h, labels)
        g = loss.backward()
        assert g.dtype == np.float32
        for layer in reversed(net.layers):
            g = layer.backward(g)
            assert g.dtype == np.float32, layer
        opt.step()
    for p in net.parameters():
        assert p.data.dtype == p.grad.dtype == np.float32
    assert all(v.dtype == np.float32 for v in opt._velocity)
    for layer in net:
        op = getattr(layer, "op", None)
        if isinstance(op, sc.ConvOperator):
            assert op.matrix.dtype == np.float32 and op.weight.dtype == np.float32


def test_float32_operator_rejects_float64_batches():
    op = sc.ConvOperator(np.ones((2, 1, 3, 3), np.float32), (1, 6, 6))
    with pytest.raises(TypeError):
        op.forward(np.ones((1, 1, 6, 6)), threads=2)
    with pytest.raises(TypeError):
        op.weight_grad(np.ones((1, 1, 6, 6), np.float32), np.ones((1, 2, 4, 4)), threads=2)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_public_scipy_fallback_without_private_kernels(monkeypatch, n_threads):
    """Without scipy's private CSR kernels the blocks go through public sparse products."""
    for name in ("csr_matvecs", "csc_matvecs", "csr_matvec", "csc_matvec"):
        monkeypatch.setattr(_sparsetools, name, None)
    rng = np.random.default_rng(0)
    a = sp.random_array((700, 300), density=0.05, format="csr", rng=rng)
    x = rng.standard_normal((300, 9))
    y = rng.standard_normal((700, 9))
    assert_allclose(parallel.csr_matmat(a, x, threads=n_threads), a @ x)
    assert_allclose(parallel.csr_rmatmat(a, y, threads=n_threads), a.T @ y)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_single_right_hand_side(n_threads, dtype):
    """One vector takes scipy's single-vector kernels; same results as scipy."""
    rng = np.random.default_rng(1)
    a = sp.random_array((900, 400), density=0.05, format="csr", rng=rng, dtype=dtype)
    x = rng.standard_normal(400).astype(dtype)
    y = rng.standard_normal(900).astype(dtype)
    for shape_x, shape_y in (((400,), (900,)), ((400, 1), (900, 1))):
        assert_allclose(parallel.csr_matmat(a, x.reshape(shape_x), threads=n_threads), a @ x.reshape(shape_x))
        assert_allclose(parallel.csr_rmatmat(a, y.reshape(shape_y), threads=n_threads), a.T @ y.reshape(shape_y))
