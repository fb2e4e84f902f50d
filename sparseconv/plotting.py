"""Pictures: a layer's matrix (entries coloured by tied parameter, or a density view of a large
matrix) and training curves.

matplotlib is an optional extra (``pip install 'sparseconv[plot]'``), imported only when a plot
is drawn. The conventions every function here follows:

- ``ax=`` draws into the caller's axes; without it a new figure is made with pyplot;
- the matplotlib :class:`~matplotlib.figure.Figure` is returned, and left open (so notebooks and
  sphinx-gallery show it; close it with ``matplotlib.pyplot.close(fig)`` when drawing many);
- a file is written only when ``path`` is given;
- the backend is never changed: whatever the session uses (inline, a GUI, Agg) stays.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:  # pragma: no cover - for annotations only; matplotlib is optional
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_matrix", "plot_history", "DETAIL_LIMIT"]

PathLike = Union[str, os.PathLike]

#: Largest side (rows or columns) drawn entry by entry; a larger block is drawn as a density view.
DETAIL_LIMIT = 400


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'sparseconv[plot]' (or pip install matplotlib)") \
            from None
    return plt


def _as_matrix(op: Any) -> sp.csr_array:
    """The sparse matrix to draw: ``op`` itself, or ``op.matrix`` for an operator."""
    from .pooling import MaxPoolOperator

    if isinstance(op, MaxPoolOperator):
        raise TypeError("plot_matrix: a MaxPoolOperator has no fixed matrix (which entry wins depends on the "
                        "input); plot the selection matrix of a batch instead: "
                        "plot_matrix(op.selection_matrix(x)) after op.forward(x)")
    if sp.issparse(op):
        matrix = op
    elif isinstance(op, np.ndarray):
        if op.ndim != 2:
            raise ValueError(f"plot_matrix: an array must be 2-D; got shape {op.shape}")
        matrix = op
    elif hasattr(op, "matrix"):
        matrix = op.matrix
    else:
        raise TypeError("plot_matrix: op must be a scipy.sparse matrix or array, a 2-D ndarray, or an operator "
                        f"with a .matrix (ConvOperator, PoolOperator, ...); got {type(op).__name__}")
    return sp.csr_array(matrix)


def _tied_colour(op: Any, matrix: sp.csr_array) -> Optional[np.ndarray]:
    """Per stored entry, the index of the weight it holds (ConvOperator-like ``op``), else None."""
    if not hasattr(op, "tying"):
        return None
    try:
        colour = np.asarray(op.param_index)
    except ValueError:
        # Some entries hold a sum of weights (repeating padding): colour by the first one.
        tying = op.tying
        colour = tying.indices[tying.indptr[:-1]]
    # The colour is per entry of the operator's own CSR order: only valid if nothing reordered it.
    return colour if colour.shape == (matrix.nnz,) else None


def _check_range(value: Optional[Sequence[int]], size: int, name: str) -> tuple[int, int]:
    if value is None:
        return 0, size
    try:
        lo, hi = (int(v) for v in value)
        exact = all(int(v) == v for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"plot_matrix: {name} must be a pair (start, stop) of ints; got {value!r}") from None
    if not exact or not 0 <= lo < hi <= size:
        raise ValueError(f"plot_matrix: {name} must be (start, stop) with 0 <= start < stop <= {size}; got {value!r}")
    return lo, hi


def _new_axes(ax: Optional["Axes"], figsize: tuple[float, float]) -> tuple["Figure", "Axes"]:
    if ax is not None:
        return ax.figure, ax
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def plot_matrix(op: Any, path: Optional[PathLike] = None, *, ax: Optional["Axes"] = None,
                rows: Optional[Sequence[int]] = None, cols: Optional[Sequence[int]] = None,
                view: str = "auto", bins: int = 200, title: Optional[str] = None, dpi: int = 120) -> "Figure":
    """Draw a matrix: every entry coloured by the weight it is tied to, or a density view.

    Parameters
    ----------
    op : ConvOperator, PoolOperator, ConvTransposeOperator, sparse matrix or 2-D ndarray
        Anything with a ``.matrix``, or the matrix itself (``csr_array``, ``csr_matrix``, any
        ``scipy.sparse`` format). With an operator that ties entries to weights
        (``ConvOperator``) the colour is the tied weight's index into ``weight.ravel()``;
        otherwise the entry's value. A ``MaxPoolOperator`` has no fixed matrix and is refused.
    path : str or PathLike, optional
        Write the figure here (format from the suffix, e.g. PNG). Nothing is written without it.
    ax : matplotlib Axes, optional
        Draw into these axes (the colour bar is added to their figure). Default: a new figure.
    rows, cols : (start, stop), optional
        Zoom on the block ``matrix[start:stop]`` of rows / columns (half-open, like slicing).
        Default: the whole matrix.
    view : {"auto", "entries", "density"}
        ``"entries"`` draws one square per stored entry; ``"density"`` counts the stored entries
        in a grid of at most ``bins`` x ``bins`` blocks, so a matrix of any size is shown whole.
        ``"auto"`` chooses ``"entries"`` when the shown block has at most
        :data:`DETAIL_LIMIT` rows and columns.
    bins : int, default 200
        Grid cells along the longer side in the density view.
    title : str, optional
        Default: the matrix's shape and ``nnz`` (and the block shown).
    dpi : int, default 120
        Resolution of the file written to ``path``.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn into (left open).

    Raises
    ------
    TypeError
        For a ``MaxPoolOperator`` (use ``plot_matrix(op.selection_matrix(x))``) or an object
        with no matrix.
    ValueError
        For a ``rows``/``cols`` range outside the matrix, or an unknown ``view``.
    """
    if view not in ("auto", "entries", "density"):
        raise ValueError(f"plot_matrix: view must be 'auto', 'entries' or 'density'; got {view!r}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"plot_matrix: bins must be a positive int; got {bins!r}")
    matrix = _as_matrix(op)
    r0, r1 = _check_range(rows, matrix.shape[0], "rows")
    c0, c1 = _check_range(cols, matrix.shape[1], "cols")
    colour = _tied_colour(op, matrix)
    label = "tied weight index" if colour is not None else "value"
    if colour is None:
        colour = matrix.data
    coo = sp.coo_array((np.arange(matrix.nnz), (np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr)),
                                                 matrix.indices)), shape=matrix.shape)
    keep = (coo.row >= r0) & (coo.row < r1) & (coo.col >= c0) & (coo.col < c1)
    r, c, entry = coo.row[keep], coo.col[keep], coo.data[keep]
    n_rows, n_cols = r1 - r0, c1 - c0
    if view == "auto":
        view = "entries" if max(n_rows, n_cols) <= DETAIL_LIMIT else "density"

    aspect = n_rows / n_cols
    fig, ax = _new_axes(ax, (7.5, min(max(2.5, 6.5 * aspect), 9.0) + 1.0))
    from matplotlib.ticker import MaxNLocator
    if view == "entries":
        # One square marker per entry, sized so neighbouring entries just touch.
        width_in = ax.get_position().width * fig.get_figwidth()
        side_points = 0.9 * width_in * 72 / max(n_rows, n_cols)
        artist = ax.scatter(c, r, c=colour[entry], s=side_points ** 2, marker="s", cmap="viridis", linewidths=0)
        ax.set_xlim(c0 - 0.5, c1 - 0.5)
        ax.set_ylim(r1 - 0.5, r0 - 0.5)
        ax.set_aspect("equal")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        values = np.asarray(colour[entry])
        # One value everywhere (a pooling matrix): say it rather than draw a one-colour bar.
        constant = values.size > 0 and label == "value" and bool(np.all(values == values[0]))
        detail = f", every entry {values[0]:.4g}" if constant else ""
    else:
        scale = max(n_rows, n_cols) / bins
        row_bins, col_bins = max(1, round(n_rows / scale)), max(1, round(n_cols / scale))
        counts, _, _ = np.histogram2d(r, c, bins=(row_bins, col_bins), range=((r0, r1), (c0, c1)))
        shown = np.ma.masked_equal(counts, 0)
        artist = ax.imshow(shown, extent=(c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5), cmap="viridis",
                           interpolation="nearest", aspect="equal" if 0.1 < aspect < 10 else "auto")
        label = "stored entries per cell"
        constant = False
        detail = f"; density view, cells of {n_rows / row_bins:.3g}x{n_cols / col_bins:.3g}"
    ax.set_xlabel("column (input c, *in)")
    ax.set_ylabel("row (output f, *out)")
    block = "" if (n_rows, n_cols) == matrix.shape else f", rows {r0}:{r1}, cols {c0}:{c1} shown"
    ax.set_title(title or f"{matrix.shape[0]}x{matrix.shape[1]} matrix, nnz={matrix.nnz}{block}{detail}",
                 fontsize=10, wrap=True)
    # The colour bar as an inset of the axes: exactly their height, and it leaves the layout
    # of a caller's figure alone.
    if not constant:
        bar = fig.colorbar(artist, cax=ax.inset_axes((1.03, 0.0, 0.035, 1.0)), label=label)
        if label != "value":
            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
    if path is not None:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def plot_history(history: Any, path: Optional[PathLike] = None, *, ax: Optional[Sequence["Axes"]] = None,
                 dpi: int = 120) -> "Figure":
    """Training loss and train/test accuracy per epoch.

    Parameters
    ----------
    history : History
        What :func:`sparseconv.train.train` returns (``train_loss``, ``train_accuracy``,
        ``test_accuracy`` per epoch).
    path : str or PathLike, optional
        Write the figure here. Nothing is written without it.
    ax : pair of matplotlib Axes, optional
        Axes for the loss and for the accuracies. Default: a new figure with two panels.
    dpi : int, default 120
        Resolution of the file written to ``path``.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn into (left open).
    """
    if ax is None:
        plt = _pyplot()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    else:
        try:
            ax1, ax2 = ax
        except (TypeError, ValueError):
            raise TypeError("plot_history: ax must be a pair of Axes (loss, accuracy); "
                            f"got {type(ax).__name__}") from None
        fig = ax1.figure
    epochs = np.arange(1, len(history.train_loss) + 1)
    ax1.plot(epochs, history.train_loss, marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax2.plot(epochs, history.train_accuracy, marker="o", label="train")
    ax2.plot(epochs, history.test_accuracy, marker="s", label="test")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    if path is not None:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig
