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
kernel, full convolution" rule as a gather and a GEMM; with a stride, input positions split
into phases, each read by its own subset of taps, and each phase is one such product. The
kernel gradient is ``dy`` times the gathered inputs, one GEMM per group.

The tables come from the operator's :class:`~sparseconv.pattern.SpatialPattern`, the same
tap-level list the CSR matrix is expanded from. A tap that reads padding (or a weight masked
out of the matrix) is multiplied as an explicit zero, so the forward does ``P * prod(kernel)
* C/G * F`` multiply-adds per sample where the matrix has ``nnz`` (the adjoint, as many per
slot of its tables: more where padding repeats input values); :func:`sparseconv.engines.policy.choose_engine`
takes the CSR kernel where that extra work, or a channel count too small for BLAS, would cost
more. The operators run these functions through :mod:`sparseconv.engines.factored`.

Every function takes and returns batches with channels first, ``(N, C, positions)``; the
channels-last copies and the gathers run on sparseconv's thread pool (split over samples, or
over positions when the batch is smaller than the thread count), the GEMMs on BLAS's. Work
proceeds in chunks of samples (or of one sample's positions) so that the gathered block stays
near :data:`CHUNK_ELEMENTS` elements whatever the batch (one output row's gather at least; the
channels-last copy of a chunk's input is at most one copy of the input).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .geometry import ConvGeometry
from .parallel import get_threads, run_blocks
from .pattern import SpatialPattern, axis_sources

__all__ = ["CHUNK_ELEMENTS", "AdjointPhase", "AdjointTables", "forward_table", "adjoint_plan", "adjoint_tables",
           "gather_tables", "forward_taps", "adjoint_taps", "weight_grad_taps"]

# Elements of one gathered block: a few MB, so the block is still in cache when BLAS reads
# it (measured faster than 4x larger) and large enough for BLAS to run near its peak.
CHUNK_ELEMENTS = 1 << 20

# Smallest copy worth handing to another thread, in elements.
_MIN_THREAD_BLOCK = 1 << 18

# The adjoint scatters (runs the forward table backwards) when fewer than this fraction of
# the inverse tables' slots would be real and at least this fraction of the forward table's.
_SCATTER_FILL = 0.5

@dataclass(frozen=True)
class AdjointPhase:
    """One gather table of the factored adjoint.

    Attributes
    ----------
    positions : ndarray of shape (rows,), intp, or None
        The input positions this table's rows produce, ascending; None for all of them in
        order (a single phase).
    table : ndarray of shape (rows, slots), intp
        ``table[r, j]``: the output position whose tap ``taps[j]`` reads input position
        ``positions[r]``, or ``prod(out)`` (a zero row) where none does.
    taps : ndarray of shape (slots,), intp
        The kernel tap (flat index into the weight as stored) of each column.
    """

    positions: Optional[np.ndarray]
    table: np.ndarray
    taps: np.ndarray


@dataclass(frozen=True)
class AdjointTables:
    """How the factored adjoint of one convolution runs: gather phases, or scatter rounds.

    Attributes
    ----------
    phases : tuple of AdjointPhase
        The inverse tables, when the adjoint gathers (empty when it scatters). With zero
        padding and a stride, input positions fall into ``prod(stride)`` phases (their
        coordinates plus the low padding, modulo the stride) and only the taps congruent to a
        phase can read it, so each phase lists only those: no slot is a hole between strided
        outputs. Otherwise one phase lists every tap ``multiplicity`` times, the most output
        positions any (input position, tap) pair is read by: 1 for zero padding, more where
        padding repeats input values (reflect, replicate, and circular padding that wraps).
    scatter_rounds : tuple of ndarray
        When the adjoint scatters (empty when it gathers): it runs the forward table
        backwards -- a GEMM, then each tap's products added back at the input positions it
        read (col2im) -- in rounds of taps that read disjoint positions, one indexed add per
        round. Chosen for zero padding when most inverse slots would be holes, as in a valid
        convolution whose output is much smaller than its input (LeNet-5's C5 reads each
        input position through one tap of 25).
    """

    phases: tuple[AdjointPhase, ...]
    scatter_rounds: tuple[np.ndarray, ...]


def _phase_of(geom: ConvGeometry, in_pos: np.ndarray) -> np.ndarray:
    """Flat stride phase of flat input positions: coordinates plus low padding, mod stride."""
    coords = np.unravel_index(in_pos, geom.in_size)
    residues = tuple((c + lo) % s for c, (lo, _), s in zip(coords, geom.padding, geom.stride))
    return np.ravel_multi_index(residues, geom.stride)


def _ranked(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stable order of ``keys`` and each item's rank among equal keys, in that order."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.ones(keys.size, dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run_start = np.flatnonzero(first)
    return order, np.arange(keys.size) - np.repeat(run_start, np.diff(np.append(run_start, keys.size)))


def forward_table(geom: ConvGeometry, spatial: SpatialPattern) -> np.ndarray:
    """The tap table of a convolution: which input position each tap reads at each output.

    Parameters
    ----------
    geom : ConvGeometry
    spatial : SpatialPattern
        The pattern :func:`~sparseconv.pattern.spatial_pattern` gives for ``geom``.

    Returns
    -------
    ndarray of shape (prod(out), prod(kernel)), intp
        ``table[o, t]``: the input position tap ``t`` (flat index into the weight as stored)
        reads at output position ``o``, or ``prod(in)`` (a zero row appended to the input)
        where it reads padding.
    """
    n_in, n_out = int(np.prod(geom.in_size)), int(np.prod(geom.out_size))
    table = np.full((n_out, int(np.prod(geom.kernel_size))), n_in, dtype=np.intp)
    table[spatial.out_pos, spatial.tap] = spatial.in_pos
    return table


def _phased(geom: ConvGeometry) -> bool:
    # Zero padding never wraps, so a stride splits input positions into phases.
    return geom.padding_mode == "zeros" and max(geom.stride) > 1


def _gather_slots(geom: ConvGeometry, spatial: SpatialPattern) -> int:
    """Rows x columns of the inverse tables, counted without building them."""
    n_in, n_taps = int(np.prod(geom.in_size)), int(np.prod(geom.kernel_size))
    if _phased(geom):
        n_phases = int(np.prod(geom.stride))
        positions = np.bincount(_phase_of(geom, np.arange(n_in)), minlength=n_phases)
        pairs = np.unique(_phase_of(geom, spatial.in_pos) * n_taps + spatial.tap)
        return int((positions * np.bincount(pairs // n_taps, minlength=n_phases)).sum())
    rank = _ranked(spatial.in_pos * n_taps + spatial.tap)[1]
    return n_in * n_taps * (int(rank.max()) + 1 if rank.size else 1)


def adjoint_plan(geom: ConvGeometry, spatial: SpatialPattern) -> tuple[bool, int]:
    """Whether the factored adjoint scatters, and the rows x taps it works through per sample.

    Cheap (no table is built), so that choosing an engine costs nothing on layers that end
    up on the CSR kernel.

    Parameters
    ----------
    geom : ConvGeometry
    spatial : SpatialPattern

    Returns
    -------
    scatter : bool
        See :attr:`AdjointTables.scatter_rounds`: zero padding, the inverse tables less than
        half real, the forward table at least half real.
    slots : int
        The forward table's size when scattering, else the inverse tables' total size.
    """
    gather = _gather_slots(geom, spatial)
    n_forward = int(np.prod(geom.out_size)) * int(np.prod(geom.kernel_size))
    scatter = (geom.padding_mode == "zeros"
               and spatial.n_items < _SCATTER_FILL * gather and spatial.n_items >= _SCATTER_FILL * n_forward)
    return scatter, n_forward if scatter else gather


def _scatter_rounds(geom: ConvGeometry) -> tuple[np.ndarray, ...]:
    """Taps grouped so that no two of a group read the same input position (zero padding).

    Two taps collide only if they collide along every dimension, so greedy groups of one
    dimension's taps (those whose read positions are disjoint) multiply into groups of the
    whole kernel: a product over dimensions, never a scan over taps x positions.
    """
    per_dim = []
    for src, i, k in zip(axis_sources(geom), geom.in_size, geom.kernel_size):
        reads = np.zeros((k, i), dtype=bool)
        tap, out = np.nonzero(src.T >= 0)
        reads[tap, src.T[tap, out]] = True
        groups: list[list[int]] = []
        seen: list[np.ndarray] = []
        for kk in range(k):
            for members, used in zip(groups, seen):
                if not np.any(used & reads[kk]):
                    members.append(kk)
                    used |= reads[kk]
                    break
            else:
                groups.append([kk])
                seen.append(reads[kk].copy())
        per_dim.append(groups)
    n_taps = int(np.prod(geom.kernel_size))
    rounds = []
    for combo in itertools.product(*per_dim):
        flat = np.ravel_multi_index(np.meshgrid(*combo, indexing="ij"), geom.kernel_size).reshape(-1)
        # A true convolution stores the kernel rotated: geometric tap t is weight tap n_taps-1-t.
        rounds.append(np.sort(n_taps - 1 - flat if geom.flip else flat).astype(np.intp))
    return tuple(rounds)


def adjoint_tables(geom: ConvGeometry, spatial: SpatialPattern) -> AdjointTables:
    """Build the tables of the factored adjoint (see :func:`adjoint_plan` for which kind).

    Parameters
    ----------
    geom : ConvGeometry
    spatial : SpatialPattern

    Returns
    -------
    AdjointTables
    """
    if adjoint_plan(geom, spatial)[0]:
        return AdjointTables(phases=(), scatter_rounds=_scatter_rounds(geom))
    return AdjointTables(phases=gather_tables(geom, spatial), scatter_rounds=())


def gather_tables(geom: ConvGeometry, spatial: SpatialPattern) -> tuple[AdjointPhase, ...]:
    """The inverse tap tables, by stride phase (see :attr:`AdjointTables.phases`).

    Parameters
    ----------
    geom : ConvGeometry
    spatial : SpatialPattern

    Returns
    -------
    tuple of AdjointPhase
        Their positions partition the input positions.
    """
    n_in, n_out = int(np.prod(geom.in_size)), int(np.prod(geom.out_size))
    n_taps = int(np.prod(geom.kernel_size))
    if _phased(geom):
        # (input position, tap) determines the output: one slot each.
        phase = _phase_of(geom, spatial.in_pos)
        input_phase = _phase_of(geom, np.arange(n_in))
        phases = []
        for ph in range(int(np.prod(geom.stride))):
            positions = np.flatnonzero(input_phase == ph)
            if positions.size == 0:
                continue
            items = phase == ph
            taps = np.unique(spatial.tap[items])
            table = np.full((positions.size, taps.size), n_out, dtype=np.intp)
            table[np.searchsorted(positions, spatial.in_pos[items]),
                  np.searchsorted(taps, spatial.tap[items])] = spatial.out_pos[items]
            phases.append(AdjointPhase(positions=positions, table=table, taps=taps.astype(np.intp)))
        return tuple(phases)
    order, rank = _ranked(spatial.in_pos * n_taps + spatial.tap)
    multiplicity = int(rank.max()) + 1 if rank.size else 1
    table = np.full((n_in, n_taps, multiplicity), n_out, dtype=np.intp)
    table[spatial.in_pos[order], spatial.tap[order], rank] = spatial.out_pos[order]
    taps = np.repeat(np.arange(n_taps, dtype=np.intp), multiplicity)
    return (AdjointPhase(None, table.reshape(n_in, -1), taps),)


def _run_split(fn: Callable[[slice, slice], None], n: int, n_rows: int, row_elements: int,
               threads: Optional[int]) -> None:
    """Call ``fn(samples, rows)`` on blocks covering ``n`` samples x ``n_rows`` rows (of
    ``row_elements`` elements each), one block per thread worth using: split by samples
    when there are enough of them, else by rows (a batch of one still uses every core)."""
    n_threads = max(1, min(get_threads(threads), (n * n_rows * row_elements) // _MIN_THREAD_BLOCK))
    if n >= n_threads:
        edges = np.linspace(0, n, n_threads + 1).astype(np.int64)
        blocks = [(slice(lo, hi), slice(None)) for lo, hi in zip(edges[:-1], edges[1:])]
    else:
        edges = np.linspace(0, n_rows, n_threads + 1).astype(np.int64)
        blocks = [(slice(None), slice(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    run_blocks(lambda i, _: fn(*blocks[i]), list(range(len(blocks) + 1)), n_threads)


def _channels_last(a: np.ndarray, groups: int, threads: Optional[int]) -> np.ndarray:
    """``(n, G*c, R)`` -> ``(G, n, R + 1, c)`` with row ``R`` zero (what padding taps read)."""
    n, channels, rows = a.shape
    c = channels // groups
    out = np.empty((groups, n, rows + 1, c), dtype=a.dtype)
    out[:, :, rows] = 0
    body = out[:, :, :rows]
    src = a.reshape(n, groups, c, rows).transpose(1, 0, 3, 2)

    def block(samples: slice, part: slice) -> None:
        body[:, samples, part] = src[:, samples, part]

    _run_split(block, n, rows, channels, threads)
    return out


def _gather(src: np.ndarray, rows: np.ndarray, threads: Optional[int]) -> np.ndarray:
    """``src[:, :, rows]`` for ``src`` of shape (G, n, R, c): shape (G, n, len(rows), c)."""
    out = np.empty((src.shape[0], src.shape[1], rows.size, src.shape[3]), dtype=src.dtype)

    def block(samples: slice, part: slice) -> None:
        # Indices are in range, so every mode agrees; "wrap" is numpy's fastest.
        np.take(src[:, samples], rows[part], axis=2, out=out[:, samples, part], mode="wrap")

    _run_split(block, src.shape[1], rows.size, src.shape[0] * src.shape[3], threads)
    return out


def _channels_first(res: np.ndarray, out: np.ndarray, threads: Optional[int]) -> None:
    """Write ``res`` of shape (G, n, R, c) into ``out`` of shape (n, G*c, R)."""
    groups, n, rows, c = res.shape
    dst = out.reshape(n, groups, c, rows)  # a view: out's channel axis splits into (G, c)

    def block(samples: slice, part: slice) -> None:
        dst[samples, :, :, part] = res[:, samples, part].transpose(1, 0, 3, 2)

    _run_split(block, n, rows, groups * c, threads)


def _chunks(n: int, tables: list[np.ndarray], channels: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Sample ranges ``(n0, n1, pieces)``, each with the ``(table number, r0, r1)`` row ranges
    to gather for it, so that one gathered block holds about :data:`CHUNK_ELEMENTS` elements:
    several whole samples when one fits, else one sample in row ranges."""
    per_sample = sum(t.size for t in tables) * channels
    if per_sample <= CHUNK_ELEMENTS:
        step = CHUNK_ELEMENTS // max(per_sample, 1)
        whole = [(i, 0, t.shape[0]) for i, t in enumerate(tables)]
        return [(n0, min(n, n0 + step), whole) for n0 in range(0, n, step)]
    pieces = []
    for i, t in enumerate(tables):
        step = max(1, CHUNK_ELEMENTS // max(t.shape[1] * channels, 1))
        pieces += [(i, r0, min(t.shape[0], r0 + step)) for r0 in range(0, t.shape[0], step)]
    return [(n0, n0 + 1, pieces) for n0 in range(n)]


def _factored_product(a: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]],
                      groups: int, n_rows: int, threads: Optional[int]) -> np.ndarray:
    """``out[n, g, :, positions[r]] = gather(a[n, g], table[r]) @ mat[g]`` over ``parts``.

    ``a`` has shape (N, G*c, R); each part is ``(table, mat, positions)`` with ``table`` of
    shape (rows, S) indexing rows of ``a`` (``R`` for a zero), ``mat`` of shape (G, S*c, k)
    and ``positions`` the output rows it produces (None: all ``n_rows``, in order). The parts'
    positions partition the output rows. Returns (N, G*k, n_rows).
    """
    n, channels, _ = a.shape
    c, k = channels // groups, parts[0][1].shape[2]
    direct = len(parts) == 1 and parts[0][2] is None
    out = np.empty((n, groups * k, n_rows), dtype=a.dtype)
    for n0, n1, pieces in _chunks(n, [table for table, _, _ in parts], channels):
        source = _channels_last(a[n0:n1], groups, threads)
        # Scattered parts meet in one channels-last block, transposed once at the end.
        staged = None if direct else np.empty((groups, n1 - n0, n_rows, k), dtype=a.dtype)
        for i, r0, r1 in pieces:
            table, mat, positions = parts[i]
            cols = _gather(source, table[r0:r1].reshape(-1), threads)
            cols = cols.reshape(groups, (n1 - n0) * (r1 - r0), table.shape[1] * c)
            res = np.matmul(cols, mat).reshape(groups, n1 - n0, r1 - r0, k)
            if direct:
                _channels_first(res, out[n0:n1, :, r0:r1], threads)
            else:
                staged[:, :, positions[r0:r1]] = res
        if not direct:
            _channels_first(staged, out[n0:n1], threads)
    return out


def forward_taps(x: np.ndarray, weight: np.ndarray, geom: ConvGeometry, table: np.ndarray,
                 threads: Optional[int] = None) -> np.ndarray:
    """``W @ x`` for a batch, as a gather through the tap table and one GEMM per group.

    Parameters
    ----------
    x : ndarray of shape (N, C, prod(in))
    weight : ndarray of shape (F, C // groups, prod(kernel))
        With masked weights zero.
    geom : ConvGeometry
    table : ndarray of shape (prod(out), prod(kernel))
        :func:`forward_table`.
    threads : int, optional
        Threads for the copies and gathers; BLAS uses its own pool.

    Returns
    -------
    ndarray of shape (N, F, prod(out))
    """
    g = geom.groups
    f_total, cin_g, n_taps = weight.shape
    f_per_g = f_total // g
    # B[g, (t, c), f] = w[g F/G + f, c, t]: the gathered row (taps, channels) times B.
    mat = weight.reshape(g, f_per_g, cin_g, n_taps).transpose(0, 3, 2, 1).reshape(g, n_taps * cin_g, f_per_g)
    return _factored_product(x, [(table, np.ascontiguousarray(mat), None)], g, table.shape[0], threads)


def adjoint_taps(dy: np.ndarray, weight: np.ndarray, geom: ConvGeometry, table: np.ndarray,
                 tables: AdjointTables, threads: Optional[int] = None) -> np.ndarray:
    """``W.T @ dy`` for a batch: gather ``dy`` through the inverse tap tables and one GEMM per
    group and phase, or (:attr:`AdjointTables.scatter_rounds`) one GEMM and an indexed add per
    round of taps.

    Parameters
    ----------
    dy : ndarray of shape (N, F, prod(out))
    weight : ndarray of shape (F, C // groups, prod(kernel))
        With masked weights zero.
    geom : ConvGeometry
    table : ndarray of shape (prod(out), prod(kernel))
        :func:`forward_table` (what a scattering adjoint runs backwards).
    tables : AdjointTables
        :func:`adjoint_tables`.
    threads : int, optional

    Returns
    -------
    ndarray of shape (N, C, prod(in))
    """
    g = geom.groups
    f_total, cin_g, n_taps = weight.shape
    f_per_g = f_total // g
    kernel = weight.reshape(g, f_per_g, cin_g, n_taps)
    if tables.scatter_rounds:
        return _adjoint_scatter(dy, kernel, table, tables.scatter_rounds, int(np.prod(geom.in_size)), threads)
    parts = []
    for phase in tables.phases:
        # A[g, (slot, f), c] = w[g F/G + f, c, tap(slot)]: the kernel read backwards, per slot.
        mat = np.ascontiguousarray(kernel[..., phase.taps].transpose(0, 3, 1, 2))
        parts.append((phase.table, mat.reshape(g, phase.taps.size * f_per_g, cin_g), phase.positions))
    return _factored_product(dy, parts, g, int(np.prod(geom.in_size)), threads)


def _adjoint_scatter(dy: np.ndarray, kernel: np.ndarray, table: np.ndarray, rounds: tuple[np.ndarray, ...],
                     n_in: int, threads: Optional[int]) -> np.ndarray:
    """``S.T`` applied after ``I ⊗ B.T``: per output position the (taps, C/G) products of
    ``dy`` with the kernel, each tap's added back at the input positions it read, one indexed
    add per round of taps reading disjoint positions. ``kernel`` has shape (G, F/G, C/G, taps)."""
    g, f_per_g, cin_g, n_taps = kernel.shape
    n = dy.shape[0]
    # B.T[g, f, (t, c)] = w[g F/G + f, c, t].
    mat = np.ascontiguousarray(kernel.transpose(0, 1, 3, 2)).reshape(g, f_per_g, n_taps * cin_g)
    out = np.empty((n, g * cin_g, n_in), dtype=dy.dtype)
    for n0, n1, pieces in _chunks(n, [table], g * cin_g):
        source = _channels_last(dy[n0:n1], g, threads)
        # Row n_in collects the products of taps that read padding, then is dropped.
        staged = np.zeros((g, n1 - n0, n_in + 1, cin_g), dtype=dy.dtype)
        for _, r0, r1 in pieces:
            rows = source[:, :, r0:r1].reshape(g, (n1 - n0) * (r1 - r0), f_per_g)
            prods = np.matmul(rows, mat).reshape(g, n1 - n0, r1 - r0, n_taps, cin_g)
            for taps in rounds:
                # Positions are distinct within a round (padding aside), so += adds each once.
                values = prods[:, :, :, taps].transpose(0, 1, 3, 2, 4).reshape(g, n1 - n0, -1, cin_g)
                staged[:, :, table[r0:r1, taps].T.reshape(-1)] += values
        _channels_first(staged[:, :, :n_in], out[n0:n1], threads)
    return out


def weight_grad_taps(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry, table: np.ndarray,
                     threads: Optional[int] = None) -> np.ndarray:
    """Kernel gradient ``sum_n dy[n] (S x[n])^T``, one ``(F/G, N*P) @ (N*P, taps*C/G)`` GEMM per
    group and batch chunk.

    Parameters
    ----------
    x : ndarray of shape (N, C, prod(in))
    dy : ndarray of shape (N, F, prod(out))
    geom : ConvGeometry
    table : ndarray of shape (prod(out), prod(kernel))
        :func:`forward_table`.
    threads : int, optional

    Returns
    -------
    ndarray of shape (F, C // groups, prod(kernel))
        Including the (meaningless) gradient of masked weights; the caller zeroes it.
    """
    g = geom.groups
    n, channels, _ = x.shape
    cin_g, f_per_g = channels // g, geom.out_channels // g
    n_out, n_taps = table.shape
    grad = np.zeros((g, f_per_g, n_taps, cin_g), dtype=x.dtype)
    for n0, n1, pieces in _chunks(n, [table], channels):
        source = _channels_last(x[n0:n1], g, threads)
        for _, r0, r1 in pieces:
            cols = _gather(source, table[r0:r1].reshape(-1), threads)
            cols = cols.reshape(g, (n1 - n0) * (r1 - r0), n_taps * cin_g)
            ds = dy[n0:n1, :, r0:r1].reshape(n1 - n0, g, f_per_g, r1 - r0).transpose(1, 2, 0, 3)
            ds = np.ascontiguousarray(ds).reshape(g, f_per_g, (n1 - n0) * (r1 - r0))
            grad += np.matmul(ds, cols).reshape(g, f_per_g, n_taps, cin_g)
    return grad.transpose(0, 1, 3, 2).reshape(geom.out_channels, cin_g, n_taps)
