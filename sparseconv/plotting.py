"""Pictures: a layer's sparsity pattern coloured by tied parameter, and training curves.

matplotlib is an optional extra (``pip install 'sparseconv[plot]'``); it is imported when a
plot is drawn, with the non-interactive Agg backend, and never at package import.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

__all__ = ["plot_matrix", "plot_history"]

PathLike = Union[str, os.PathLike]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'sparseconv[plot]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_matrix(op, path: PathLike, *, max_rows: Optional[int] = 400, max_cols: Optional[int] = 400,
                title: Optional[str] = None) -> PathLike:
    """Spy plot of an operator's matrix, each entry coloured by the weight it is tied to.

    Parameters
    ----------
    op : ConvOperator or object with ``.matrix``
        With a ConvOperator the colour is the tied parameter's index (entries that hold a
        sum of weights take the first); otherwise the entry's value.
    path : str or PathLike
        Where to write the PNG.
    max_rows, max_cols : int or None
        Draw only the top-left block of a large matrix (None: everything).
    title : str, optional

    Returns
    -------
    path
    """
    plt = _pyplot()
    matrix = op.matrix.tocoo()
    keep = np.ones(matrix.nnz, dtype=bool)
    if max_rows is not None:
        keep &= matrix.row < max_rows
    if max_cols is not None:
        keep &= matrix.col < max_cols
    if hasattr(op, "tying"):
        # tocoo keeps CSR entry order, so entry e of the CSR is entry e here.
        colour = op.tying.indices[op.tying.indptr[:-1]]
        label = "tied parameter index"
    else:
        colour = matrix.data
        label = "value"
    rows = matrix.shape[0] if max_rows is None else min(max_rows, matrix.shape[0])
    cols = matrix.shape[1] if max_cols is None else min(max_cols, matrix.shape[1])
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 6.5 * rows / max(cols, 1)) + 1.0))
    # One square marker per entry, sized so neighbouring entries just touch.
    side_points = 6.5 * 72 / max(rows, cols)
    sc = ax.scatter(matrix.col[keep], matrix.row[keep], c=colour[keep], s=side_points ** 2 * 0.8,
                    marker="s", cmap="viridis", linewidths=0)
    ax.set_aspect("equal")
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xlabel("column (input c, *in)")
    ax.set_ylabel("row (output f, *out)")
    shown = "" if (rows, cols) == matrix.shape else f" (top-left {rows}x{cols} shown)"
    ax.set_title(title or f"{matrix.shape[0]}x{matrix.shape[1]} matrix, nnz={matrix.nnz}{shown}", fontsize=10,
                 wrap=True)
    fig.colorbar(sc, ax=ax, label=label, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_history(history, path: PathLike) -> PathLike:
    """Training loss and train/test accuracy per epoch (a :class:`~sparseconv.train.History`)."""
    plt = _pyplot()
    epochs = np.arange(1, len(history.train_loss) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, history.train_loss, marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax2.plot(epochs, history.train_accuracy, marker="o", label="train")
    ax2.plot(epochs, history.test_accuracy, marker="s", label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
