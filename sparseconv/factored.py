"""A convolution matrix in factored form: a 0/1 gather, then one dense product per group.

Weight tying gives the sparse matrix ``W`` of a convolution a factorisation. Order the rows
of ``W`` by output position and, within a position, by filter. The rows of one position read
the inputs at ``prod(kernel)`` positions (its *taps*), and every position uses the same dense
``(F, C * prod(kernel))`` block of weights. So, per group,

.. math:: W = (I_{P} \\otimes B)\\, S,

where ``S`` is a 0/1 selection matrix with one non-zero per row (the *tap table*: which input
position tap ``t`` reads at output position ``o``) and ``B`` is the weight, reshaped. Applied
to a batch, ``S`` is a row gather of channels-last inputs and ``I ⊗ B`` is one BLAS GEMM:
the same sum ``W @ x`` computes, at BLAS speed instead of the index-bound speed of a CSR
kernel. The adjoint factors the same way through the *inverse tap table* (which output reads
input position ``i`` through tap ``t``): ``W.T = (I_{P_in} \\otimes A) S'`` -- the "rotated
kernel, full convolution" rule as a gather and a GEMM. The kernel gradient is ``dy`` times
the gathered inputs, one GEMM per group.

The tables come from the operator's :class:`~sparseconv.pattern.SpatialPattern`, the same
tap-level list the CSR matrix is expanded from. A tap that reads padding (or a weight masked
out of the matrix) is multiplied as an explicit zero, so these products do ``P * prod(kernel)
* C/G * F`` multiply-adds per sample where the matrix has ``nnz``; :func:`choose_method` takes
the CSR kernel where that extra work, or a channel count too small for BLAS, would cost more.

Every function takes and returns batches with channels first, ``(N, C, positions)``; the
channels-last copies and the gathers run on sparseconv's thread pool (split over samples), the
GEMMs on BLAS's. Work proceeds in batch chunks so that the gathered block stays near
:data:`CHUNK_ELEMENTS` elements whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .geometry import ConvGeometry
from .parallel import get_threads, run_blocks
from .pattern import SpatialPattern

__all__ = ["CHUNK_ELEMENTS", "TapTables", "tap_tables", "choose_method", "forward_taps", "adjoint_taps",
           "weight_grad_taps"]

# Elements of one gathered block: a few MB, so the block is still in cache when BLAS reads
# it (measured faster than 4x larger) and large enough for BLAS to run near its peak.
CHUNK_ELEMENTS = 1 << 20

# Smallest copy worth handing to another thread, in elements.
_MIN_THREAD_BLOCK = 1 << 16

# When the factored product is used (see choose_method): at least this many channels per
# group on the gathered side (each gathered row is one contiguous run of them), this many on
# the GEMM's output side, and at least this fraction of the gathered taps real (not padding,
# not masked, not a hole between strided outputs).
_MIN_GATHER_CHANNELS = 4
_MIN_OUTPUT_CHANNELS = {"forward": 4, "adjoint": 8}
_MIN_FILL = 0.5


@dataclass(frozen=True)
class TapTables:
    """Gather tables of the factored product of one convolution.

    Attributes
    ----------
    forward : ndarray of shape (prod(out), prod(kernel)), intp
        ``forward[o, t]``: the input position tap ``t`` reads at output position ``o``, or
        ``prod(in)`` (a zero row appended to the input) where it reads padding.
    adjoint : ndarray of shape (prod(in), prod(kernel) * multiplicity), intp
        ``adjoint[i, t * multiplicity + j]``: the ``j``-th output position whose tap ``t``
        reads input position ``i``, or ``prod(out)`` (a zero row) where there is none.
    multiplicity : int
        Most output positions any (input position, tap) pair is read by: 1 except for
        circular padding wrapping an output row around a small input more than once.
    """

    forward: np.ndarray
    adjoint: np.ndarray
    multiplicity: int

    @property
    def adjoint_taps(self) -> np.ndarray:
        """The kernel tap of each column of :attr:`adjoint`, shape (prod(kernel) * multiplicity,)."""
        return np.repeat(np.arange(self.forward.shape[1]), self.multiplicity)


def tap_tables(geom: ConvGeometry, spatial: SpatialPattern) -> TapTables:
    """Build the forward and inverse tap tables of a convolution from its spatial pattern.

    Parameters
    ----------
    geom : ConvGeometry
    spatial : SpatialPattern
        The pattern :func:`~sparseconv.pattern.spatial_pattern` gives for ``geom``.

    Returns
    -------
    TapTables
    """
    n_in, n_out = int(np.prod(geom.in_size)), int(np.prod(geom.out_size))
    n_taps = int(np.prod(geom.kernel_size))
    forward = np.full((n_out, n_taps), n_in, dtype=np.intp)
    forward[spatial.out_pos, spatial.tap] = spatial.in_pos
    # Rank each item among those sharing its (input position, tap): the column it takes.
    key = spatial.in_pos * n_taps + spatial.tap
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    first = np.ones(key.size, dtype=bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    run_start = np.flatnonzero(first)
    rank = np.arange(key.size) - np.repeat(run_start, np.diff(np.append(run_start, key.size)))
    multiplicity = int(rank.max()) + 1 if key.size else 1
    adjoint = np.full((n_in, n_taps, multiplicity), n_out, dtype=np.intp)
    adjoint[spatial.in_pos[order], spatial.tap[order], rank] = spatial.out_pos[order]
    return TapTables(forward=forward, adjoint=adjoint.reshape(n_in, n_taps * multiplicity),
                     multiplicity=multiplicity)


def choose_method(geom: ConvGeometry, spatial: SpatialPattern, product: str, mask_fraction: float = 1.0,
                  multiplicity: int = 1) -> str:
    """``"taps"`` (factored, BLAS) or ``"csr"`` (scipy's CSR kernel) for a product.

    The factored product wins when BLAS gets wide enough operands and few of the gathered taps
    are explicit zeros; this rule encodes the measurements in ``benchmarks/bench_speed.py``
    (the factored forward runs at 33-87 GFLOP/s where the CSR kernel runs at about 15 per
    core) and depends only on the layer's shape, never on timing, so results are reproducible.

    Parameters
    ----------
    geom : ConvGeometry
    spatial : SpatialPattern
    product : {"forward", "adjoint"}
    mask_fraction : float, default 1.0
        Fraction of weights present in the matrix.
    multiplicity : int, default 1
        :attr:`TapTables.multiplicity` (needed for the adjoint only).

    Returns
    -------
    str
    """
    cin_g, f_per_g = geom.in_channels // geom.groups, geom.out_channels // geom.groups
    n_taps = int(np.prod(geom.kernel_size))
    if product == "forward":
        gathered, produced, slots = cin_g, f_per_g, int(np.prod(geom.out_size)) * n_taps
    elif product == "adjoint":
        gathered, produced, slots = f_per_g, cin_g, int(np.prod(geom.in_size)) * n_taps * multiplicity
    else:
        raise ValueError(f"product must be 'forward' or 'adjoint'; got {product!r}")
    fill = mask_fraction * spatial.n_items / max(slots, 1)
    wide = gathered >= _MIN_GATHER_CHANNELS and produced >= _MIN_OUTPUT_CHANNELS[product]
    return "taps" if wide and fill >= _MIN_FILL else "csr"


def _split(n: int, size: int, threads: Optional[int]) -> tuple[np.ndarray, int]:
    """Bounds splitting ``n`` samples of ``size`` elements each over the threads worth using."""
    n_threads = max(1, min(get_threads(threads), n, (n * size) // _MIN_THREAD_BLOCK))
    return np.linspace(0, n, n_threads + 1).astype(np.int64), n_threads


def _channels_last(a: np.ndarray, groups: int, threads: Optional[int]) -> np.ndarray:
    """``(n, G*c, R)`` -> ``(G, n, R + 1, c)`` with row ``R`` zero (what padding taps read)."""
    n, channels, rows = a.shape
    c = channels // groups
    out = np.empty((groups, n, rows + 1, c), dtype=a.dtype)
    src = a.reshape(n, groups, c, rows).transpose(1, 0, 3, 2)

    def block(s0: int, s1: int) -> None:
        out[:, s0:s1, :rows] = src[:, s0:s1]
        out[:, s0:s1, rows] = 0

    bounds, n_threads = _split(n, channels * rows, threads)
    run_blocks(block, bounds, n_threads)
    return out


def _gather(src: np.ndarray, rows: np.ndarray, threads: Optional[int]) -> np.ndarray:
    """``src[:, :, rows]`` for ``src`` of shape (G, n, R, c): shape (G, n, len(rows), c)."""
    out = np.empty((src.shape[0], src.shape[1], rows.size, src.shape[3]), dtype=src.dtype)

    def block(s0: int, s1: int) -> None:
        # Indices are in range, so every mode agrees; "wrap" is numpy's fastest.
        np.take(src[:, s0:s1], rows, axis=2, out=out[:, s0:s1], mode="wrap")

    bounds, n_threads = _split(src.shape[1], out[:, :1].size, threads)
    run_blocks(block, bounds, n_threads)
    return out


def _channels_first(res: np.ndarray, out: np.ndarray, threads: Optional[int]) -> None:
    """Write ``res`` of shape (G, n, R, c) into ``out`` of shape (n, G*c, R)."""
    groups, n, rows, c = res.shape
    dst = out.reshape(n, groups, c, rows)  # a view: out's channel axis splits into (G, c)

    def block(s0: int, s1: int) -> None:
        dst[s0:s1] = res[:, s0:s1].transpose(1, 0, 3, 2)

    bounds, n_threads = _split(n, groups * rows * c, threads)
    run_blocks(block, bounds, n_threads)


def _chunks(n: int, n_rows: int, per_row: int) -> list[tuple[int, int, int, int]]:
    """``(n0, n1, r0, r1)`` blocks of samples and output rows of about :data:`CHUNK_ELEMENTS`
    gathered elements: whole samples when one fits, else rows of one sample at a time."""
    per_sample = n_rows * per_row
    if per_sample <= CHUNK_ELEMENTS:
        step = max(1, CHUNK_ELEMENTS // max(per_sample, 1))
        return [(n0, min(n, n0 + step), 0, n_rows) for n0 in range(0, n, step)]
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [(n0, n0 + 1, r0, min(n_rows, r0 + step)) for n0 in range(n) for r0 in range(0, n_rows, step)]


def _factored_product(a: np.ndarray, mat: np.ndarray, table: np.ndarray, groups: int,
                      threads: Optional[int]) -> np.ndarray:
    """``out[n, g, :, r] = gather(a[n, g], table[r]) @ mat[g]`` for channels-first ``a``.

    ``a`` has shape (N, G*c, R); ``table`` (rows, S) indexes rows of ``a`` (``R`` for a
    zero); ``mat`` has shape (G, S*c, k). Returns (N, G*k, rows).
    """
    n, channels, _ = a.shape
    c, k = channels // groups, mat.shape[2]
    n_rows, n_slots = table.shape
    out = np.empty((n, groups * k, n_rows), dtype=a.dtype)
    source, source_range = None, None
    for n0, n1, r0, r1 in _chunks(n, n_rows, n_slots * channels):
        if source_range != (n0, n1):
            source, source_range = _channels_last(a[n0:n1], groups, threads), (n0, n1)
        cols = _gather(source, table[r0:r1].reshape(-1), threads)
        cols = cols.reshape(groups, (n1 - n0) * (r1 - r0), n_slots * c)
        res = np.matmul(cols, mat).reshape(groups, n1 - n0, r1 - r0, k)
        _channels_first(res, out[n0:n1, :, r0:r1], threads)
    return out


def forward_taps(x: np.ndarray, weight: np.ndarray, geom: ConvGeometry, tables: TapTables,
                 threads: Optional[int] = None) -> np.ndarray:
    """``W @ x`` for a batch, as a gather through the tap table and one GEMM per group.

    Parameters
    ----------
    x : ndarray of shape (N, C, prod(in))
    weight : ndarray of shape (F, C // groups, prod(kernel))
        With masked weights zero.
    geom : ConvGeometry
    tables : TapTables
    threads : int, optional
        Threads for the copies and gathers; BLAS uses its own pool.

    Returns
    -------
    ndarray of shape (N, F, prod(out))
    """
    g = geom.groups
    f_per_g, cin_g, n_taps = weight.shape
    f_per_g //= g
    # B[g, (t, c), f] = w[g F/G + f, c, t]: the gathered row (taps, channels) times B.
    mat = weight.reshape(g, f_per_g, cin_g, n_taps).transpose(0, 3, 2, 1).reshape(g, n_taps * cin_g, f_per_g)
    return _factored_product(x, np.ascontiguousarray(mat), tables.forward, g, threads)


def adjoint_taps(dy: np.ndarray, weight: np.ndarray, geom: ConvGeometry, tables: TapTables,
                 threads: Optional[int] = None) -> np.ndarray:
    """``W.T @ dy`` for a batch: gather ``dy`` through the inverse tap table, one GEMM per group.

    Parameters
    ----------
    dy : ndarray of shape (N, F, prod(out))
    weight : ndarray of shape (F, C // groups, prod(kernel))
        With masked weights zero.
    geom : ConvGeometry
    tables : TapTables
    threads : int, optional

    Returns
    -------
    ndarray of shape (N, C, prod(in))
    """
    g = geom.groups
    f_total, cin_g, n_taps = weight.shape
    f_per_g = f_total // g
    slot_taps = tables.adjoint_taps
    # A[g, (slot, f), c] = w[g F/G + f, c, tap(slot)]: the kernel read backwards, per slot.
    mat = weight.reshape(g, f_per_g, cin_g, n_taps)[..., slot_taps].transpose(0, 3, 1, 2)
    mat = np.ascontiguousarray(mat).reshape(g, slot_taps.size * f_per_g, cin_g)
    return _factored_product(dy, mat, tables.adjoint, g, threads)


def weight_grad_taps(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry, tables: TapTables,
                     threads: Optional[int] = None) -> np.ndarray:
    """Kernel gradient ``sum_n dy[n] (S x[n])^T``, one ``(F/G, N*P) @ (N*P, taps*C/G)`` GEMM per
    group and batch chunk.

    Parameters
    ----------
    x : ndarray of shape (N, C, prod(in))
    dy : ndarray of shape (N, F, prod(out))
    geom : ConvGeometry
    tables : TapTables
    threads : int, optional

    Returns
    -------
    ndarray of shape (F, C // groups, prod(kernel))
        Including the (meaningless) gradient of masked weights; the caller zeroes it.
    """
    g = geom.groups
    n, channels, _ = x.shape
    cin_g, f_per_g = channels // g, geom.out_channels // g
    table = tables.forward
    n_out, n_taps = table.shape
    grad = np.zeros((g, f_per_g, n_taps, cin_g), dtype=x.dtype)
    source, source_range = None, None
    for n0, n1, r0, r1 in _chunks(n, n_out, n_taps * channels):
        if source_range != (n0, n1):
            source, source_range = _channels_last(x[n0:n1], g, threads), (n0, n1)
        cols = _gather(source, table[r0:r1].reshape(-1), threads)
        cols = cols.reshape(g, (n1 - n0) * (r1 - r0), n_taps * cin_g)
        ds = dy[n0:n1, :, r0:r1].reshape(n1 - n0, g, f_per_g, r1 - r0).transpose(1, 2, 0, 3)
        ds = np.ascontiguousarray(ds).reshape(g, f_per_g, (n1 - n0) * (r1 - r0))
        grad += np.matmul(ds, cols).reshape(g, f_per_g, n_taps, cin_g)
    return grad.transpose(0, 1, 3, 2).reshape(geom.out_channels, cin_g, n_taps)
