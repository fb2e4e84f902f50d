"""The ``"implicit"`` engine: compiled products of a convolution matrix that is never stored.

Every stored entry of ``W`` is one kernel weight placed by the tying map, so a row of ``W``
is known from three small tables: for each filter, the list of its kept taps (source channel,
spatial shift, weight); for each output position, where its window starts. The engine runs the
numba engine's register-blocked loop (a row's ``N`` outputs in vector registers, one fused
multiply-add per tap and register, bands of positions with every filter inside) over those
tables instead of over CSR arrays. What it reads per product is the activations and a few
kilobytes of taps, where a CSR kernel streams an index and a value per stored entry -- for a
64->64 3x3 32x32 layer at 90% zeros that is 30 MB per product, the whole L3 cache, so in a
network (three such layers) every product paid for it from memory.

Zero padding only (any dimension 1-3, stride, dilation, groups, flip, mask): a tap that lands
in the padding reads nothing, which border positions check tap by tap and inner positions
(every tap inside) skip. The adjoint runs the same kernel on the transposed tables -- per input
channel and stride phase, the taps that can reach it -- so it costs what the forward costs and
stores nothing either. The kernel gradient is computed only at kept taps.

The forward can also add a per-filter bias and apply ReLU to each row as it is stored
(:meth:`ImplicitEngine.matmat`), which is how a ``Conv -> ReLU`` pair of a network runs in one
pass over memory.

numba is optional (see :mod:`sparseconv.engines.numba`, whose availability, thread and dtype
helpers this module shares). :class:`ImplicitEngine` is built from a geometry and a weight;
``ENGINE`` (module attribute) is the same engine behind the operators' engine protocol.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..geometry import ConvGeometry
from .base import Structure, aligned_empty, bias_values
from .numba import (_BAND_INPUT_BYTES, ALIGN_READS, CompiledEngine, _block, _check_weight, _compute_dtype,
                    _grad_blocks, _launch, _pool_size, _require, _threads, _work, available)

__all__ = ["ENGINE", "ImplicitEngine", "ImplicitProtocolEngine"]


def _three(values: Any, fill: int) -> np.ndarray:
    """A per-dimension tuple as three int64 values, leading dimensions filled with ``fill``."""
    values = [int(v) for v in values]
    return np.array([fill] * (3 - len(values)) + values, dtype=np.int64)


def _strides(sizes: np.ndarray) -> np.ndarray:
    """Flat-index strides of a C-ordered grid of ``sizes`` (three dimensions)."""
    return np.array([sizes[1] * sizes[2], sizes[2], 1], dtype=np.int64)


def _grid(sizes: np.ndarray) -> np.ndarray:
    """Every point of a grid of ``sizes``, C order, shape ``(prod(sizes), 3)``."""
    return np.indices(tuple(int(s) for s in sizes)).reshape(3, -1).T.astype(np.int64)


class _Dims:
    """A geometry's per-dimension sizes as three int64 values each (1-D/2-D padded in front)."""

    def __init__(self, g: ConvGeometry) -> None:
        self.kernel, self.dilation, self.stride = _three(g.kernel_size, 1), _three(g.dilation, 1), _three(g.stride, 1)
        self.lo = _three([p[0] for p in g.padding], 0)
        self.ins, self.outs = _three(g.in_size, 1), _three(g.out_size, 1)


class _Tables:
    """Tap lists and position tables of one product (see ``taps_bands`` for their meaning)."""

    def __init__(self, tap_ptr: np.ndarray, delta: np.ndarray, off: np.ndarray, param: np.ndarray,
                 pos_base: np.ndarray, pos_start: np.ndarray, pos_phase: np.ndarray, pos_inner: np.ndarray,
                 sizes: np.ndarray, n_phases: int, n_blocks: int, source_rows: int) -> None:
        self.tap_ptr, self.delta, self.off, self.param = tap_ptr, delta, off, param
        self.pos_base, self.pos_start, self.pos_phase = pos_base, pos_start, pos_phase
        # uint8, not bool: the kernels read it through raw loads (numba keeps bools as bytes).
        self.pos_inner = pos_inner.astype(np.uint8)
        self.sizes, self.n_phases, self.n_blocks, self.source_rows = sizes, n_phases, n_blocks, source_rows
        self.bands: dict[tuple[int, int, int, int], np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        arrays = (self.tap_ptr, self.delta, self.off, self.param, self.pos_base, self.pos_start, self.pos_phase,
                  self.pos_inner)
        return int(sum(a.nbytes for a in arrays))

    def band_bounds(self, n_threads: int, n: int, itemsize: int, rows: int) -> np.ndarray:
        """Equal runs of positions: enough that a band's ``rows`` source rows fit in L2, a
        multiple of the thread count (cached per thread count, ``N``, item size and rows)."""
        key = (n_threads, n, itemsize, rows)
        # A local reference: another thread may clear the cache between the store and the return.
        bands = self.bands.get(key)
        if bands is None:
            if len(self.bands) >= 64:  # many batch sizes: keep the cache small
                self.bands.clear()
            n_pos = self.pos_base.size
            n_bands = max(n_threads, -(-rows * n * itemsize // _BAND_INPUT_BYTES))
            n_bands = min(-(-n_bands // n_threads) * n_threads, max(n_pos, 1))
            bands = np.unique(np.linspace(0, n_pos, n_bands + 1).round().astype(np.int64))
            self.bands[key] = bands
        return bands


def _forward_tables(g: ConvGeometry, mask: np.ndarray) -> _Tables:
    """Per filter, its kept taps; per output position, where its window starts in the input."""
    f_per_g, c_per_g = g.out_channels // g.groups, g.in_channels // g.groups
    d = _Dims(g)
    ks, dil, st, lo, ins, outs = d.kernel, d.dilation, d.stride, d.lo, d.ins, d.outs
    n_k = int(np.prod(ks))
    # The shift at which each weight of a filter reads: correlation reads weight a at a * dilation,
    # a true convolution reads it rotated, at (k - 1 - a) * dilation.
    kidx = _grid(ks)
    shift = ((ks - 1 - kidx) if g.flip else kidx) * dil
    o, cg, k = np.nonzero(mask.reshape(g.out_channels, c_per_g, n_k))  # filter-major order
    chan = (o // f_per_g) * c_per_g + cg
    in_strides = _strides(ins)
    off = np.ascontiguousarray(shift[k])
    delta = chan * int(np.prod(ins)) + off @ in_strides
    param = np.ravel_multi_index((o, cg, k), (g.out_channels, c_per_g, n_k)).astype(np.int64)
    tap_ptr = np.searchsorted(o, np.arange(g.out_channels + 1)).astype(np.int64)
    start = _grid(outs) * st - lo
    inner = np.all((start >= 0) & (start + (ks - 1) * dil < ins), axis=1)
    return _Tables(tap_ptr, delta.astype(np.int64), off, param, start @ in_strides, np.ascontiguousarray(start),
                   np.zeros(start.shape[0], np.int64), inner, ins, 1, g.out_channels, g.n_in)


def _adjoint_tables(g: ConvGeometry, fwd: _Tables) -> _Tables:
    """The forward's taps regrouped per input channel and stride phase, read from the outputs.

    Input coordinate ``i`` (per dimension, ``i + lo = p * stride + shift``) is reached by the
    taps whose shift has the phase ``(i + lo) % stride``, from output ``p = start - shift //
    stride`` with ``start = (i + lo) // stride``.
    """
    c_per_g, f_per_g = g.in_channels // g.groups, g.out_channels // g.groups
    d = _Dims(g)
    ks, dil, st, lo, ins, outs = d.kernel, d.dilation, d.stride, d.lo, d.ins, d.outs
    n_phases = int(np.prod(st))
    o = np.repeat(np.arange(g.out_channels, dtype=np.int64), np.diff(fwd.tap_ptr))
    # The source channel from the weight index (the shift can exceed a channel's size).
    chan = (o // f_per_g) * c_per_g + (fwd.param // int(np.prod(ks))) % c_per_g
    tap_phase = np.ravel_multi_index(tuple((fwd.off % st).T), tuple(st)).astype(np.int64)
    order = np.argsort(chan * n_phases + tap_phase, kind="stable")
    src_off = np.ascontiguousarray(-(fwd.off[order] // st))
    out_strides = _strides(outs)
    delta = o[order] * int(np.prod(outs)) + src_off @ out_strides
    tap_ptr = np.searchsorted((chan * n_phases + tap_phase)[order],
                              np.arange(g.in_channels * n_phases + 1)).astype(np.int64)
    shifted = _grid(ins) + lo
    phase = shifted % st
    start = shifted // st
    # Per dimension and phase value, the output offsets its taps read at (whole kernel, mask
    # ignored: a conservative bound); a phase with no tap in some dimension reads nothing, so
    # its positions need no checks.
    inner = np.ones(start.shape[0], dtype=bool)
    empty = np.zeros(start.shape[0], dtype=bool)
    for dim in range(3):
        reach = np.arange(ks[dim]) * dil[dim]
        for ph in range(int(st[dim])):
            m = reach[reach % st[dim] == ph] // st[dim]
            rows = phase[:, dim] == ph
            if m.size:
                inner[rows] &= (start[rows, dim] - m.max() >= 0) & (start[rows, dim] - m.min() < outs[dim])
            else:
                empty |= rows
    inner |= empty
    pos_phase = np.ravel_multi_index(tuple(phase.T), tuple(st)).astype(np.int64)
    return _Tables(tap_ptr, delta.astype(np.int64), src_off, fwd.param[order], start @ out_strides,
                   np.ascontiguousarray(start), pos_phase, inner, outs, n_phases, g.in_channels, g.n_out)


class ImplicitEngine:
    """Compiled products of a zero-padded convolution from its tap lists (``"implicit"``).

    Parameters
    ----------
    geometry : ConvGeometry
        Must satisfy :meth:`applicable` (zero padding).
    weight : ndarray of shape ``geometry.weight_shape``, float32 or float64
    weight_mask : ndarray of bool, shape ``geometry.weight_shape``, optional
        Weights left out (False): no tap is stored for them and the kernel gradient is zero
        there.

    Attributes
    ----------
    name : str
        ``"implicit"``.
    shape : (int, int)
        ``(geometry.n_out, geometry.n_in)``.
    dtype : numpy.dtype
    weight_shape : tuple of int
    n_taps : int
        Kept taps (weights) of all filters.

    Raises
    ------
    ImportError
        When numba is not available.
    ValueError
        For a geometry :meth:`applicable` refuses, or a mask of the wrong shape or kind.
    """

    name = "implicit"

    @property
    def _k(self) -> Any:
        """The kernel module (looked up, not stored: engines stay picklable and deep-copyable)."""
        return _require()

    def __init__(self, geometry: ConvGeometry, weight: np.ndarray, *, weight_mask: Optional[np.ndarray] = None) -> None:
        _require()
        if not self.applicable(geometry):
            raise ValueError(f"the implicit engine runs convolutions with zero padding; got {geometry.describe()}")
        w = _check_weight(weight)
        shape = tuple(geometry.weight_shape)
        if weight_mask is None:
            mask = np.ones(shape, dtype=bool)
        else:
            mask = np.asarray(weight_mask)
            if mask.dtype != bool or mask.shape != shape:
                raise ValueError(f"weight_mask must be a bool array of shape {shape}; got {mask.dtype} array of "
                                 f"shape {mask.shape}")
        self.geometry = geometry
        self.dtype = w.dtype
        self.weight_shape = shape
        self.shape = (geometry.n_out, geometry.n_in)
        self._fwd = _forward_tables(geometry, mask)
        self.n_taps = int(self._fwd.delta.size)
        self._adj: Optional[_Tables] = None
        self._w = np.empty(self.n_taps, dtype=self.dtype)
        self._w_adj: Optional[np.ndarray] = None
        self.refresh(w)

    @classmethod
    def applicable(cls, geometry: ConvGeometry) -> bool:
        """numba available and zero padding (any dimension, stride, dilation, groups, mask).

        Parameters
        ----------
        geometry : ConvGeometry

        Returns
        -------
        bool
        """
        return available() and geometry.padding_mode == "zeros"

    @classmethod
    def estimate_nbytes(cls, geometry: ConvGeometry, n_taps: int, dtype: Any, *, adjoint: bool = True) -> int:
        """Bytes the engine would hold (an upper bound): per tap six int64 and a value, per
        position six int64 and a flag; with ``adjoint``, the same again for the transposed tables.

        Parameters
        ----------
        geometry : ConvGeometry
        n_taps : int
            Kept weights.
        dtype : dtype
        adjoint : bool, default True

        Returns
        -------
        int
        """
        per_tap = 6 * 8 + np.dtype(dtype).itemsize
        n_out, n_in = int(np.prod(geometry.out_size)), int(np.prod(geometry.in_size))
        total = n_taps * per_tap + n_out * 49 + (geometry.out_channels + 1) * 8
        if adjoint:
            total += n_taps * per_tap + n_in * 49 + (geometry.in_channels * int(np.prod(geometry.stride)) + 1) * 8
        return int(total)

    @property
    def nbytes(self) -> int:
        """Bytes of the tables and tap values built so far."""
        total = self._fwd.nbytes + self._w.nbytes
        if self._adj is not None:
            total += self._adj.nbytes + self._w_adj.nbytes
        return int(total)

    def refresh(self, weight: np.ndarray) -> None:
        """Take new weight values (same geometry and mask).

        Parameters
        ----------
        weight : ndarray of shape :attr:`weight_shape`, the engine's dtype
        """
        flat = _check_weight(weight, shape=self.weight_shape, dtype=self.dtype).reshape(-1)
        np.take(flat, self._fwd.param, out=self._w)
        if self._adj is not None:
            np.take(flat, self._adj.param, out=self._w_adj)

    def build_adjoint(self) -> None:
        """Build the transposed tables (done by the first :meth:`rmatmat`; idempotent)."""
        if self._adj is None:
            adj = _adjoint_tables(self.geometry, self._fwd)
            # The adjoint's taps are the forward's regrouped; the forward's are in increasing
            # weight order, so each one's forward position is found by search.
            self._w_adj = np.take(self._w, np.searchsorted(self._fwd.param, adj.param))
            self._adj = adj

    def _reads(self, tables: _Tables) -> float:
        """About how many times a product reads each source row (taps per source channel)."""
        return self.n_taps * tables.pos_base.size / max(tables.source_rows, 1)

    def _run(self, tables: _Tables, values: np.ndarray, a: np.ndarray, rows_in: int, name: str,
             threads: Optional[int], bias: Optional[np.ndarray], relu: bool) -> np.ndarray:
        # Aligned when each source row is read at least ALIGN_READS times.
        block, vector = _block(a, rows_in, self.dtype, name, align=self._reads(tables) >= ALIGN_READS)
        n = block.shape[1]
        out = aligned_empty((tables.n_blocks * tables.pos_base.size, n), block.dtype)
        nt = _threads(threads, _work(self.n_taps * tables.pos_base.size // tables.n_phases, n))
        bands = tables.band_bounds(nt, n, block.dtype.itemsize, tables.source_rows)
        b = np.zeros(0, block.dtype) if bias is None else bias
        _launch(self._k.taps_bands, nt, block, out, tables.tap_ptr, tables.delta, tables.off,
                values.astype(block.dtype, copy=False), tables.pos_base, tables.pos_start, tables.pos_phase,
                tables.pos_inner, tables.sizes, tables.n_phases, bands, tables.n_blocks, b, bool(relu))
        return out[:, 0] if vector else out

    def matmat(self, X: np.ndarray, threads: Optional[int] = None, *, bias: Optional[np.ndarray] = None,
               relu: bool = False) -> np.ndarray:
        """``Y = W @ X``, optionally plus a bias per filter and through ReLU, in one pass.

        Parameters
        ----------
        X : ndarray of shape (in_size, N) or (in_size,)
            Any memory order (copied into C order first if needed). Computed in the engine's
            dtype when ``X`` casts to it without loss, else in float64 (as for
            :meth:`sparseconv.engines.numba.NumbaEngine.matmat`).
        threads : int, optional
            Default :func:`sparseconv.parallel.get_threads`; capped at numba's pool size.
        bias : ndarray of shape (out_channels,), float32 or float64, optional
            Added to every row of its filter as the row is stored, before ``relu``.
        relu : bool, default False
            Return ``max(W @ X + bias, 0)`` (NaN stays NaN, as with ``np.maximum``).

        Returns
        -------
        ndarray of shape (out_size, N) (or (out_size,)), the compute dtype
            Each row summed by one thread in a fixed order: the same bits for every thread
            count, and the same bits as adding the bias and taking the maximum afterwards.
        """
        dtype = _compute_dtype(np.asarray(X), self.dtype, "X")
        return self._run(self._fwd, self._w, X, self.shape[1], "X", threads,
                         bias_values(bias, self.geometry.out_channels, dtype), relu)

    def rmatmat(self, D: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
        """``Z = W.T @ D`` (the first call builds the transposed tables).

        Parameters
        ----------
        D : ndarray of shape (out_size, N) or (out_size,)
        threads : int, optional

        Returns
        -------
        ndarray of shape (in_size, N) (or (in_size,))
            Independent of the thread count, as for :meth:`matmat`.
        """
        self.build_adjoint()
        return self._run(self._adj, self._w_adj, D, self.shape[0], "D", threads, None, False)

    def weight_grad(self, X: np.ndarray, D: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
        """Kernel gradient ``g[w] = sum over positions p of D[filter, p] . X[tap of w at p]``.

        Parameters
        ----------
        X : ndarray of shape (in_size, N)
        D : ndarray of shape (out_size, N)
        threads : int, optional

        Returns
        -------
        ndarray of shape :attr:`weight_shape`, the engine's dtype
            Zero at masked weights. Each tap's dot products over a band of positions are
            summed in registers in the compute dtype, band sums in float64 per thread and the
            threads' sums in thread order: the result depends on the thread count only in the
            last bits.
        """
        m, k = self.shape
        x, d = _grad_blocks(X, D, self.shape, self.dtype, align=self._reads(self._fwd) >= ALIGN_READS)
        n = x.shape[1]
        nt = _threads(threads, _work(self.n_taps * self._fwd.pos_base.size, n))
        t = self._fwd
        # Bands sized for the rows of both D and X, as many as numba's pool can split evenly.
        pool = _pool_size()
        bands = t.band_bounds(pool, n, x.dtype.itemsize, (m + k) // 2)
        n_bands = bands.size - 1
        n_parts = min(nt, n_bands)
        part_ptr = (np.arange(n_parts + 1) * n_bands // n_parts).astype(np.int64)
        buffers = np.zeros(n_parts * self.n_taps)
        _launch(self._k.taps_grad, nt, x, d, buffers, t.tap_ptr, t.delta, t.off, t.pos_base, t.pos_start,
                t.pos_inner, t.sizes, bands, part_ptr, t.n_blocks)
        grad = np.zeros(int(np.prod(self.weight_shape)))
        grad[t.param] = buffers.reshape(n_parts, self.n_taps).sum(axis=0)
        return grad.astype(self.dtype).reshape(self.weight_shape)

    def __repr__(self) -> str:
        return f"ImplicitEngine({self.geometry.describe()}, taps={self.n_taps}, dtype={self.dtype})"


# ---------------------------------------------------------------------- the engine protocol
class ImplicitProtocolEngine(CompiledEngine):
    """The ``"implicit"`` engine on a ``Structure``: tap tables only, never the matrix.

    Parameters
    ----------
    structure : Structure
    """

    name = "implicit"
    fused_epilogue = True

    @classmethod
    def applicable(cls, structure: Structure, product: str) -> bool:
        """numba available and zero padding."""
        return ImplicitEngine.applicable(structure.geometry)

    @classmethod
    def _n_taps(cls, structure: Structure) -> int:
        return int(structure.geometry.n_params if structure.mask is None else structure.mask.sum())

    @classmethod
    def estimate_nbytes(cls, structure: Structure, product: str) -> int:
        """The tables for ``product`` (the transposed ones too for the adjoint)."""
        return ImplicitEngine.estimate_nbytes(structure.geometry, cls._n_taps(structure), structure.dtype,
                                              adjoint=product == "adjoint")

    def prepare(self, product: str) -> None:
        """Build the forward tables on first use, and the transposed ones for the adjoint.

        What ``product`` still needs is charged in one reservation before anything of it is
        built, so a refused product leaves the engine as it was.
        """
        s = self.structure
        n_taps = self._n_taps(s)
        forward = ImplicitEngine.estimate_nbytes(s.geometry, n_taps, s.dtype, adjoint=False)
        need = forward if self.kernel is None else 0
        if product == "adjoint" and (self.kernel is None or self.kernel._adj is None):
            need += ImplicitEngine.estimate_nbytes(s.geometry, n_taps, s.dtype) - forward
        if need:
            s.reserve(need, "the implicit engine's tap tables")
        if self.kernel is None:
            self.kernel = ImplicitEngine(s.geometry, s.weight, weight_mask=s.mask)
        if product == "adjoint":
            self.kernel.build_adjoint()


#: The class the registry of :mod:`sparseconv.engines` imports as ``"implicit"``.
ENGINE = ImplicitProtocolEngine
