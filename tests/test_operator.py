"""The operators as scipy LinearOperators on engines: the contract, the lazy and guarded matrix,
the memory budget, empty batches and the non-finite rule."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.sparse.linalg import LinearOperator, aslinearoperator

import sparseconv as sc
from sparseconv import reference as ref
from sparseconv.testing import assert_allclose, dottest

from cases import supported_engines

RNG = np.random.default_rng(0)


def _conv(dtype="float64", **opts):
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(dtype)
    return sc.ConvOperator(w, (3, 7, 6), **({"padding": 1} | opts))


OPERATORS = {
    "conv-f64": lambda: _conv(),
    "conv-f32-strided": lambda: _conv("float32", stride=2),
    "conv-wide-factored": lambda: sc.ConvOperator(np.random.default_rng(2).standard_normal((16, 16, 3, 3)),
                                                  (16, 6, 6), padding=1),
    "transpose": lambda: sc.ConvTransposeOperator(np.random.default_rng(3).standard_normal((3, 2, 3, 3)), (3, 4, 5),
                                                  stride=2, padding=1, output_padding=1),
    "transpose-wide-output-padding": lambda: sc.ConvTransposeOperator(
        np.random.default_rng(4).standard_normal((2, 2, 3)), (2, 5), stride=1, dilation=3, output_padding=2),
    "pool-avg": lambda: sc.PoolOperator((3, 6, 6), 2),
    "pool-sum-f32": lambda: sc.PoolOperator((2, 7, 5), 3, stride=2, padding=1, kind="sum", dtype=np.float32),
}


# ---------------------------------------------------------------------- LinearOperator contract
@pytest.mark.parametrize("key", list(OPERATORS))
def test_linear_operator_contract(key):
    op = OPERATORS[key]()
    assert isinstance(op, LinearOperator) and aslinearoperator(op) is op
    m = op.matrix.toarray().astype(np.float64)
    assert op.shape == m.shape and op.dtype == op.matrix.dtype
    rng = np.random.default_rng(5)
    v, y = rng.standard_normal(op.shape[1]).astype(op.dtype), rng.standard_normal(op.shape[0]).astype(op.dtype)
    X, Y = rng.standard_normal((op.shape[1], 4)).astype(op.dtype), rng.standard_normal((op.shape[0], 3)).astype(op.dtype)
    assert_allclose(op @ v, m @ v)
    assert_allclose(op @ X, m @ X)
    assert_allclose(op.H @ y, m.T @ y)
    assert_allclose(op.T @ Y, m.T @ Y)
    assert_allclose(op.rmatmat(Y), m.T @ Y)
    assert (op @ X).dtype == op.dtype
    assert (op @ np.zeros((op.shape[1], 0), op.dtype)).shape == (op.shape[0], 0)
    dottest(op)
    dottest(op.H)


@pytest.mark.parametrize("key, engine", [
    (key, engine) for key in ["conv-f64", "conv-wide-factored", "transpose", "pool-avg"]
    for engine in supported_engines(OPERATORS[key](), "forward", "adjoint")])
def test_every_engine_is_a_linear_operator(key, engine):
    op = OPERATORS[key]()
    lin = op.as_linear_operator(engine)
    m = op.matrix.toarray()
    X = np.random.default_rng(6).standard_normal((op.shape[1], 3))
    assert_allclose(lin @ X, m @ X)
    dottest(lin)


def test_composition_runs_on_the_operators():
    conv = sc.ConvOperator(np.random.default_rng(7).standard_normal((3, 2, 3, 3)), (2, 8, 8), padding=1)
    pool = sc.PoolOperator((3, 8, 8), 2)
    up = sc.ConvTransposeOperator(np.random.default_rng(8).standard_normal((3, 2, 2, 2)), (3, 4, 4), stride=2)
    chain = up @ pool @ conv
    assert isinstance(chain, LinearOperator) and chain.shape == (up.shape[0], conv.shape[1])
    dense = up.matrix.toarray() @ pool.matrix.toarray() @ conv.matrix.toarray()
    X = np.random.default_rng(9).standard_normal((conv.shape[1], 2))
    assert_allclose(chain @ X, dense @ X)
    assert_allclose(chain.H @ (chain @ X), dense.T @ (dense @ X))
    dottest(chain)
    dottest(pool @ conv)


def test_products_do_not_build_the_matrix():
    op = OPERATORS["conv-wide-factored"]()
    assert op.engine("forward") == op.engine("adjoint") == "factored"
    X = np.random.default_rng(0).standard_normal((op.shape[1], 2))
    op.H @ (op @ X)
    op.weight_grad(np.ones((1, *op.input_shape)), np.ones((1, *op.out_shape)))
    assert op._structure._pattern is None and "csr" not in op._engines


def test_weight_grad_columns_layout_takes_operator_blocks():
    op = _conv()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, *op.input_shape))
    dy = rng.standard_normal((5, *op.out_shape))
    X, D = x.reshape(5, -1).T, dy.reshape(5, -1).T  # views, as a LinearOperator user holds them
    for engine in supported_engines(op, "weight_grad"):
        assert_allclose(op.weight_grad(X, D, layout="columns", engine=engine), ref.conv_direct_backward(x, op.weight, dy, padding=1)[1])
    with pytest.raises(ValueError, match=r"x must have shape \(126, N\) with layout='columns'"):
        op.weight_grad(X.T, D, layout="columns")
    with pytest.raises(ValueError, match=r"same number of samples; got 5 \(x\) and 4 \(dy\)"):
        op.weight_grad(X, D[:, :4], layout="columns")


def test_max_pool_is_not_a_linear_operator():
    mp = sc.MaxPoolOperator((1, 4, 4), 2)
    assert not isinstance(mp, LinearOperator)
    assert "Not a ``LinearOperator``: which input each output copies depends on the input" in type(mp).__doc__
    with pytest.raises(TypeError, match="max pooling is not linear"):
        dottest(mp)
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 4))
    dottest(mp.selection_matrix(x))


# ---------------------------------------------------------------------- engines
def test_engine_choice_keyword_and_environment(monkeypatch):
    w = np.ones((16, 16, 3, 3))
    op = sc.ConvOperator(w, (16, 8, 8), padding=1)
    assert [op.engine(p) for p in ("forward", "adjoint", "weight_grad")] == ["factored"] * 3
    forced = sc.ConvOperator(w, (16, 8, 8), padding=1, engine="csr")
    assert [forced.engine(p) for p in ("forward", "adjoint", "weight_grad")] == ["csr"] * 3
    monkeypatch.setenv("SPARSECONV_ENGINE", "csr")
    assert sc.ConvOperator(w, (16, 8, 8), padding=1).engine("forward") == "csr"
    assert sc.ConvOperator(w, (16, 8, 8), padding=1, engine="auto").engine("forward") == "factored"
    x = np.random.default_rng(0).standard_normal((2, 16, 8, 8))
    dy = np.random.default_rng(1).standard_normal((2, 16, 8, 8))
    assert_allclose(op.weight_grad(x, dy, engine="auto"), op.weight_grad(x, dy, engine="csr"))


def test_prepare_builds_an_engine_before_its_first_call(uncompiled_policy):
    # One channel: CSR products, and the kernel gradient on the factored engine, whose tap
    # table (64 outputs x 9 taps of intp) is otherwise built at the first weight_grad call.
    op = sc.ConvOperator(np.ones((1, 1, 3, 3)), (1, 8, 8), padding=1)
    assert [op.engine(p) for p in ("forward", "adjoint", "weight_grad")] == ["csr", "csr", "factored"]
    before = op.nbytes
    with pytest.raises(ValueError, match=r"product must be one of .*; got 'both'"):
        op.prepare("weight_grad", "both")
    assert op.nbytes == before  # refused before anything was built
    op.prepare("weight_grad")
    assert op.nbytes == before + 64 * 9 * np.dtype(np.intp).itemsize
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    op.weight_grad(x, x)
    assert op.nbytes == before + 64 * 9 * np.dtype(np.intp).itemsize


def test_transposed_and_pool_report_their_engines(uncompiled_policy):
    up = sc.ConvTransposeOperator(np.ones((16, 4, 3, 3)), (16, 5, 5))
    assert up.engine("forward") == up.conv.engine("adjoint") and up.engine("adjoint") == up.conv.engine("forward")
    assert sc.PoolOperator((2, 4, 4), 2).engine("forward") == "csr"


# ---------------------------------------------------------------------- lazy matrix
def test_matrix_is_built_on_first_access_and_equals_conv_matrix():
    w = np.random.default_rng(0).standard_normal((16, 16, 3, 3))
    op = sc.ConvOperator(w, (16, 9, 9), padding=1)
    assert op._structure._pattern is None
    tables = op.nbytes
    assert (op.matrix != sc.conv_matrix(w, (16, 9, 9), padding=1)).nnz == 0
    assert op.matrix is op.matrix
    assert op.nbytes > tables
    w2 = np.random.default_rng(1).standard_normal(w.shape)
    op.set_weight(w2)
    assert (op.matrix != sc.conv_matrix(w2, (16, 9, 9), padding=1)).nnz == 0


def test_nnz_without_building():
    for opts in (dict(padding=1), dict(stride=2, padding=(1, 2)), dict(padding="full", dilation=2)):
        mask = np.random.default_rng(0).random((16, 16, 3, 3)) > 0.3
        op = sc.ConvOperator(mask * 1.0, (16, 7, 8), weight_mask=mask, **opts)
        n = op.nnz
        assert op._structure._pattern is None
        assert n == op.matrix.nnz == int(np.count_nonzero(op.matrix.data))
        assert sc.ConvOperator(np.ones(mask.shape), (16, 7, 8), **opts).nnz == sc.conv_matrix(
            np.ones(mask.shape), (16, 7, 8), **opts).nnz


def test_conv_matrix_is_the_callers_to_edit():
    W = sc.conv_matrix(np.ones((1, 1, 2)), (1, 4))
    W.data[0] = 7.0
    W.eliminate_zeros()
    assert W[0, 0] == 7.0
    P = sc.pool_matrix((1, 4), 2)
    P.data *= 2
    T = sc.conv_transpose_matrix(np.ones((1, 1, 2)), (1, 3))
    T.data[:] = 0


# ---------------------------------------------------------------------- guarded matrix
def _rebuilt(op, w):
    return sc.conv_matrix(w, op.input_shape, padding=1)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m.data.__setitem__(0, 5.0), id="data-item"),
    pytest.param(lambda m: m.data.__imul__(2), id="data-imul"),
    pytest.param(lambda m: m.indices.__setitem__(0, 10**6), id="indices-item"),
    pytest.param(lambda m: m.indptr.__setitem__(-1, 10**9), id="indptr-item"),
    pytest.param(lambda m: setattr(m.data.flags, "writeable", True), id="data-flag"),
    pytest.param(lambda m: setattr(m.indices.flags, "writeable", True), id="indices-flag"),
    pytest.param(lambda m: m.eliminate_zeros(), id="eliminate_zeros"),
    pytest.param(lambda m: (setattr(m, "has_sorted_indices", False), m.sort_indices()), id="sort_indices"),
    pytest.param(lambda m: m.__imul__(3), id="scalar-imul"),
])
def test_in_place_edits_of_the_matrix_are_refused(edit):
    op = _conv()
    w = op.weight.copy()
    w[0, 0, 0, 0] = 0.0
    op.set_weight(w)  # an explicit zero for eliminate_zeros to find
    with pytest.raises(ValueError, match="read-only|WRITEABLE"):
        edit(op.matrix)
    w2 = np.random.default_rng(3).standard_normal(w.shape)
    op.set_weight(w2)
    assert (op.matrix != _rebuilt(op, w2)).nnz == 0


@pytest.mark.parametrize("op_factory", [_conv, lambda: OPERATORS["transpose"]()], ids=["conv", "transpose"])
@pytest.mark.parametrize("replace", [
    pytest.param(lambda m: setattr(m, "data", m.data * 2), id="data"),
    pytest.param(lambda m: setattr(m, "indices", m.indices.copy()), id="indices"),
    pytest.param(lambda m: m.setdiag(1.0), id="setdiag"),
    pytest.param(lambda m: m.resize((3, 3)), id="resize"),
])
def test_replaced_matrix_arrays_are_detected(op_factory, replace):
    op = op_factory()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, *op.input_shape))
    y = op.forward(x)
    w_before = op.weight.copy()
    m = op.matrix
    w2 = rng.standard_normal(w_before.shape)
    try:
        replace(m)
    except ValueError as exc:
        # scipy writes this edit in place and the read-only arrays refuse it; resize replaces
        # some arrays before it fails, which the check then catches as below.
        assert "read-only" in str(exc)
        try:
            op.set_weight(w2)
        except sc.MatrixModifiedError:
            pass
        else:
            assert_allclose(op.matrix.toarray() @ x.reshape(2, -1).T, op.forward(x, engine="csr").reshape(2, -1).T)
            return
    with pytest.raises(sc.MatrixModifiedError, match="op.matrix was modified"):
        op.set_weight(w2)
    np.testing.assert_array_equal(op.weight, w_before)  # nothing half-applied
    np.testing.assert_array_equal(op.forward(x), y)
    with pytest.raises(sc.MatrixModifiedError):
        op.matrix
    kept = [a.copy() for a in (m.data, m.indices, m.indptr)]
    op.release_matrix()
    op.set_weight(w2)
    for array, before in zip((m.data, m.indices, m.indptr), kept):  # the detached matrix keeps what it had
        np.testing.assert_array_equal(array, before)
    assert_allclose(op.matrix.toarray() @ x.reshape(2, -1).T, op.forward(x, engine="csr").reshape(2, -1).T)


def test_index_arrays_and_mask_are_read_only_copies():
    mask = np.ones((4, 3, 3, 3), bool)
    mask[0, 0] = False
    w = np.random.default_rng(0).standard_normal(mask.shape) * mask
    op = sc.ConvOperator(w, (3, 6, 6), weight_mask=mask)
    mask[:] = True  # the caller's array: the operator keeps its own
    assert not op.weight_mask[0, 0].any()
    with pytest.raises(ValueError, match="read-only"):
        op.weight_mask[0, 0] = True
    with pytest.raises(ValueError, match="weight_mask is False"):
        op.set_weight(np.ones(mask.shape))
    for array in (op.param_index, op.matrix.indices, op.matrix.indptr, op.weight):
        with pytest.raises(ValueError):
            array.flags.writeable = True


# ---------------------------------------------------------------------- memory budget
def test_budget_strings_and_refusals():
    w = np.ones((2, 2, 3, 3))
    assert sc.ConvOperator(w, (2, 8, 8), memory_budget="1GiB").nnz > 0
    assert sc.ConvOperator(w, (2, 8, 8), memory_budget=2**20).nnz > 0
    with pytest.raises(ValueError, match=r"memory_budget must be positive .*-5"):
        sc.ConvOperator(w, (2, 8, 8), memory_budget=-5)
    with pytest.raises(ValueError, match=r"memory_budget must be a number of bytes .*'lots'"):
        sc.ConvOperator(w, (2, 8, 8), memory_budget="lots")
    with pytest.raises(TypeError, match="memory_budget must be"):
        sc.ConvOperator(w, (2, 8, 8), memory_budget=True)
    with pytest.raises(sc.MemoryBudgetError, match="would need"):
        sc.ConvOperator(w, (2, 8, 8), memory_budget="1KiB", engine="csr")


_PEAK_SCRIPT = textwrap.dedent("""
    import resource, tracemalloc
    import numpy as np
    import sparseconv as sc
    w = np.ones((64, 64, 3, 3), np.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    refused = []
    try:
        sc.ConvOperator(w, (64, 56, 56), padding=1, memory_budget="100MiB", engine="csr")
    except sc.MemoryBudgetError:
        refused.append("construction")
    op = sc.ConvOperator(w, (64, 56, 56), padding=1, memory_budget="100MiB")
    try:
        op.matrix
    except sc.MemoryBudgetError:
        refused.append("matrix")
    peak = tracemalloc.get_traced_memory()[1]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(",".join(refused), peak, (rss - rss0) * 1024)
""")


def test_budget_refuses_before_allocating_in_a_fresh_process():
    """The 64->64 3x3 56x56 float32 layer's matrix is 1.3 GiB: refused at a 100 MiB budget with
    a peak of a few MiB, both when the CSR engine is forced and when the matrix is asked for."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True)
    refused, peak, rss_growth = out.stdout.split()
    assert refused == "construction,matrix"
    assert int(peak) < 32 * 2**20, f"tracemalloc peak {int(peak) / 2**20:.1f} MiB"
    assert int(rss_growth) < 100 * 2**20, f"maxrss grew by {int(rss_growth) / 2**20:.1f} MiB"


# ---------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("key", list(OPERATORS))
def test_empty_batches_give_empty_outputs(key):
    op = OPERATORS[key]()
    x = np.zeros((0, *op.input_shape), op.dtype)
    dy = np.zeros((0, *op.out_shape), op.dtype)
    assert op.forward(x).shape == (0, *op.out_shape)
    assert op.backward_input(dy).shape == (0, *op.input_shape)
    if hasattr(op, "weight_grad"):
        g = op.weight_grad(x, dy)
        assert g.shape == op.weight.shape and not g.any()
    if hasattr(op, "bias_grad"):
        assert op.bias_grad(dy).shape == (op.out_shape[0],)


def test_empty_batch_max_pool():
    mp = sc.MaxPoolOperator((2, 4, 4), 2)
    assert mp.forward(np.zeros((0, 2, 4, 4))).shape == (0, 2, 2, 2)
    assert mp.backward_input(np.zeros((0, 2, 2, 2))).shape == (0, 2, 4, 4)


# ---------------------------------------------------------------------- non-finite values
def test_non_finite_rule():
    """The documented rule: for finite data the engines agree; the CSR engine multiplies
    stored entries only (finite where a non-finite weight meets padding only, as PyTorch),
    the factored engine multiplies padding taps as zeros (NaN there)."""
    w = np.ones((1, 1, 3, 3))
    w[0, 0, 0, 0] = np.inf  # the top-left tap: reads padding at the first output row and column
    op = sc.ConvOperator(w, (1, 4, 4), padding=1)
    x = np.ones((1, 1, 4, 4))
    csr = op.forward(x, engine="csr")[0, 0]
    with np.errstate(invalid="ignore"):  # 0 * inf, by the rule under test
        fac = op.forward(x, engine="factored")[0, 0]
    border = np.zeros((4, 4), bool)
    border[0, :] = border[:, 0] = True
    assert np.all(np.isfinite(csr[border])) and np.all(np.isinf(csr[~border]))
    assert_allclose(csr[border], ref.conv_direct(x, np.where(np.isinf(w), 0, w), padding=1)[0, 0][border])
    assert np.all(np.isnan(fac[border])) and np.all(np.isinf(fac[~border]))


def test_float64_blocks_on_a_float32_matrix_keep_one_promoted_copy_in_sync():
    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    op = sc.ConvOperator(w, (2, 6, 6), padding=1, engine="csr")
    X = np.random.default_rng(1).standard_normal((op.shape[1], 2))
    before = op.nbytes
    assert_allclose(op @ X, op.matrix.astype(np.float64) @ X, dtype="float64")
    assert op.nbytes == before + op.nnz * 8
    w2 = np.random.default_rng(2).standard_normal(w.shape).astype(np.float32)
    op.set_weight(w2)
    assert_allclose(op @ X, sc.conv_matrix(w2.astype(np.float64), (2, 6, 6), padding=1) @ X, dtype="float64")
    assert_allclose(op.H @ (op @ X), op.matrix.T.astype(np.float64) @ (op.matrix.astype(np.float64) @ X), dtype="float64")
