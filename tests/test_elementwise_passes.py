"""The element-wise passes of :mod:`sparseconv.engines.elementwise` on both of their paths.

Each function runs a compiled kernel when numba is installed and the blocks are C-contiguous
float32/float64 of one dtype, and numpy otherwise. The element-wise outputs (``tanh_grad``,
``sigmoid_grad``, ``channel_affine`` and the ``dZ`` of ``channel_affine_grad``) are claimed to be
the *same bits* as numpy's textbook expressions, so they are compared bit for bit with those
expressions written out here (one operation at a time, the way numpy rounds them), on the
compiled path (a spy checks that the kernel really ran), on the numpy path (numba reported
unavailable) and on F-ordered, strided and mixed-dtype inputs (the fallback). The sums
(``channel_sums`` and the parameter gradients of ``channel_affine_grad``) are float64
accumulations in an order of their own: they are compared with ``math.fsum`` of the exact
terms (products of float32 values are exact in float64) at float64 tolerance, scaled by the
sum of the terms' magnitudes, and with exact fractions where a float32 sum would be wrong.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparseconv.engines import elementwise as ew
from sparseconv.engines import numba as numba_engine
from sparseconv.testing import assert_allclose

from column_refs import sigmoid_grad_ref, tanh_grad_ref

DTYPES = [np.float32, np.float64]
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# (C, P, N): channels, positions per channel, samples; N = 0 and N = 1, C = 1, odd sizes.
BLOCKS = [(1, 1, 1), (1, 7, 3), (3, 5, 1), (6, 4, 17), (5, 3, 0), (2, 1, 33), (16, 25, 8)]
# Shapes for the activations' derivatives (any shape).
SHAPES = [(0,), (1,), (13,), (7, 3), (1, 1), (150, 0), (3, 5, 2), (400, 9)]

needs_numba = pytest.mark.skipif(not numba_engine.available(), reason="the compiled path needs numba")


def _block_id(b):
    return f"C{b[0]}-P{b[1]}-N{b[2]}"


def _shape_id(s):
    return "x".join(map(str, s)) if s else "scalar"


# ---------------------------------------------------------------------- references
def affine_ref(Z, scale, shift):
    """``Z * scale[c] + shift[c]`` channel by channel, with the parameters in ``Z``'s dtype."""
    C = len(scale)
    per = Z.shape[0] // C
    out = np.empty(Z.shape, Z.dtype)
    for c in range(C):
        s, b = Z.dtype.type(scale[c]), Z.dtype.type(shift[c])
        out[c * per:(c + 1) * per] = Z[c * per:(c + 1) * per] * s + b
    return out


def scaled_ref(D, scale):
    """``D * scale[c]`` channel by channel."""
    C = len(scale)
    per = D.shape[0] // C
    out = np.empty(D.shape, D.dtype)
    for c in range(C):
        out[c * per:(c + 1) * per] = D[c * per:(c + 1) * per] * D.dtype.type(scale[c])
    return out


def channel_fsum(terms, C):
    """Per channel: (``math.fsum`` of the terms, the sum of their magnitudes); ``terms`` float64."""
    per = terms.reshape(C, -1)
    return (np.array([math.fsum(row) for row in per]),
            np.array([math.fsum(np.abs(row)) for row in per]))


def exact_products(D, Z):
    """``D * Z`` in float64; exact for float32 data, the correctly rounded product for float64."""
    return D.astype(np.float64) * Z.astype(np.float64)


def assert_same_bits(actual, desired, what=""):
    """Same dtype, shape and bits (NaNs included, -0.0 distinct from 0.0)."""
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype}, expected {desired.dtype}"
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape}, expected {desired.shape}"
    uint = np.dtype(f"u{actual.dtype.itemsize}")
    a, d = np.ascontiguousarray(actual).view(uint), np.ascontiguousarray(desired).view(uint)
    bad = np.flatnonzero(a != d)
    assert bad.size == 0, (f"{what}: {bad.size} of {a.size} entries differ, first at flat index {bad[0]}: "
                           f"{actual.reshape(-1)[bad[0]]!r} vs {desired.reshape(-1)[bad[0]]!r}")


def assert_sums(actual, terms, C, what=""):
    """float64 per-channel sums against ``math.fsum`` of the exact terms, at float64 tolerance."""
    exact, magnitude = channel_fsum(terms, C)
    assert actual.dtype == np.float64 and actual.shape == (C,), (what, actual.dtype, actual.shape)
    for c in range(C):
        assert_allclose(actual[c], exact[c], dtype=np.float64, scale=max(magnitude[c], 1e-300),
                        err_msg=f"{what} channel {c}")


# ---------------------------------------------------------------------- path control
KERNELS = ("tanh_grad_into", "sigmoid_grad_into", "channel_affine_into", "channel_affine_grad_into",
           "channel_sums_into")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the calls of each compiled kernel (the real kernel still runs)."""
    calls = dict.fromkeys(KERNELS, 0)
    if numba_engine.available():
        kernels = numba_engine._require()
        for name in KERNELS:
            real = getattr(kernels, name)

            def spy(*args, _real=real, _name=name):
                calls[_name] += 1
                return _real(*args)

            monkeypatch.setattr(kernels, name, spy)
    return calls


@contextmanager
def _numpy_path():
    """numba reported unavailable for the duration (hypothesis tests cannot take monkeypatch)."""
    real = numba_engine.available
    numba_engine.available = lambda: False
    try:
        yield
    finally:
        numba_engine.available = real


PATHS = ["compiled", "numpy"]


@pytest.fixture(params=PATHS)
def path(request, kernel_calls, monkeypatch):
    """Run the test once on the compiled path (numba, C-contiguous blocks) and once on numpy's."""
    if request.param == "compiled":
        if not numba_engine.available():
            pytest.skip("the compiled path needs numba")
    else:
        monkeypatch.setattr(numba_engine, "available", lambda: False)
    return request.param, kernel_calls


def _ran(path, kernel, nonempty=True):
    """The compiled kernel ran exactly when the compiled path was asked for (and there was data)."""
    name, calls = path
    expected = 1 if (name == "compiled" and nonempty) else 0
    assert calls[kernel] == expected, f"{kernel} ran {calls[kernel]} times on the {name} path"


# ---------------------------------------------------------------------- data
def _activation_data(shape, dtype, seed, kind):
    """``(D, A)``: A in [-1, 1] for tanh, in [0, 1] for the logistic function, with the edges."""
    rng = np.random.default_rng(seed)
    lo = -1.0 if kind == "tanh" else 0.0
    A = rng.uniform(lo, 1.0, shape)
    D = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)
    flat = A.reshape(-1)
    edges = [1.0, lo, 0.0, -0.0, 0.5, 1e-30, 1 - 2 ** -24]
    flat[:len(edges)] = edges[:flat.size]
    return D.astype(dtype), A.astype(dtype)


def _special(dtype, size, seed):
    """Values IEEE arithmetic treats specially: NaN, infinities, signed zeros, subnormals, huge."""
    info = np.finfo(dtype)
    pool = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny / 8,
                     info.max, -info.max, info.eps, 1.0, -1.0, 3.5, 1e10], dtype=dtype)
    return np.random.default_rng(seed).choice(pool, size)


def _channel_data(block, dtype, seed):
    C, P, N = block
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((C * P, N)).astype(dtype)
    D = rng.standard_normal((C * P, N)).astype(dtype)
    scale = rng.standard_normal(C).astype(dtype)
    shift = rng.standard_normal(C).astype(dtype)
    return Z, D, scale, shift


ACTIVATIONS = {"tanh": (ew.tanh_grad, tanh_grad_ref, "tanh_grad_into"),
               "sigmoid": (ew.sigmoid_grad, sigmoid_grad_ref, "sigmoid_grad_into")}


# ---------------------------------------------------------------------- activation derivatives
@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_activation_grad_same_bits_as_numpy(path, kind, dtype, shape):
    fn, ref, kernel = ACTIVATIONS[kind]
    D, A = _activation_data(shape, dtype, 1, kind)
    D0, A0 = D.copy(), A.copy()
    out = fn(D, A)
    assert_same_bits(out, ref(D, A), f"{kind} {path[0]}")
    _ran(path, kernel, D.size > 0)
    # A new array; the inputs are left as they were.
    assert not np.shares_memory(out, D) and not np.shares_memory(out, A)
    assert_same_bits(D, D0, "D unchanged")
    assert_same_bits(A, A0, "A unchanged")


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_activation_grad_special_values(path, kind, dtype):
    fn, ref, kernel = ACTIVATIONS[kind]
    D, A = _special(dtype, (64, 9), 2), _special(dtype, (64, 9), 3)
    with np.errstate(all="ignore"):
        out, expected = fn(D, A), ref(D, A)
    assert_same_bits(out, expected, f"{kind} {path[0]} special values")
    _ran(path, kernel)


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_activation_grad_aliased_inputs(path, kind, dtype):
    fn, ref, kernel = ACTIVATIONS[kind]
    _, A = _activation_data((33, 4), dtype, 4, kind)
    assert_same_bits(fn(A, A), ref(A, A), f"{kind} D is A")
    _ran(path, kernel)


# Memory layouts the compiled kernels do not take (numba installed): numpy's path must still
# give the textbook bits. Each entry makes (D, A) from C-ordered data.
LAYOUTS = {
    "F-ordered": lambda D, A: (np.asfortranarray(D), np.asfortranarray(A)),
    "D-F-ordered": lambda D, A: (np.asfortranarray(D), A),
    "strided-rows": lambda D, A: (np.repeat(D, 2, axis=0)[::2], np.repeat(A, 2, axis=0)[::2]),
    "transposed": lambda D, A: (np.ascontiguousarray(D.T).T, np.ascontiguousarray(A.T).T),
    "negative-stride": lambda D, A: (D[::-1].copy()[::-1], A[::-1].copy()[::-1]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_activation_grad_other_layouts(kernel_calls, layout, kind, dtype):
    fn, ref, kernel = ACTIVATIONS[kind]
    D, A = _activation_data((31, 6), dtype, 5, kind)
    D, A = LAYOUTS[layout](D, A)
    assert not (D.flags.c_contiguous and A.flags.c_contiguous)
    assert_same_bits(fn(D, A), ref(D, A), f"{kind} {layout}")
    assert kernel_calls[kernel] == 0


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_activation_grad_list_inputs(kind, dtype):
    # array_like inputs of one float dtype work like arrays of it.
    fn, ref, _ = ACTIVATIONS[kind]
    D, A = _activation_data((5,), dtype, 6, kind)
    assert_same_bits(fn(D, list(A)), ref(D, np.asarray(list(A))), f"{kind} list A")


# D float32 with A float64 follows numpy's promotion: float64 arithmetic throughout.
MIXED = [("D-float32-A-float64", np.float32, np.float64),
         ("D-float64-A-float32", np.float64, np.float32)]


@pytest.mark.parametrize("label, d_dtype, a_dtype", MIXED, ids=[m[0] for m in MIXED])
def test_tanh_grad_mixed_dtypes(kernel_calls, label, d_dtype, a_dtype):
    D, _ = _activation_data((40, 7), d_dtype, 7, "tanh")
    _, A = _activation_data((40, 7), a_dtype, 8, "tanh")
    assert_same_bits(ew.tanh_grad(D, A), tanh_grad_ref(D, A), label)
    assert kernel_calls["tanh_grad_into"] == 0


def test_sigmoid_grad_mixed_dtypes_float32_D(kernel_calls):
    D, _ = _activation_data((40, 7), np.float32, 9, "sigmoid")
    _, A = _activation_data((40, 7), np.float64, 10, "sigmoid")
    assert_same_bits(ew.sigmoid_grad(D, A), sigmoid_grad_ref(D, A), "D float32, A float64")
    assert kernel_calls["sigmoid_grad_into"] == 0


def test_sigmoid_grad_mixed_dtypes_float64_D():
    D, _ = _activation_data((40, 7), np.float64, 11, "sigmoid")
    _, A = _activation_data((40, 7), np.float32, 12, "sigmoid")
    assert_same_bits(ew.sigmoid_grad(D, A), sigmoid_grad_ref(D, A), "D float64, A float32")


@given(data=st.data())
@SETTINGS
def test_activation_grad_fuzz(data):
    """Random shapes, dtypes, values (special ones included) and layouts: both paths, numpy's bits."""
    kind = data.draw(st.sampled_from(sorted(ACTIVATIONS)), label="kind")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9), label="shape")
    elements = st.floats(width=np.dtype(dtype).itemsize * 8, allow_nan=True, allow_infinity=True)
    D = data.draw(hnp.arrays(dtype, shape, elements=elements), label="D")
    A = data.draw(hnp.arrays(dtype, shape, elements=elements), label="A")
    order = data.draw(st.sampled_from(["C", "F", "strided"]), label="order")
    if order == "F":
        D, A = np.asfortranarray(D), np.asfortranarray(A)
    elif order == "strided" and D.ndim:
        D, A = np.repeat(D, 2, axis=-1)[..., ::2], np.repeat(A, 2, axis=-1)[..., ::2]
    fn, ref, _ = ACTIVATIONS[kind]
    with np.errstate(all="ignore"):
        expected = ref(D, A)
        assert_same_bits(fn(D, A), expected, f"{kind} {order}")
        with _numpy_path():
            assert_same_bits(fn(D, A), expected, f"{kind} {order} numpy path")


@given(data=st.data())
@SETTINGS
def test_channel_affine_fuzz(data):
    """Random blocks, dtypes, values (special ones included) and layouts: both paths give numpy's
    bits for ``channel_affine`` and the ``dZ`` of ``channel_affine_grad``."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    C = data.draw(st.integers(1, 5), label="C")
    P = data.draw(st.integers(0, 6), label="P")
    n = data.draw(st.integers(0, 9), label="N")
    elements = st.floats(width=np.dtype(dtype).itemsize * 8, allow_nan=True, allow_infinity=True)
    Z = data.draw(hnp.arrays(dtype, (C * P, n), elements=elements), label="Z")
    D = data.draw(hnp.arrays(dtype, (C * P, n), elements=elements), label="D")
    scale = data.draw(hnp.arrays(dtype, (C,), elements=elements), label="scale")
    shift = data.draw(hnp.arrays(dtype, (C,), elements=elements), label="shift")
    order = data.draw(st.sampled_from(["C", "F"]), label="order")
    if order == "F":
        Z, D = np.asfortranarray(Z), np.asfortranarray(D)
    with np.errstate(all="ignore"):
        expected_y, expected_dz = affine_ref(Z, scale, shift), scaled_ref(D, scale)
        paths = [nullcontext(), _numpy_path()] if numba_engine.available() else [nullcontext()]
        for ctx in paths:
            with ctx:
                assert_same_bits(ew.channel_affine(Z, scale, shift), expected_y, f"channel_affine {order}")
                assert_same_bits(ew.channel_affine_grad(D, Z, scale)[0], expected_dz, f"dZ {order}")


# ---------------------------------------------------------------------- channel_affine
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_channel_affine_same_bits_as_numpy(path, block, dtype):
    Z, _, scale, shift = _channel_data(block, dtype, 20)
    Z0 = Z.copy()
    out = ew.channel_affine(Z, scale, shift)
    assert_same_bits(out, affine_ref(Z, scale, shift), f"channel_affine {path[0]}")
    assert out.flags.c_contiguous and not np.shares_memory(out, Z)
    assert_same_bits(Z, Z0, "Z unchanged")
    _ran(path, "channel_affine_into", Z.size > 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_channel_affine_special_values(path, dtype):
    Z = _special(dtype, (6 * 7, 5), 21)
    scale, shift = _special(dtype, 6, 22), _special(dtype, 6, 23)
    with np.errstate(all="ignore"):
        out, expected = ew.channel_affine(Z, scale, shift), affine_ref(Z, scale, shift)
    assert_same_bits(out, expected, f"channel_affine {path[0]} special values")
    _ran(path, "channel_affine_into")


CHANNEL_LAYOUTS = {
    "F-ordered": np.asfortranarray,
    "strided-columns": lambda Z: np.repeat(Z, 3, axis=1)[:, ::3],
    "transposed-copy": lambda Z: np.ascontiguousarray(Z.T).T,
}


@pytest.mark.parametrize("layout", list(CHANNEL_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_channel_affine_other_layouts(kernel_calls, layout, dtype):
    Z, _, scale, shift = _channel_data((4, 6, 5), dtype, 24)
    Z = CHANNEL_LAYOUTS[layout](Z)
    assert not Z.flags.c_contiguous
    out = ew.channel_affine(Z, scale, shift)
    assert_same_bits(out, affine_ref(Z, scale, shift), f"channel_affine {layout}")
    assert out.flags.c_contiguous
    assert kernel_calls["channel_affine_into"] == 0


@pytest.mark.parametrize("param_dtype", [np.float64, np.int64, np.int8], ids=lambda d: np.dtype(d).name)
def test_channel_affine_parameters_exact_in_Z_dtype(path, param_dtype):
    # Parameters of another dtype are taken when Z's dtype holds them exactly (the arithmetic
    # then stays in float32) and refused when it would round them.
    Z, _, _, _ = _channel_data((3, 4, 6), np.float32, 25)
    rng = np.random.default_rng(26)
    scale = (rng.standard_normal(3) * 7).astype(np.float32).astype(param_dtype)
    shift = (rng.standard_normal(3) * 7).astype(np.float32).astype(param_dtype)
    out = ew.channel_affine(Z, scale, shift)
    assert_same_bits(out, affine_ref(Z, scale.astype(np.float32), shift.astype(np.float32)), "exact parameters")
    _ran(path, "channel_affine_into")
    if np.dtype(param_dtype) == np.float64:
        inexact = scale + 1e-12 * np.abs(scale).max()
        with pytest.raises(ValueError, match="scale has values that float32 cannot hold exactly"):
            ew.channel_affine(Z, inexact, shift)
    elif np.dtype(param_dtype) == np.int64:
        with pytest.raises(ValueError, match="shift has values that float32 cannot hold exactly"):
            ew.channel_affine(Z, scale, shift + (1 << 25) + 1)


# ---------------------------------------------------------------------- channel_affine_grad
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_channel_affine_grad(path, block, dtype):
    Z, D, scale, _ = _channel_data(block, dtype, 30)
    Z0, D0 = Z.copy(), D.copy()
    dZ, dscale, dshift = ew.channel_affine_grad(D, Z, scale)
    assert_same_bits(dZ, scaled_ref(D, scale), f"dZ {path[0]}")
    assert dZ.flags.c_contiguous and not np.shares_memory(dZ, D)
    C = block[0]
    assert_sums(dscale, exact_products(D, Z), C, f"dscale {path[0]}")
    assert_sums(dshift, D.astype(np.float64), C, f"dshift {path[0]}")
    assert_same_bits(D, D0, "D unchanged")
    assert_same_bits(Z, Z0, "Z unchanged")
    _ran(path, "channel_affine_grad_into", D.size > 0)
    # Without the input gradient: no dZ, and the same bits for the sums.
    none, dscale2, dshift2 = ew.channel_affine_grad(D, Z, scale, input_grad=False)
    assert none is None
    assert_same_bits(dscale2, dscale, "dscale without input_grad")
    assert_same_bits(dshift2, dshift, "dshift without input_grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_channel_affine_grad_special_values(path, dtype):
    D = _special(dtype, (5 * 3, 4), 31)
    Z = np.random.default_rng(32).standard_normal(D.shape).astype(dtype)
    scale = _special(dtype, 5, 33)
    with np.errstate(all="ignore"):
        dZ, dscale, dshift = ew.channel_affine_grad(D, Z, scale)
        assert_same_bits(dZ, scaled_ref(D, scale), f"dZ {path[0]} special values")
    # (The sums of infinities and overflowing values depend on the order of the additions.)
    assert dscale.shape == dshift.shape == (5,)
    _ran(path, "channel_affine_grad_into")


@pytest.mark.parametrize("layout", list(CHANNEL_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_channel_affine_grad_other_layouts(kernel_calls, layout, dtype):
    Z, D, scale, _ = _channel_data((3, 7, 5), dtype, 34)
    D = CHANNEL_LAYOUTS[layout](D)
    dZ, dscale, dshift = ew.channel_affine_grad(D, Z, scale)
    assert_same_bits(dZ, scaled_ref(D, scale), f"dZ {layout}")
    assert_sums(dscale, exact_products(D, Z), 3, f"dscale {layout}")
    assert_sums(dshift, D.astype(np.float64), 3, f"dshift {layout}")
    assert kernel_calls["channel_affine_grad_into"] == 0


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block", [(1, 1, 1), (6, 4, 17), (16, 25, 8), (3, 40, 300)], ids=_block_id)
def test_channel_affine_grad_paths_agree(monkeypatch, block, dtype):
    # The element-wise output is the same bits on both paths; the sums agree to float64 rounding.
    Z, D, scale, _ = _channel_data(block, dtype, 35)
    compiled = ew.channel_affine_grad(D, Z, scale)
    monkeypatch.setattr(numba_engine, "available", lambda: False)
    fallback = ew.channel_affine_grad(D, Z, scale)
    assert_same_bits(compiled[0], fallback[0], "dZ")
    _, mag_s = channel_fsum(np.abs(exact_products(D, Z)), block[0])
    _, mag_b = channel_fsum(D.astype(np.float64), block[0])
    for c in range(block[0]):
        assert_allclose(compiled[1][c], fallback[1][c], dtype=np.float64, scale=mag_s[c], err_msg=f"dscale {c}")
        assert_allclose(compiled[2][c], fallback[2][c], dtype=np.float64, scale=mag_b[c], err_msg=f"dshift {c}")


# ---------------------------------------------------------------------- channel_sums
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_channel_sums(path, block, dtype):
    _, D, _, _ = _channel_data(block, dtype, 40)
    D0 = D.copy()
    sums = ew.channel_sums(D, block[0])
    assert_sums(sums, D.astype(np.float64), block[0], f"channel_sums {path[0]}")
    assert_same_bits(D, D0, "D unchanged")
    _ran(path, "channel_sums_into", D.size > 0)


@pytest.mark.parametrize("layout", list(CHANNEL_LAYOUTS))
def test_channel_sums_other_layouts(kernel_calls, layout):
    _, D, _, _ = _channel_data((5, 3, 7), np.float32, 41)
    D = CHANNEL_LAYOUTS[layout](D)
    assert_sums(ew.channel_sums(D, 5), D.astype(np.float64), 5, layout)
    assert kernel_calls["channel_sums_into"] == 0


@pytest.mark.parametrize("channels", [5, np.int64(5), np.int32(5)], ids=["int", "int64", "int32"])
def test_channel_sums_integer_types(channels):
    _, D, _, _ = _channel_data((5, 2, 3), np.float64, 42)
    assert_sums(ew.channel_sums(D, channels), D, 5, "numpy integer channels")


# A float32 sum would lose these (2**24 + 1 is not a float32); the float64 sums are exact.
def _cancelling_block():
    big = np.float32(2 ** 24)
    # Two channels of 2 positions, 3 samples: channel 0 sums to 2, channel 1 to -1.5.
    D = np.array([[big, 1, 1], [-big, 0, 0],
                  [0.25, -big, 0.25], [big, -1, -1]], dtype=np.float32)
    Z = np.array([[1, 3, -3], [1, 0.5, 2],
                  [4, 1, -4], [1, 0.5, 8]], dtype=np.float32)
    return D, Z


def _exact_channel_sums(M, C):
    per = M.reshape(C, -1)
    return [float(sum((Fraction(float(v)) for v in row), Fraction(0))) for row in per]


def test_channel_sums_float32_exact_in_float64(path):
    D, _ = _cancelling_block()
    assert np.float32(2 ** 24) + np.float32(1) == np.float32(2 ** 24)
    expected = _exact_channel_sums(D, 2)
    assert expected == [2.0, -1.5]
    np.testing.assert_array_equal(ew.channel_sums(D, 2), expected)
    _ran(path, "channel_sums_into")


def test_channel_affine_grad_float32_sums_exact_in_float64(path):
    D, Z = _cancelling_block()
    dZ, dscale, dshift = ew.channel_affine_grad(D, Z, np.float32([2, 3]))
    prods = [[Fraction(float(d)) * Fraction(float(z)) for d, z in zip(rd, rz)] for rd, rz in zip(D, Z)]
    exact_scale = [float(sum(prods[0] + prods[1], Fraction(0))), float(sum(prods[2] + prods[3], Fraction(0)))]
    np.testing.assert_array_equal(dscale, exact_scale)
    np.testing.assert_array_equal(dshift, _exact_channel_sums(D, 2))
    assert_same_bits(dZ, scaled_ref(D, np.float32([2, 3])), "dZ")
    _ran(path, "channel_affine_grad_into")


# ---------------------------------------------------------------------- invalid input
F64 = np.zeros((6, 4))


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("D, A, error, name", [
    (np.zeros((3, 4), np.int64), np.zeros((3, 4)), TypeError, "D"),
    (np.zeros((3, 4)), np.zeros((3, 4), np.int32), TypeError, "A"),
    (np.zeros((3, 4), np.float16), np.zeros((3, 4), np.float16), TypeError, "D"),
    (np.zeros((3, 4), np.complex128), np.zeros((3, 4)), TypeError, "D"),
    (np.zeros((3, 4), bool), np.zeros((3, 4)), TypeError, "D"),
    (np.zeros((3, 4)), np.zeros((4, 3)), ValueError, "D and A"),
    (np.zeros((3, 4)), np.zeros(12), ValueError, "D and A"),
    (np.zeros((3, 4)), np.zeros((3, 4, 1)), ValueError, "D and A"),
], ids=["D-int64", "A-int32", "float16", "complex", "bool", "transposed-shape", "flat-A", "extra-axis"])
def test_activation_grad_rejects(kind, D, A, error, name):
    fn = ACTIVATIONS[kind][0]
    with pytest.raises(error, match=name):
        fn(D, A)


@pytest.mark.parametrize("Z, scale, shift, error, name", [
    (np.zeros(6), np.ones(2), np.zeros(2), ValueError, "Z"),
    (np.zeros((2, 3, 4)), np.ones(2), np.zeros(2), ValueError, "Z"),
    (np.zeros((6, 4)), np.ones(4), np.zeros(4), ValueError, "channels"),
    (np.zeros((6, 4), np.int32), np.ones(2), np.zeros(2), TypeError, "Z"),
    (np.zeros((6, 4), bool), np.ones(2), np.zeros(2), TypeError, "Z"),
    (F64, np.ones((2, 1)), np.zeros(2), ValueError, "scale"),
    (F64, np.float64(2.0), np.zeros(1), ValueError, "scale"),
    (F64, np.ones(0), np.zeros(0), ValueError, "scale"),
    (F64, np.ones(2), np.zeros(3), ValueError, "shift"),
    (F64, np.ones(2), np.zeros((2, 1)), ValueError, "shift"),
    (F64, np.ones(2, np.complex128), np.zeros(2), TypeError, "scale"),
    (F64, np.ones(2), np.array(["a", "b"]), TypeError, "shift"),
    (F64, np.array([1, 2], dtype=object), np.zeros(2), TypeError, "scale"),
], ids=["Z-1d", "Z-3d", "rows-not-multiple", "Z-int", "Z-bool", "scale-2d", "scale-scalar", "scale-empty",
        "shift-length", "shift-2d", "scale-complex", "shift-str", "scale-object"])
def test_channel_affine_rejects(Z, scale, shift, error, name):
    with pytest.raises(error, match=name):
        ew.channel_affine(Z, scale, shift)


@pytest.mark.parametrize("D, Z, scale, error, name", [
    (np.zeros(6), np.zeros(6), np.ones(2), ValueError, "D"),
    (np.zeros((6, 4)), np.zeros((6, 5)), np.ones(2), ValueError, "D and Z"),
    (np.zeros((6, 4)), np.zeros((6, 4), np.float32), np.ones(2), TypeError, "D and Z"),
    (np.zeros((6, 4)), np.zeros((6, 4), np.int64), np.ones(2), TypeError, "Z"),
    (np.zeros((6, 4), np.int64), np.zeros((6, 4)), np.ones(2), TypeError, "D"),
    (np.zeros((6, 4)), np.zeros((6, 4)), np.ones(4), ValueError, "channels"),
    (np.zeros((6, 4)), np.zeros((6, 4)), np.ones((2, 2)), ValueError, "scale"),
    (np.zeros((6, 4)), np.zeros((6, 4)), np.ones(2, np.complex64), TypeError, "scale"),
], ids=["D-1d", "shape-mismatch", "dtype-mismatch", "Z-int", "D-int", "rows-not-multiple", "scale-2d",
        "scale-complex"])
def test_channel_affine_grad_rejects(D, Z, scale, error, name):
    with pytest.raises(error, match=name):
        ew.channel_affine_grad(D, Z, scale)


@pytest.mark.parametrize("D, channels, error, name", [
    (np.zeros(6), 2, ValueError, "D"),
    (np.zeros((6, 1, 1)), 2, ValueError, "D"),
    (np.zeros((6, 4), np.int16), 2, TypeError, "D"),
    (np.zeros((6, 4)), 4, ValueError, "channels"),
    (np.zeros((6, 4)), 0, (ValueError, TypeError), "channels"),
    (np.zeros((6, 4)), -2, (ValueError, TypeError), "channels"),
    (np.zeros((6, 4)), True, (ValueError, TypeError), "channels"),
    (np.zeros((6, 4)), np.True_, (ValueError, TypeError), "channels"),
    (np.zeros((6, 4)), 2.0, (ValueError, TypeError), "channels"),
    (np.zeros((6, 4)), "2", (ValueError, TypeError), "channels"),
    (np.zeros((6, 4)), None, (ValueError, TypeError), "channels"),
], ids=["D-1d", "D-3d", "D-int16", "rows-not-multiple", "zero", "negative", "True", "np.True_", "float",
        "str", "None"])
def test_channel_sums_rejects(D, channels, error, name):
    with pytest.raises(error, match=name):
        ew.channel_sums(D, channels)
