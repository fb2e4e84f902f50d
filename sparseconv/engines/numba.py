"""The ``"numba"`` engine: compiled CSR products of a convolution matrix on column blocks.

Any convolution (any geometry, padding mode, mask or tying): the CSR arrays of ``W``, values
gathered from the weight through ``param_index`` (or the tying map), products on C-ordered
column blocks ``X`` of shape ``(in_size, N)`` with each row's ``N`` outputs in vector
registers; the adjoint is the same kernel on a stored CSR of ``W.T`` whose values follow
``W``'s through a fixed permutation; the kernel gradient sums, per parameter and band of rows,
the dot products over ``N`` of the rows each stored entry joins, in registers. Work is
proportional to the stored entries, so it wins on pruned and partially connected layers.

numba is optional: this module imports without it, :func:`available` then says False (with
:func:`unavailable_reason`), and constructing an engine raises ``ImportError``. The kernels live
in :mod:`sparseconv.engines._numba_kernels`, imported at the first construction. The helpers
here (availability, thread control, dtype rules) are shared with :mod:`sparseconv.engines.stencil`.

:class:`NumbaEngine` is built from CSR arrays, so it runs (and is tested) on any sparse matrix;
``ENGINE`` (module attribute) is the same engine behind the operators' engine protocol
(:mod:`sparseconv.engines.base`), built from a ``Structure``.

Examples
--------
>>> import numpy as np, sparseconv as sc
>>> from sparseconv.engines.numba import NumbaEngine, available
>>> op = sc.ConvOperator(np.ones((2, 1, 3, 3), np.float32), (1, 5, 5), padding=1)
>>> if available():
...     eng = NumbaEngine.from_operator(op)
...     x = np.ones((25, 4), np.float32)
...     bool(np.allclose(eng.matmat(x, threads=1), op.matrix @ x))
... else:
...     True
True
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any, Optional

import numpy as np
import scipy.sparse as sp

from ..geometry import FLOAT_DTYPES, ConvGeometry
from ..parallel import get_threads
from .base import ALIGNMENT, KernelEngine, Structure, aligned_empty, bias_values, is_aligned

__all__ = ["ALIGN_READS", "CompiledEngine", "ENGINE", "NumbaEngine", "NumbaProtocolEngine", "SERIAL_WORK", "available",
           "c_order", "transpose_c", "unavailable_reason"]

# Bytes of input a band of rows may read: a quarter of one core's L2 (2 MiB here), so the
# rows a band reads stay cached while every filter of the band passes over them, with room for
# the outputs and the matrix streaming through. Measured on the 64->64 3x3 32x32 layer at
# N = 32: 256 KiB - 1 MiB bands 9.4-9.7 ms, 4 MiB 13 ms, one band 14-22 ms.
_BAND_INPUT_BYTES = 1 << 19

_kernels: Optional[ModuleType] = None
_import_error: Optional[str] = None
_import_lock = threading.Lock()
# numba's "workqueue" threading layer aborts the process when two threads launch parallel
# kernels at once; launches are serialised under this lock when that layer is in use.
_launch_lock = threading.Lock()


def _load() -> Optional[ModuleType]:
    """The kernel module, imported once; None (reason kept) when numba is missing or broken."""
    global _kernels, _import_error
    if _kernels is not None:
        return _kernels
    with _import_lock:
        if _kernels is None and _import_error is None:
            try:
                _kernels = importlib.import_module("sparseconv.engines._numba_kernels")
            except Exception as err:  # ImportError, or numba failing on this platform
                _import_error = f"{type(err).__name__}: {err}"
    return _kernels


def available() -> bool:
    """True when numba imports and the compiled engines can run."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (the import error), or None when it is True."""
    _load()
    return _import_error


def _require() -> ModuleType:
    kernels = _load()
    if kernels is None:
        raise ImportError(f"the compiled engines need numba (pip install 'sparseconv[fast]'); importing it failed: "
                          f"{_import_error}")
    return kernels


def _pool_size() -> int:
    """Threads in numba's pool (``NUMBA_NUM_THREADS``)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


#: Work below which a product runs on one thread: stored entries times ``max(N, 16)``
#: (narrow blocks count as 16 vectors wide: one vector's scalar sums are bound by latency, not
#: by lanes, and still gain from a second thread). Such a product takes at most ~0.1 ms on
#: one core, so a parallel region gains little, and it can lose much: numba's workers wait at
#: the region's end for every thread, and a worker descheduled by another pool's busy-waiting
#: threads (OpenBLAS's, after a multi-threaded GEMM) stalled the region for milliseconds -- a
#: 90%-pruned LeNet-5 training step in the column layout took 15-100 ms instead of 6 ms until
#: its small products ran on one thread.
SERIAL_WORK = 1 << 21


def _threads(threads: Optional[int], work: Optional[int] = None) -> int:
    """The thread count to run on: the request (checked), capped at numba's pool size; 1 for a
    product whose ``work`` (entries times ``max(N, 16)``, when given) is below :data:`SERIAL_WORK`."""
    n = min(get_threads(threads), _pool_size())
    return 1 if work is not None and work < SERIAL_WORK else n


def _work(entries: int, n: int) -> int:
    """A product's work for :data:`SERIAL_WORK`: ``entries`` multiply-adds on ``max(n, 16)`` vectors."""
    return int(entries) * max(int(n), 16)


def _launch(kernel: Any, n_threads: int, *args: Any) -> None:
    """Run a parallel kernel on ``n_threads`` threads, restoring the caller's numba setting."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(n_threads)
    try:
        if _serialise_launches():
            with _launch_lock:
                kernel(*args)
        else:
            kernel(*args)
    finally:
        numba.set_num_threads(previous)


_layer: Optional[str] = None


def _serialise_launches() -> bool:
    """Whether launches must be serialised (the "workqueue" layer, or not yet known)."""
    global _layer
    if _layer is None:
        import numba

        try:
            _layer = numba.threading_layer()
        except ValueError:  # no parallel kernel has run yet: serialise this first launch
            return True
    return _layer == "workqueue"


def _compute_dtype(a: np.ndarray, dtype: np.dtype, name: str) -> np.dtype:
    """The dtype a product of an engine in ``dtype`` with ``a`` runs in.

    The engine's dtype when ``a`` casts to it without loss; float64 for a float64 block on a
    float32 engine (the float32 values promote exactly, no input is rounded).
    """
    if a.dtype.kind in "biuf":
        if np.can_cast(a.dtype, dtype, "safe"):
            return dtype
        if np.can_cast(a.dtype, np.float64, "safe"):
            return np.dtype(np.float64)
    raise TypeError(f"{name} must be a real array of a dtype that casts to float64 without loss; got {a.dtype}")


#: A misaligned block is copied into an aligned one when the product reads each of its rows at
#: least this many times (stored entries per row): on the 64->64 3x3 32x32 layer at N = 32 the
#: copy (0.3-1.2 ms, cache-dependent) paid off at 90% zeros (57 reads per row: 3.4 ms with it,
#: 5.1 ms without) and not at 99% (6 reads: 0.6 ms either way when the block was in cache,
#: 1.9 ms with the copy when it was not).
ALIGN_READS = 16


def _block(a: np.ndarray, rows: int, dtype: np.dtype, name: str, *, align: bool = False) -> tuple[np.ndarray, bool]:
    """A checked, C-contiguous ``(rows, N)`` block in its compute dtype, and whether ``a`` was 1-D.

    With ``align``, a block whose rows span at least :data:`~sparseconv.engines.base.ALIGNMENT`
    bytes is also aligned (copied into an aligned buffer if it is not): for kernels that read
    each row many times.
    """
    a = np.asarray(a)
    if a.ndim not in (1, 2) or a.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows}, N) or ({rows},); got {a.shape}")
    block = a.reshape(rows, -1)
    dtype = _compute_dtype(a, dtype, name)
    if (align and block.shape[1] * dtype.itemsize >= ALIGNMENT
            and not (block.dtype == dtype and block.flags.c_contiguous and is_aligned(block))):
        out = aligned_empty(block.shape, dtype)
        out[...] = block
        return out, a.ndim == 1
    return np.ascontiguousarray(block, dtype=dtype), a.ndim == 1


def _grad_blocks(X: np.ndarray, D: np.ndarray, shape: tuple[int, int], dtype: np.dtype, *,
                 align: bool) -> tuple[np.ndarray, np.ndarray]:
    """The checked ``(in_size, N)`` and ``(out_size, N)`` blocks of a kernel gradient, C order, in
    one compute dtype (float64 for both if either is a float64 block on a float32 engine)."""
    m, k = shape
    x, _ = _block(X, k, dtype, "X", align=align)
    d, _ = _block(D, m, dtype, "D", align=align)
    if x.dtype != d.dtype:
        x, d = x.astype(np.float64, copy=False), d.astype(np.float64, copy=False)
    if x.shape[1] != d.shape[1]:
        raise ValueError(f"X and D must hold the same number of vectors; got {x.shape[1]} and {d.shape[1]}")
    return x, d


def c_order(a: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
    """A 2-D array in C order: ``a`` itself when it is C-contiguous, else an aligned copy.

    The copy of an F-contiguous array (the column view ``x.reshape(N, -1).T`` of a batch, or
    a block a factored engine produced) is made by :func:`transpose_c`.

    Parameters
    ----------
    a : ndarray of shape (R, C)
    threads : int, optional
        Default :func:`sparseconv.parallel.get_threads`.

    Returns
    -------
    ndarray of shape (R, C), C-contiguous
    """
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"a must be a 2-D array; got shape {a.shape}")
    return a if a.flags.c_contiguous else transpose_c(a.T, threads)


def transpose_c(a: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
    """``a.T`` as a new C-contiguous array aligned to :data:`~sparseconv.engines.base.ALIGNMENT` bytes.

    A C-contiguous float ``a`` is transposed by a compiled tiled kernel where numba is
    available: 0.55-0.8 ms for a (65536, 32) or (32, 65536) float32 block on 2 threads,
    where numpy's copy of the transposed view takes 1.2-7 ms (one cache line fetched per
    element on one side). Other inputs, or no numba, are copied by numpy.

    Parameters
    ----------
    a : ndarray of shape (R, C)
    threads : int, optional
        Default :func:`sparseconv.parallel.get_threads`.

    Returns
    -------
    ndarray of shape (C, R), C-contiguous, sharing no memory with ``a``
    """
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"a must be a 2-D array; got shape {a.shape}")
    out = aligned_empty(a.shape[::-1], a.dtype)
    if a.size and a.flags.c_contiguous and a.dtype in FLOAT_DTYPES and available():
        _launch(_require().transpose_into, _threads(threads, a.size), a, out)
    else:
        out[...] = a.T
    return out


def _balanced_bands(indptr: np.ndarray, blocks: int, n_bands: int) -> np.ndarray:
    """Bounds of at most ``n_bands`` runs of positions (rows within one of ``blocks`` equal row
    blocks) holding about equal numbers of stored entries over all blocks.

    Parameters
    ----------
    indptr : ndarray of shape (rows + 1,)
    blocks : int
    n_bands : int

    Returns
    -------
    ndarray of int64
        Strictly increasing, from 0 to ``rows // blocks``.
    """
    block_rows = (indptr.size - 1) // blocks
    per_pos = np.diff(indptr).astype(np.int64).reshape(blocks, block_rows).sum(axis=0)
    cum = np.concatenate(([0], np.cumsum(per_pos)))
    # Equal entries, not equal positions: border positions hold fewer.
    targets = np.linspace(0, cum[-1], min(n_bands, max(block_rows, 1)) + 1)[1:-1]
    inner = np.searchsorted(cum, targets, side="left")
    return np.unique(np.concatenate(([0], inner, [block_rows]))).astype(np.int64)


def _check_weight(weight: Any, name: str = "weight", *, shape: Optional[tuple[int, ...]] = None,
                  dtype: Optional[np.dtype] = None) -> np.ndarray:
    """``weight`` as a float32/float64 array; with ``shape`` and ``dtype``, exactly those (a refresh)."""
    w = np.asarray(weight)
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array; got {w.dtype}")
    if shape is not None and (w.shape != shape or w.dtype != dtype):
        raise ValueError(f"{name} must be a {dtype} array of shape {shape}; got {w.dtype} array of shape {w.shape}")
    return w


class NumbaEngine:
    """Compiled CSR products of a tied sparse matrix ``W`` on column blocks (``"numba"``).

    Parameters
    ----------
    shape : (int, int)
        ``(out_size, in_size)`` of ``W``.
    indptr : ndarray of shape (out_size + 1,), int32 or int64
    indices : ndarray of shape (nnz,), int32 or int64
        CSR structure of ``W``; kept by reference (not copied), so it must not change.
    weight : ndarray, float32 or float64
        The parameters, any shape (``weight_grad`` returns this shape); their dtype is the
        engine's.
    param_index : ndarray of shape (nnz,), optional
        Index into ``weight.ravel()`` of the weight each stored entry holds.
    tying : scipy.sparse array of shape (nnz, weight.size), optional
        The general tying map (``data = tying @ weight.ravel()``); exactly one of
        ``param_index`` and ``tying`` is given.
    out_blocks, in_blocks : int, default 1
        The rows (columns) of ``W`` are this many equal runs -- the output (input) channels
        of a convolution. Products walk bands of positions with every run inside, so the input
        rows a band reads stay in cache; 1 for a general matrix.

    Attributes
    ----------
    name : str
        ``"numba"``.
    shape : (int, int)
    dtype : numpy.dtype
    weight_shape : tuple of int

    Raises
    ------
    ImportError
        When numba is not available.
    ValueError, TypeError
        For inconsistent structure arrays or a weight of another kind.
    """

    name = "numba"

    @property
    def _k(self) -> Any:
        """The kernel module (looked up, not stored: engines stay picklable and deep-copyable)."""
        return _require()

    def __init__(self, shape: tuple[int, int], indptr: np.ndarray, indices: np.ndarray, weight: np.ndarray, *,
                 param_index: Optional[np.ndarray] = None, tying: Optional[sp.sparray] = None,
                 out_blocks: int = 1, in_blocks: int = 1) -> None:
        _require()
        weight = _check_weight(weight)
        m, k = (int(s) for s in shape)
        indptr, indices = np.asarray(indptr), np.asarray(indices)
        for name, arr in (("indptr", indptr), ("indices", indices)):
            if arr.ndim != 1 or arr.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
                raise TypeError(f"{name} must be a 1-D int32 or int64 array; got {arr.dtype} of shape {arr.shape}")
        if indptr.size != m + 1 or indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
            raise ValueError(f"indptr must be a non-decreasing array of {m + 1} row pointers from 0 to "
                             f"nnz={indices.size}")
        if indices.size and (indices.min() < 0 or indices.max() >= k):
            raise ValueError(f"indices must lie in [0, {k}); got values in [{indices.min()}, {indices.max()}]")
        if (param_index is None) == (tying is None):
            raise ValueError("give exactly one of param_index and tying")
        nnz = indices.size
        if param_index is not None:
            param_index = np.asarray(param_index)
            if param_index.shape != (nnz,) or param_index.dtype.kind not in "iu":
                raise ValueError(f"param_index must be an integer array of shape ({nnz},); got {param_index.dtype} "
                                 f"of shape {param_index.shape}")
            if nnz and (param_index.min() < 0 or param_index.max() >= weight.size):
                raise ValueError(f"param_index must lie in [0, {weight.size}) (weight.size)")
        else:
            tying = sp.csr_array(tying)
            if tying.shape != (nnz, weight.size):
                raise ValueError(f"tying must have shape ({nnz}, {weight.size}); got {tying.shape}")
        for name, blocks, size in (("out_blocks", out_blocks, m), ("in_blocks", in_blocks, k)):
            if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 1 or size % blocks:
                raise ValueError(f"{name} must be a positive int dividing {size}; got {blocks!r}")
        self.shape = (m, k)
        self.dtype = weight.dtype
        self.weight_shape = weight.shape
        self._indptr, self._indices = indptr, indices
        self._param = param_index
        self._tying = tying
        self._blocks = (int(out_blocks), int(in_blocks))
        self._data = np.empty(nnz, dtype=self.dtype)
        # The transposed structure is built at the first adjoint (inference never needs it).
        self._t_indptr: Optional[np.ndarray] = None
        self._t_indices: Optional[np.ndarray] = None
        self._t_perm: Optional[np.ndarray] = None
        self._t_data: Optional[np.ndarray] = None
        self._bands: dict[tuple[bool, int, int], np.ndarray] = {}
        self._grad_layout: Optional[dict[str, Any]] = None
        # float64 copies of the values for float64 blocks on a float32 engine, made on demand.
        self._promoted: dict[bool, np.ndarray] = {}
        self.refresh(weight)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_operator(cls, op: Any) -> "NumbaEngine":
        """The engine of a :class:`~sparseconv.ConvOperator` (or any operator with ``matrix``,
        ``weight``, ``geometry`` and ``param_index``/``tying``), sharing its structure arrays.

        Parameters
        ----------
        op : ConvOperator

        Returns
        -------
        NumbaEngine
        """
        geom = op.geometry
        try:
            param, tying = op.param_index, None
        except ValueError:  # entries holding weight sums: the general tying map
            param, tying = None, op.tying
        return cls(op.matrix.shape, op.matrix.indptr, op.matrix.indices, np.asarray(op.weight), param_index=param,
                   tying=tying, out_blocks=geom.out_channels, in_blocks=geom.in_channels)

    @classmethod
    def applicable(cls, geometry: Optional[ConvGeometry] = None) -> bool:
        """Whether this engine can run a structure: whenever numba is available (any geometry).

        Parameters
        ----------
        geometry : ConvGeometry, optional
            Unused: every convolution's matrix is a CSR matrix.

        Returns
        -------
        bool
        """
        return available()

    @classmethod
    def estimate_nbytes(cls, nnz: int, shape: tuple[int, int], dtype: Any, *, adjoint: bool = True,
                        weight_grad: bool = True) -> int:
        """Bytes the engine would allocate (structure arrays it is given are not counted).

        Parameters
        ----------
        nnz : int
        shape : (int, int)
        dtype : dtype
            The value dtype.
        adjoint : bool, default True
            Count the transposed CSR built at the first :meth:`rmatmat`.
        weight_grad : bool, default True
            Count the entry order built at the first :meth:`weight_grad`.

        Returns
        -------
        int
            Values; with ``adjoint``, the transpose's values, int64 permutation, and indices
            and row pointers; with ``weight_grad``, a row and a column index per entry and an
            upper bound for the segment table (one int64 pointer and parameter per entry --
            really one per band and kept parameter, usually far fewer). Indices are int32 when
            they fit.
        """
        item = np.dtype(dtype).itemsize
        idx = 4 if max(nnz, shape[0], shape[1]) < np.iinfo(np.int32).max else 8
        total = nnz * item
        if adjoint:
            total += nnz * (item + 8 + idx) + (shape[1] + 1) * idx
        if weight_grad:
            total += nnz * (2 * idx + 16) + 8
        return int(total)

    @property
    def nbytes(self) -> int:
        """Bytes the engine holds beyond the structure arrays it was given."""
        arrays = [self._data, self._t_indptr, self._t_indices, self._t_perm, self._t_data, *self._promoted.values()]
        if self._grad_layout is not None:
            arrays += [a for a in self._grad_layout.values() if isinstance(a, np.ndarray)]
        return int(sum(a.nbytes for a in arrays if a is not None))

    # ------------------------------------------------------------------ values
    def refresh(self, weight: np.ndarray) -> None:
        """Take new weight values (same structure).

        Parameters
        ----------
        weight : ndarray of shape :attr:`weight_shape`, the engine's dtype
        """
        w = _check_weight(weight, shape=self.weight_shape, dtype=self.dtype)
        flat = w.reshape(-1)
        if self._param is not None:
            # Indices were checked in range; "wrap" is numpy's fastest take mode.
            np.take(flat, self._param, out=self._data, mode="wrap")
        else:
            self._data[...] = self._tying @ flat
        if self._t_data is not None:
            np.take(self._data, self._t_perm, out=self._t_data)
        self._promoted.clear()

    def _values(self, adjoint: bool, dtype: np.dtype) -> np.ndarray:
        """The value array of ``W`` (or ``W.T``) in ``dtype`` (a kept float64 copy if promoted)."""
        data = self._t_data if adjoint else self._data
        if dtype == self.dtype:
            return data
        if adjoint not in self._promoted:
            self._promoted[adjoint] = data.astype(dtype)
        return self._promoted[adjoint]

    def build_adjoint(self) -> None:
        """Build the CSR of ``W.T`` and the permutation that fills its values from ``W``'s.

        Done by the first :meth:`rmatmat`; call it to build ahead (idempotent).
        """
        if self._t_data is not None:
            return
        m, k = self.shape
        nnz = self._indices.size
        order = sp.csr_array((np.arange(nnz, dtype=np.int64), self._indices, self._indptr), shape=(m, k)).T.tocsr()
        order.sort_indices()
        idx = np.int32 if max(nnz, m, k) < np.iinfo(np.int32).max else np.int64
        self._t_indptr = order.indptr.astype(idx)
        self._t_indices = order.indices.astype(idx)
        self._t_perm = order.data
        self._t_data = np.take(self._data, self._t_perm)

    # ------------------------------------------------------------------ products
    def _band_bounds(self, adjoint: bool, n_threads: int, n: int) -> np.ndarray:
        """Row bands of ``W`` (or ``W.T``) for ``n_threads`` and ``n`` vectors, cached."""
        key = (adjoint, n_threads, n)
        # A local reference: another thread may clear the cache between the store and the return.
        bands = self._bands.get(key)
        if bands is None:
            if len(self._bands) >= 64:  # many batch sizes: keep the cache small
                self._bands.clear()
            indptr = self._t_indptr if adjoint else self._indptr
            blocks = self._blocks[1] if adjoint else self._blocks[0]
            cols = self.shape[0] if adjoint else self.shape[1]
            n_bands = max(n_threads, -(-cols * n * self.dtype.itemsize // _BAND_INPUT_BYTES))
            # A multiple of the thread count: every thread gets as many bands.
            bands = _balanced_bands(indptr, blocks, -(-n_bands // n_threads) * n_threads)
            self._bands[key] = bands
        return bands

    def _product(self, a: np.ndarray, threads: Optional[int], adjoint: bool, bias: Optional[np.ndarray] = None,
                 relu: bool = False) -> np.ndarray:
        m, k = self.shape
        rows_in, rows_out = (m, k) if adjoint else (k, m)
        # Aligned when each input row is read at least ALIGN_READS times.
        block, vector = _block(a, rows_in, self.dtype, "D" if adjoint else "X",
                               align=self._indices.size >= ALIGN_READS * rows_in)
        if adjoint:
            self.build_adjoint()
        n = block.shape[1]
        out = aligned_empty((rows_out, n), block.dtype)
        nt = _threads(threads, _work(self._indices.size, n))
        blocks = self._blocks[1] if adjoint else self._blocks[0]
        if adjoint:
            arrays = (self._t_indptr, self._t_indices, self._values(True, block.dtype))
        else:
            arrays = (self._indptr, self._indices, self._values(False, block.dtype))
        bands = self._band_bounds(adjoint, nt, n)
        b = np.zeros(0, block.dtype) if bias is None else bias
        if n == 1:
            # One vector: scalar sums (a vector kernel would fill one lane of each register).
            _launch(self._k.csr_vec_bands, nt, *arrays, block.reshape(-1), out.reshape(-1), bands, blocks,
                    rows_out // blocks, block.dtype.type(0), b, bool(relu))
        else:
            _launch(self._k.csr_bands, nt, *arrays, block, out, bands, blocks, rows_out // blocks, b, bool(relu))
        return out[:, 0] if vector else out

    def matmat(self, X: np.ndarray, threads: Optional[int] = None, *, bias: Optional[np.ndarray] = None,
               relu: bool = False) -> np.ndarray:
        """``Y = W @ X``, optionally plus a bias per row block and through ReLU, in one pass.

        Parameters
        ----------
        X : ndarray of shape (in_size, N) or (in_size,)
            Any memory order (C-contiguous in the compute dtype is used as is, anything else is
            copied into that layout first, aligned where each row is read at least
            :data:`ALIGN_READS` times). Computed in the engine's dtype when ``X`` casts to it
            without loss, else in float64 if ``X`` casts to that (a float64 block on a float32
            engine: the values promote exactly); other dtypes raise ``TypeError``.
        threads : int, optional
            Default :func:`sparseconv.parallel.get_threads`; capped at numba's pool size.
        bias : ndarray of shape (out_blocks,), optional
            Added to every row of its block (a convolution's output channel) as the row is
            stored.
        relu : bool, default False
            Store ``max(W @ X + bias, 0)`` (NaN stays NaN, as with ``np.maximum``).

        Returns
        -------
        ndarray of shape (out_size, N) (or (out_size,)), the compute dtype
            Each row is summed by one thread in a fixed order: the same bits for every thread
            count, and the same bits as adding the bias and taking the maximum afterwards.
        """
        dtype = _compute_dtype(np.asarray(X), self.dtype, "X")
        return self._product(X, threads, False, bias_values(bias, self._blocks[0], dtype), relu)

    def rmatmat(self, D: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
        """``Z = W.T @ D`` (the first call builds the transposed structure).

        Parameters
        ----------
        D : ndarray of shape (out_size, N) or (out_size,)
        threads : int, optional

        Returns
        -------
        ndarray of shape (in_size, N) (or (in_size,))
            Independent of the thread count, as for :meth:`matmat`.
        """
        return self._product(D, threads, adjoint=True)

    def weight_grad(self, X: np.ndarray, D: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
        """``g[p] = sum over stored entries e tied to p of D[row(e)] . X[col(e)]``.

        Parameters
        ----------
        X : ndarray of shape (in_size, N)
        D : ndarray of shape (out_size, N)
            Output sensitivities of the same ``N`` samples.
        threads : int, optional

        Returns
        -------
        ndarray of shape :attr:`weight_shape`, the engine's dtype
            Zero for weights with no stored entry (masked taps). The entries of one parameter
            within one band of rows (a segment) are summed in vector
            registers in the compute dtype, segment sums in float64 per thread, and the
            threads' sums in thread order: the result depends on the thread count only in
            the last bits. The first call (and a call whose ``N`` changes the band count)
            builds the entry order, a permutation of the entries.
        """
        m, k = self.shape
        x, d = _grad_blocks(X, D, self.shape, self.dtype, align=self._indices.size >= ALIGN_READS * max(m, k))
        n = x.shape[1]
        nt = _threads(threads, _work(self._indices.size, n))
        seg = self._segments(n)
        n_bands = seg["band_ptr"].size - 1
        n_parts = min(nt, n_bands)
        part_ptr = seg["band_ptr"][np.arange(n_parts + 1) * n_bands // n_parts]
        if self._param is None:
            per_entry = np.zeros(self._indices.size)
            _launch(self._k.csr_grad_segments, nt, seg["ptr"], seg["param"], seg["rows"], seg["cols"], x, d,
                    per_entry, part_ptr, False)
            return (self._tying.T @ per_entry).astype(self.dtype).reshape(self.weight_shape)
        # Sums only for the parameters that have entries (``seg["used"]``: at 90% zeros a tenth
        # of them), scattered into the full gradient at the end.
        used = seg["used"]
        buffers = np.zeros(n_parts * used.size)
        _launch(self._k.csr_grad_segments, nt, seg["ptr"], seg["param"], seg["rows"], seg["cols"], x, d,
                buffers, part_ptr, True)
        grad = np.zeros(int(np.prod(self.weight_shape)), dtype=self.dtype)
        grad[used] = buffers.reshape(n_parts, used.size).sum(axis=0)
        return grad.reshape(self.weight_shape)

    def _segments(self, n: int) -> dict[str, np.ndarray]:
        """The kernel gradient's entry order: grouped by (band, parameter), rows ascending.

        Built at the first :meth:`weight_grad` for a band count (set by ``n``: the bands of
        ``D`` and ``X`` should fit in L2) and kept while that count does not change.
        """
        m, k = self.shape
        blocks = self._blocks[0]
        n_bands = -(-(m + k) * n * self.dtype.itemsize // (2 * _BAND_INPUT_BYTES))
        # Rounded to a multiple of the pool size so that any thread count up to it splits evenly.
        pool = _pool_size()
        n_bands = -(-max(n_bands, pool) // pool) * pool
        if self._grad_layout is not None and self._grad_layout["n_bands"] == n_bands:
            return self._grad_layout
        self._grad_layout = None
        bands = _balanced_bands(self._indptr, blocks, n_bands)
        nnz = self._indices.size
        block_rows = m // blocks
        entry_rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(self._indptr))
        band_of_pos = np.searchsorted(bands, np.arange(block_rows), side="right") - 1
        if self._param is not None:
            param, n_params = self._param.astype(np.int64), int(np.prod(self.weight_shape))
        else:
            param, n_params = np.arange(nnz, dtype=np.int64), nnz
        key = band_of_pos[entry_rows % block_rows] * n_params + param
        # Stable: the entries of a segment stay in row order.
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1]))) if nnz else np.zeros(0, np.int64)
        idx = self._indices.dtype
        seg_param = key[starts] % n_params
        # The parameters with entries, and each segment's parameter as an index into them.
        used, compact = np.unique(seg_param, return_inverse=True)
        self._grad_layout = {
            "n_bands": n_bands,
            "ptr": np.append(starts, nnz).astype(np.int64),
            "param": (compact if self._param is not None else seg_param).astype(np.int64),
            "used": used.astype(np.int64),
            "rows": entry_rows[order].astype(idx),
            "cols": self._indices[order],
            "band_ptr": np.searchsorted(key[starts] // n_params, np.arange(bands.size), side="left").astype(np.int64),
        }
        return self._grad_layout

    def __repr__(self) -> str:
        return (f"NumbaEngine({self.shape[0]}x{self.shape[1]}, nnz={self._indices.size}, dtype={self.dtype}, "
                f"blocks={self._blocks})")


# ---------------------------------------------------------------------- the engine protocol
class CompiledEngine(KernelEngine):
    """Base of the engines numba compiles (``"numba"``, ``"implicit"``, ``"stencil"``): they share
    numba's availability and the reason it is missing.

    Parameters
    ----------
    structure : Structure
    """

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """numba's import error, with the extra that installs it, or None."""
        reason = unavailable_reason()
        return None if reason is None else f"numba is not available (pip install 'sparseconv[fast]'): {reason}"


class NumbaProtocolEngine(CompiledEngine):
    """The ``"numba"`` engine on a ``Structure``: a :class:`NumbaEngine` on the structure's
    pattern, built at the first product, each piece charged to the memory budget first.

    Parameters
    ----------
    structure : Structure
    """

    name = "numba"
    fused_epilogue = True

    def __init__(self, structure: Structure) -> None:
        super().__init__(structure)
        self._grad_reserved = False

    @classmethod
    def applicable(cls, structure: Structure, product: str) -> bool:
        """Whenever numba imports: the CSR products run on any pattern."""
        return available()

    @classmethod
    def _own_nbytes(cls, structure: Structure, product: str) -> int:
        g = structure.geometry
        return NumbaEngine.estimate_nbytes(structure.nnz_bound, (g.n_out, g.n_in), structure.dtype,
                                           adjoint=product == "adjoint", weight_grad=product == "weight_grad")

    @classmethod
    def estimate_nbytes(cls, structure: Structure, product: str) -> int:
        """The pattern (shared with the CSR engine) and this engine's own arrays for ``product``."""
        return structure.pattern_nbytes() + cls._own_nbytes(structure, product)

    @classmethod
    def full_nbytes(cls, structure: Structure) -> int:
        """Everything the engine would hold after all three products: pattern, values, the
        transposed matrix and the gradient's entry order (what the policy checks against the
        memory budget)."""
        g = structure.geometry
        return structure.pattern_nbytes() + NumbaEngine.estimate_nbytes(structure.nnz_bound, (g.n_out, g.n_in),
                                                                         structure.dtype)

    def prepare(self, product: str) -> None:
        """Build the values (and the stored transpose or the gradient's entry order) on first use.

        Everything ``product`` still needs, the structure's pattern included, is checked
        against the budget before anything is built, so a refused product leaves the engine
        and the budget as they were.
        """
        s = self.structure
        values = s.nnz_bound * s.dtype.itemsize if self.kernel is None else 0
        extra, what = 0, "values"
        if product == "adjoint" and (self.kernel is None or self.kernel._t_data is None):
            extra, what = (self._own_nbytes(s, "adjoint") - self._own_nbytes(s, "forward"),
                           "values and transposed matrix")
        if product == "weight_grad" and not self._grad_reserved:
            extra, what = (self._own_nbytes(s, "weight_grad") - self._own_nbytes(s, "forward"),
                           "values and gradient entry order")
        s.check_fits(s.pattern_nbytes() + values + extra, f"the numba engine's matrix, {what}")
        p = s.pattern()
        if values + extra:
            s.reserve(values + extra, f"the numba engine's {what}")
        if self.kernel is None:
            g = s.geometry
            self.kernel = NumbaEngine(p.shape, p.indptr, p.indices, s.weight, param_index=p.param_index,
                                      tying=p.tying, out_blocks=g.out_channels, in_blocks=g.in_channels)
        if product == "adjoint":
            self.kernel.build_adjoint()
        if product == "weight_grad":
            self._grad_reserved = True


#: The class the registry of :mod:`sparseconv.engines` imports as ``"numba"``.
ENGINE = NumbaProtocolEngine
