"""Sparsity pattern and tying map of a convolution matrix, built vectorised.

The matrix of a convolution has rows ``(f, *out)`` and columns ``(c, *in)``, both in C order.
Its structure factors: which input position a kernel tap reads at an output position is the
same for every (filter, channel) pair. The builder therefore works in two steps:

1. :func:`spatial_pattern` lists, tap by tap, the ``(output position, input position, tap)``
   triples of one (filter, channel) pair -- at most ``prod(out) * prod(kernel)`` items, small.
2. :func:`build_pattern` expands that list over channels once per group and copies it per
   filter into preallocated CSR arrays, so peak memory stays a small multiple of the final
   matrix and no Python loop runs over positions or entries (only over filters).

Every stored entry records the kernel weight it comes from (``param_index``, an index into
``weight.ravel()``). With a padding mode that repeats input values (``circular``,
``reflect``, ``replicate``) on an input smaller than the kernel, two taps of one output can read
the same input position, and the entry then holds the *sum* of several weights: the tying
map is then a sparse ``(nnz, n_params)`` 0/1 matrix with ``data = tying @ weight.ravel()``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp

from .geometry import ConvGeometry, default_memory_budget

__all__ = [
    "SpatialPattern",
    "TiedPattern",
    "MemoryBudgetError",
    "source_index",
    "axis_sources",
    "spatial_pattern",
    "build_pattern",
    "count_items",
    "index_dtype",
    "pattern_bytes",
    "pattern_nbytes",
    "format_bytes",
    "ValueBlock",
    "ValueLayout",
    "value_layout",
]

_INT32_MAX = np.iinfo(np.int32).max


class MemoryBudgetError(MemoryError):
    """Raised before allocating a matrix that would exceed the memory budget."""


def index_dtype(*sizes: int) -> np.dtype:
    """int32 when every size fits, int64 otherwise."""
    return np.dtype(np.int32) if max(sizes) < _INT32_MAX else np.dtype(np.int64)


def source_index(size: int, pad_lo: int, pad_hi: int, mode: str) -> np.ndarray:
    """Map each padded position to the input position it reads, or -1 for a zero.

    Parameters
    ----------
    size : int
        Input length along one spatial dimension.
    pad_lo, pad_hi : int
        Padding before and after.
    mode : {"zeros", "circular", "reflect", "replicate"}

    Returns
    -------
    ndarray of shape (size + pad_lo + pad_hi,), int64
    """
    q = np.arange(-pad_lo, size + pad_hi)
    if mode == "zeros":
        return np.where((q >= 0) & (q < size), q, -1)
    if mode == "circular":
        return q % size
    if mode == "replicate":
        return np.clip(q, 0, size - 1)
    if mode == "reflect":
        # Mirror about the edge samples without repeating them (numpy's "reflect");
        # geometry guarantees pad < size, so one reflection suffices.
        q = np.abs(q)
        return np.where(q >= size, 2 * (size - 1) - q, q)
    raise ValueError(f"unknown padding mode {mode!r}")


@dataclass(frozen=True)
class SpatialPattern:
    """Tap-level pattern of one (filter, channel) pair, sorted by (output, input, tap).

    Attributes
    ----------
    out_pos, in_pos, tap : ndarray of shape (n_items,), int64
        Flat output position, flat input position and flat kernel index (into the weight
        as stored, so ``flip`` is already applied) of each item.
    counts : ndarray of shape (prod(out_size),), int64
        Items per output position.
    single_tap : bool
        True when no two items share an (output, input) position, i.e. every matrix entry is
        one weight.
    """

    out_pos: np.ndarray
    in_pos: np.ndarray
    tap: np.ndarray
    counts: np.ndarray
    single_tap: bool

    @property
    def n_items(self) -> int:
        return int(self.tap.size)


def spatial_pattern(geom: ConvGeometry) -> SpatialPattern:
    """List the (output, input, tap) triples of one (filter, channel) pair, tap by tap.

    Parameters
    ----------
    geom : ConvGeometry

    Returns
    -------
    SpatialPattern
    """
    sources = [source_index(i, lo, hi, geom.padding_mode) for i, (lo, hi) in zip(geom.in_size, geom.padding)]
    in_strides = np.cumprod((1,) + geom.in_size[:0:-1])[::-1]
    out_flat = np.arange(int(np.prod(geom.out_size))).reshape(geom.out_size)
    kernel = geom.kernel_size
    n_taps = int(np.prod(kernel))
    outs, ins, taps = [], [], []
    for tap_flat, tap in enumerate(np.ndindex(*kernel)):
        flat_in = np.zeros((1,) * geom.ndim, dtype=np.int64)
        valid = np.ones((1,) * geom.ndim, dtype=bool)
        for axis, (k, o, s, d, src) in enumerate(zip(tap, geom.out_size, geom.stride, geom.dilation, sources)):
            shape = [1] * geom.ndim
            shape[axis] = o
            pos = src[np.arange(o) * s + k * d].reshape(shape)
            valid = valid & (pos >= 0)
            flat_in = flat_in + pos * in_strides[axis]
        valid = np.broadcast_to(valid, geom.out_size)
        flat_in = np.broadcast_to(flat_in, geom.out_size)
        outs.append(out_flat[valid])
        ins.append(flat_in[valid])
        # A true convolution reads tap k with the weight rotated by 180 degrees.
        taps.append(np.full(outs[-1].size, n_taps - 1 - tap_flat if geom.flip else tap_flat, dtype=np.int64))
    out_pos = np.concatenate(outs)
    in_pos = np.concatenate(ins)
    tap_arr = np.concatenate(taps)
    order = np.lexsort((tap_arr, in_pos, out_pos))
    out_pos, in_pos, tap_arr = out_pos[order], in_pos[order], tap_arr[order]
    repeated = (out_pos[1:] == out_pos[:-1]) & (in_pos[1:] == in_pos[:-1])
    counts = np.bincount(out_pos, minlength=out_flat.size)
    return SpatialPattern(out_pos=out_pos, in_pos=in_pos, tap=tap_arr, counts=counts,
                          single_tap=not bool(repeated.any()))


@dataclass(frozen=True)
class TiedPattern:
    """CSR structure of a convolution matrix plus its tying map.

    Attributes
    ----------
    shape : (int, int)
        ``(F * prod(out), C * prod(in))``.
    indptr, indices : ndarray
        CSR row pointers and column indices (int32 when they fit, else int64); columns are
        sorted and unique within each row.
    param_index : ndarray of shape (nnz,) or None
        The weight (index into ``weight.ravel()``) each entry holds, when every entry holds one.
    tying : scipy.sparse.csr_array of shape (nnz, n_params) or None
        The general tying map, set only when some entry is a sum of several weights.
    n_params : int
    spatial : SpatialPattern
        The per-(filter, channel) pattern the matrix was expanded from.
    """

    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    param_index: Optional[np.ndarray]
    tying: Optional[sp.csr_array]
    n_params: int
    spatial: SpatialPattern

    @property
    def nnz(self) -> int:
        return int(self.indices.size)


def pattern_bytes(n_items: int, n_rows: int, value_itemsize: int, idx_itemsize: int,
                  param_itemsize: int) -> int:
    """Bytes of a finished matrix: values, column indices, row pointers and tying map."""
    return n_items * (value_itemsize + idx_itemsize + param_itemsize) + (n_rows + 1) * idx_itemsize


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit below it, e.g. ``"1.3 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _checked_mask(geom: ConvGeometry, weight_mask: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if weight_mask is None:
        return None
    mask = np.asarray(weight_mask)
    if mask.dtype != bool or mask.shape != geom.weight_shape:
        raise ValueError(f"weight_mask must be a bool array of shape {geom.weight_shape}; "
                         f"got {mask.dtype} array of shape {mask.shape}")
    return mask


def _items_per_filter(geom: ConvGeometry, spat: SpatialPattern, mask: Optional[np.ndarray]) -> np.ndarray:
    """Stored (before coalescing) items of each filter's rows."""
    cin_g, n_taps = geom.in_channels // geom.groups, int(np.prod(geom.kernel_size))
    if mask is None:
        return np.full(geom.out_channels, cin_g * spat.n_items, dtype=np.int64)
    tap_counts = np.bincount(spat.tap, minlength=n_taps)
    return (mask.reshape(geom.out_channels, cin_g, n_taps) * tap_counts).sum(axis=(1, 2))


def count_items(geom: ConvGeometry, spatial: SpatialPattern, weight_mask: Optional[np.ndarray] = None) -> int:
    """Stored entries of the matrix, counted without building it: exact where every entry is
    one weight, an upper bound where repeating padding merges items into one entry.

    Parameters
    ----------
    geom : ConvGeometry
    spatial : SpatialPattern
    weight_mask : ndarray of bool, optional

    Returns
    -------
    int
    """
    return int(_items_per_filter(geom, spatial, _checked_mask(geom, weight_mask)).sum())


def pattern_nbytes(geom: ConvGeometry, spatial: SpatialPattern, weight_mask: Optional[np.ndarray] = None,
                   value_dtype: np.dtype = np.dtype(np.float64)) -> int:
    """Bytes :func:`build_pattern` would return plus the value array, computed without building.

    Parameters
    ----------
    geom : ConvGeometry
    spatial : SpatialPattern
        :func:`spatial_pattern` of ``geom``.
    weight_mask : ndarray of bool, optional
    value_dtype : dtype

    Returns
    -------
    int
        Values, column indices, row pointers and tying map (an upper bound where repeating
        padding merges items into one entry).
    """
    n_items = count_items(geom, spatial, weight_mask)
    idx_dtype = index_dtype(n_items, geom.n_in, geom.n_out)
    return pattern_bytes(n_items, geom.n_out, np.dtype(value_dtype).itemsize, idx_dtype.itemsize,
                         index_dtype(geom.n_params).itemsize)


def build_pattern(geom: ConvGeometry, *, weight_mask: Optional[np.ndarray] = None,
                  value_dtype: np.dtype = np.dtype(np.float64),
                  memory_budget: Optional[int] = None, spatial: Optional[SpatialPattern] = None) -> TiedPattern:
    """Build the CSR pattern and tying map of a convolution.

    Parameters
    ----------
    geom : ConvGeometry
    weight_mask : ndarray of bool, shape (F, C // groups, *kernel), optional
        Weights to leave out of the matrix (False). Used for partial connection tables
        (LeNet-5's C3) and pruned kernels; masked weights get no entries at all.
    value_dtype : dtype
        Dtype of the values the matrix will hold; only used for the memory estimate.
    memory_budget : int, optional
        Bytes the finished matrix may occupy; default :func:`default_memory_budget`.
    spatial : SpatialPattern, optional
        :func:`spatial_pattern` of ``geom``, when the caller has it already.

    Returns
    -------
    TiedPattern

    Raises
    ------
    MemoryBudgetError
        Before allocating anything large, if the matrix would not fit in the budget.
    """
    n_filters, n_channels, n_groups = geom.out_channels, geom.in_channels, geom.groups
    cin_g, f_per_g = n_channels // n_groups, n_filters // n_groups
    n_taps = int(np.prod(geom.kernel_size))
    n_out_sp, n_in_sp = int(np.prod(geom.out_size)), int(np.prod(geom.in_size))
    n_rows, n_cols, n_params = geom.n_out, geom.n_in, geom.n_params
    spat = spatial_pattern(geom) if spatial is None else spatial
    mask = _checked_mask(geom, weight_mask)
    items_per_filter = _items_per_filter(geom, spat, mask)
    if mask is not None:
        mask = mask.reshape(n_filters, cin_g * n_taps)
    n_items = int(items_per_filter.sum())

    idx_dtype = index_dtype(n_items, n_cols, n_rows)
    param_dtype = index_dtype(n_params)
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    need = pattern_bytes(n_items, n_rows, np.dtype(value_dtype).itemsize, idx_dtype.itemsize,
                         param_dtype.itemsize)
    if need > budget:
        raise MemoryBudgetError(
            f"the sparse matrix of this convolution ({geom.describe()}) would need "
            f"{format_bytes(need)} ({n_items:,} non-zeros of {np.dtype(value_dtype).name} with "
            f"{idx_dtype.name} indices and tying map) but the memory budget is {format_bytes(budget)}; "
            f"pass memory_budget=<bytes> or set the SPARSECONV_MEMORY_BUDGET environment variable "
            f"to raise it")

    # One group's block: rows o, then channel c, then the spatial items of o. It is the same
    # for every filter of every group up to a column offset, so it is built once.
    row_len = cin_g * spat.counts
    block_len = int(row_len.sum())
    block_row = np.repeat(np.arange(n_out_sp, dtype=idx_dtype), row_len)
    row_start = np.cumsum(row_len) - row_len
    pos = np.arange(block_len, dtype=np.int64) - np.repeat(row_start, row_len)
    per_row = spat.counts[block_row]
    chan = pos // np.maximum(per_row, 1)
    item = np.repeat(np.cumsum(spat.counts) - spat.counts, row_len) + (pos - chan * per_row)
    del pos, per_row
    block_col = (chan * n_in_sp + spat.in_pos[item]).astype(idx_dtype)
    block_param = (chan * n_taps + spat.tap[item]).astype(param_dtype)
    del chan, item

    indices = np.empty(n_items, dtype=idx_dtype)
    params = np.empty(n_items, dtype=param_dtype)
    row_counts = np.empty(n_rows, dtype=np.int64)
    start = 0
    for f in range(n_filters):
        col_offset = (f // f_per_g) * cin_g * n_in_sp
        param_offset = f * cin_g * n_taps
        stop = start + int(items_per_filter[f])
        rows = slice(f * n_out_sp, (f + 1) * n_out_sp)
        if mask is None:
            np.add(block_col, col_offset, out=indices[start:stop])
            np.add(block_param, param_offset, out=params[start:stop])
            row_counts[rows] = row_len
        else:
            keep = mask[f][block_param]
            np.add(block_col[keep], col_offset, out=indices[start:stop])
            np.add(block_param[keep], param_offset, out=params[start:stop])
            row_counts[rows] = np.bincount(block_row[keep], minlength=n_out_sp)
        start = stop
    indptr = np.zeros(n_rows + 1, dtype=idx_dtype)
    np.cumsum(row_counts, out=indptr[1:])

    if spat.single_tap:
        return TiedPattern(shape=(n_rows, n_cols), indptr=indptr, indices=indices, param_index=params,
                           tying=None, n_params=n_params, spatial=spat)
    return _coalesce(indptr, indices, params, row_counts, (n_rows, n_cols), n_params, idx_dtype, spat)


def _coalesce(indptr: np.ndarray, indices: np.ndarray, params: np.ndarray, row_counts: np.ndarray,
              shape: tuple[int, int], n_params: int, idx_dtype: np.dtype,
              spat: SpatialPattern) -> TiedPattern:
    """Merge items that land on the same (row, column) into one entry holding a weight sum."""
    n_items = indices.size
    item_row = np.repeat(np.arange(shape[0]), row_counts)
    new_entry = np.ones(n_items, dtype=bool)
    new_entry[1:] = (indices[1:] != indices[:-1]) | (item_row[1:] != item_row[:-1])
    entry_start = np.flatnonzero(new_entry)
    entry_counts = np.bincount(item_row[entry_start], minlength=shape[0])
    new_indptr = np.zeros(shape[0] + 1, dtype=idx_dtype)
    np.cumsum(entry_counts, out=new_indptr[1:])
    tying_ptr = np.append(entry_start, n_items).astype(index_dtype(n_items, n_params))
    tying = sp.csr_array((np.ones(n_items), params.astype(tying_ptr.dtype), tying_ptr),
                         shape=(entry_start.size, n_params))
    return TiedPattern(shape=shape, indptr=new_indptr, indices=indices[entry_start], param_index=None,
                       tying=tying, n_params=n_params, spatial=spat)


@dataclass(frozen=True)
class ValueBlock:
    """A strided block of a CSR value array whose rows repeat one row per filter.

    Attributes
    ----------
    offset : int
        Position of the block's first entry in the value array.
    shape : tuple of int
        ``(filters, *box, row_length)``: the block viewed as one row per (filter, output
        position of the box).
    strides : tuple of int
        In elements, one per axis of ``shape``; the last is 1.
    template : ndarray of shape (filters, row_length)
        Weight indices (into ``weight.ravel()``) of the row each filter repeats.
    """

    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    template: np.ndarray

    def view(self, array: np.ndarray) -> np.ndarray:
        """The block of an array laid out like the matrix's values.

        Parameters
        ----------
        array : ndarray of shape (nnz,)
            Contiguous: the values, or ``param_index``.

        Returns
        -------
        ndarray of shape :attr:`shape`
            A writeable strided view.
        """
        item = array.itemsize
        return np.lib.stride_tricks.as_strided(array[self.offset:], self.shape, tuple(s * item for s in self.strides))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """One row per filter, shaped to broadcast over the block.

        Parameters
        ----------
        rows : ndarray of shape (filters, row_length)

        Returns
        -------
        ndarray of shape (filters, 1, ..., 1, row_length)
            A view, with as many axes as :attr:`shape`.
        """
        return rows.reshape(self.shape[0], *(1,) * (len(self.shape) - 2), self.shape[-1])

    def broadcast(self, rows: np.ndarray) -> np.ndarray:
        """Repeat one row per filter over the block.

        Parameters
        ----------
        rows : ndarray of shape (filters, row_length)

        Returns
        -------
        ndarray of shape :attr:`shape`
            A read-only broadcast view.
        """
        return np.broadcast_to(self.rows(rows), self.shape)


class ValueLayout:
    """How a weight fills a convolution matrix's value array: a few strided broadcasts.

    Output positions whose taps read the input the same way (same taps inside the input, in
    the same order) hold the same weights in the same order, in every row of one filter;
    border positions differ only in which taps fall on padding. Grouped by such classes --
    boxes of output positions -- the value array is a few :class:`ValueBlock` broadcasts of
    one row per filter, written at the speed of a copy instead of a gather through
    ``param_index``. Built by :func:`value_layout`.

    Parameters
    ----------
    blocks : list of ValueBlock
        Covering the value array exactly once.
    n_params : int
    """

    def __init__(self, blocks: list[ValueBlock], n_params: int) -> None:
        self.blocks = blocks
        # A block whose rows are whole filters in weight order needs no gather (the interior
        # class of an unmasked layer: usually most of the array); the other templates are
        # gathered together in one call.
        self._direct = [b.template.size == n_params and np.array_equal(b.template.reshape(-1), np.arange(n_params))
                        for b in blocks]
        gathered = [b.template.reshape(-1) for b, direct in zip(blocks, self._direct) if not direct]
        self._gather = np.concatenate(gathered) if gathered else np.zeros(0, dtype=np.intp)
        # Strided views of the last value array written: rebuilding them costs ~15% of a write.
        self._data: Optional[np.ndarray] = None
        self._views: list[np.ndarray] = []

    def __getstate__(self) -> dict:
        # The cached views would be copied as arrays of their own, detached from the copy's
        # value array: drop them (the copy rebuilds them at its first write).
        return {**self.__dict__, "_data": None, "_views": []}

    def write(self, weight: np.ndarray, data: np.ndarray) -> None:
        """Fill the value array from a weight.

        Parameters
        ----------
        weight : ndarray of shape (F, C // groups, *kernel)
            C-contiguous.
        data : ndarray of shape (nnz,)
            The matrix's value array, contiguous; overwritten.
        """
        if data is not self._data:
            self._views = [block.view(data) for block in self.blocks]
            self._data = data
        flat = weight.reshape(-1)
        rows = np.take(flat, self._gather, mode="wrap")
        start = 0
        for block, view, direct in zip(self.blocks, self._views, self._direct):
            if direct:
                values = flat
            else:
                values = rows[start:start + block.template.size]
                start += block.template.size
            # Numpy broadcasts the assignment itself: cheaper than a broadcast_to view.
            view[...] = block.rows(values)


def axis_sources(geom: ConvGeometry) -> list[np.ndarray]:
    """Per spatial dimension, the input coordinate each (output, tap) pair reads.

    Parameters
    ----------
    geom : ConvGeometry

    Returns
    -------
    list of ndarray of shape (out_size[d], kernel_size[d]), int64
        ``-1`` where the tap reads zero padding; geometric taps (``flip`` not applied).
    """
    return [source_index(i, lo, hi, geom.padding_mode)[np.arange(o)[:, None] * s + np.arange(k) * d]
            for i, k, o, s, d, (lo, hi) in zip(geom.in_size, geom.kernel_size, geom.out_size, geom.stride,
                                               geom.dilation, geom.padding)]


def _dimension_runs(geom: ConvGeometry) -> list[list[tuple[int, int]]]:
    """Per spatial dimension, maximal runs of consecutive output positions whose taps read
    inputs in the same order with the same taps valid (so their matrix rows repeat)."""
    runs = []
    for src, o in zip(axis_sources(geom), geom.out_size):
        # Rank of each tap's input position within its output position (ties share a rank).
        ranks = np.where(src >= 0, (src[:, :, None] > src[:, None, :]).sum(axis=2), -1)
        change = np.flatnonzero(np.any(ranks[1:] != ranks[:-1], axis=1)) + 1
        edges = np.concatenate(([0], change, [o]))
        runs.append(list(zip(edges[:-1].tolist(), edges[1:].tolist())))
    return runs


def value_layout(geom: ConvGeometry, indptr: np.ndarray, param_index: np.ndarray, *,
                 uniform_filters: bool, max_blocks: int = 64) -> Optional[ValueLayout]:
    """Decompose a convolution matrix's value array into strided blocks of repeated rows.

    Parameters
    ----------
    geom : ConvGeometry
    indptr : ndarray of shape (F * prod(out) + 1,)
    param_index : ndarray of shape (nnz,)
    uniform_filters : bool
        True when every filter has the same entries (no weight mask): one block then spans
        all filters of a class; otherwise each filter gets its own.
    max_blocks : int, default 64
        Give up rather than produce more blocks than this.

    Returns
    -------
    ValueLayout or None
        None when the rows do not decompose into at most ``max_blocks`` blocks (tiny inputs
        next to large kernels; a masked layer, whose filters each need their own blocks,
        unless filters x classes stays small -- LeNet-5's C3 has 16 x 1); the caller then
        gathers through ``param_index``. Every block is checked against ``param_index`` here, so a layout
        returned is exact.
    """
    runs = _dimension_runs(geom)
    n_classes = int(np.prod([len(r) for r in runs]))
    n_filters, n_out = geom.out_channels, int(np.prod(geom.out_size))
    filter_groups = [np.arange(n_filters)] if uniform_filters else [np.array([f]) for f in range(n_filters)]
    if n_classes * len(filter_groups) > max_blocks:
        return None
    out_index = np.arange(n_out).reshape(geom.out_size)
    blocks, covered = [], 0
    for box in itertools.product(*runs):
        positions = out_index[tuple(slice(a, b) for a, b in box)]
        for filters in filter_groups:
            rows = filters[(slice(None),) + (None,) * geom.ndim] * n_out + positions
            starts = indptr[rows].astype(np.int64)
            lengths = indptr[rows + 1] - starts
            length, origin = int(lengths.flat[0]), int(starts.flat[0])
            strides = tuple(int(np.diff(starts, axis=a).flat[0]) if starts.shape[a] > 1 else 0
                            for a in range(starts.ndim))
            predicted = origin + sum(np.arange(n).reshape((-1,) + (1,) * (starts.ndim - a - 1)) * st
                                     for a, (n, st) in enumerate(zip(starts.shape, strides)))
            if np.any(lengths != length) or not np.array_equal(starts, predicted):
                return None
            first_rows = starts.reshape(starts.shape[0], -1)[:, 0]
            block = ValueBlock(offset=origin, shape=(*starts.shape, length), strides=(*strides, 1),
                               template=param_index[first_rows[:, None] + np.arange(length)])
            # Rows of one class repeat by construction; checking costs one pass over the
            # block and makes the layout exact whatever the layer.
            if not np.array_equal(block.view(param_index), block.broadcast(block.template)):
                return None
            blocks.append(block)
            covered += lengths.size * length
    return ValueLayout(blocks, geom.n_params) if covered == param_index.size else None
