"""The fused epilogue: ``op.affine(X, bias, relu=...)`` and the compiled engines' ``matmat(..., bias, relu)``.

Two promises are checked on every engine that runs a layer's forward: the result is
``max(W @ X + bias per channel, 0)`` of the dense matrix (:func:`sparseconv.reference.dense_matrix`,
float64) within tolerance, and it has exactly the bits of the same engine's ``op @ X`` followed
by numpy's bias add and ``np.maximum`` (NaN stays NaN). Then the argument checks, empty and
one-column blocks, and the engines' own ``matmat`` keywords.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

import sparseconv as sc
from sparseconv.parallel import threads
from sparseconv.testing import assert_allclose

from cases import Case, supported_engines
from column_refs import dense, masked_weight

LAYERS = {
    "conv2d-p1": (Case((7, 6), (3, 3), c=3, f=4, padding=1), None),
    "image-1ch": (Case((9, 9), (3, 3), c=1, f=1, padding=1), None),
    "depthwise": (Case((8, 7), (3, 3), c=3, f=3, groups=3, padding=1, flip=True), None),
    "wide-8to8": (Case((6, 6), (3, 3), c=8, f=8, padding=1), None),
    "conv1d-s2-g2": (Case((11,), (3,), c=4, f=4, groups=2, stride=2), None),
    "conv3d": (Case((4, 5, 3), (2, 2, 2), c=2, f=3, padding=1), None),
    "reflect": (Case((7, 6), (3, 3), c=2, f=3, padding=1, padding_mode="reflect"), None),
    "pruned-80": (Case((8, 8), (3, 3), c=6, f=5, padding=1), 0.8),
}
DTYPES = ("float32", "float64")
WIDTHS = (1, 5, 33)


def _layer(name: str, dtype: str):
    case, masked = LAYERS[name]
    case = Case(case.in_size, case.kernel, c=case.c, f=case.f, dtype=dtype, **case.opts)
    mask = None if masked is None else np.random.default_rng(3).random(case.weight_shape) >= masked
    w = masked_weight(case, mask, seed=4)
    op = sc.ConvOperator(w, (case.c, *case.in_size), weight_mask=mask, **case.opts)
    return case, op, w


def _epilogue(Y: np.ndarray, bias, relu: bool, channels: int) -> np.ndarray:
    """``Y`` plus ``bias[c]`` on every row of channel ``c``, then ``np.maximum(., 0)`` (numpy, new array)."""
    Y = np.array(Y)
    if bias is not None:
        Y = (Y.reshape(channels, -1, Y.shape[1]) + bias[:, None, None]).reshape(Y.shape)
    return np.maximum(Y, 0) if relu else Y


@pytest.fixture
def one_thread():
    """Products on the calling thread: the tests that use it check values and arguments, not
    threading (the compiled engines' launches are slow on a loaded machine)."""
    with threads(1):
        yield


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_affine_on_every_engine(name, dtype):
    case, op, w = _layer(name, dtype)
    engines = supported_engines(op, "forward")
    A = dense(case, w)
    rng = np.random.default_rng(0)
    b = rng.standard_normal(case.f).astype(dtype)
    for n in WIDTHS:
        X = rng.standard_normal((op.shape[1], n)).astype(dtype)
        X64 = X.astype(np.float64)
        scale = float((np.abs(A) @ np.abs(X64)).max()) + float(np.abs(b).max())
        # Every call of one width on the same thread count (the widest on two): the unfused
        # product it is compared with bit for bit runs on as many.
        with threads(2 if n == max(WIDTHS) else 1):
            _check_affine(op, engines, X, b, A @ X64, scale, case.f, n)
        # No engine named: the operator's forward engine, same bits as naming it.
        assert _same_bits(op.affine(X, b, relu=True, threads=1),
                          op.affine(X, b, relu=True, engine=op.engine("forward"), threads=1))


def _check_affine(op, engines, X, b, exact, scale, channels, n):
    """``op.affine`` on every engine, relu and bias against the exact product and the unfused one."""
    for engine in engines:
        for relu in (False, True):
            for bias in (None, b):
                tag = f"{engine} N={n} relu={relu} bias={bias is not None}"
                Y = op.affine(X, bias, relu=relu, engine=engine)
                assert Y.shape == (op.shape[0], n) and Y.dtype == op.dtype, tag
                assert_allclose(Y, _epilogue(exact, bias, relu, channels), scale=scale, err_msg=tag)
                unfused = _epilogue(op.as_linear_operator(engine) @ X, bias, relu, channels)
                assert _same_bits(Y, unfused), tag
                if relu:
                    assert np.all(Y >= 0), tag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["conv2d-p1", "image-1ch", "depthwise", "wide-8to8", "conv3d", "reflect"])
def test_nan_stays_nan_through_relu(name, dtype):
    """NaN inputs make NaN exactly the outputs whose rows read them (unmasked layers, so every
    engine's stored or gathered taps are real), with or without ReLU: ``max(NaN, 0)`` is NaN."""
    case, op, w = _layer(name, dtype)
    A = dense(case, w)
    rng = np.random.default_rng(1)
    b = rng.standard_normal(case.f).astype(dtype)
    for n in (1, 17):
        X = rng.standard_normal((op.shape[1], n)).astype(dtype)
        X[rng.random(X.shape) < 0.05] = np.nan
        X[0, 0] = np.nan
        reached = (A != 0).astype(np.float64) @ np.isnan(X).astype(np.float64) > 0
        assert reached.any() and not reached.all()
        for engine in supported_engines(op, "forward"):
            for relu in (False, True):
                with threads(1 if n == 1 else 2):
                    Y = op.affine(X, b, relu=relu, engine=engine)
                    unfused = _epilogue(op.as_linear_operator(engine) @ X, b, relu, case.f)
                assert np.array_equal(np.isnan(Y), reached), (engine, n, relu)
                if relu:
                    assert np.all(Y[~reached] >= 0)
                assert _same_bits(Y, unfused), (engine, relu)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["conv2d-p1", "pruned-80"])
def test_blocks_of_other_dtypes_follow_the_product(name, dtype):
    """float64 (on float32), integer and F-ordered blocks: the dtype and bits of ``op @ X``."""
    case, op, w = _layer(name, dtype)
    A = dense(case, w)
    rng = np.random.default_rng(2)
    b = rng.standard_normal(case.f).astype(dtype)
    X64 = rng.standard_normal((op.shape[1], 7)) * (1 + 1e-9)
    Xint = rng.integers(-3, 4, size=(op.shape[1], 7))
    for engine in supported_engines(op, "forward"):
        for X in (X64, Xint, np.asfortranarray(X64.astype(dtype)), X64.astype(np.float16)):
            Y = op.affine(X, b, relu=True, engine=engine)
            product = op.as_linear_operator(engine) @ X
            assert Y.dtype == product.dtype == np.result_type(op.dtype, X.dtype), (engine, X.dtype)
            assert _same_bits(Y, _epilogue(product, b, True, case.f)), (engine, X.dtype)
            assert_allclose(Y, _epilogue(A @ X.astype(np.float64), b, True, case.f), dtype=Y.dtype,
                            scale=float((np.abs(A) @ np.abs(X.astype(np.float64))).max()) + float(np.abs(b).max()))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_leaves_its_arguments_unchanged(dtype):
    _, op, _ = _layer("pruned-80", dtype)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((op.shape[1], 16)).astype(dtype)
    b = rng.standard_normal(op.out_shape[0]).astype(dtype)
    X0, b0 = X.copy(), b.copy()
    for engine in supported_engines(op, "forward"):
        Y = op.affine(X, b, relu=True, engine=engine)
        assert not np.shares_memory(Y, X) and not np.shares_memory(Y, b)
        assert np.array_equal(X, X0) and np.array_equal(b, b0), engine


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_blocks(dtype):
    _, op, _ = _layer("conv2d-p1", dtype)
    b = np.ones(op.out_shape[0], dtype)
    for engine in supported_engines(op, "forward"):
        Y = op.affine(np.zeros((op.shape[1], 0), dtype), b, relu=True, engine=engine)
        assert Y.shape == (op.shape[0], 0) and Y.dtype == np.dtype(dtype)
        # The arguments are checked before the empty block is answered.
        with pytest.raises(ValueError, match="bias must have shape"):
            op.affine(np.zeros((op.shape[1], 0), dtype), b[:-1], engine=engine)
        with pytest.raises(TypeError, match="relu must be a bool"):
            op.affine(np.zeros((op.shape[1], 0), dtype), b, relu=1, engine=engine)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_arguments_are_refused(dtype):
    _, op, _ = _layer("pruned-80", dtype)
    other = np.float64 if dtype == "float32" else np.float32
    X = np.ones((op.shape[1], 3), dtype)
    b = np.ones(op.out_shape[0], dtype)
    for engine in supported_engines(op, "forward"):
        with pytest.raises(TypeError, match=f"bias has dtype {np.dtype(other)} but the operator computes in {dtype}"):
            op.affine(X, b.astype(other), engine=engine)
        with pytest.raises(ValueError, match=r"bias must have shape \(5,\); got \(6,\)"):
            op.affine(X, np.ones(6, dtype), engine=engine)
        with pytest.raises(ValueError, match=r"bias must have shape \(5,\); got \(5, 1\)"):
            op.affine(X, b[:, None], engine=engine)
        for relu in (1, 0, "yes", None, 1.0):
            with pytest.raises(TypeError, match="relu must be a bool"):
                op.affine(X, b, relu=relu, engine=engine)
        for bad in (X[:-1], X[:, 0], X[None]):
            with pytest.raises(ValueError, match=r"X must be a column block of shape \(384, N\)"):
                op.affine(bad, b, engine=engine)
        with pytest.raises(TypeError, match="X must be a real array"):
            op.affine(X.astype(np.complex128), b, engine=engine)
        # Accepted: a numpy bool, an integer bias (converted exactly), no bias.
        expected = op.affine(X, b, relu=True, engine=engine)
        assert _same_bits(op.affine(X, b, relu=np.True_, engine=engine), expected)
        assert _same_bits(op.affine(X, np.ones(op.out_shape[0], np.int64), relu=True, engine=engine), expected)
    with pytest.raises(ValueError, match="engine must be one of"):
        op.affine(X, b, engine="bogus")


# ---------------------------------------------------------------------- the compiled engines' keywords
def _compiled_engines(case: Case, w: np.ndarray):
    pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")
    from sparseconv.engines.implicit import ImplicitEngine
    from sparseconv.engines.numba import NumbaEngine

    op = sc.ConvOperator(w, (case.c, *case.in_size), **case.opts)
    return [NumbaEngine.from_operator(op), ImplicitEngine(case.geometry(), w)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_matmat_bias_and_relu(dtype):
    """``matmat(X, threads, bias=, relu=)``: the bits of the product, then numpy's add and maximum,
    on every batch width (N = 1 takes the scalar kernel of the numba engine) and thread count."""
    case = Case((7, 6), (3, 3), c=3, f=4, stride=(1, 2), padding=1, dtype=dtype)
    w = masked_weight(case, None, seed=0)
    rng = np.random.default_rng(0)
    b = rng.standard_normal(case.f).astype(dtype)
    for eng in _compiled_engines(case, w):
        for n in (1, 3, 16, 17, 33):
            X = rng.standard_normal((case.geometry().n_in, n)).astype(dtype)
            X[1, 0] = np.nan
            for threads in (1, 2):
                plain = eng.matmat(X, threads)
                for relu in (False, True):
                    for bias in (None, b):
                        Y = eng.matmat(X, threads, bias=bias, relu=relu)
                        assert _same_bits(Y, _epilogue(plain, bias, relu, case.f)), (eng.name, n, threads, relu)
        # Vectors: (in_size,) in, (out_size,) out, same bits as the one-column block.
        x = rng.standard_normal(case.geometry().n_in).astype(dtype)
        y = eng.matmat(x, 1, bias=b, relu=True)
        assert y.shape == (case.geometry().n_out,)
        assert _same_bits(y, _epilogue(eng.matmat(x[:, None], 1), b, True, case.f)[:, 0])


def test_compiled_matmat_bias_checks():
    case = Case((5, 6), (3, 3), c=2, f=3, padding=1, dtype="float32")
    w = masked_weight(case, None, seed=0)
    X = np.ones((case.geometry().n_in, 4), np.float32)
    for eng in _compiled_engines(case, w):
        before = eng.matmat(X)
        for bad in (np.ones(3), np.ones(3, np.int64), np.ones(3, bool)):
            with pytest.raises(TypeError, match="bias must be a floating array that converts to the product's "
                                                "float32 without rounding"):
                eng.matmat(X, bias=bad)
        for bad in (np.ones(2, np.float32), np.ones((3, 1), np.float32)):
            with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
                eng.matmat(X, bias=bad)
        assert np.array_equal(eng.matmat(X), before)
        # float16 converts to float32 exactly: taken as it is.
        half = np.array([0.5, -1.25, 3.0], np.float16)
        assert np.array_equal(eng.matmat(X, bias=half), eng.matmat(X, bias=half.astype(np.float32)))
        # A float64 block computes in float64: a float64 bias is then not rounded.
        y = eng.matmat(X.astype(np.float64), bias=np.full(3, 1 + 1e-12))
        assert y.dtype == np.float64
        assert np.array_equal(y, _epilogue(eng.matmat(X.astype(np.float64)), np.full(3, 1 + 1e-12), False, 3))


def test_numba_engine_bias_per_row_block_of_a_general_matrix():
    """``out_blocks`` equal runs of rows, one bias each, on an arbitrary CSR matrix."""
    pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")
    from sparseconv.engines.numba import NumbaEngine

    rng = np.random.default_rng(0)
    a = sp.random_array((60, 40), density=0.2, format="csr", rng=rng)
    weight = rng.standard_normal(a.nnz)
    a.data = weight.copy()
    eng = NumbaEngine(a.shape, a.indptr, a.indices, weight, param_index=np.arange(a.nnz), out_blocks=4)
    b = rng.standard_normal(4)
    for n in (1, 9):
        X = rng.standard_normal((40, n))
        expected = np.maximum(a @ X + np.repeat(b, 15)[:, None], 0)
        assert_allclose(eng.matmat(X, 2, bias=b, relu=True), expected,
                        scale=float((abs(a) @ np.abs(X)).max()) + float(np.abs(b).max()))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        eng.matmat(X, bias=np.ones(60))


@pytest.mark.slow
def test_without_numba_affine_runs_on_the_scipy_engines():
    """No numba: the policy never names a compiled engine, ``"implicit"`` is refused with the
    reason, ``affine`` and ``c_order``/``transpose_c`` still work (numpy copies)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None  # import numba now raises ImportError
        import numpy as np
        import sparseconv as sc
        from sparseconv import reference as ref
        from sparseconv.engines.implicit import ImplicitEngine
        from sparseconv.engines.numba import c_order, transpose_c
        from sparseconv.testing import assert_allclose

        rng = np.random.default_rng(0)
        w = rng.standard_normal((3, 2, 3, 3))
        b = rng.standard_normal(3)
        op = sc.ConvOperator(w, (2, 5, 6), padding=1, memory_budget=100_000)
        print("choices", sorted({op.engine(p) for p in ("forward", "adjoint", "weight_grad")}))
        print("supports", any(op.supports("implicit", p) for p in ("forward", "adjoint", "weight_grad")))
        try:
            sc.ConvOperator(w, (2, 5, 6), padding=1, engine="implicit")
        except ValueError as err:
            print("refused:", err)
        try:
            ImplicitEngine(op.geometry, w)
        except ImportError as err:
            print("import:", err)
        X = np.asfortranarray(rng.standard_normal((60, 4)))
        A = ref.dense_matrix(w, (2, 5, 6), padding=1)
        expected = np.maximum(A @ X + np.repeat(b, 30)[:, None], 0)
        for engine in ("csr", "factored"):
            assert_allclose(op.affine(X, b, relu=True, engine=engine), expected)
        assert np.array_equal(c_order(X), np.ascontiguousarray(X)) and c_order(X).flags.c_contiguous
        assert np.array_equal(transpose_c(X), np.ascontiguousarray(X.T))
        print("affine ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "choices ['csr', 'factored']" in res.stdout, res.stdout
    assert "supports False" in res.stdout
    assert "refused: engine 'implicit' cannot run the forward product" in res.stdout
    assert "numba is not available" in res.stdout
    assert "import: the compiled engines need numba" in res.stdout
    assert res.stdout.strip().endswith("affine ok")
