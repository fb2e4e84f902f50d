"""``Tanh``/``ReLU``/``Sigmoid`` layers writing into reused aligned blocks: numpy's bits, fresh outputs.

The built-in ufunc activations (``tanh``, ``relu``) of a C-contiguous float input now write
into an :func:`~sparseconv.engines.base.aligned_empty` block (``out=``), and the backward of
``tanh`` and ``sigmoid`` is one pass of :mod:`sparseconv.engines.elementwise`. Checked here in
both layer layouts (``forward``/``backward`` and the column methods) and on C-contiguous,
F-ordered and strided inputs, with NaN, infinities, signed zeros and subnormals among the
values: the forward is the same bits as ``np.tanh(z)`` / ``np.maximum(z, 0)``, the backward the
same bits as numpy's ``dy * (1 - a*a)`` / ``dy * ((1 - a) * a)``; an output the caller still
holds is never overwritten by a later call (its buffer is not reused while alive).
"""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv.nn as nn

from column_refs import sigmoid_grad_ref, tanh_grad_ref

DTYPES = ["float32", "float64"]


def assert_same_bits(actual, desired, what=""):
    assert actual.dtype == desired.dtype and actual.shape == desired.shape, (what, actual.dtype, actual.shape)
    uint = np.dtype(f"u{actual.dtype.itemsize}")
    a, d = np.ascontiguousarray(actual).view(uint), np.ascontiguousarray(desired).view(uint)
    assert np.array_equal(a, d), f"{what}: {np.count_nonzero(a != d)} entries differ"


def _values(shape, dtype, seed):
    """Normal data with special values mixed in; large enough to be cached (>= 64 KiB) at float32."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * 3).astype(dtype)
    info = np.finfo(dtype)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, info.tiny / 4, -info.tiny / 4, info.max, -info.max,
                        20.0, -20.0], dtype=dtype)
    flat = z.reshape(-1)
    flat[rng.choice(flat.size, special.size * 3, replace=False)] = np.tile(special, 3)
    return z


FORWARD_REFS = {"tanh": (nn.Tanh, np.tanh), "relu": (nn.ReLU, lambda z: np.maximum(z, 0))}

# (N, C, H, W) batches in several memory layouts, all viewing data of one C-ordered array.
BATCH_LAYOUTS = {
    "C-contiguous": lambda z: z,
    "F-ordered": np.asfortranarray,
    "strided": lambda z: np.repeat(z, 2, axis=3)[..., ::2],
    "negative-strides": lambda z: z[::-1, :, ::-1].copy()[::-1, :, ::-1],
    "transposed-axes": lambda z: np.ascontiguousarray(z.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
}


@pytest.mark.parametrize("layout", list(BATCH_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(FORWARD_REFS))
def test_forward_same_bits_as_numpy(kind, dtype, layout):
    cls, ref = FORWARD_REFS[kind]
    z = BATCH_LAYOUTS[layout](_values((8, 4, 25, 26), dtype, 1))
    assert (layout == "C-contiguous") == z.flags.c_contiguous
    z0 = z.copy()
    layer = cls()
    with np.errstate(all="ignore"):
        a = layer.forward(z)
        expected = ref(z)
    assert_same_bits(a, expected, f"{kind} forward {layout}")
    assert not np.shares_memory(a, z)
    assert_same_bits(z, z0, "input unchanged")


COLUMN_LAYOUTS = {
    "C-contiguous": lambda Z: Z,
    "F-ordered": np.asfortranarray,
    "strided": lambda Z: np.repeat(Z, 2, axis=1)[:, ::2],
}


@pytest.mark.parametrize("layout", list(COLUMN_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(FORWARD_REFS))
def test_forward_columns_same_bits_as_numpy(kind, dtype, layout):
    cls, ref = FORWARD_REFS[kind]
    shape = (3, 20, 21)
    Z = COLUMN_LAYOUTS[layout](_values((int(np.prod(shape)), 17), dtype, 2))
    layer = cls()
    with np.errstate(all="ignore"):
        A, out = layer.forward_columns(Z, shape)
        expected = ref(Z)
    assert out == shape
    assert_same_bits(A, expected, f"{kind} forward_columns {layout}")
    assert not np.shares_memory(A, Z)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(FORWARD_REFS))
def test_outputs_held_by_the_caller_are_not_overwritten(kind, dtype):
    cls, ref = FORWARD_REFS[kind]
    layer = cls()
    held, expected = [], []
    with np.errstate(all="ignore"):
        for seed in range(6):
            z = _values((4, 3, 40, 40), dtype, 10 + seed)
            a = layer.forward(z)
            for h in held:
                assert not np.shares_memory(a, h)
            if seed % 2 == 0:  # keep every other output, drop the rest
                held.append(a)
                expected.append(ref(z))
            # Column calls in between, their outputs dropped at once.
            layer.forward_columns(np.ascontiguousarray(z.reshape(4, -1).T), z.shape[1:])
    for h, e in zip(held, expected):
        assert_same_bits(h, e, f"{kind} held output")


# ---------------------------------------------------------------------- backward
BACKWARD_REFS = {"tanh": (nn.Tanh, lambda a, dy: tanh_grad_ref(dy, a)),
                 "sigmoid": (nn.Sigmoid, lambda a, dy: sigmoid_grad_ref(dy, a))}


@pytest.mark.parametrize("dy_layout", ["C-contiguous", "F-ordered", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(BACKWARD_REFS))
def test_backward_same_bits_as_numpy(kind, dtype, dy_layout):
    cls, ref = BACKWARD_REFS[kind]
    layer = cls()
    with np.errstate(all="ignore"):
        z = _values((5, 3, 16, 17), dtype, 3)
        a = np.array(layer.forward(z))
        dy = BATCH_LAYOUTS[dy_layout](_values(z.shape, dtype, 4))
        dx = layer.backward(dy)
        expected = ref(a, dy)
    assert_same_bits(dx, expected, f"{kind} backward, dy {dy_layout}")


@pytest.mark.parametrize("D_layout", list(COLUMN_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(BACKWARD_REFS))
def test_backward_columns_same_bits_as_numpy(kind, dtype, D_layout):
    cls, ref = BACKWARD_REFS[kind]
    layer = cls()
    shape = (2, 30, 7)
    with np.errstate(all="ignore"):
        Z = _values((int(np.prod(shape)), 9), dtype, 5)
        A, out = layer.forward_columns(Z, shape)
        A = np.array(A)
        D = COLUMN_LAYOUTS[D_layout](_values(Z.shape, dtype, 6))
        dZ = layer.backward_columns(D, out)
        expected = ref(A, D)
    assert_same_bits(dZ, expected, f"{kind} backward_columns, D {D_layout}")


@pytest.mark.parametrize("layout", ["columns", "batch_first"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_network_same_bits_as_numpy(dtype, layout):
    # A chain of activations (no products): the network's output and input gradient are
    # numpy's expressions composed, whatever blocks the layers write into.
    net = nn.Sequential(nn.Tanh(), nn.ReLU(), nn.Sigmoid(), nn.Tanh(), layout=layout)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 3, 30, 30)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    a1 = np.tanh(x)
    a2 = np.maximum(a1, 0)
    a3 = 1 / (1 + np.exp(-a2))  # a2 >= 0: the branch of the layer's sigmoid for z >= 0
    a4 = np.tanh(a3)
    y = net.forward(x)
    assert_same_bits(np.asarray(y), a4, "output")
    d = tanh_grad_ref(dy, a4)
    d = sigmoid_grad_ref(d, a3)
    d = d * (a1 > 0).astype(dtype)
    d = tanh_grad_ref(d, a1)
    assert_same_bits(np.asarray(net.backward(dy)), d, "input gradient")


@pytest.mark.parametrize("dtype", ["float16", ">f8", ">f4", "longdouble"])
@pytest.mark.parametrize("layer", [nn.Tanh, nn.Sigmoid], ids=["tanh", "sigmoid"])
def test_backward_of_other_float_dtypes(layer, dtype):
    """The compiled passes take native float32/float64; other floats take numpy's expression
    (float16, long double and byte-swapped arrays are accepted by the forward)."""
    x = np.linspace(-2, 2, 12).astype(dtype).reshape(3, 4)
    dy = np.linspace(1, 3, 12).astype(dtype).reshape(3, 4)
    act = layer()
    a = act.forward(x)
    got = act.backward(dy)
    want = (tanh_grad_ref if layer is nn.Tanh else sigmoid_grad_ref)(dy, a)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
