"""The convolution operator: a tied-parameter sparse matrix with forward, adjoint and gradients.

A convolution with weight ``w`` of shape ``(F, C // G, *kernel)`` on one sample of shape
``(C, *in)`` is the matrix-vector product ``z = W @ x.ravel()`` with ``W`` of shape
``(F * prod(out), C * prod(in))``. ``W`` is sparse (each row holds at most
``C // G * prod(kernel)`` entries) and its entries are *tied*: each is one weight (or, for
repeating padding modes on tiny inputs, a sum of weights), recorded in a tying map.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from .geometry import (ConvGeometry, IntOrTuple, PaddingSpec, check_array_dtype, check_batch,
                       conv_geometry, resolve_dtype)
from .parallel import csr_matmat, csr_rmatmat, get_threads, run_blocks
from .pattern import build_pattern

__all__ = ["ConvOperator", "MatrixOperator", "SparseLinearOperator", "conv_matrix"]

# Elements of the kernel gradient's scratch: (entries x batch) for "entries", (taps x
# positions x batch x channels) for "taps". A few MB whatever the layer: small enough for the
# gathered block to be still in cache when BLAS reads it (measured faster than 4x larger).
_GRAD_CHUNK_ELEMENTS = 1 << 20

# Smallest gather worth handing to another thread, in elements.
_MIN_GATHER_BLOCK = 1 << 16


class SparseLinearOperator(LinearOperator):
    """A scipy ``LinearOperator`` view of a sparse matrix with batched products.

    scipy's default ``_matmat`` loops over columns; here one sparse-dense product handles a
    whole block, in both directions.

    Parameters
    ----------
    matrix : scipy.sparse.csr_array of shape (m, n)
    """

    def __init__(self, matrix: sp.csr_array):
        super().__init__(dtype=matrix.dtype, shape=matrix.shape)
        self.matrix = matrix

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self.matrix @ np.ravel(x)

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self.matrix.T @ np.ravel(y)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return self.matrix @ x

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        return self.matrix.T @ y

    def _adjoint(self) -> "SparseLinearOperator":
        return SparseLinearOperator(self.matrix.T.tocsr())

    def __repr__(self) -> str:
        return f"<{self.shape[0]}x{self.shape[1]} SparseLinearOperator with dtype={self.dtype}, nnz={self.matrix.nnz}>"


class MatrixOperator:
    """What every operator owning a sparse matrix shares (convolution, pooling, transposed).

    Subclasses set ``matrix`` (a ``csr_array``), ``dtype`` and ``geometry`` (or override
    :attr:`input_shape` and :attr:`out_shape`).
    """

    matrix: sp.csr_array
    dtype: np.dtype
    geometry: ConvGeometry

    @property
    def shape(self) -> tuple[int, int]:
        """``(prod(out_shape), prod(input_shape))``."""
        return self.matrix.shape

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's input shape, ``(C, *in)``."""
        return self.geometry.input_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        """One sample's output shape, ``(F, *out)``."""
        return self.geometry.output_shape

    @property
    def nnz(self) -> int:
        """Stored entries of the matrix (the layer's multiply-accumulates per sample)."""
        return int(self.matrix.nnz)

    def bias_grad(self, dy: np.ndarray) -> np.ndarray:
        """``dJ/db[f]``: ``dy`` summed over the batch and every position of output channel ``f``.

        Parameters
        ----------
        dy : ndarray of shape (N, F, *out)

        Returns
        -------
        ndarray of shape (F,)
        """
        dy = check_batch(dy, self.out_shape, self.dtype, "dy")
        return dy.sum(axis=(0, *range(2, dy.ndim)))

    def as_linear_operator(self) -> SparseLinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` on flattened samples (no bias)."""
        return SparseLinearOperator(self.matrix)


class ConvOperator(MatrixOperator):
    """An N-d convolution lowered to a tied-parameter ``scipy.sparse`` matrix.

    Parameters
    ----------
    weight : ndarray of shape (F, C // groups, *kernel)
        1, 2 or 3 kernel dimensions; float32 or float64 (integers become float64). The
        operator computes in this dtype.
    input_shape : tuple of int
        One sample's shape ``(C, *in)``.
    stride, dilation : int or tuple of int, default 1
    padding : int, tuple, or {"valid", "same", "full"}, default 0
        Int, per-dimension ints, per-dimension ``(low, high)`` pairs, or a string; see
        :func:`sparseconv.geometry.normalize_padding`.
    groups : int, default 1
    padding_mode : {"zeros", "circular", "reflect", "replicate"}, default "zeros"
    flip : bool, default False
        True for a true convolution (kernel rotated 180 degrees), False for the
        cross-correlation deep-learning libraries call convolution.
    bias : ndarray of shape (F,), optional
        Added to every output position of its map by :meth:`forward`.
    weight_mask : ndarray of bool, shape like ``weight``, optional
        Weights left out of the matrix (a connection table, or pruning). Masked weights
        must be zero.
    memory_budget : int, optional
        Bytes the matrix may use; construction raises
        :class:`~sparseconv.pattern.MemoryBudgetError` beyond it. Default: half the
        physical memory, or ``SPARSECONV_MEMORY_BUDGET``.

    Attributes
    ----------
    matrix : scipy.sparse.csr_array of shape (F * prod(out), C * prod(in))
    geometry : ConvGeometry
    out_shape : tuple of int
        ``(F, *out)``.

    Notes
    -----
    Along each spatial dimension the output size is

    .. math:: o = \\lfloor (i + p_{lo} + p_{hi} - d (k - 1) - 1) / s \\rfloor + 1.

    Row ``(f, *o)`` holds, at column ``(c, *(o s - p_lo + k d))``, the weight
    ``w[f, c - g C/G, *k]`` (rotated when ``flip``) for every tap inside the input. With
    ``delta = dJ/dz``:

    - ``dJ/dx = W.T @ delta``: the adjoint of a correlation is the full convolution
      (correlation with the rotated kernel);
    - ``dJ/dw[p] = sum_e [param(e) == p] delta[row(e)] x[col(e)]``, summed over the batch
      (a scatter-add over the tying map);
    - ``dJ/db[f] = sum of delta over map f``.

    Examples
    --------
    >>> import numpy as np, sparseconv as sc
    >>> op = sc.ConvOperator(np.ones((1, 1, 2, 2)), input_shape=(1, 3, 3))
    >>> op.matrix.shape, op.nnz
    ((4, 9), 16)
    """

    def __init__(self, weight: np.ndarray, input_shape: tuple[int, ...], *, stride: IntOrTuple = 1,
                 padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                 padding_mode: str = "zeros", flip: bool = False, bias: Optional[np.ndarray] = None,
                 weight_mask: Optional[np.ndarray] = None, memory_budget: Optional[int] = None):
        dtype = resolve_dtype(weight, "weight")
        weight = np.asarray(weight)
        self.geometry: ConvGeometry = conv_geometry(
            weight.shape, input_shape, stride=stride, padding=padding, dilation=dilation,
            groups=groups, padding_mode=padding_mode, flip=flip)
        self.dtype = dtype
        self._mask = None if weight_mask is None else np.asarray(weight_mask)
        pattern = build_pattern(self.geometry, weight_mask=self._mask, value_dtype=dtype,
                                memory_budget=memory_budget)
        self._param_index = pattern.param_index
        self._tying = pattern.tying
        self._spatial = pattern.spatial
        self._taps: Optional[np.ndarray] = None
        self.matrix = sp.csr_array(
            (np.empty(pattern.nnz, dtype=dtype), pattern.indices, pattern.indptr), shape=pattern.shape)
        self._weight = np.empty(self.geometry.weight_shape, dtype=dtype)
        self.set_weight(weight)
        self.bias: Optional[np.ndarray] = None
        if bias is not None:
            self.set_bias(bias)

    # ------------------------------------------------------------------ structure
    @property
    def n_params(self) -> int:
        """Number of kernel weights (masked ones included)."""
        return self.geometry.n_params

    @property
    def weight(self) -> np.ndarray:
        """A read-only view of the weight the matrix currently holds."""
        view = self._weight.view()
        view.flags.writeable = False
        return view

    @property
    def weight_mask(self) -> Optional[np.ndarray]:
        """The mask given at construction (False: weight left out), or None."""
        return self._mask

    @property
    def param_index(self) -> np.ndarray:
        """Index into ``weight.ravel()`` of the weight each stored entry holds, shape (nnz,).

        Raises
        ------
        ValueError
            When some entry is a sum of several weights (repeating padding on an input smaller
            than the kernel's reach); use :attr:`tying` then.
        """
        if self._param_index is None:
            raise ValueError(
                "some entries of this matrix hold a sum of several weights (padding_mode "
                f"{self.geometry.padding_mode!r} wraps the kernel onto the same input position), so "
                "there is no single param_index; use .tying, a sparse (nnz, n_params) matrix")
        return self._param_index

    @property
    def tying(self) -> sp.csr_array:
        """The tying map: a 0/1 ``csr_array`` of shape (nnz, n_params) with
        ``matrix.data == tying @ weight.ravel()``."""
        if self._tying is not None:
            return self._tying
        nnz = self._param_index.size
        return sp.csr_array((np.ones(nnz), self._param_index, np.arange(nnz + 1)),
                            shape=(nnz, self.n_params))

    # ------------------------------------------------------------------ values
    def set_weight(self, weight: np.ndarray) -> None:
        """Refresh the stored values from a new weight, keeping the pattern.

        O(nnz), no allocation on the pattern: a gather through the tying map into the
        matrix's existing value array.

        Parameters
        ----------
        weight : ndarray of shape (F, C // groups, *kernel)
        """
        weight = check_array_dtype(weight, self.dtype, "weight")
        if weight.shape != self.geometry.weight_shape:
            raise ValueError(f"weight must have shape {self.geometry.weight_shape}; got {weight.shape}")
        if self._mask is not None and np.any(weight[~self._mask]):
            raise ValueError("weight has non-zero values where weight_mask is False; those weights have "
                             "no entries in the matrix (build a new operator to change the mask)")
        self._weight[...] = weight
        flat = self._weight.reshape(-1)
        if self._param_index is not None:
            # Indices are in range, so any mode gives the same values; "wrap" is numpy's
            # fastest (no buffered copy as for "raise", no per-element clamp as for "clip").
            np.take(flat, self._param_index, out=self.matrix.data, mode="wrap")
        else:
            self.matrix.data[...] = self._tying @ flat

    def set_bias(self, bias: Optional[np.ndarray]) -> None:
        """Set (or, with None, remove) the per-map bias of shape (F,)."""
        if bias is None:
            self.bias = None
            return
        bias = check_array_dtype(bias, self.dtype, "bias")
        if bias.shape != (self.geometry.out_channels,):
            raise ValueError(f"bias must have shape ({self.geometry.out_channels},); got {bias.shape}")
        self.bias = bias.copy()

    # ------------------------------------------------------------------ products
    def _flat(self, arr: np.ndarray, sample_shape: tuple[int, ...], name: str) -> np.ndarray:
        arr = check_batch(arr, sample_shape, self.dtype, name)
        return arr.reshape(arr.shape[0], -1)

    def forward(self, x: np.ndarray, *, threads: Optional[int] = None) -> np.ndarray:
        """``z = W @ x + b`` for every sample.

        Parameters
        ----------
        x : ndarray of shape (N, C, *in)
        threads : int, optional
            Row blocks of ``W`` run on this many threads; default
            :func:`sparseconv.parallel.get_threads` (every core). The result does not depend
            on it.

        Returns
        -------
        ndarray of shape (N, F, *out)
        """
        xf = self._flat(x, self.input_shape, "x")
        z = csr_matmat(self.matrix, xf.T, threads=threads).T.reshape((xf.shape[0], *self.out_shape))
        if self.bias is not None:
            z += self.bias.reshape((-1,) + (1,) * self.geometry.ndim)
        return z

    def backward_input(self, dy: np.ndarray, *, threads: Optional[int] = None) -> np.ndarray:
        """``dJ/dx = W.T @ dy`` for every sample (the full convolution with the rotated kernel).

        Parameters
        ----------
        dy : ndarray of shape (N, F, *out)
        threads : int, optional
            Row blocks of ``W`` scatter into per-thread buffers that are then summed (no
            transpose of ``W`` is stored); default every core. Results agree to rounding
            across thread counts, and are bit-identical to scipy's ``W.T @ dy`` on one.

        Returns
        -------
        ndarray of shape (N, C, *in)
        """
        df = self._flat(dy, self.out_shape, "dy")
        return csr_rmatmat(self.matrix, df.T, threads=threads).T.reshape((df.shape[0], *self.input_shape))

    def weight_grad(self, x: np.ndarray, dy: np.ndarray, *, method: str = "taps",
                    threads: Optional[int] = None) -> np.ndarray:
        """Kernel gradient: the scatter-add of ``dy[row(e)] * x[col(e)]`` over the tying map.

        Parameters
        ----------
        x : ndarray of shape (N, C, *in)
        dy : ndarray of shape (N, F, *out)
        method : {"taps", "entries"}, default "taps"
            ``"entries"`` is the literal definition: for each stored entry ``e`` the batch sum
            ``g[e] = sum_n dy[n, row(e)] x[n, col(e)]`` is formed in bounded chunks and
            scatter-added to the weight(s) ``e`` is tied to. ``"taps"`` performs the same sum
            grouped by kernel tap: the entries tied to tap ``t`` of every (filter, channel)
            pair share one list of (output, input) positions, so gathering each tap's input
            positions once (a zero where the tap reads padding) turns the whole sum into one
            ``(F, N*m) @ (N*m, taps*C)`` product per group -- BLAS speed, no ``(nnz, N)``
            scratch. The gather runs in batch (and, for huge layers, tap) chunks of at most
            ``_GRAD_CHUNK_ELEMENTS`` elements.
        threads : int, optional
            Threads for the gather; default every core. The BLAS product runs on BLAS's own
            pool (limit it with ``threadpoolctl``).

        Returns
        -------
        ndarray of shape (F, C // groups, *kernel)
            Zero for masked weights.
        """
        xf = self._flat(x, self.input_shape, "x")
        df = self._flat(dy, self.out_shape, "dy")
        if xf.shape[0] != df.shape[0]:
            raise ValueError(f"x and dy must hold the same number of samples; got {xf.shape[0]} and {df.shape[0]}")
        if method == "taps":
            grad = self._weight_grad_taps(xf, df, threads)
        elif method == "entries":
            grad = self._weight_grad_entries(xf, df)
        else:
            raise ValueError(f"method must be 'taps' or 'entries'; got {method!r}")
        if self._mask is not None:
            grad[~self._mask.reshape(grad.shape)] = 0
        return grad.astype(self.dtype, copy=False).reshape(self.geometry.weight_shape)

    def _tap_table(self) -> np.ndarray:
        """``table[o, t]``: the input position tap ``t`` reads at output position ``o``, or
        ``prod(in)`` (a zero row appended to the input) where it reads padding. Built at
        first use; shape ``(prod(out), prod(kernel))``, int64."""
        if self._taps is None:
            g, spat = self.geometry, self._spatial
            n_in = int(np.prod(g.in_size))
            table = np.full((int(np.prod(g.out_size)), int(np.prod(g.kernel_size))), n_in, dtype=np.int64)
            table[spat.out_pos, spat.tap] = spat.in_pos
            self._taps = table
        return self._taps

    def _weight_grad_taps(self, xf: np.ndarray, df: np.ndarray, threads: Optional[int]) -> np.ndarray:
        g = self.geometry
        n = xf.shape[0]
        groups, cin_g, f_per_g = g.groups, g.in_channels // g.groups, g.out_channels // g.groups
        n_in, n_out = int(np.prod(g.in_size)), int(np.prod(g.out_size))
        table = self._tap_table()
        n_taps = table.shape[1]
        per_sample = n_taps * n_out * g.in_channels
        batch_chunk = max(1, min(n, _GRAD_CHUNK_ELEMENTS // per_sample))
        tap_chunk = max(1, min(n_taps, _GRAD_CHUNK_ELEMENTS // (n_out * g.in_channels * batch_chunk)))
        grad = np.zeros((groups, f_per_g, n_taps, cin_g), dtype=self.dtype)
        for n0 in range(0, n, batch_chunk):
            nc = min(batch_chunk, n - n0)
            # Inputs as (G, samples, in positions + 1, C/G), the extra position a zero for
            # padding taps: gathering rows by the tap table then yields, per group, the
            # (samples * positions, taps * C/G) block of unrolled inputs in C order.
            xs = np.zeros((groups, nc, n_in + 1, cin_g), dtype=self.dtype)
            xs[:, :, :n_in] = xf[n0:n0 + nc].reshape(nc, groups, cin_g, n_in).transpose(1, 0, 3, 2)
            ds = np.ascontiguousarray(df[n0:n0 + nc].reshape(nc, groups, f_per_g, n_out).transpose(1, 2, 0, 3))
            ds = ds.reshape(groups, f_per_g, nc * n_out)
            for t0 in range(0, n_taps, tap_chunk):
                t1 = min(n_taps, t0 + tap_chunk)
                cols = self._gather_rows(xs, table[:, t0:t1].reshape(-1), threads)
                cols = cols.reshape(groups, nc * n_out, (t1 - t0) * cin_g)
                # One (F/G, N*m) @ (N*m, taps*C/G) BLAS product per group and chunk.
                grad[:, :, t0:t1] += np.matmul(ds, cols).reshape(groups, f_per_g, t1 - t0, cin_g)
        # (G, F/G, taps, C/G) -> (F, C/G, taps), the weight's layout.
        return grad.transpose(0, 1, 3, 2).reshape(-1)

    @staticmethod
    def _gather_rows(xs: np.ndarray, rows: np.ndarray, threads: Optional[int]) -> np.ndarray:
        """``xs[:, :, rows]`` (shape (G, samples, len(rows), C/G)), samples split over threads."""
        out = np.empty((xs.shape[0], xs.shape[1], rows.size, xs.shape[3]), dtype=xs.dtype)

        def block(s0: int, s1: int) -> None:
            np.take(xs[:, s0:s1], rows, axis=2, out=out[:, s0:s1], mode="wrap")

        n_threads = min(get_threads(threads), xs.shape[1], max(1, out.size // _MIN_GATHER_BLOCK))
        run_blocks(block, np.linspace(0, xs.shape[1], n_threads + 1).astype(np.int64), n_threads)
        return out

    def _weight_grad_entries(self, xf: np.ndarray, df: np.ndarray) -> np.ndarray:
        xt = np.ascontiguousarray(xf.T)
        dt = np.ascontiguousarray(df.T)
        indptr, indices = self.matrix.indptr, self.matrix.indices
        n_rows = self.shape[0]
        chunk = max(1, _GRAD_CHUNK_ELEMENTS // xf.shape[0])
        grad = np.zeros(self.n_params, dtype=np.float64)
        r0 = 0
        while r0 < n_rows:
            # Whole rows per chunk: the last row whose entries still fit (at least one row).
            r1 = max(r0 + 1, int(np.searchsorted(indptr, indptr[r0] + chunk, side="right")) - 1)
            r1 = min(r1, n_rows)
            e0, e1 = int(indptr[r0]), int(indptr[r1])
            rows = np.repeat(np.arange(r0, r1), np.diff(indptr[r0:r1 + 1]))
            g = np.einsum("ij,ij->i", dt[rows], xt[indices[e0:e1]])
            if self._param_index is not None:
                grad += np.bincount(self._param_index[e0:e1], weights=g, minlength=self.n_params)
            else:
                grad += self._tying[e0:e1].T @ g
            r0 = r1
        return grad

    def to_dense(self) -> np.ndarray:
        """The matrix as a dense ndarray (small layers only)."""
        return self.matrix.toarray()

    def __repr__(self) -> str:
        g = self.geometry
        return (f"ConvOperator({g.describe()}, matrix {self.shape[0]}x{self.shape[1]}, nnz={self.nnz}, "
                f"params={self.n_params}, dtype={self.dtype})")


def conv_matrix(weight: np.ndarray, input_shape: tuple[int, ...], *, stride: IntOrTuple = 1,
                padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                padding_mode: str = "zeros", flip: bool = False,
                memory_budget: Optional[int] = None) -> sp.csr_array:
    """The explicit sparse matrix of a convolution.

    Like :func:`scipy.linalg.convolution_matrix`, but N-d, strided, multi-channel and sparse.

    Parameters
    ----------
    weight : ndarray of shape (F, C // groups, *kernel)
    input_shape : tuple of int
        ``(C, *in)`` with 1, 2 or 3 spatial dimensions.
    stride, padding, dilation, groups, padding_mode, flip, memory_budget
        As for :class:`ConvOperator`.

    Returns
    -------
    scipy.sparse.csr_array of shape (F * prod(out), C * prod(in))
        Rows ordered ``(F, *out)`` and columns ``(C, *in)``, both C order, so that
        ``(W @ x.reshape(N, -1).T).T.reshape(N, F, *out)`` is the layer's output.

    Examples
    --------
    >>> import numpy as np, sparseconv as sc
    >>> W = sc.conv_matrix(np.array([[[[1., 2.], [3., 4.]]]]), (1, 3, 3))
    >>> W.toarray()[0]
    array([1., 2., 0., 3., 4., 0., 0., 0., 0.])
    """
    return ConvOperator(weight, input_shape, stride=stride, padding=padding, dilation=dilation,
                        groups=groups, padding_mode=padding_mode, flip=flip,
                        memory_budget=memory_budget).matrix
