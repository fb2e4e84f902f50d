"""
Gradients against the direct and im2col references
===================================================

The operator's three products -- forward ``W @ x``, input gradient ``W.T @ dy`` and kernel
gradient (a scatter-add over the tying map) -- are checked here against two independent
implementations shipped in :mod:`sparseconv.reference`: textbook loops (with the rot180 rule
for the input gradient) and im2col with a GEMM. A layer with every option at once: stride,
padding, dilation and groups. Finally a finite-difference check of the kernel gradient along
random directions (:func:`sparseconv.testing.gradcheck`).
"""

import numpy as np

import sparseconv as sc
from sparseconv import reference as ref
from sparseconv.testing import assert_allclose, gradcheck

rng = np.random.default_rng(0)
options = dict(stride=2, padding=(1, 2), dilation=(1, 2), groups=2)
weight = rng.standard_normal((6, 2, 3, 3))               # F=6, C // groups = 2
x = rng.standard_normal((4, 4, 11, 12))                  # N=4, C=4
op = sc.ConvOperator(weight, input_shape=x.shape[1:], **options)
print(op)

y = op.forward(x)
dy = rng.standard_normal(y.shape)
dx, dw = op.backward_input(dy), op.weight_grad(x, dy)

# %%
# Each product against each reference; ``assert_allclose`` uses the tolerance of the dtype
# (one table for the whole project, :func:`sparseconv.testing.tolerance`).
references = {
    "direct (loops, rot180 rule)": (ref.conv_direct(x, weight, **options),
                                    ref.conv_direct_backward(x, weight, dy, **options)),
    "im2col (GEMM)": (ref.conv_im2col(x, weight, **options), ref.conv_im2col_backward(x, weight, dy, **options)),
}
for name, (y_ref, (dx_ref, dw_ref, _)) in references.items():
    for product, ours, theirs in [("forward", y, y_ref), ("input grad", dx, dx_ref), ("kernel grad", dw, dw_ref)]:
        assert_allclose(ours, theirs)
        print(f"{name:<29} {product:<12} max |diff| = {np.abs(ours - theirs).max():.1e}")

# %%
# Finite differences of the loss ``J(w) = <dy, conv(x, w)>``, whose gradient is the kernel
# gradient: central differences along random unit directions must match ``<dw, v>``.


def loss(w):
    return float(np.sum(dy * sc.ConvOperator(w, x.shape[1:], **options).forward(x)))


print("gradcheck, worst relative error:", gradcheck(loss, weight, dw, rng=1))

# %%
# And the adjoint identity ``<W u, v> == <u, W.T v>`` (:func:`sparseconv.testing.dottest`).
print("dot test (lhs, rhs):", sc.testing.dottest(op, rng=2))
