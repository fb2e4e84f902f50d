"""Method ``im2col``: patches unrolled by :func:`sparseconv.reference.im2col`, one GEMM per group.

The batch is one GEMM: patches as rows ``(N * Ho * Wo, C * k * k)`` (``layout="rows"``, one
copy of a ``sliding_window_view``); the adjoint is :func:`sparseconv.reference.col2im`, one
strided slice add per kernel tap. Every other method's time is divided by this one's.
"""

from __future__ import annotations

import numpy as np

from ... import reference as ref
from ..suites import Case
from ._base import Prepared, Settings, check_budget

__all__ = ["NAME", "RANK", "prepare"]

NAME = "im2col"
RANK = 50


def prepare(case: Case, settings: Settings) -> Prepared:
    """Set up im2col for the case's layer (nothing to build: the patches are unrolled per pass)."""
    layer = case.layer
    n = layer.batch
    f, cg, k, _ = layer.weight_shape
    g, fg = layer.groups, f // layer.groups
    kg = cg * k * k
    o2 = layer.out_size ** 2
    cols_bytes = n * o2 * layer.in_channels * k * k * case.dtype.itemsize
    check_budget(cols_bytes, f"the im2col buffer ({n * o2} x {layer.in_channels * k * k})", settings.budget)
    patch = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, layout="rows")
    wmat = case.kernel.reshape(g, fg, kg)
    x, dy = case.x, case.dy

    def unroll() -> np.ndarray:
        return ref.im2col(x, k, **patch).reshape(n * o2, g, kg)

    def dy_rows() -> np.ndarray:
        return dy.transpose(0, 2, 3, 1).reshape(n * o2, g, fg)

    def forward() -> np.ndarray:
        y = np.matmul(unroll().transpose(1, 0, 2), wmat.transpose(0, 2, 1))  # (G, N*L, Fg)
        y = y.transpose(1, 0, 2).reshape(n, o2, f).transpose(0, 2, 1)
        return np.ascontiguousarray(y).reshape(layer.y_shape)

    def adjoint() -> np.ndarray:
        dcols = np.matmul(dy_rows().transpose(1, 0, 2), wmat)  # (G, N*L, Kg)
        return ref.col2im(dcols.transpose(1, 0, 2).reshape(n * o2, g * kg), layer.input_shape, k, **patch)

    def weight_grad() -> np.ndarray:
        grad = np.matmul(dy_rows().transpose(1, 2, 0), unroll().transpose(1, 0, 2))  # (G, Fg, Kg)
        return grad.reshape(layer.weight_shape)

    return Prepared(method=NAME, passes={"forward": forward, "adjoint": adjoint, "weight_grad": weight_grad},
                    buffer_name="im2col buffer (N*Ho*Wo x C*k*k)", buffer_bytes=int(cols_bytes))
