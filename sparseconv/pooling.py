"""Pooling (sub-sampling) as sparse matrices.

Average and sum pooling are fixed linear maps: a depthwise convolution whose kernel is all
ones (sum) or ``1 / prod(kernel)`` (average). Their matrix is built by the same geometry and
pattern code as every convolution, and their backward pass is the transpose -- the seeds'
"up-sample" (a Kronecker product with a block of ones, divided by the window size for the
mean, when the windows tile the input).

:class:`PoolOperator` is a scipy ``LinearOperator`` (products on its depthwise convolution's
engines). Max pooling is not linear: for each sample it is a 0/1 *selection* matrix with one
entry per output, at the input position that won its window. :class:`MaxPoolOperator` builds
that matrix for a whole batch at once from the arg-max positions. The pooling geometry is
:func:`sparseconv.geometry.pool_geometry`'s (re-exported here).

Padding is implicit zeros for average/sum pooling (and the zeros count in the average, like
PyTorch's ``count_include_pad=True``); max pooling never selects a padded position.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from .conv import ConvOperator, MatrixOperator
from .geometry import IntOrTuple, PaddingSpec, check_batch, check_float_dtype, pool_geometry
from .pattern import spatial_pattern

__all__ = ["PoolOperator", "MaxPoolOperator", "pool_matrix", "pool_geometry"]

POOL_KINDS = ("avg", "sum")


class PoolOperator(MatrixOperator):
    """Average or sum pooling as a fixed linear operator (a depthwise convolution).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, *in)``.
    kernel_size : int or tuple of int
    stride : int or tuple of int, optional
        Defaults to ``kernel_size``; overlapping windows (stride < kernel) are allowed.
    padding : int, tuple or str, default 0
    kind : {"avg", "sum"}, default "avg"
    dtype : {float64, float32}, default float64
    engine : {"auto", "csr", "factored"}, optional
        The depthwise convolution's engines (see :class:`~sparseconv.conv.ConvOperator`).

    Attributes
    ----------
    shape : (int, int)
        ``(C * prod(out), C * prod(in))``: a scipy ``LinearOperator`` on flattened samples.
    matrix : scipy.sparse.csr_array of shape (C * prod(out), C * prod(in))
        Built on first access.

    Notes
    -----
    Output size per dimension: ``o = floor((i + p_lo + p_hi - k) / s) + 1``. Each row holds
    ``1 / prod(k)`` (avg) or 1 (sum) at the input positions of its window.
    """

    def __init__(self, input_shape: tuple[int, ...], kernel_size: IntOrTuple, *,
                 stride: Optional[IntOrTuple] = None, padding: PaddingSpec = 0, kind: str = "avg",
                 dtype: type = np.float64, engine: Optional[str] = None):
        if kind not in POOL_KINDS:
            raise ValueError(f"kind must be one of {POOL_KINDS}; got {kind!r}")
        dtype = check_float_dtype(dtype)
        geometry = pool_geometry(input_shape, kernel_size, stride=stride, padding=padding)
        window = int(np.prod(geometry.kernel_size))
        value = 1.0 / window if kind == "avg" else 1.0
        weight = np.full(geometry.weight_shape, value, dtype=dtype)
        self._conv = ConvOperator(weight, geometry.input_shape, stride=geometry.stride, padding=geometry.padding,
                                  groups=geometry.groups, engine=engine)
        super().__init__(dtype=dtype, shape=self._conv.shape)
        self.geometry = geometry
        self.kind = kind

    @property
    def matrix(self) -> sp.csr_array:
        """The explicit matrix, built on first access (read-only arrays)."""
        return self._conv.matrix

    @property
    def nnz(self) -> int:
        """Stored entries of the matrix."""
        return self._conv.nnz

    def supports(self, engine: str, product: str) -> bool:
        """Whether ``engine`` can run ``product`` (see :meth:`ConvOperator.supports`)."""
        return self._conv.supports(engine, product)

    def engine(self, product: str) -> str:
        """The engine of ``"forward"`` or ``"adjoint"`` (see :meth:`ConvOperator.engine`)."""
        return self._conv.engine(product)

    def _columns_product(self, a: np.ndarray, adjoint: bool, engine: Optional[str],
                         threads: Optional[int]) -> np.ndarray:
        return self._conv._columns_product(a, adjoint, engine, threads)

    def forward(self, x: np.ndarray, *, engine: Optional[str] = None, threads: Optional[int] = None) -> np.ndarray:
        """Pool a batch.

        Parameters
        ----------
        x : ndarray of shape (N, C, *in)
        engine, threads
            As for :meth:`ConvOperator.forward`.

        Returns
        -------
        ndarray of shape (N, C, *out)
        """
        return self._conv.forward(x, engine=engine, threads=threads)

    def backward_input(self, dy: np.ndarray, *, engine: Optional[str] = None,
                       threads: Optional[int] = None) -> np.ndarray:
        """``P.T @ dy``: spread each output's sensitivity over its window (the up-sample).

        Parameters
        ----------
        dy : ndarray of shape (N, C, *out)
        engine, threads
            As for :meth:`ConvOperator.backward_input`.

        Returns
        -------
        ndarray of shape (N, C, *in)
        """
        return self._conv.backward_input(dy, engine=engine, threads=threads)

    def __repr__(self) -> str:
        g = self.geometry
        return (f"PoolOperator(kind={self.kind!r}, input_shape={g.input_shape}, kernel_size={g.kernel_size}, "
                f"stride={g.stride}, out_shape={self.out_shape}, nnz={self.nnz})")


def pool_matrix(input_shape: tuple[int, ...], kernel_size: IntOrTuple, *, stride: Optional[IntOrTuple] = None,
                padding: PaddingSpec = 0, kind: str = "avg", dtype: type = np.float64) -> sp.csr_array:
    """The fixed sparse matrix of average or sum pooling.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, *in)`` with 1, 2 or 3 spatial dimensions.
    kernel_size : int or tuple of int
    stride : int or tuple of int, optional
        Defaults to the kernel size.
    padding : int, tuple or str, default 0
    kind : {"avg", "sum"}
    dtype : {float64, float32}

    Returns
    -------
    scipy.sparse.csr_array of shape (C * prod(out), C * prod(in))

    Examples
    --------
    >>> import sparseconv as sc
    >>> P = sc.pool_matrix((1, 4, 4), 2)
    >>> P.shape, P.nnz, float(P.data[0])
    ((4, 16), 16, 0.25)
    """
    op = PoolOperator(input_shape, kernel_size, stride=stride, padding=padding, kind=kind, dtype=dtype, engine="csr")
    # The operator is discarded: its matrix is handed over writeable, not copied.
    return op._conv._engine("forward", "csr").hand_over()


class MaxPoolOperator:
    """Max pooling through a data-dependent 0/1 selection matrix.

    Not a ``LinearOperator``: which input each output copies depends on the input itself, so
    there is no fixed matrix to multiply by (``P(a x + b y) != a P x + b P y``). For one batch
    the map *is* linear in a neighbourhood of that batch -- its Jacobian, the selection
    matrix -- which :meth:`selection_matrix` returns (pass it where a LinearOperator is
    wanted, e.g. to spectral analysis).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, *in)``.
    kernel_size : int or tuple of int
    stride : int or tuple of int, optional
        Defaults to ``kernel_size``.
    padding : int, tuple or str, default 0
        Padded positions never win; every window must contain at least one input position.
    dtype : {float64, float32}

    Notes
    -----
    Ties: when several positions of a window hold the maximum, the *first* in the window's
    C-order scan (smallest kernel offset, row-major) wins and receives the whole sensitivity.
    NaN propagates: a window containing NaN selects its first NaN.

    :meth:`forward` records the winners; :meth:`selection_matrix` returns them as a
    ``(N * C * prod(out), N * C * prod(in))`` matrix ``S`` with one 1 per row, so that
    ``S @ x.ravel()`` is the pooled batch and :meth:`backward_input` is ``S.T @ dy.ravel()``.
    """

    def __init__(self, input_shape: tuple[int, ...], kernel_size: IntOrTuple, *,
                 stride: Optional[IntOrTuple] = None, padding: PaddingSpec = 0, dtype: type = np.float64):
        dtype = check_float_dtype(dtype)
        self.geometry = pool_geometry(input_shape, kernel_size, stride=stride, padding=padding)
        self.dtype = dtype
        spat = spatial_pattern(self.geometry)
        if np.any(spat.counts == 0):
            raise ValueError(
                f"padding={padding!r} leaves pooling windows with no input position (kernel "
                f"{self.geometry.kernel_size}, input {self.geometry.in_size}); max pooling needs at least one "
                f"real value per window, so keep the padding below the kernel size")
        n_taps = int(np.prod(self.geometry.kernel_size))
        # (positions, taps) table of input positions. A padded tap repeats the first real
        # position of its window: it can then never beat a real value, and since that
        # position also appears at its own tap, the first-maximum tie rule is unchanged.
        first = spat.in_pos[np.cumsum(spat.counts) - spat.counts]
        windows = np.repeat(first[:, None], n_taps, axis=1)
        windows[spat.out_pos, spat.tap] = spat.in_pos
        self._windows = windows
        self._winners: Optional[np.ndarray] = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.geometry.input_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.geometry.output_shape

    def winners(self, x: np.ndarray) -> np.ndarray:
        """Flat spatial input position that wins each window.

        Parameters
        ----------
        x : ndarray of shape (N, C, *in)

        Returns
        -------
        ndarray of shape (N, C, prod(out)), int64
        """
        return self._winners_of(check_batch(x, self.input_shape, self.dtype, "x"))

    def _winners_of(self, x: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        taps = np.argmax(x.reshape(n, c, int(np.prod(self.geometry.in_size)))[..., self._windows], axis=-1)
        return self._windows[np.arange(self._windows.shape[0]), taps]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Pool a batch and remember the winners for :meth:`backward_input`.

        Parameters
        ----------
        x : ndarray of shape (N, C, *in)

        Returns
        -------
        ndarray of shape (N, C, *out)
        """
        x = check_batch(x, self.input_shape, self.dtype, "x")
        win = self._winners_of(x)
        self._winners = win
        n, c = win.shape[:2]
        return np.take_along_axis(x.reshape(n, c, int(np.prod(self.geometry.in_size))), win, axis=-1).reshape((n, *self.out_shape))

    def selection_matrix(self, x: Optional[np.ndarray] = None) -> sp.csr_array:
        """The 0/1 selection matrix of a batch (of the last forward batch when ``x`` is None).

        Returns
        -------
        scipy.sparse.csr_array of shape (N * C * prod(out), N * C * prod(in))
            Block diagonal over samples and channels; row ``(n, c, o)`` has its single 1 at
            column ``(n, c, winner)``.
        """
        win = self._winners if x is None else self.winners(x)
        if win is None:
            raise ValueError("selection_matrix() needs a batch: pass x or call forward(x) first")
        n, c, n_out_sp = win.shape
        n_in_sp = int(np.prod(self.geometry.in_size))
        cols = (win + (np.arange(n * c) * n_in_sp).reshape(n, c, 1)).ravel()
        rows = cols.size
        return sp.csr_array((np.ones(rows, dtype=self.dtype), cols, np.arange(rows + 1)),
                            shape=(rows, n * c * n_in_sp))

    def backward_input(self, dy: np.ndarray) -> np.ndarray:
        """Route each sensitivity to the position that won its window in the last forward.

        Parameters
        ----------
        dy : ndarray of shape (N, C, *out)

        Returns
        -------
        ndarray of shape (N, C, *in)
            Overlapping windows that share a winner add their sensitivities.
        """
        if self._winners is None:
            raise ValueError("backward_input() needs the winners of a forward pass: call forward(x) first")
        dy = check_batch(dy, self.out_shape, self.dtype, "dy")
        n, c = self._winners.shape[:2]
        if dy.shape[0] != n:
            raise ValueError(f"dy must have the batch size of the last forward, {n}; got {dy.shape[0]}")
        return (self.selection_matrix().T @ dy.ravel()).reshape((n, *self.input_shape))

    def __repr__(self) -> str:
        g = self.geometry
        return (f"MaxPoolOperator(input_shape={g.input_shape}, kernel_size={g.kernel_size}, stride={g.stride}, "
                f"out_shape={self.out_shape})")
