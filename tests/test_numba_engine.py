"""The compiled engines ("numba", "stencil") against scipy, the direct reference and torch-free checks.

Every product is compared with an independent computation: scipy's CSR product in float64 for
random matrices, :mod:`sparseconv.reference`'s direct convolution and its textbook gradients on
the reference grid, and ``scipy.signal.convolve2d`` for the image stencil. The no-numba
fallback and an unwritable numba cache are simulated in subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

import sparseconv as sc
from sparseconv import reference as ref
from sparseconv.geometry import conv_geometry
from sparseconv.testing import assert_allclose

from cases import Case

pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")

from sparseconv.engines.numba import NumbaEngine, available, unavailable_reason  # noqa: E402
from sparseconv.engines.stencil import StencilEngine  # noqa: E402

try:  # the grid moves to cases.py with the engine restructure
    from cases import GRID
except ImportError:
    from test_conv import GRID

# Chunk edges: the main chunk is 32 float32 / 16 float64 lanes, the masked tail 16 / 8.
WIDTHS = (1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65)
DTYPES = ("float32", "float64")


def _columns(a: np.ndarray) -> np.ndarray:
    """A batch ``(N, ...)`` as a C-ordered column block ``(prod(...), N)``."""
    return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)


def _random_csr(shape, density, dtype, seed, *, empty_rows=False):
    rng = np.random.default_rng(seed)
    a = sp.random_array(shape, density=density, format="csr", rng=rng, dtype=np.float64)
    if empty_rows:
        a = sp.csr_array(a.multiply((np.arange(shape[0]) % 3 != 0)[:, None]))
        a.eliminate_zeros()
    # Values come from a "weight" through param_index: here every entry has its own weight.
    weight = rng.standard_normal(a.nnz).astype(dtype)
    a.data = weight.astype(np.float64)
    return a, weight


def test_available():
    assert available(), unavailable_reason()
    assert unavailable_reason() is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("shape, density, blocks", [((300, 200), 0.05, (1, 1)), ((96, 160), 0.3, (4, 8)),
                                                     ((1, 7), 1.0, (1, 1)), ((50, 1), 0.5, (5, 1))],
                         ids=["300x200-5%", "96x160-30%-blocks", "1x7-dense", "50x1"])
def test_random_matrix_products(shape, density, blocks, n, dtype):
    a, weight = _random_csr(shape, density, dtype, seed=n)
    eng = NumbaEngine(a.shape, a.indptr, a.indices, weight, param_index=np.arange(a.nnz), out_blocks=blocks[0],
                      in_blocks=blocks[1])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((shape[1], n)).astype(dtype)
    d = rng.standard_normal((shape[0], n)).astype(dtype)
    rows = np.repeat(np.arange(shape[0]), np.diff(a.indptr))
    grad_ref = np.einsum("en,en->e", d[rows].astype(np.float64), x[a.indices].astype(np.float64))
    for threads in (1, 2, 3):
        assert_allclose(eng.matmat(x, threads), a @ x.astype(np.float64), dtype=dtype)
        assert_allclose(eng.rmatmat(d, threads), a.T @ d.astype(np.float64), dtype=dtype)
        assert_allclose(eng.weight_grad(x, d, threads), grad_ref, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int64_structure(dtype):
    """Structures too large for int32 indices use int64 ones: the same kernels, another signature."""
    a, weight = _random_csr((200, 150), 0.1, dtype, seed=4)
    eng = NumbaEngine(a.shape, a.indptr.astype(np.int64), a.indices.astype(np.int64), weight,
                      param_index=np.arange(a.nnz), out_blocks=2, in_blocks=3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((150, 19)).astype(dtype)
    d = rng.standard_normal((200, 19)).astype(dtype)
    rows = np.repeat(np.arange(200), np.diff(a.indptr))
    assert_allclose(eng.matmat(x, 2), a @ x.astype(np.float64), dtype=dtype)
    assert_allclose(eng.rmatmat(d, 2), a.T @ d.astype(np.float64), dtype=dtype)
    assert_allclose(eng.weight_grad(x, d, 2),
                    np.einsum("en,en->e", d[rows].astype(np.float64), x[a.indices].astype(np.float64)), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_and_empty_matrix(dtype):
    a, weight = _random_csr((120, 90), 0.1, dtype, seed=3, empty_rows=True)
    x = np.random.default_rng(0).standard_normal((90, 33)).astype(dtype)
    eng = NumbaEngine(a.shape, a.indptr, a.indices, weight, param_index=np.arange(a.nnz))
    out = eng.matmat(x, 2)
    assert_allclose(out, a @ x.astype(np.float64), dtype=dtype)
    assert not np.any(out[::3])
    empty = NumbaEngine((4, 5), np.zeros(5, np.int32), np.zeros(0, np.int32), np.ones(3, dtype),
                        param_index=np.zeros(0, np.int64))
    assert np.array_equal(empty.matmat(np.ones((5, 3), dtype)), np.zeros((4, 3), dtype))
    assert np.array_equal(empty.rmatmat(np.ones((4, 3), dtype)), np.zeros((5, 3), dtype))
    assert np.array_equal(empty.weight_grad(np.ones((5, 3), dtype), np.ones((4, 3), dtype)), np.zeros(3, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_products_do_not_depend_on_thread_count(dtype):
    """Each output row is summed by one thread in a fixed order: the same bits on 1, 2, 3
    threads; the gradient's per-thread sums differ only by rounding."""
    a, weight = _random_csr((2000, 1500), 0.02, dtype, seed=5)
    eng = NumbaEngine(a.shape, a.indptr, a.indices, weight, param_index=np.arange(a.nnz), out_blocks=4,
                      in_blocks=3)
    rng = np.random.default_rng(2)
    for n in (1, 37):
        x = rng.standard_normal((1500, n)).astype(dtype)
        d = rng.standard_normal((2000, n)).astype(dtype)
        y1, z1, g1 = eng.matmat(x, 1), eng.rmatmat(d, 1), eng.weight_grad(x, d, 1)
        for threads in (2, 3):
            assert np.array_equal(eng.matmat(x, threads), y1)
            assert np.array_equal(eng.rmatmat(d, threads), z1)
            assert_allclose(eng.weight_grad(x, d, threads), g1)


def _grid_arrays(case: Case, n: int, mask=None):
    rng = np.random.default_rng(len(case.id) + n)
    x = rng.standard_normal((n, case.c, *case.in_size)).astype(case.dtype)
    w = rng.standard_normal(case.weight_shape).astype(case.dtype)
    if mask is not None:
        w = np.where(mask, w, 0).astype(case.dtype)
    dy = rng.standard_normal((n, *case.geometry().output_shape)).astype(case.dtype)
    return x, w, dy


def _check_engine_on_case(eng, case: Case, x, w, dy, threads: int, mask=None):
    """Forward, adjoint and kernel gradient against the direct reference (masked taps: zero gradient)."""
    y = ref.conv_direct(x, w, None, **case.opts)
    dx, dw, _ = ref.conv_direct_backward(x, w, dy, **case.opts)
    if mask is not None:
        dw = np.where(mask, dw, 0)
    assert_allclose(eng.matmat(_columns(x), threads), _columns(y), err_msg="forward")
    assert_allclose(eng.rmatmat(_columns(dy), threads), _columns(dx), err_msg="adjoint")
    assert_allclose(eng.weight_grad(_columns(x), _columns(dy), threads), dw, err_msg="weight_grad")


@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_numba_engine_on_reference_grid(case: Case):
    """Every geometry of the reference grid (tied entries of repeating padding included)."""
    for n, threads in ((case.n, 1), (17, 2)):
        x, w, dy = _grid_arrays(case, n)
        op = sc.ConvOperator(w, (case.c, *case.in_size), **case.opts)
        _check_engine_on_case(NumbaEngine.from_operator(op), case, x, w, dy, threads)


STENCIL_GRID = [c for c in GRID if StencilEngine.applicable(c.geometry())]


@pytest.mark.parametrize("case", STENCIL_GRID, ids=[c.id for c in STENCIL_GRID])
def test_stencil_engine_on_reference_grid(case: Case):
    for n, threads in ((case.n, 1), (3, 2)):
        x, w, dy = _grid_arrays(case, n)
        _check_engine_on_case(StencilEngine(case.geometry(), w), case, x, w, dy, threads)


@pytest.mark.parametrize("n", [1, 4])
def test_stencil_masked_layer(n):
    case = Case((9, 10), (3, 3), c=3, f=4, padding=1, dilation=(1, 2), groups=1)
    mask = np.random.default_rng(0).random(case.weight_shape) >= 0.6
    x, w, dy = _grid_arrays(case, n, mask)
    eng = StencilEngine(case.geometry(), w, weight_mask=mask)
    _check_engine_on_case(eng, case, x, w, dy, 2, mask)
    with pytest.raises(ValueError, match="weight_mask must be a bool array"):
        StencilEngine(case.geometry(), w, weight_mask=mask[:1])


@pytest.mark.parametrize("case", [Case((6, 7), (3, 2), c=3, f=2, padding=4),
                                  Case((6, 7), (3, 2), c=3, f=2, padding=((5, 0), (0, 6)), dilation=(1, 2)),
                                  Case((6, 7), (3, 2), c=3, f=2, padding=((0, 3), (4, 1)), flip=True)],
                         ids=lambda c: c.id)
def test_stencil_padding_wider_than_the_kernel(case: Case):
    """Padding beyond the kernel's reach: the adjoint's shifted copy crops instead of padding."""
    x, w, dy = _grid_arrays(case, 2)
    _check_engine_on_case(StencilEngine(case.geometry(), w), case, x, w, dy, 2)


def test_stencil_grid_is_not_empty_and_refuses_others():
    assert len(STENCIL_GRID) > 20
    strided = Case((7, 6), (3, 2), stride=2).geometry()
    assert not StencilEngine.applicable(strided)
    with pytest.raises(ValueError, match="stencil"):
        StencilEngine(strided, np.ones(strided.weight_shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pruned", [0.5, 0.9, 1.0])
def test_masked_layers(pruned, dtype):
    """Pruned kernels (weight_mask): only kept taps are stored, masked taps get zero gradient."""
    case = Case((9, 10), (3, 3), c=8, f=6, padding=1, dtype=dtype)
    rng = np.random.default_rng(int(pruned * 100))
    mask = rng.random(case.weight_shape) >= pruned
    for n, threads in ((1, 1), (33, 2), (65, 3)):
        x, w, dy = _grid_arrays(case, n, mask)
        op = sc.ConvOperator(w, (case.c, *case.in_size), padding=1, weight_mask=mask)
        eng = NumbaEngine.from_operator(op)
        _check_engine_on_case(eng, case, x, w, dy, threads, mask)
        assert not np.any(eng.weight_grad(_columns(x), _columns(dy), threads)[~mask])


@pytest.mark.parametrize("dtype", DTYPES)
def test_refresh_updates_forward_and_stored_transpose(dtype):
    case = Case((6, 7), (3, 3), c=3, f=4, padding=1, flip=True, dtype=dtype)
    x, w, dy = _grid_arrays(case, 5)
    op = sc.ConvOperator(w, (case.c, *case.in_size), **case.opts)
    eng = NumbaEngine.from_operator(op)
    eng.rmatmat(_columns(dy))  # builds the transpose with the old values
    w2 = (2 * w + 1).astype(dtype)
    eng.refresh(w2)
    _check_engine_on_case(eng, case, x, w2, dy, 2)
    sten = StencilEngine(case.geometry(), w)
    sten.refresh(w2)
    _check_engine_on_case(sten, case, x, w2, dy, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [(7, 7), (4, 6)])
def test_stencil_image_operator_against_scipy_convolve2d(kernel, dtype):
    """The inverse-problem use: one image through a 'same' true convolution, one vector at a time."""
    from scipy.signal import convolve2d, correlate2d

    rng = np.random.default_rng(0)
    image = rng.standard_normal((45, 70)).astype(dtype)
    h = rng.standard_normal(kernel).astype(dtype)
    geom = conv_geometry((1, 1, *kernel), (1, 45, 70), padding="same", flip=True)
    eng = StencilEngine(geom, h.reshape(1, 1, *kernel))
    y = eng.matmat(image.ravel(), 1)
    assert y.shape == (45 * 70,)
    # scipy centres an even kernel the other way round; compare the full convolution's window.
    (lh, _), (lw, _) = geom.padding
    full = convolve2d(image.astype(np.float64), h.astype(np.float64), mode="full")
    top, left = kernel[0] - 1 - lh, kernel[1] - 1 - lw
    assert_allclose(y.reshape(45, 70), full[top:top + 45, left:left + 70], dtype=dtype)
    d = rng.standard_normal((45, 70)).astype(dtype)
    padded = np.zeros(full.shape)
    padded[top:top + 45, left:left + 70] = d
    assert_allclose(eng.rmatmat(d.ravel(), 2).reshape(45, 70),
                    correlate2d(padded, h.astype(np.float64), mode="valid"), dtype=dtype)


@pytest.mark.parametrize("make", ["numba", "stencil"])
def test_float64_blocks_on_float32_engine_compute_in_float64(make):
    """A float64 block is not rounded to float32: the float32 weights promote exactly."""
    case = Case((5, 6), (3, 3), c=2, f=3, padding=1, dtype="float32")
    x, w, dy = _grid_arrays(case, 3)
    if make == "numba":
        eng = NumbaEngine.from_operator(sc.ConvOperator(w, (2, 5, 6), padding=1))
    else:
        eng = StencilEngine(case.geometry(), w)
    x64, dy64, w64 = x.astype(np.float64) + 1e-9, dy.astype(np.float64), w.astype(np.float64)
    opts = case.opts
    y = eng.matmat(_columns(x64), 2)
    assert y.dtype == np.float64
    assert_allclose(y, _columns(ref.conv_direct(x64, w64, None, **opts)))
    assert_allclose(eng.rmatmat(_columns(dy64), 2), _columns(ref.conv_direct_backward(x64, w64, dy64, **opts)[0]))
    g = eng.weight_grad(_columns(x64), _columns(dy), 2)
    assert g.dtype == np.float32  # the gradient of float32 weights
    assert_allclose(g, ref.conv_direct_backward(x64, w64, dy64, **opts)[1])
    if make == "numba":
        eng.refresh(2 * w)  # the promoted copies follow the weight
        assert_allclose(eng.matmat(_columns(x64), 1), _columns(ref.conv_direct(x64, 2 * w64, None, **opts)))


@pytest.mark.parametrize("make", ["numba", "stencil"])
def test_bad_input_is_refused_and_leaves_engine_unchanged(make):
    case = Case((5, 6), (3, 3), c=2, f=3, padding=1, dtype="float32")
    x, w, dy = _grid_arrays(case, 4)
    if make == "numba":
        eng = NumbaEngine.from_operator(sc.ConvOperator(w, (2, 5, 6), padding=1))
    else:
        eng = StencilEngine(case.geometry(), w)
    xc = _columns(x)
    before = eng.matmat(xc)
    with pytest.raises(ValueError, match="X must have shape"):
        eng.matmat(xc[:-1])
    with pytest.raises(TypeError, match="without loss"):
        eng.matmat(xc.astype(np.complex64))
    with pytest.raises(ValueError, match="weight must be a float32 array of shape"):
        eng.refresh(np.ones((3, 2, 3, 2), np.float32))
    with pytest.raises(ValueError, match="weight must be a float32 array"):
        eng.refresh(w.astype(np.float64))
    with pytest.raises(ValueError, match="same number of vectors"):
        eng.weight_grad(xc, _columns(dy)[:, :2])
    assert np.array_equal(eng.matmat(xc), before)
    # Lossless casts and other memory orders are accepted.
    assert np.array_equal(eng.matmat(np.asfortranarray(xc)), before)
    assert_allclose(eng.matmat(xc.astype(np.float16)), eng.matmat(xc.astype(np.float16).astype(np.float32)))


def test_constructor_validation():
    a, weight = _random_csr((10, 8), 0.3, "float64", seed=0)
    with pytest.raises(ValueError, match="exactly one of param_index and tying"):
        NumbaEngine(a.shape, a.indptr, a.indices, weight)
    with pytest.raises(ValueError, match="indices must lie in"):
        NumbaEngine((10, 3), a.indptr, a.indices, weight, param_index=np.arange(a.nnz))
    with pytest.raises(ValueError, match="param_index must lie in"):
        NumbaEngine(a.shape, a.indptr, a.indices, weight[:2], param_index=np.arange(a.nnz))
    with pytest.raises(ValueError, match="out_blocks must be a positive int dividing 10"):
        NumbaEngine(a.shape, a.indptr, a.indices, weight, param_index=np.arange(a.nnz), out_blocks=3)
    with pytest.raises(TypeError, match="float32 or float64"):
        NumbaEngine(a.shape, a.indptr, a.indices, weight.astype(int), param_index=np.arange(a.nnz))


def test_nbytes_and_estimate():
    case = Case((8, 8), (3, 3), c=4, f=4, padding=1, dtype="float32")
    x, w, dy = _grid_arrays(case, 2)
    op = sc.ConvOperator(w, (4, 8, 8), padding=1)
    eng = NumbaEngine.from_operator(op)
    assert eng.nbytes == op.nnz * 4
    assert NumbaEngine.estimate_nbytes(op.nnz, op.shape, np.float32, adjoint=False, weight_grad=False) == eng.nbytes
    eng.rmatmat(_columns(dy))
    assert eng.nbytes == NumbaEngine.estimate_nbytes(op.nnz, op.shape, np.float32, weight_grad=False)
    eng.weight_grad(_columns(x), _columns(dy))
    assert op.nnz * (4 + 4 + 8 + 4 + 8) < eng.nbytes <= NumbaEngine.estimate_nbytes(op.nnz, op.shape, np.float32)
    sten = StencilEngine(case.geometry(), w)
    assert sten.nbytes == StencilEngine.estimate_nbytes(case.geometry(), np.float32) == 2 * w.nbytes


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_without_numba_sparseconv_imports_and_engines_report_unavailable():
    res = _run("""
        import sys
        sys.modules["numba"] = None  # import numba now raises ImportError
        import numpy as np
        import sparseconv
        from sparseconv.engines.numba import NumbaEngine, available, unavailable_reason
        from sparseconv.engines.stencil import StencilEngine
        assert not available()
        assert "numba" in unavailable_reason(), unavailable_reason()
        assert not StencilEngine.applicable(sparseconv.conv_geometry((1, 1, 3, 3), (1, 5, 5)))
        assert not NumbaEngine.applicable()
        try:
            NumbaEngine((1, 1), np.array([0, 1]), np.array([0]), np.ones(1), param_index=np.array([0]))
        except ImportError as err:
            print("refused:", err)
        op = sparseconv.ConvOperator(np.ones((1, 1, 2, 2)), (1, 3, 3))
        print(op.forward(np.ones((1, 1, 3, 3))).sum())
    """)
    assert res.returncode == 0, res.stderr
    assert "refused: the compiled engines need numba" in res.stdout
    assert res.stdout.strip().endswith("16.0")


def test_unwritable_cache_does_not_break_import():
    """No writable cache location: numba's decorator raises; the kernels compile uncached."""
    res = _run("""
        import warnings
        import numba.core.caching as caching

        def refuse(self):
            raise PermissionError("read-only file system (simulated)")

        caching._CacheLocator.ensure_cache_path = refuse
        import numpy as np
        import sparseconv
        from sparseconv.engines.numba import NumbaEngine, available
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert available()
        print("warned:", any("cannot cache" in str(w.message) for w in caught))
        eng = NumbaEngine((2, 2), np.array([0, 1, 2]), np.array([1, 0]), np.array([2.0, 3.0]),
                          param_index=np.array([0, 1]))
        print(eng.matmat(np.array([[1.0], [10.0]]), threads=1).ravel().tolist())
    """, SPARSECONV_NUMBA_CACHE="1")
    assert res.returncode == 0, res.stderr
    assert "warned: True" in res.stdout
    assert "[20.0, 3.0]" in res.stdout


@pytest.mark.parametrize("name", ["numba", "stencil"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_protocol_engines_on_a_structure(name, dtype):
    """``ENGINE`` of each module on the operators' engine protocol: products, refresh, budget."""
    base = pytest.importorskip("sparseconv.engines.base", reason="the engine protocol (issue 10) is not merged")
    module = __import__(f"sparseconv.engines.{name}", fromlist=["ENGINE"])
    case = Case((8, 9), (3, 3), c=3, f=4, padding=1, flip=True, dtype=dtype)
    mask = np.random.default_rng(1).random(case.weight_shape) >= 0.5
    x, w, dy = _grid_arrays(case, 5, mask)
    structure = base.Structure(case.geometry(), np.dtype(dtype), weight_mask=mask)
    structure.weight[...] = w
    assert module.ENGINE.applicable(structure, "forward")
    eng = module.ENGINE(structure)
    assert eng.name == name
    _check_engine_on_case(eng, case, x, w, dy, 2, mask)
    assert eng.nbytes > 0
    w2 = (3 * w).astype(dtype)
    structure.weight[...] = w2
    eng.refresh(w2)
    _check_engine_on_case(eng, case, x, w2, dy, 1, mask)
    tight = base.Structure(case.geometry(), np.dtype(dtype), weight_mask=mask, memory_budget=64)
    with pytest.raises(sc.MemoryBudgetError):
        module.ENGINE(tight).prepare("forward")


@pytest.mark.parametrize("copy", ["deepcopy", "pickle"])
def test_engines_copy_and_pickle(copy):
    """Copies hold their own values: refreshing a copy leaves the original alone."""
    import copy as copy_module
    import pickle

    case = Case((6, 7), (3, 3), c=2, f=3, padding=1, dtype="float32")
    x, w, dy = _grid_arrays(case, 3)
    engines = [NumbaEngine.from_operator(sc.ConvOperator(w, (2, 6, 7), padding=1)), StencilEngine(case.geometry(), w)]
    for eng in engines:
        eng.rmatmat(_columns(dy))
        twin = copy_module.deepcopy(eng) if copy == "deepcopy" else pickle.loads(pickle.dumps(eng))
        twin.refresh(2 * w)
        _check_engine_on_case(twin, case, x, 2 * w, dy, 2)
        _check_engine_on_case(eng, case, x, w, dy, 2)


# ---------------------------------------------------------------------- small products on one thread
@pytest.mark.parametrize("bad", [0, -2, "two", 2.5, True], ids=repr)
def test_small_products_still_check_threads(bad):
    """A product under SERIAL_WORK runs on one thread whatever is asked, but a bad request is refused."""
    from sparseconv.engines.numba import SERIAL_WORK, _work, transpose_c

    op = sc.ConvOperator(np.ones((4, 4, 3, 3), np.float32), (4, 8, 8), padding=1, engine="numba")
    assert _work(op.nnz, 3) < SERIAL_WORK
    with pytest.raises(ValueError, match="threads must be a positive int"):
        op.forward(np.ones((3, 4, 8, 8), np.float32), threads=bad)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        transpose_c(np.ones((4, 5), np.float32), threads=bad)


def test_serial_work_rule():
    from sparseconv.engines.numba import SERIAL_WORK, _threads, _work

    assert _threads(2, SERIAL_WORK - 1) == 1
    assert _threads(2, SERIAL_WORK) == min(2, numba_pool_size())
    assert _threads(2, None) == min(2, numba_pool_size())
    # One vector counts as 16: a narrow product of many entries still runs on every thread.
    assert _work(SERIAL_WORK // 16, 1) == SERIAL_WORK
    assert _work(1000, 64) == 64_000


def numba_pool_size() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("engine", ["numba", "implicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_products_do_not_depend_on_thread_count(engine, dtype, monkeypatch):
    """With the one-thread rule off, products run in parallel regions: forward and adjoint give
    the same bits on 1, 2 and 3 threads, the kernel gradient the same values to rounding."""
    import sparseconv.engines.numba as compiled

    monkeypatch.setattr(compiled, "SERIAL_WORK", 0)
    rng = np.random.default_rng(3)
    mask = rng.random((6, 4, 3, 3)) < 0.5
    w = np.where(mask, rng.standard_normal(mask.shape), 0).astype(dtype)
    op = sc.ConvOperator(w, (4, 9, 7), padding=1, stride=(1, 2), weight_mask=mask, engine=engine)
    X = rng.standard_normal((op.shape[1], 37)).astype(dtype)
    D = rng.standard_normal((op.shape[0], 37)).astype(dtype)
    dense = op.as_linear_operator("csr")
    ref_f, ref_a = dense @ X, dense.H @ D
    first = None
    for threads in (1, 2, 3):
        y = op._columns_product(X, False, None, threads)
        z = op._columns_product(D, True, None, threads)
        g = op.weight_grad(X, D, layout="columns", threads=threads)
        assert_allclose(y, ref_f, dtype=dtype)
        assert_allclose(z, ref_a, dtype=dtype)
        if first is None:
            first = (y, z, g)
        else:
            assert np.array_equal(y, first[0]) and np.array_equal(z, first[1])
            assert_allclose(g, first[2], dtype=dtype)
