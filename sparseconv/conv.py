"""The convolution operator: a tied-parameter sparse matrix with forward, adjoint and gradients.

A convolution with weight ``w`` of shape ``(F, C // G, *kernel)`` on one sample of shape
``(C, *in)`` is the matrix-vector product ``z = W @ x.ravel()`` with ``W`` of shape
``(F * prod(out), C * prod(in))``. ``W`` is sparse (each row holds at most
``C // G * prod(kernel)`` entries) and its entries are *tied*: each is one weight (or, for
repeating padding modes on tiny inputs, a sum of weights), recorded in a tying map.

Products with ``W`` are evaluated one of two ways, with the same result to rounding: by
scipy's CSR kernel on the stored matrix (``method="csr"``), or in the factored form the tying
gives it, ``W = (I ⊗ B) S`` -- a gather of the inputs each tap reads, then one BLAS GEMM
(``method="taps"``, :mod:`sparseconv.factored`). ``method="auto"`` (the default) picks by the
layer's shape: the factored form where BLAS gets wide operands, the CSR kernel where the
matrix is much sparser than its taps (pruned or partially connected kernels) or channels are
few.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from .geometry import (ConvGeometry, IntOrTuple, PaddingSpec, check_array_dtype, check_batch,
                       conv_geometry, resolve_dtype)
from .factored import (AdjointTables, adjoint_tables, adjoint_taps, choose_method, forward_table, forward_taps,
                       weight_grad_taps)
from .parallel import csr_matmat, csr_rmatmat
from .pattern import build_pattern, value_layout

__all__ = ["ConvOperator", "MatrixOperator", "SparseLinearOperator", "conv_matrix"]

# Elements of the (entries x batch) scratch of the kernel gradient's "entries" method: a few
# MB whatever the layer.
_GRAD_CHUNK_ELEMENTS = 1 << 20

_METHODS = ("auto", "csr", "taps")


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


class _ProductOperator(LinearOperator):
    """``W`` through a convolution operator's products with a fixed method (no bias).

    Parameters
    ----------
    op : ConvOperator
    method : {"auto", "taps"}
        Passed to :meth:`ConvOperator.forward` and :meth:`ConvOperator.backward_input`.
    """

    def __init__(self, op: "ConvOperator", method: str) -> None:
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op, self.method = op, method

    def _apply(self, a: np.ndarray, adjoint: bool) -> np.ndarray:
        """Columns of ``a`` (flattened samples) through the product, complex ones in two parts."""
        a = np.asarray(a)
        if np.iscomplexobj(a):
            return self._apply(a.real, adjoint) + 1j * self._apply(a.imag, adjoint)
        if not np.can_cast(a.dtype, self.op.dtype, "safe"):
            raise TypeError(f"this operator computes in {self.op.dtype}; a {a.dtype} block would be rounded to it "
                            f"(use as_linear_operator('csr'), which promotes, or an operator built from a "
                            f"{a.dtype} weight)")
        shape = self.op.out_shape if adjoint else self.op.input_shape
        batch = a.astype(self.op.dtype, copy=False).T.reshape((-1, *shape))
        product = self.op._adjoint_product if adjoint else self.op._product
        return product(batch, self.method, None).reshape(batch.shape[0], -1).T

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, adjoint=False)

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        return self._apply(y, adjoint=True)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(x, (-1, 1)))[:, 0]

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self._rmatmat(np.reshape(y, (-1, 1)))[:, 0]


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
        self._layout = None if pattern.param_index is None else value_layout(
            self.geometry, pattern.indptr, pattern.param_index, uniform_filters=self._mask is None)
        self._forward_table: Optional[np.ndarray] = None
        self._adjoint_tables: Optional[AdjointTables] = None
        self._auto: dict[str, str] = {}
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

        O(nnz), written into the matrix's existing value array (no allocation on the
        pattern's scale). Rows of output positions whose taps fall on the input the same way
        repeat one row per filter (see :class:`~sparseconv.pattern.ValueLayout`), so most
        layers are written as a few strided broadcasts at the speed of a copy; the others by a
        gather through the tying map.

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
        if self._layout is not None:
            # A few strided broadcasts: copy speed, where a gather is ~7x slower.
            self._layout.write(self._weight, self.matrix.data)
        elif self._param_index is not None:
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
    def tap_table(self) -> np.ndarray:
        """The tap table of the factored products (built at first use, then kept).

        Returns
        -------
        ndarray of shape (prod(out), prod(kernel)), intp
            See :func:`sparseconv.factored.forward_table`.
        """
        if self._forward_table is None:
            self._forward_table = forward_table(self.geometry, self._spatial)
        return self._forward_table

    def adjoint_tables(self) -> AdjointTables:
        """The tables of the factored adjoint (built at first use, then kept).

        Returns
        -------
        AdjointTables
            See :func:`sparseconv.factored.adjoint_tables`.
        """
        if self._adjoint_tables is None:
            self._adjoint_tables = adjoint_tables(self.geometry, self._spatial)
        return self._adjoint_tables

    def method(self, product: str) -> str:
        """The method ``method="auto"`` takes for a product.

        ``"taps"`` (the factored product of :mod:`sparseconv.factored`: a gather and a BLAS
        GEMM) when the layer has enough channels for BLAS and few explicit zeros among the
        gathered taps, else ``"csr"`` (scipy's CSR kernel on :attr:`matrix`). Depends only on
        the layer's shape and mask; see :func:`sparseconv.factored.choose_method`.

        Parameters
        ----------
        product : {"forward", "adjoint"}

        Returns
        -------
        {"taps", "csr"}

        Raises
        ------
        ValueError
            For an unknown ``product``.
        """
        if product not in self._auto:
            mask_fraction = 1.0 if self._mask is None else float(self._mask.mean())
            self._auto[product] = choose_method(self.geometry, self._spatial, product, mask_fraction)
        return self._auto[product]

    def _resolve(self, method: str, product: str) -> str:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
        return self.method(product) if method == "auto" else method

    def _kernel(self) -> np.ndarray:
        return self._weight.reshape(self.geometry.out_channels, self.geometry.in_channels // self.geometry.groups, -1)

    def forward(self, x: np.ndarray, *, method: str = "auto", threads: Optional[int] = None) -> np.ndarray:
        """``z = W @ x + b`` for every sample.

        Parameters
        ----------
        x : ndarray of shape (N, C, *in)
        method : {"auto", "csr", "taps"}, default "auto"
            ``"csr"`` multiplies by :attr:`matrix` with scipy's CSR kernel, row blocks on
            threads. ``"taps"`` evaluates the same product in factored form (a gather of the
            inputs each kernel tap reads, then one BLAS GEMM per group; see
            :mod:`sparseconv.factored`), which multiplies padding and masked weights as
            explicit zeros -- a non-finite input or weight can then give NaN where the CSR
            product, having no such entries, does not. ``"auto"`` takes :meth:`method`.
        threads : int, optional
            Threads for the CSR row blocks or the gathers; default
            :func:`sparseconv.parallel.get_threads` (every core). BLAS uses its own pool.

        Returns
        -------
        ndarray of shape (N, F, *out)
            ``"csr"`` results do not depend on ``threads``; ``"taps"`` results agree with them
            to rounding.
        """
        z = self._product(check_batch(x, self.input_shape, self.dtype, "x"), method, threads)
        if self.bias is not None:
            z += self.bias.reshape((-1,) + (1,) * self.geometry.ndim)
        return z

    def backward_input(self, dy: np.ndarray, *, method: str = "auto", threads: Optional[int] = None) -> np.ndarray:
        """``dJ/dx = W.T @ dy`` for every sample (the full convolution with the rotated kernel).

        Parameters
        ----------
        dy : ndarray of shape (N, F, *out)
        method : {"auto", "csr", "taps"}, default "auto"
            ``"csr"``: row blocks of ``W`` scatter into per-thread buffers that are then summed
            (no transpose of ``W`` is stored); bit-identical to scipy's ``W.T @ dy`` on one
            thread, equal to rounding on more. ``"taps"``: the factored adjoint, a gather of
            ``dy`` through the inverse tap table and one GEMM per group (see :meth:`forward`
            for what explicit zeros mean). ``"auto"`` takes ``method("adjoint")``.
        threads : int, optional
            As for :meth:`forward`.

        Returns
        -------
        ndarray of shape (N, C, *in)
        """
        return self._adjoint_product(check_batch(dy, self.out_shape, self.dtype, "dy"), method, threads)

    def _product(self, x: np.ndarray, method: str, threads: Optional[int]) -> np.ndarray:
        """``W @ x`` (no bias) for a checked batch of shape (N, C, *in)."""
        n = x.shape[0]
        if self._resolve(method, "forward") == "taps":
            z = forward_taps(x.reshape(n, self.geometry.in_channels, -1), self._kernel(), self.geometry,
                             self.tap_table(), threads)
        else:
            z = csr_matmat(self.matrix, x.reshape(n, -1).T, threads=threads).T
        return z.reshape((n, *self.out_shape))

    def _adjoint_product(self, dy: np.ndarray, method: str, threads: Optional[int]) -> np.ndarray:
        """``W.T @ dy`` for a checked batch of shape (N, F, *out)."""
        n = dy.shape[0]
        if self._resolve(method, "adjoint") == "taps":
            dx = adjoint_taps(dy.reshape(n, self.geometry.out_channels, -1), self._kernel(), self.geometry,
                              self.tap_table(), self.adjoint_tables(), threads)
        else:
            dx = csr_rmatmat(self.matrix, dy.reshape(n, -1).T, threads=threads).T
        return dx.reshape((n, *self.input_shape))

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
            ``(F/G, N*m) @ (N*m, taps*C/G)`` product per group -- BLAS speed, no ``(nnz, N)``
            scratch. It runs in chunks of samples (or, for huge layers, output positions) of
            about :data:`sparseconv.factored.CHUNK_ELEMENTS` gathered elements.
        threads : int, optional
            Threads for the gather; default every core. The BLAS product runs on BLAS's own
            pool (limit it with ``threadpoolctl``).

        Returns
        -------
        ndarray of shape (F, C // groups, *kernel)
            Zero for masked weights.
        """
        x = check_batch(x, self.input_shape, self.dtype, "x")
        dy = check_batch(dy, self.out_shape, self.dtype, "dy")
        n = x.shape[0]
        if n != dy.shape[0]:
            raise ValueError(f"x and dy must hold the same number of samples; got {n} and {dy.shape[0]}")
        if method == "taps":
            grad = weight_grad_taps(x.reshape(n, self.geometry.in_channels, -1),
                                    dy.reshape(n, self.geometry.out_channels, -1), self.geometry,
                                    self.tap_table(), threads)
        elif method == "entries":
            grad = self._weight_grad_entries(x.reshape(n, -1), dy.reshape(n, -1))
        else:
            raise ValueError(f"method must be 'taps' or 'entries'; got {method!r}")
        if self._mask is not None:
            grad[~self._mask.reshape(grad.shape)] = 0
        return grad.astype(self.dtype, copy=False).reshape(self.geometry.weight_shape)

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

    def as_linear_operator(self, method: str = "csr") -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` on flattened samples (no bias).

        Parameters
        ----------
        method : {"csr", "taps", "auto"}, default "csr"
            ``"csr"``: a :class:`SparseLinearOperator` on :attr:`matrix` (its adjoint is the
            stored matrix transposed). ``"taps"`` / ``"auto"``: products through
            :meth:`forward` and :meth:`backward_input` with that method, a block of vectors at
            a time -- for iterative solvers and ARPACK on layers where the factored product is
            faster.

        Returns
        -------
        LinearOperator of shape (F * prod(out), C * prod(in))
        """
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
        if method == "csr":
            return SparseLinearOperator(self.matrix)
        return _ProductOperator(self, method)

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
