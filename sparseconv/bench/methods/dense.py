"""Method ``dense``: the layer's matrix stored dense, one GEMM per pass.

The weight gradient is the dense ``dy.T @ x`` reduced through the tying map, as a fully
connected layer would compute it.
"""

from __future__ import annotations

import numpy as np

from ..suites import Case
from ..timing import measure
from . import _operator
from ._base import Prepared, Settings, check_budget

__all__ = ["NAME", "RANK", "prepare"]

NAME = "dense"
RANK = 40


def prepare(case: Case, settings: Settings) -> Prepared:
    """Set up the dense matrix of the case's layer (its construction is timed)."""
    layer = case.layer
    rows = int(np.prod(layer.y_shape[1:]))
    cols = int(np.prod(layer.input_shape))
    # The matrix itself plus the dense (rows x cols) weight-gradient product.
    check_budget(2 * rows * cols * case.dtype.itemsize,
                 f"the dense {rows}x{cols} {case.dtype.name} matrix and its gradient", settings.budget)

    def build() -> tuple:
        op, _ = _operator.build(case, settings.budget, "csr")
        return op, _operator.to_dense(op)

    op, dense = build()
    timing = measure(build, repeats=min(settings.repeats, 3), max_seconds=settings.max_seconds, warmup=False)
    n = layer.batch
    flat, param_index, n_params, _ = _operator.matrix_entries(op)
    x2, dy2 = case.x.reshape(n, -1), case.dy.reshape(n, -1)
    dense_flat = dense.reshape(-1)
    w_flat = case.w.reshape(-1)

    def weight_grad() -> np.ndarray:
        full = dy2.T @ x2
        grad = np.bincount(param_index, weights=full.reshape(-1)[flat], minlength=n_params)
        return grad.astype(case.dtype).reshape(layer.weight_shape)

    def refresh() -> None:
        dense_flat[flat] = w_flat[param_index]

    return Prepared(
        method=NAME,
        passes={"forward": lambda: (x2 @ dense.T).reshape(layer.y_shape),
                "adjoint": lambda: (dy2 @ dense).reshape(layer.x_shape),
                "weight_grad": weight_grad},
        buffer_name="dense matrix", buffer_bytes=int(dense.nbytes), build_s=timing["median_s"],
        refresh=refresh, info={"matrix_shape": [rows, cols]})
