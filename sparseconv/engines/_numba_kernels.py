"""Compiled kernels of the ``"numba"`` and ``"stencil"`` engines (imported only when numba is).

Importing this module imports numba and defines (but does not compile) every kernel; each
kernel compiles at its first call for the dtypes it gets. :mod:`sparseconv.engines.numba`
imports it lazily, so ``import sparseconv`` never needs numba.

Design (the measured reasons are in issue 11):

- **Explicit LLVM vectors.** :class:`Vec` is a numba type whose value is an LLVM vector
  (``<32 x float>``, ``<16 x double>``: two 512-bit registers, or four 256-bit ones where the
  machine has no AVX-512). The intrinsics below load, store, multiply-add and sum them, so a
  row's outputs stay in registers across the row's entries and every entry costs one vector
  FMA per register -- written with plain arrays, LLVM turned the entry loop into gathers or
  into a load and store of the output per entry.
- **Batch innermost.** Dense blocks are C-contiguous ``(rows, N)``: entry ``(r, c)`` of a
  sparse matrix meets the contiguous ``N`` values of row ``c``. ``N`` is covered by chunks of
  :data:`MAIN_BYTES` and masked chunks of :data:`TAIL_BYTES` (AVX-512 masked loads do not
  touch the masked lanes' memory, so the last row of a block is safe).
- **Raw offsets.** The intrinsics index through a ``getelementptr`` on the array's data
  pointer: no negative-index wrap-around code in the hot loops. Every offset is computed
  from validated CSR arrays by the engine, which is the only caller.
- **Band order.** The CSR kernels walk rows band by band (a band: a run of output positions,
  with every row block -- every filter -- inside), so the input rows a band reads stay in L2;
  bands are the parallel tasks (``prange``).
- **Two partial sums per row** (even and odd entries) break the FMA latency chain: four
  independent accumulator registers at ``N = 32`` in float32.
- **Kernel gradient by segments**: the entries of one parameter within one band are
  contiguous (a permutation built once), so their dot products accumulate in registers and
  are summed across lanes once per segment instead of once per entry.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, models, register_model

__all__ = [
    "MAIN_BYTES",
    "TAIL_BYTES",
    "Vec",
    "csr_bands",
    "csr_vec_bands",
    "csr_grad_segments",
    "taps_bands",
    "taps_grad",
    "transpose_into",
    "tanh_grad_into",
    "sigmoid_grad_into",
    "channel_affine_into",
    "channel_affine_grad_into",
    "channel_sums_into",
    "window_affine_into",
    "window_affine_grad_into",
    "stencil_forward",
    "stencil_grad",
    "shift_pad",
    "CACHING",
]

#: Bytes of the main accumulator chunk: two AVX-512 registers (32 float32 / 16 float64 lanes).
MAIN_BYTES = 128
#: Bytes of a tail chunk: one AVX-512 register, masked to the lanes that remain.
TAIL_BYTES = 64


class Vec(types.Type):
    """A numba type for an LLVM vector of ``lanes`` values of ``dtype``.

    Parameters
    ----------
    dtype : numba.types.Float
    lanes : int
    """

    def __init__(self, dtype: types.Float, lanes: int) -> None:
        self.dtype, self.lanes = dtype, lanes
        super().__init__(name=f"Vec({dtype} x {lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: Vec) -> None:
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _float_array(arr: types.Type, name: str) -> None:
    if not isinstance(arr, types.Array) or not isinstance(arr.dtype, types.Float):
        raise errors.TypingError(f"{name}: expected a float array, got {arr}")


def _lanes(arr: types.Array, nbytes: types.Type) -> int:
    if not isinstance(nbytes, types.IntegerLiteral):
        raise errors.RequireLiteralValue(nbytes)
    return nbytes.literal_value // (arr.dtype.bitwidth // 8)


def _pointer(context, builder, arrty, arr, offset):
    """Pointer to element ``offset`` of a contiguous array's data (no wrap-around, no check)."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [offset], inbounds=True)


def _lane_mask(builder, lanes: int, remaining):
    """``<lanes x i1>``: true for the first ``remaining`` lanes."""
    iota = ir.Constant(ir.VectorType(_I64, lanes), list(range(lanes)))
    rem = builder.sext(remaining, _I64) if remaining.type.width < 64 else remaining
    return builder.icmp_unsigned("<", iota, _splat(builder, rem, lanes))


def _splat(builder, scalar, lanes: int):
    vty = ir.VectorType(scalar.type, lanes)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, lanes),
                                                                                    [0] * lanes))


def _float_width(t: ir.Type) -> int:
    return 32 if isinstance(t, ir.FloatType) else 64


def _fma(builder, a, b, c):
    """``a * b + c`` element-wise on vectors, as one fused multiply-add."""
    vty = a.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                        f"llvm.fma.v{vty.count}f{_float_width(vty.element)}")
    return builder.call(fn, [a, b, c])


@intrinsic
def vzero(typingctx, arr, nbytes):
    """A zero vector of ``nbytes`` (a compile-time constant) of ``arr``'s dtype."""
    _float_array(arr, "vzero")
    vt = Vec(arr.dtype, _lanes(arr, nbytes))

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(arr, nbytes), codegen


@intrinsic
def vload(typingctx, arr, offset, like):
    """The vector of ``like``'s width at ``arr.flat[offset:]`` (unaligned, no check)."""
    _float_array(arr, "vload")

    def codegen(context, builder, sig, args):
        vty = context.get_value_type(sig.return_type)
        ptr = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]), vty.as_pointer())
        return builder.load(ptr, align=arr.dtype.bitwidth // 8)

    return like(arr, offset, like), codegen


@intrinsic
def vload_masked(typingctx, arr, offset, remaining, like):
    """As :func:`vload`, reading only the first ``remaining`` lanes (the others are zero)."""
    _float_array(arr, "vload_masked")

    def codegen(context, builder, sig, args):
        vty = context.get_value_type(sig.return_type)
        ptr = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]), vty.as_pointer())
        mask = _lane_mask(builder, vty.count, args[2])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty.as_pointer(), _I32, mask.type, vty]),
            f"llvm.masked.load.v{vty.count}f{_float_width(vty.element)}.p0")
        return builder.call(fn, [ptr, ir.Constant(_I32, arr.dtype.bitwidth // 8), mask, ir.Constant(vty, None)])

    return like(arr, offset, remaining, like), codegen


@intrinsic
def vstore(typingctx, arr, offset, vec):
    """Write ``vec`` to ``arr.flat[offset:]`` (unaligned, no check)."""
    _float_array(arr, "vstore")

    def codegen(context, builder, sig, args):
        ptr = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]), args[2].type.as_pointer())
        builder.store(args[2], ptr, align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.void(arr, offset, vec), codegen


@intrinsic
def vstore_masked(typingctx, arr, offset, vec, remaining):
    """Write the first ``remaining`` lanes of ``vec`` to ``arr.flat[offset:]``."""
    _float_array(arr, "vstore_masked")

    def codegen(context, builder, sig, args):
        vty = args[2].type
        ptr = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]), vty.as_pointer())
        mask = _lane_mask(builder, vty.count, args[3])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(), _I32, mask.type]),
            f"llvm.masked.store.v{vty.count}f{_float_width(vty.element)}.p0")
        builder.call(fn, [args[2], ptr, ir.Constant(_I32, arr.dtype.bitwidth // 8), mask])
        return context.get_dummy_value()

    return types.void(arr, offset, vec, remaining), codegen


@intrinsic
def vfma(typingctx, acc, scalar, vec):
    """``acc + scalar * vec`` (``scalar`` broadcast), one fused multiply-add per register."""

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[1], sig.args[1], acc.dtype)
        return _fma(builder, _splat(builder, s, args[0].type.count), args[2], args[0])

    return acc(acc, scalar, vec), codegen


@intrinsic
def vfma_vv(typingctx, acc, a, b):
    """``acc + a * b`` element-wise."""

    def codegen(context, builder, sig, args):
        return _fma(builder, args[1], args[2], args[0])

    return acc(acc, a, b), codegen


@intrinsic
def vadd(typingctx, a, b):
    """``a + b`` element-wise."""

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vadd_scalar(typingctx, vec, scalar):
    """``vec + scalar`` (``scalar`` broadcast)."""

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[1], sig.args[1], vec.dtype)
        return builder.fadd(args[0], _splat(builder, s, args[0].type.count))

    return vec(vec, scalar), codegen


@intrinsic
def vrelu(typingctx, vec):
    """``max(vec, 0)`` element-wise as ``np.maximum(vec, 0)`` computes it: NaN stays NaN and
    -0.0 becomes +0.0 (``v`` where ``v > 0`` or unordered, else +0.0)."""

    def codegen(context, builder, sig, args):
        v = args[0]
        keep = builder.fcmp_unordered(">", v, ir.Constant(v.type, None))
        return builder.select(keep, v, ir.Constant(v.type, None))

    return vec(vec), codegen


@intrinsic
def vsum(typingctx, vec):
    """The sum of a vector's lanes, as a fixed halving tree (deterministic)."""

    def codegen(context, builder, sig, args):
        v = args[0]
        n = v.type.count
        while n > 1:
            half = n // 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, n))))
            v, n = builder.fadd(lo, hi), half
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return vec.dtype(vec), codegen


@intrinsic
def uadd(typingctx, arr, index, value):
    """``arr.flat[index] += value`` with no wrap-around and no bounds check."""

    def codegen(context, builder, sig, args):
        ptr = _pointer(context, builder, sig.args[0], args[0], args[1])
        value = context.cast(builder, args[2], sig.args[2], arr.dtype)
        builder.store(builder.fadd(builder.load(ptr), value), ptr)
        return context.get_dummy_value()

    return types.void(arr, index, value), codegen


@intrinsic
def uload(typingctx, arr, index):
    """``arr.flat[index]`` with no wrap-around and no bounds check."""

    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1]))

    return arr.dtype(arr, index), codegen


#: False when ``SPARSECONV_NUMBA_CACHE=0``: kernels then compile in each process.
CACHING = os.environ.get("SPARSECONV_NUMBA_CACHE", "1") != "0"


_cache_refused = False


def _jit(**options) -> Callable:
    """``numba.njit`` with the on-disk cache where numba can write one, else without.

    numba looks for a writable cache directory (``NUMBA_CACHE_DIR``, next to this file, a
    user-wide one) when the decorator runs and raises if there is none; a read-only install
    must still import, so the decorator then falls back to compiling in each process.
    """
    def decorate(fn: Callable) -> Callable:
        global _cache_refused
        if CACHING and not _cache_refused:
            try:
                return numba.njit(cache=True, **options)(fn)
            except RuntimeError as err:  # "cannot cache function ...: no locator available"
                _cache_refused = True
                warnings.warn(f"numba cannot cache sparseconv's kernels ({err}); they compile in each process "
                              f"(set NUMBA_CACHE_DIR to a writable directory to keep them)", RuntimeWarning,
                              stacklevel=2)
        return numba.njit(**options)(fn)

    return decorate


# ---------------------------------------------------------------------- CSR kernels
@_jit(inline="always")
def _epilogue(acc, has_bias, bval, relu):
    """The row's outputs as stored: plus the row block's bias, then ``max(., 0)`` if asked."""
    if has_bias:
        acc = vadd_scalar(acc, bval)
    if relu:
        acc = vrelu(acc)
    return acc


@_jit(inline="always")
def _row_main(lo, hi, indices, data, x, n, c0, like):
    """The ``like``-wide chunk at column ``c0`` of one row of ``A @ X``: two partial sums."""
    acc0 = like
    acc1 = like
    e = lo
    while e + 1 < hi:
        acc0 = vfma(acc0, uload(data, e), vload(x, uload(indices, e) * n + c0, like))
        acc1 = vfma(acc1, uload(data, e + 1), vload(x, uload(indices, e + 1) * n + c0, like))
        e += 2
    if e < hi:
        acc0 = vfma(acc0, uload(data, e), vload(x, uload(indices, e) * n + c0, like))
    return vadd(acc0, acc1)


@_jit(inline="always")
def _row_tail(lo, hi, indices, data, x, n, c0, rem, like):
    """As ``_row_main`` for a masked chunk of ``rem`` columns."""
    acc0 = like
    acc1 = like
    e = lo
    while e + 1 < hi:
        acc0 = vfma(acc0, uload(data, e), vload_masked(x, uload(indices, e) * n + c0, rem, like))
        acc1 = vfma(acc1, uload(data, e + 1), vload_masked(x, uload(indices, e + 1) * n + c0, rem, like))
        e += 2
    if e < hi:
        acc0 = vfma(acc0, uload(data, e), vload_masked(x, uload(indices, e) * n + c0, rem, like))
    return vadd(acc0, acc1)


@_jit(parallel=True, nogil=True)
def csr_bands(indptr, indices, data, x, y, bands, n_blocks, block_rows, bias, relu):
    """``y = A @ x`` for a CSR matrix ``A``, band by band.

    Parameters
    ----------
    indptr, indices, data : ndarray
        The CSR arrays of ``A`` (``m`` rows), indices valid for ``x``'s rows.
    x : ndarray of shape (k, n), C-contiguous, ``data``'s dtype
    y : ndarray of shape (m, n), C-contiguous; every element is written.
    bands : ndarray of shape (n_bands + 1,), int64
        Increasing bounds of row runs within one row block; band ``b`` is the rows
        ``blk * block_rows + [bands[b], bands[b + 1])`` for every ``blk``.
    n_blocks, block_rows : int
        ``m == n_blocks * block_rows``.
    bias : ndarray of shape (n_blocks,) or (0,), ``x``'s dtype
        Added to every row of its block when not empty.
    relu : bool
        Store ``max(., 0)`` of each row (after the bias).
    """
    n = x.shape[1]
    main = vzero(x, MAIN_BYTES)
    tail = vzero(x, TAIL_BYTES)
    main_w = MAIN_BYTES // x.itemsize
    tail_w = TAIL_BYTES // x.itemsize
    n_main = n - n % main_w
    has_bias = bias.size > 0
    for b in prange(bands.size - 1):
        for blk in range(n_blocks):
            bval = bias[blk] if has_bias else 0.0
            r0 = blk * block_rows + bands[b]
            r1 = blk * block_rows + bands[b + 1]
            for r in range(r0, r1):
                lo = uload(indptr, r)
                hi = uload(indptr, r + 1)
                for c0 in range(0, n_main, main_w):
                    acc = _row_main(lo, hi, indices, data, x, n, c0, main)
                    vstore(y, r * n + c0, _epilogue(acc, has_bias, bval, relu))
                for c0 in range(n_main, n, tail_w):
                    rem = min(tail_w, n - c0)
                    acc = _row_tail(lo, hi, indices, data, x, n, c0, rem, tail)
                    vstore_masked(y, r * n + c0, _epilogue(acc, has_bias, bval, relu), rem)


@_jit(parallel=True, nogil=True)
def csr_vec_bands(indptr, indices, data, x, y, bands, n_blocks, block_rows, zero, bias, relu):
    """``y = A @ x`` for one vector (``N = 1``), band by band, four partial sums per row.

    With one vector there are no lanes to fill along ``N``; four independent scalar sums per
    row keep the multiply-adds from waiting on each other (one sum would wait the add's
    latency at every entry).

    Parameters
    ----------
    indptr, indices, data : ndarray
        As for :func:`csr_bands`.
    x : ndarray of shape (k,), contiguous
    y : ndarray of shape (m,); every element is written.
    bands, n_blocks, block_rows
        As for :func:`csr_bands`.
    zero : scalar of ``data``'s dtype
        0, typed: the sums are kept in the data's precision.
    bias, relu
        As for :func:`csr_bands`.
    """
    has_bias = bias.size > 0
    for b in prange(bands.size - 1):
        for blk in range(n_blocks):
            bval = bias[blk] if has_bias else zero
            r0 = blk * block_rows + bands[b]
            r1 = blk * block_rows + bands[b + 1]
            for r in range(r0, r1):
                lo = uload(indptr, r)
                hi = uload(indptr, r + 1)
                s0 = zero
                s1 = s0
                s2 = s0
                s3 = s0
                e = lo
                while e + 3 < hi:
                    s0 += uload(data, e) * uload(x, uload(indices, e))
                    s1 += uload(data, e + 1) * uload(x, uload(indices, e + 1))
                    s2 += uload(data, e + 2) * uload(x, uload(indices, e + 2))
                    s3 += uload(data, e + 3) * uload(x, uload(indices, e + 3))
                    e += 4
                while e < hi:
                    s0 += uload(data, e) * uload(x, uload(indices, e))
                    e += 1
                v = (s0 + s1) + (s2 + s3)
                if has_bias:
                    v += bval
                if relu and v <= 0:  # as np.maximum(v, 0): NaN stays NaN, -0.0 becomes +0.0
                    v = zero
                y[r] = v


@_jit(inline="always")
def _segment_main(lo, hi, rows, cols, x, d, n, c0, like):
    """``sum_e d[rows[e]] . x[cols[e]]`` over entries ``[lo, hi)``, the ``like``-wide chunk at ``c0``."""
    acc0 = like
    acc1 = like
    e = lo
    while e + 1 < hi:
        acc0 = vfma_vv(acc0, vload(d, uload(rows, e) * n + c0, like), vload(x, uload(cols, e) * n + c0, like))
        acc1 = vfma_vv(acc1, vload(d, uload(rows, e + 1) * n + c0, like),
                       vload(x, uload(cols, e + 1) * n + c0, like))
        e += 2
    if e < hi:
        acc0 = vfma_vv(acc0, vload(d, uload(rows, e) * n + c0, like), vload(x, uload(cols, e) * n + c0, like))
    return vsum(vadd(acc0, acc1))


@_jit(inline="always")
def _segment_tail(lo, hi, rows, cols, x, d, n, c0, rem, like):
    """As ``_segment_main`` for a masked chunk of ``rem`` columns."""
    acc = like
    for e in range(lo, hi):
        acc = vfma_vv(acc, vload_masked(d, uload(rows, e) * n + c0, rem, like),
                      vload_masked(x, uload(cols, e) * n + c0, rem, like))
    return vsum(acc)


@_jit(parallel=True, nogil=True)
def csr_grad_segments(seg_ptr, seg_param, rows, cols, x, d, out, part_ptr, per_part):
    """Kernel gradient by segments: ``out[part, seg_param[s]] += sum_{e in s} d[rows[e]] . x[cols[e]]``.

    A segment is the stored entries of one parameter within one band of rows, so each
    segment's dot products accumulate in registers over all its entries and are summed across
    lanes once (not once per entry); the two rows read per entry advance together, entry
    after entry, through one band of ``d`` and ``x``.

    Parameters
    ----------
    seg_ptr : ndarray of shape (n_segments + 1,), int64
        Entry bounds of each segment in ``rows`` / ``cols``.
    seg_param : ndarray of shape (n_segments,), integer
        The parameter (column of ``out``) each segment adds to.
    rows, cols : ndarray of shape (nnz,), integer
        Row (into ``d``) and column (into ``x``) of each entry, grouped by segment.
    x : ndarray of shape (k, n), C-contiguous
    d : ndarray of shape (m, n), C-contiguous, ``x``'s dtype
    out : ndarray of shape (n_parts * P,) or (P,), float64
        Added to.
    part_ptr : ndarray of shape (n_parts + 1,), int64
        Segment bounds of each parallel task.
    per_part : bool
        True: part ``t`` adds into ``out[t * P:(t + 1) * P]`` (a parameter may have segments in
        several parts; the caller sums the parts); False: every part adds into ``out`` (each
        parameter has one segment).
    """
    n = x.shape[1]
    main = vzero(x, MAIN_BYTES)
    tail = vzero(x, TAIL_BYTES)
    main_w = MAIN_BYTES // x.itemsize
    tail_w = TAIL_BYTES // x.itemsize
    n_main = n - n % main_w
    n_parts = part_ptr.size - 1
    n_cols = out.size // n_parts if per_part else out.size
    for t in prange(n_parts):
        base = t * n_cols if per_part else 0
        for s in range(part_ptr[t], part_ptr[t + 1]):
            lo = uload(seg_ptr, s)
            hi = uload(seg_ptr, s + 1)
            total = 0.0
            for c0 in range(0, n_main, main_w):
                total += _segment_main(lo, hi, rows, cols, x, d, n, c0, main)
            for c0 in range(n_main, n, tail_w):
                total += _segment_tail(lo, hi, rows, cols, x, d, n, c0, min(tail_w, n - c0), tail)
            uadd(out, base + uload(seg_param, s), total)


# ---------------------------------------------------------------------- tap-list kernels
@_jit(inline="always")
def _tap_valid(off, t, a0, a1, a2, s0, s1, s2):
    """Whether tap ``t`` read from a position starting at ``(a0, a1, a2)`` lands inside the source."""
    i0 = a0 + uload(off, 3 * t)
    i1 = a1 + uload(off, 3 * t + 1)
    i2 = a2 + uload(off, 3 * t + 2)
    return 0 <= i0 < s0 and 0 <= i1 < s1 and 0 <= i2 < s2


@_jit(inline="always")
def _taps_main(lo, hi, delta, w, x, base, n, c0, like):
    """``sum_t w[t] * x[base + delta[t]]`` over taps ``[lo, hi)``, the chunk at ``c0``: two partial sums."""
    acc0 = like
    acc1 = like
    t = lo
    while t + 1 < hi:
        acc0 = vfma(acc0, uload(w, t), vload(x, (base + uload(delta, t)) * n + c0, like))
        acc1 = vfma(acc1, uload(w, t + 1), vload(x, (base + uload(delta, t + 1)) * n + c0, like))
        t += 2
    if t < hi:
        acc0 = vfma(acc0, uload(w, t), vload(x, (base + uload(delta, t)) * n + c0, like))
    return vadd(acc0, acc1)


@_jit(inline="always")
def _taps_tail(lo, hi, delta, w, x, base, n, c0, rem, like):
    """As ``_taps_main`` for a masked chunk of ``rem`` columns."""
    acc0 = like
    acc1 = like
    t = lo
    while t + 1 < hi:
        acc0 = vfma(acc0, uload(w, t), vload_masked(x, (base + uload(delta, t)) * n + c0, rem, like))
        acc1 = vfma(acc1, uload(w, t + 1), vload_masked(x, (base + uload(delta, t + 1)) * n + c0, rem, like))
        t += 2
    if t < hi:
        acc0 = vfma(acc0, uload(w, t), vload_masked(x, (base + uload(delta, t)) * n + c0, rem, like))
    return vadd(acc0, acc1)


@_jit(inline="always")
def _taps_checked(lo, hi, delta, off, w, x, base, a0, a1, a2, s0, s1, s2, n, c0, rem, like):
    """As ``_taps_main`` (``rem`` < the chunk width: masked) skipping taps that land outside the source."""
    acc = like
    for t in range(lo, hi):
        if _tap_valid(off, t, a0, a1, a2, s0, s1, s2):
            at = (base + uload(delta, t)) * n + c0
            if rem < 0:
                acc = vfma(acc, uload(w, t), vload(x, at, like))
            else:
                acc = vfma(acc, uload(w, t), vload_masked(x, at, rem, like))
    return acc


@_jit(parallel=True, nogil=True)
def taps_bands(x, y, tap_ptr, delta, off, w, pos_base, pos_start, pos_phase, pos_inner, sizes, n_phases, bands,
               n_blocks, bias, relu):
    """``y = W @ x`` for a convolution matrix ``W`` given by tap lists, never stored.

    Row ``blk * P + p`` of ``W`` (row block ``blk``, position ``p``) holds the taps
    ``tap_ptr[blk * n_phases + pos_phase[p]]`` up to the next pointer: tap ``t`` reads source
    row ``pos_base[p] + delta[t]`` with weight ``w[t]`` when the source coordinates
    ``pos_start[p] + off[t]`` lie inside ``sizes`` (always true where ``pos_inner[p]``).

    Parameters
    ----------
    x : ndarray of shape (k, n), C-contiguous
    y : ndarray of shape (n_blocks * P, n), C-contiguous; every element is written.
    tap_ptr : ndarray of shape (n_blocks * n_phases + 1,), int64
    delta : ndarray of shape (T,), int64
        Source row offset of each tap (its source channel's first row plus its spatial shift).
    off : ndarray of shape (T, 3), int64
        Each tap's shift per spatial dimension (three, leading ones of size 1 for 1-D/2-D).
    w : ndarray of shape (T,), ``x``'s dtype
    pos_base : ndarray of shape (P,), int64
        Flat source index of each position's start (negative at some borders).
    pos_start : ndarray of shape (P, 3), int64
    pos_phase : ndarray of shape (P,), int64
    pos_inner : ndarray of shape (P,), uint8
        Non-zero where every tap of the position's phase lands inside the source (no checks).
    sizes : ndarray of shape (3,), int64
        The source's spatial size.
    n_phases : int
    bands : ndarray of shape (n_bands + 1,), int64
        Increasing position bounds; the parallel tasks, each running every row block.
    n_blocks : int
    bias : ndarray of shape (n_blocks,) or (0,), ``x``'s dtype
        Added to every row of its block when not empty.
    relu : bool
        Store ``max(., 0)`` of each row (after the bias).
    """
    n = x.shape[1]
    n_pos = pos_base.size
    main = vzero(x, MAIN_BYTES)
    tail = vzero(x, TAIL_BYTES)
    main_w = MAIN_BYTES // x.itemsize
    tail_w = TAIL_BYTES // x.itemsize
    n_main = n - n % main_w
    s0 = sizes[0]
    s1 = sizes[1]
    s2 = sizes[2]
    has_bias = bias.size > 0
    for b in prange(bands.size - 1):
        for blk in range(n_blocks):
            bval = bias[blk] if has_bias else 0.0
            for p in range(bands[b], bands[b + 1]):
                ph = blk * n_phases + uload(pos_phase, p)
                lo = uload(tap_ptr, ph)
                hi = uload(tap_ptr, ph + 1)
                base = uload(pos_base, p)
                r = (blk * n_pos + p) * n
                if uload(pos_inner, p) != 0:
                    for c0 in range(0, n_main, main_w):
                        acc = _taps_main(lo, hi, delta, w, x, base, n, c0, main)
                        vstore(y, r + c0, _epilogue(acc, has_bias, bval, relu))
                    for c0 in range(n_main, n, tail_w):
                        rem = min(tail_w, n - c0)
                        acc = _taps_tail(lo, hi, delta, w, x, base, n, c0, rem, tail)
                        vstore_masked(y, r + c0, _epilogue(acc, has_bias, bval, relu), rem)
                else:
                    a0 = uload(pos_start, 3 * p)
                    a1 = uload(pos_start, 3 * p + 1)
                    a2 = uload(pos_start, 3 * p + 2)
                    for c0 in range(0, n_main, main_w):
                        acc = _taps_checked(lo, hi, delta, off, w, x, base, a0, a1, a2, s0, s1, s2, n, c0, -1,
                                            main)
                        vstore(y, r + c0, _epilogue(acc, has_bias, bval, relu))
                    for c0 in range(n_main, n, tail_w):
                        rem = min(tail_w, n - c0)
                        acc = _taps_checked(lo, hi, delta, off, w, x, base, a0, a1, a2, s0, s1, s2, n, c0, rem,
                                            tail)
                        vstore_masked(y, r + c0, _epilogue(acc, has_bias, bval, relu), rem)


@_jit(inline="always")
def _grad_chunk(p0, p1, blk, n_pos, dt, t, off, pos_base, pos_start, pos_inner, s0, s1, s2, x, d, n, c0, rem,
                like):
    """``sum_p d[blk * P + p] . x[pos_base[p] + dt]`` over positions ``[p0, p1)`` where tap ``t``
    lands inside the source, the chunk at ``c0`` (masked when ``rem >= 0``)."""
    acc0 = like
    acc1 = like
    p = p0
    while p < p1:
        if p + 1 < p1 and uload(pos_inner, p) != 0 and uload(pos_inner, p + 1) != 0:
            r0 = (blk * n_pos + p) * n + c0
            x0 = (uload(pos_base, p) + dt) * n + c0
            x1 = (uload(pos_base, p + 1) + dt) * n + c0
            if rem < 0:
                acc0 = vfma_vv(acc0, vload(d, r0, like), vload(x, x0, like))
                acc1 = vfma_vv(acc1, vload(d, r0 + n, like), vload(x, x1, like))
            else:
                acc0 = vfma_vv(acc0, vload_masked(d, r0, rem, like), vload_masked(x, x0, rem, like))
                acc1 = vfma_vv(acc1, vload_masked(d, r0 + n, rem, like), vload_masked(x, x1, rem, like))
            p += 2
            continue
        if uload(pos_inner, p) != 0 or _tap_valid(off, t, uload(pos_start, 3 * p), uload(pos_start, 3 * p + 1),
                                             uload(pos_start, 3 * p + 2), s0, s1, s2):
            r0 = (blk * n_pos + p) * n + c0
            x0 = (uload(pos_base, p) + dt) * n + c0
            if rem < 0:
                acc0 = vfma_vv(acc0, vload(d, r0, like), vload(x, x0, like))
            else:
                acc0 = vfma_vv(acc0, vload_masked(d, r0, rem, like), vload_masked(x, x0, rem, like))
        p += 1
    return vsum(vadd(acc0, acc1))


@_jit(parallel=True, nogil=True)
def taps_grad(x, d, out, tap_ptr, delta, off, pos_base, pos_start, pos_inner, sizes, bands, part_ptr, n_blocks):
    """Kernel gradient over tap lists: ``out[part * T + t] += sum_p d[row(t, p)] . x[pos_base[p] + delta[t]]``.

    The tables are those of :func:`taps_bands` with one phase (a convolution's forward). For
    each band of positions and row block, each tap's dot products over the band accumulate in
    registers and are summed across lanes once per tap and band.

    Parameters
    ----------
    x : ndarray of shape (k, n), C-contiguous
    d : ndarray of shape (n_blocks * P, n), C-contiguous, ``x``'s dtype
    out : ndarray of shape (n_parts * T,), float64
        Added to; part ``i`` adds into ``out[i * T:(i + 1) * T]`` (the caller sums the parts).
    tap_ptr, delta, off, pos_base, pos_start, pos_inner, sizes
        As for :func:`taps_bands` (``tap_ptr`` of shape ``(n_blocks + 1,)``).
    bands : ndarray of shape (n_bands + 1,), int64
    part_ptr : ndarray of shape (n_parts + 1,), int64
        Band bounds of each parallel task.
    n_blocks : int
    """
    n = x.shape[1]
    n_pos = pos_base.size
    n_taps = delta.size
    main = vzero(x, MAIN_BYTES)
    tail = vzero(x, TAIL_BYTES)
    main_w = MAIN_BYTES // x.itemsize
    tail_w = TAIL_BYTES // x.itemsize
    n_main = n - n % main_w
    s0 = sizes[0]
    s1 = sizes[1]
    s2 = sizes[2]
    for part in prange(part_ptr.size - 1):
        base = part * n_taps
        for b in range(part_ptr[part], part_ptr[part + 1]):
            p0 = bands[b]
            p1 = bands[b + 1]
            for blk in range(n_blocks):
                for t in range(uload(tap_ptr, blk), uload(tap_ptr, blk + 1)):
                    dt = uload(delta, t)
                    total = 0.0
                    for c0 in range(0, n_main, main_w):
                        total += _grad_chunk(p0, p1, blk, n_pos, dt, t, off, pos_base, pos_start, pos_inner, s0,
                                             s1, s2, x, d, n, c0, -1, main)
                    for c0 in range(n_main, n, tail_w):
                        total += _grad_chunk(p0, p1, blk, n_pos, dt, t, off, pos_base, pos_start, pos_inner, s0,
                                             s1, s2, x, d, n, c0, min(tail_w, n - c0), tail)
                    uadd(out, base + t, total)


# ---------------------------------------------------------------------- layout
#: Side of the square tiles :func:`transpose_into` moves: a 32 x 32 tile of float64 is 8 KiB,
#: so a source tile and a destination tile stay in L1 while their rows are swapped.
TILE = 32


@_jit(parallel=True, nogil=True)
def transpose_into(src, dst):
    """``dst[j, i] = src[i, j]`` tile by tile, the tiles spread over threads.

    numpy's copy of a transposed view walks one side with a stride of a whole row, so that
    one cache line is fetched per element: 7 ms for a (65536, 32) float32 block here; tiles
    keep both sides' lines in L1 while they are used.

    Parameters
    ----------
    src : ndarray of shape (R, C), C-contiguous
    dst : ndarray of shape (C, R), C-contiguous; every element is written.
    """
    n_r, n_c = src.shape
    t_r = (n_r + TILE - 1) // TILE
    t_c = (n_c + TILE - 1) // TILE
    for t in prange(t_r * t_c):
        i0 = (t // t_c) * TILE
        j0 = (t % t_c) * TILE
        i1 = min(i0 + TILE, n_r)
        j1 = min(j0 + TILE, n_c)
        for j in range(j0, j1):
            for i in range(i0, i1):
                dst[j, i] = src[i, j]


# ---------------------------------------------------------------------- element-wise passes
# The activations' derivatives and the per-channel affine maps of a network's column blocks,
# each one serial pass (the blocks of a small network are a few hundred KiB to a few MiB:
# handing them to the thread pool cost more than it saved). Written as plain loops that LLVM
# vectorises; no fast-math, so every product and difference is rounded as numpy rounds it and
# the stored values are bit for bit numpy's. Sums accumulate in float64, one accumulator per
# column (a vectorisable order, fixed whatever the machine).
@_jit(nogil=True)
def tanh_grad_into(d, a, out, one):
    """``out = d * (one - a * a)`` element-wise (the derivative of tanh through its output).

    Parameters
    ----------
    d, a : ndarray of shape (size,), one float dtype
    out : ndarray of shape (size,), that dtype; may be ``d``.
    one : scalar of that dtype
        1, typed so that the arithmetic stays in the arrays' dtype.
    """
    for i in range(out.size):
        ai = a[i]
        out[i] = d[i] * (one - ai * ai)


@_jit(nogil=True)
def sigmoid_grad_into(d, a, out, one):
    """``out = d * ((one - a) * a)`` element-wise (the derivative of the logistic function).

    Parameters
    ----------
    d, a : ndarray of shape (size,), one float dtype
    out : ndarray of shape (size,), that dtype; may be ``d``.
    one : scalar of that dtype
    """
    for i in range(out.size):
        ai = a[i]
        out[i] = d[i] * ((one - ai) * ai)


@_jit(inline="always")
def _lane_total(acc):
    """The per-column accumulators of a channel added in column order (float64)."""
    total = 0.0
    for col in range(acc.size):
        total += acc[col]
    return total


@_jit(nogil=True)
def channel_affine_into(z, scale, shift, out):
    """``out[r] = z[r] * scale[c] + shift[c]`` for the rows ``r`` of channel ``c``.

    Parameters
    ----------
    z : ndarray of shape (C * P, N), C-contiguous
        A column block whose rows are ``C`` runs of ``P`` positions.
    scale, shift : ndarray of shape (C,), ``z``'s dtype
    out : ndarray of shape (C * P, N), C-contiguous, ``z``'s dtype; may be ``z``.
    """
    n_rows, n = z.shape
    per = n_rows // scale.size
    for c in range(scale.size):
        s = scale[c]
        b = shift[c]
        for r in range(c * per, (c + 1) * per):
            for j in range(n):
                out[r, j] = z[r, j] * s + b


@_jit(nogil=True)
def channel_affine_grad_into(d, z, scale, out, dscale, dshift, acc_s, acc_b):
    """The backward of :func:`channel_affine_into` in one pass over ``d`` and ``z``.

    ``out[r] = d[r] * scale[c]``, ``dscale[c] = sum(d * z)`` and ``dshift[c] = sum(d)`` over the
    rows of channel ``c`` and all columns; the sums in float64 (products of two float32 values
    are exact there), one accumulator per column, the columns' sums added in order.

    Parameters
    ----------
    d, z : ndarray of shape (C * P, N), C-contiguous, one float dtype
    scale : ndarray of shape (C,), that dtype
    out : ndarray of shape (C * P, N), C-contiguous, that dtype; may be ``d``.
    dscale, dshift : ndarray of shape (C,), float64
        Overwritten.
    acc_s, acc_b : ndarray of shape (N,), float64
        Scratch.
    """
    n_rows, n = d.shape
    per = n_rows // scale.size
    for c in range(scale.size):
        s = scale[c]
        acc_s[:] = 0.0
        acc_b[:] = 0.0
        for r in range(c * per, (c + 1) * per):
            for j in range(n):
                v = d[r, j]
                acc_s[j] += np.float64(v) * np.float64(z[r, j])
                acc_b[j] += v
                out[r, j] = v * s
        dscale[c] = _lane_total(acc_s)
        dshift[c] = _lane_total(acc_b)


@_jit(nogil=True)
def channel_sums_into(d, sums, acc):
    """``sums[c] = sum(d[rows of channel c])`` in float64 (a convolution's bias gradient).

    Parameters
    ----------
    d : ndarray of shape (C * P, N), C-contiguous
    sums : ndarray of shape (C,), float64
        Overwritten.
    acc : ndarray of shape (N,), float64
        Scratch.
    """
    n_rows, n = d.shape
    per = n_rows // sums.size
    for c in range(sums.size):
        acc[:] = 0.0
        for r in range(c * per, (c + 1) * per):
            for j in range(n):
                acc[j] += d[r, j]
        sums[c] = _lane_total(acc)


@_jit(nogil=True)
def window_affine_into(x, h, w, kh, kw, sh, sw, scale, shift, down, y):
    """Sums of 2-D windows per channel, then a per-channel scale and shift (LeNet-5's sub-sampling).

    ``down[c, i, j] = sum_{a < kh, b < kw} x[c, i * sh + a, j * sw + b]`` (added in that order,
    starting from zero) and ``y = down * scale[c] + shift[c]``, on column blocks whose rows are
    ``(c, row, column)`` in C order.

    Parameters
    ----------
    x : ndarray of shape (C * h * w, N), C-contiguous
    h, w, kh, kw, sh, sw : int
        Input plane, window and stride (no padding: every window lies inside the plane).
    scale, shift : ndarray of shape (C,), ``x``'s dtype
    down, y : ndarray of shape (C * ho * wo, N), C-contiguous, ``x``'s dtype
        Overwritten (``ho = (h - kh) // sh + 1``, ``wo`` likewise).
    """
    n = x.shape[1]
    n_ch = scale.size
    ho = (h - kh) // sh + 1
    wo = (w - kw) // sw + 1
    for c in range(n_ch):
        s = scale[c]
        t = shift[c]
        for i in range(ho):
            for j in range(wo):
                r = (c * ho + i) * wo + j
                for col in range(n):
                    down[r, col] = 0
                for a in range(kh):
                    base = (c * h + i * sh + a) * w + j * sw
                    for b in range(kw):
                        for col in range(n):
                            down[r, col] += x[base + b, col]
                for col in range(n):
                    y[r, col] = down[r, col] * s + t


@_jit(nogil=True)
def window_affine_grad_into(d, down, h, w, kh, kw, sh, sw, scale, dx, dscale, dshift, acc_s, acc_b, input_grad):
    """The backward of :func:`window_affine_into` in one pass over ``d`` and ``down``.

    ``dscale[c] = sum(d * down)`` and ``dshift[c] = sum(d)`` over channel ``c``'s rows and all
    columns (float64, one accumulator per column); with ``input_grad``, ``dx`` is zeroed and
    every window's input rows get ``d * scale[c]`` added (inputs outside every window stay
    zero; where windows overlap the contributions add in window order).

    Parameters
    ----------
    d, down : ndarray of shape (C * ho * wo, N), C-contiguous, one float dtype
    h, w, kh, kw, sh, sw : int
    scale : ndarray of shape (C,), that dtype
    dx : ndarray of shape (C * h * w, N), C-contiguous, that dtype
        Overwritten when ``input_grad``.
    dscale, dshift : ndarray of shape (C,), float64
        Overwritten.
    acc_s, acc_b : ndarray of shape (N,), float64
        Scratch.
    input_grad : bool
    """
    n = d.shape[1]
    n_ch = scale.size
    ho = (h - kh) // sh + 1
    wo = (w - kw) // sw + 1
    if input_grad:
        dx[:] = 0
    for c in range(n_ch):
        s = scale[c]
        acc_s[:] = 0.0
        acc_b[:] = 0.0
        for i in range(ho):
            for j in range(wo):
                r = (c * ho + i) * wo + j
                for col in range(n):
                    v = d[r, col]
                    acc_s[col] += np.float64(v) * np.float64(down[r, col])
                    acc_b[col] += v
                if input_grad:
                    for a in range(kh):
                        base = (c * h + i * sh + a) * w + j * sw
                        for b in range(kw):
                            for col in range(n):
                                dx[base + b, col] += d[r, col] * s
        dscale[c] = _lane_total(acc_s)
        dshift[c] = _lane_total(acc_b)


# ---------------------------------------------------------------------- stencil kernels
@_jit(nogil=True)
def shift_pad(src, dst, lo_h, lo_w):
    """``dst[s, i, j] = src[s, i - lo_h, j - lo_w]`` where that is inside ``src``, else 0.

    Parameters
    ----------
    src : ndarray of shape (S, H, W)
    dst : ndarray of shape (S, Hd, Wd), C-contiguous; every element is written.
    lo_h, lo_w : int
        Shift (negative: crop).
    """
    n_s, h, w = src.shape
    hd, wd = dst.shape[1], dst.shape[2]
    j0 = max(0, lo_w)
    j1 = min(wd, w + lo_w)
    for s in range(n_s):
        for i in range(hd):
            si = i - lo_h
            if si < 0 or si >= h or j1 <= j0:
                dst[s, i, :] = 0
                continue
            dst[s, i, :j0] = 0
            dst[s, i, j0:j1] = src[s, si, j0 - lo_w:j1 - lo_w]
            dst[s, i, j1:] = 0


@_jit(parallel=True, nogil=True)
def stencil_forward(src, kern, out, groups, dil_h, dil_w, n_bands):
    """Grouped stride-1 correlation of zero-padded planes: one output row chunk in registers.

    ``out[t, i, j] = sum_{s, a, b} kern[t, s, a, b] * src[g(t) * S_g + s, i + a * dil_h, j + b * dil_w]``
    with ``g(t) = t // (T // groups)``.

    Parameters
    ----------
    src : ndarray of shape (S, Hs, Ws), C-contiguous (already padded)
    kern : ndarray of shape (T, S // groups, kh, kw), C-contiguous
    out : ndarray of shape (T, Ho, Wo), C-contiguous, with ``Hs >= Ho + (kh - 1) * dil_h`` and
        ``Ws >= Wo + (kw - 1) * dil_w``; every element is written.
    groups, dil_h, dil_w : int
    n_bands : int
        Parallel tasks: runs of output rows (every target plane inside each).
    """
    n_t, ho, wo = out.shape
    s_g, kh, kw = kern.shape[1], kern.shape[2], kern.shape[3]
    hs, ws = src.shape[1], src.shape[2]
    t_g = n_t // groups
    main = vzero(src, MAIN_BYTES)
    tail = vzero(src, TAIL_BYTES)
    main_w = MAIN_BYTES // src.itemsize
    tail_w = TAIL_BYTES // src.itemsize
    n_main = wo - wo % main_w
    for band in prange(n_bands):
        for t in range(n_t):
            s0 = (t // t_g) * s_g
            for i in range(band * ho // n_bands, (band + 1) * ho // n_bands):
                for j0 in range(0, n_main, main_w):
                    acc0 = main
                    acc1 = main
                    for s in range(s_g):
                        for a in range(kh):
                            row = ((s0 + s) * hs + i + a * dil_h) * ws + j0
                            kbase = ((t * s_g + s) * kh + a) * kw
                            b = 0
                            while b + 1 < kw:
                                acc0 = vfma(acc0, uload(kern, kbase + b), vload(src, row + b * dil_w, main))
                                acc1 = vfma(acc1, uload(kern, kbase + b + 1),
                                            vload(src, row + (b + 1) * dil_w, main))
                                b += 2
                            if b < kw:
                                acc0 = vfma(acc0, uload(kern, kbase + b), vload(src, row + b * dil_w, main))
                    vstore(out, (t * ho + i) * wo + j0, vadd(acc0, acc1))
                for j0 in range(n_main, wo, tail_w):
                    rem = min(tail_w, wo - j0)
                    acc = tail
                    for s in range(s_g):
                        for a in range(kh):
                            row = ((s0 + s) * hs + i + a * dil_h) * ws + j0
                            kbase = ((t * s_g + s) * kh + a) * kw
                            for b in range(kw):
                                acc = vfma(acc, uload(kern, kbase + b), vload_masked(src, row + b * dil_w, rem, tail))
                    vstore_masked(out, (t * ho + i) * wo + j0, acc, rem)


@_jit(parallel=True, nogil=True)
def stencil_grad(src, dout, grad, s_g, kh, kw, groups, dil_h, dil_w):
    """Kernel gradient of :func:`stencil_forward`: ``grad[t, s, a, b] += sum_{i, j} dout[t, i, j] *
    src[g(t) * S_g + s, i + a * dil_h, j + b * dil_w]``.

    Parameters
    ----------
    src : ndarray of shape (S, Hs, Ws), C-contiguous (padded)
    dout : ndarray of shape (T, Ho, Wo), C-contiguous
    s_g, kh, kw : int
        Kernel shape ``(T, s_g, kh, kw)``.
    grad : ndarray of shape (T * (S // groups) * kh * kw,), float64
        The gradient of ``kern`` flattened; added to.
    groups, dil_h, dil_w : int
    """
    n_t, ho, wo = dout.shape
    hs, ws = src.shape[1], src.shape[2]
    t_g = n_t // groups
    main = vzero(src, MAIN_BYTES)
    tail = vzero(src, TAIL_BYTES)
    main_w = MAIN_BYTES // src.itemsize
    tail_w = TAIL_BYTES // src.itemsize
    n_main = wo - wo % main_w
    n_taps = n_t * s_g * kh * kw
    for tap in prange(n_taps):
        b = tap % kw
        a = (tap // kw) % kh
        s = (tap // (kw * kh)) % s_g
        t = tap // (kw * kh * s_g)
        s_abs = (t // t_g) * s_g + s
        acc0 = main
        acc1 = tail
        for i in range(ho):
            row = (s_abs * hs + i + a * dil_h) * ws + b * dil_w
            drow = (t * ho + i) * wo
            for j0 in range(0, n_main, main_w):
                acc0 = vfma_vv(acc0, vload(dout, drow + j0, main), vload(src, row + j0, main))
            for j0 in range(n_main, wo, tail_w):
                rem = min(tail_w, wo - j0)
                acc1 = vfma_vv(acc1, vload_masked(dout, drow + j0, rem, tail), vload_masked(src, row + j0, rem, tail))
        uadd(grad, tap, vsum(acc0) + vsum(acc1))
