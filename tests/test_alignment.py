"""Aligned blocks: ``aligned_empty``/``is_aligned``, the engines on misaligned inputs, ``c_order``/``transpose_c``.

The compiled engines copy a misaligned block into an aligned one when they read its rows many
times; the copy must not change a bit of any product. ``c_order`` and ``transpose_c`` are
compared with numpy's own copies for every memory layout.
"""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv as sc
from sparseconv.engines.base import ALIGNMENT, aligned_empty, is_aligned

from cases import Case
from column_refs import masked_weight, misaligned

SHAPES = [(), (1,), (3, 5), (7, 3, 2), (1000, 33), (2, 1, 17)]
KINDS = [np.float32, np.float64, np.int8, np.int64, np.complex128, np.bool_, np.float16]


@pytest.mark.parametrize("dtype", KINDS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_aligned_empty(shape, dtype):
    a = aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == np.dtype(dtype)
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % ALIGNMENT == 0 and is_aligned(a)
    # Every element is its own: a full write reads back.
    values = np.arange(a.size).reshape(shape).astype(dtype)
    a[...] = values
    assert np.array_equal(a, values)


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0)], ids=str)
def test_aligned_empty_of_zero_size(shape):
    # Several arrays kept alive: one raw buffer may start aligned by chance, not all of them.
    arrays = [aligned_empty(shape, np.float64) for _ in range(32)]
    assert all(a.shape == shape and a.dtype == np.float64 and a.flags.c_contiguous for a in arrays)
    assert all(is_aligned(a) for a in arrays)


def test_is_aligned_on_offset_views():
    assert ALIGNMENT == 64
    base = aligned_empty((64,), np.uint8)
    raw = base.base
    start = base.ctypes.data - raw.ctypes.data
    for offset in range(0, 2 * ALIGNMENT, 4):
        view = raw[start + offset:start + offset + 8]
        assert is_aligned(view) == (offset % ALIGNMENT == 0), offset
    for offset in (4, 16, 48):
        m = misaligned(np.ones((5, 7)), offset)
        assert not is_aligned(m) and m.ctypes.data % ALIGNMENT == offset


# ---------------------------------------------------------------------- engines on misaligned blocks
def _engines(case: Case, w: np.ndarray):
    pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")
    from sparseconv.engines.implicit import ImplicitEngine
    from sparseconv.engines.numba import NumbaEngine

    op = sc.ConvOperator(w, (case.c, *case.in_size), **case.opts)
    return [NumbaEngine.from_operator(op), ImplicitEngine(case.geometry(), w)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_engines_give_the_same_bits_on_misaligned_blocks(dtype):
    """Rows read many times (a 3x3 layer reads each input row ~9 F/C times): the misaligned
    block is copied into an aligned one, or read as is where rows are short; same bits."""
    case = Case((9, 8), (3, 3), c=3, f=4, padding=1, stride=(1, 2), dtype=dtype)
    w = masked_weight(case, None, seed=0)
    rng = np.random.default_rng(0)
    b = rng.standard_normal(case.f).astype(dtype)
    g = case.geometry()
    for eng in _engines(case, w):
        for n in (1, 2, 8, 16, 17, 33, 64):
            X = aligned_empty((g.n_in, n), dtype)
            X[...] = rng.standard_normal(X.shape)
            D = aligned_empty((g.n_out, n), dtype)
            D[...] = rng.standard_normal(D.shape)
            y, z, grad = eng.matmat(X, 2), eng.rmatmat(D, 2), eng.weight_grad(X, D, 2)
            fused = eng.matmat(X, 2, bias=b, relu=True)
            for offset in (4, 16, 48):
                Xm, Dm = misaligned(X, offset), misaligned(D, offset)
                tag = (eng.name, n, offset)
                assert np.array_equal(eng.matmat(Xm, 2), y), tag
                assert np.array_equal(eng.rmatmat(Dm, 2), z), tag
                assert np.array_equal(eng.weight_grad(Xm, Dm, 2), grad), tag
                assert np.array_equal(eng.matmat(Xm, 2, bias=b, relu=True), fused), tag
                assert np.array_equal(Xm, X) and np.array_equal(Dm, D), "inputs modified"
            assert is_aligned(eng.matmat(X, 1)) and is_aligned(eng.rmatmat(D, 1))


def test_block_copies_misaligned_blocks_only_when_asked():
    pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")
    from sparseconv.engines.numba import _block

    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 16)).astype(np.float32)  # 64-byte rows
    m = misaligned(a, 16)
    block, vector = _block(m, 10, np.dtype(np.float32), "X", align=True)
    assert is_aligned(block) and not vector and np.array_equal(block, a) and not np.shares_memory(block, m)
    block, _ = _block(m, 10, np.dtype(np.float32), "X", align=False)
    assert block is m or np.shares_memory(block, m)  # used as it is
    aligned = aligned_empty(a.shape, np.float32)
    aligned[...] = a
    block, _ = _block(aligned, 10, np.dtype(np.float32), "X", align=True)
    assert np.shares_memory(block, aligned)  # already aligned: no copy
    # Rows narrower than ALIGNMENT are not worth a copy.
    narrow = misaligned(a[:, :8], 16)
    block, _ = _block(narrow, 10, np.dtype(np.float32), "X", align=True)
    assert np.shares_memory(block, narrow)
    # Another memory order or dtype is converted (and aligned when asked).
    block, _ = _block(np.asfortranarray(a), 10, np.dtype(np.float32), "X", align=True)
    assert block.flags.c_contiguous and is_aligned(block) and np.array_equal(block, a)
    block, _ = _block(a.astype(np.float16), 10, np.dtype(np.float32), "X", align=True)
    assert block.dtype == np.float32 and is_aligned(block)
    block, vector = _block(a[:, 0], 10, np.dtype(np.float32), "X", align=True)
    assert vector and block.shape == (10, 1)


# ---------------------------------------------------------------------- c_order and transpose_c
def _layouts(dtype, shape):
    """The same values in several memory layouts: C, F, strided, sliced, reversed, misaligned C and F."""
    rng = np.random.default_rng(sum(shape))
    base = (rng.standard_normal((2 * shape[0] + 1, 2 * shape[1] + 1)) * 100).astype(dtype)
    a = np.ascontiguousarray(base[:shape[0], :shape[1]])
    return {
        "C": a,
        "F": np.asfortranarray(a),
        "strided": base[:2 * shape[0]:2, 1:2 * shape[1] + 1:2],
        "reversed": np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1],
        "sliced": base[:shape[0], :shape[1]],
        "misaligned-C": misaligned(a, 16),
        "misaligned-F": misaligned(np.ascontiguousarray(a.T), 16).T,
    }


LAYOUT_SHAPES = [(1, 7), (7, 1), (1, 1), (33, 65), (64, 32), (0, 5), (5, 0)]
LAYOUT_DTYPES = [np.float32, np.float64, np.int32, np.int64, np.float16]


@pytest.mark.parametrize("dtype", LAYOUT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_c_order_and_transpose_c_equal_numpy(shape, dtype):
    pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")
    from sparseconv.engines.numba import c_order, transpose_c

    for name, a in _layouts(dtype, shape).items():
        expected = np.array(a, order="C")
        before = a.copy()
        for threads in (1, 2):
            out = c_order(a, threads)
            assert out.shape == a.shape and out.dtype == a.dtype and out.flags.c_contiguous, name
            assert np.array_equal(out, expected), name
            if a.flags.c_contiguous:
                assert out is a, name  # documented: C-contiguous input is returned as it is
            else:
                assert not np.shares_memory(out, a), name
                assert is_aligned(out) or out.nbytes == 0, name
            t = transpose_c(a, threads)
            assert t.shape == a.shape[::-1] and t.dtype == a.dtype and t.flags.c_contiguous, name
            assert np.array_equal(t, expected.T), name
            assert np.array_equal(a, before), f"{name}: input modified"
    # The default thread count.
    a = _layouts(dtype, shape)["F"]
    assert np.array_equal(c_order(a), np.ascontiguousarray(a))
    assert np.array_equal(transpose_c(a), np.ascontiguousarray(a.T))


@pytest.mark.parametrize("bad", [np.ones(5), np.ones((2, 3, 4)), np.float64(1.0), np.ones((2, 2, 1, 1))],
                         ids=["1d", "3d", "0d", "4d"])
def test_c_order_and_transpose_c_refuse_other_ranks(bad):
    pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")
    from sparseconv.engines.numba import c_order, transpose_c

    with pytest.raises(ValueError, match=r"a must be a 2-D array; got shape"):
        c_order(bad)
    with pytest.raises(ValueError, match=r"a must be a 2-D array; got shape"):
        transpose_c(bad)


def test_transpose_c_returns_an_aligned_copy():
    pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")
    from sparseconv.engines.numba import transpose_c

    a = misaligned(np.arange(64 * 32, dtype=np.float64).reshape(32, 64), 16).T  # F-contiguous (64, 32)
    t = transpose_c(a)
    assert np.array_equal(t, a.T)
    assert not np.shares_memory(t, a)
    assert is_aligned(t)
