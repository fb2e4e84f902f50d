"""Independent references and array helpers for the tests of the compiled engines' column products.

Every reference here is computed without the code under test: the dense matrix of a layer is
:func:`sparseconv.reference.dense_matrix` (the direct convolution of unit inputs), the kernel
gradient is :func:`sparseconv.reference.conv_direct_backward`, both in float64. The scales are
the largest sums of absolute terms, the magnitude a product's rounding error is relative to
(see ``magnitudes.py``), passed to :func:`sparseconv.testing.assert_allclose`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sparseconv import reference as ref
from sparseconv.engines.base import ALIGNMENT
from sparseconv.testing import assert_allclose

from cases import Case


def columns(a: np.ndarray) -> np.ndarray:
    """A batch ``(N, ...)`` as a C-ordered column block ``(prod(...), N)``."""
    return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)


def dense(case: Case, w: np.ndarray) -> np.ndarray:
    """The layer's matrix in float64, from the direct convolution of unit inputs."""
    return ref.dense_matrix(w.astype(np.float64), (case.c, *case.in_size), **case.opts)


def misaligned(a: np.ndarray, offset: int = 16) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data starts ``offset`` bytes past a multiple of ALIGNMENT
    (an empty array's data pointer is wherever numpy leaves it)."""
    buf = np.empty(a.nbytes + 2 * ALIGNMENT, dtype=np.uint8)
    start = -buf.ctypes.data % ALIGNMENT + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert a.size == 0 or out.ctypes.data % ALIGNMENT == offset % ALIGNMENT
    return out


def masked_weight(case: Case, mask: Optional[np.ndarray], seed: int) -> np.ndarray:
    """A standard normal weight in the case's dtype, zero where ``mask`` is False."""
    w = np.random.default_rng(seed).standard_normal(case.weight_shape)
    if mask is not None:
        w = np.where(mask, w, 0.0)
    return w.astype(case.dtype)


def check_products(eng, case: Case, w: np.ndarray, n: int, threads: int, *, mask: Optional[np.ndarray] = None,
                   seed: int = 0, matrix: Optional[np.ndarray] = None) -> None:
    """An engine's forward, adjoint and kernel gradient on ``n`` columns against the references.

    ``eng`` has ``matmat(X, threads)``, ``rmatmat(D, threads)`` and ``weight_grad(X, D, threads)``;
    masked weights must get a zero gradient.
    """
    rng = np.random.default_rng(seed)
    geom = case.geometry()
    x = rng.standard_normal((n, *geom.input_shape)).astype(case.dtype)
    dy = rng.standard_normal((n, *geom.output_shape)).astype(case.dtype)
    A = dense(case, w) if matrix is None else matrix
    X64, D64 = columns(x).astype(np.float64), columns(dy).astype(np.float64)
    absA = np.abs(A)
    tag = f"{case.id} N={n} threads={threads}"
    y = eng.matmat(columns(x), threads)
    assert y.shape == (geom.n_out, n) and y.dtype == np.dtype(case.dtype), (y.shape, y.dtype)
    assert_allclose(y, A @ X64, scale=max(float((absA @ np.abs(X64)).max()), 1e-300), err_msg=f"forward {tag}")
    z = eng.rmatmat(columns(dy), threads)
    assert z.shape == (geom.n_in, n) and z.dtype == np.dtype(case.dtype), (z.shape, z.dtype)
    assert_allclose(z, A.T @ D64, scale=max(float((absA.T @ np.abs(D64)).max()), 1e-300), err_msg=f"adjoint {tag}")
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    _, dw, _ = ref.conv_direct_backward(x64, w64, dy64, **case.opts)
    _, sdw, _ = ref.conv_direct_backward(np.abs(x64), np.abs(w64), np.abs(dy64), **case.opts)
    if mask is not None:
        dw = np.where(mask, dw, 0.0)
    g = eng.weight_grad(columns(x), columns(dy), threads)
    assert g.shape == w.shape and g.dtype == np.dtype(case.dtype), (g.shape, g.dtype)
    assert_allclose(g, dw, scale=max(float(np.abs(sdw).max()), 1e-300), err_msg=f"weight_grad {tag}")
    if mask is not None:
        assert not np.any(g[~mask]), f"non-zero gradient at masked weights ({tag})"


def check_network_gradients(net, x: np.ndarray, dy: np.ndarray, dx: np.ndarray, grads: dict) -> None:
    """``dx`` and every parameter's gradient in ``grads`` (by name) against float64 central
    differences of ``<dy, net(x)>``, in ``x`` and in the free (unmasked) entries of each parameter."""
    from sparseconv.testing import gradcheck

    def loss_x(z):
        return float(np.sum(net.forward(z) * dy))

    gradcheck(loss_x, x, dx, rng=0)
    for k, p in net.named_parameters():
        free = np.ones(p.shape, bool) if p.mask is None else p.mask
        base = p.data.copy()

        def loss_p(v, p=p, base=base, free=free):
            w = base.copy()
            w[free] = v
            p.assign(w)
            try:
                return float(np.sum(net.forward(x) * dy))
            finally:
                p.assign(base)

        gradcheck(loss_p, base[free], grads[k][free], rng=1)


def tanh_grad_ref(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``D * (1 - A*A)`` as numpy evaluates it: one rounded operation at a time."""
    d = A * A
    d = 1 - d
    return D * d


def sigmoid_grad_ref(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``D * ((1 - A) * A)`` as numpy evaluates it."""
    d = 1 - A
    d = d * A
    return D * d
