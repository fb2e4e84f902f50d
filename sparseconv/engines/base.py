"""The engine protocol: what a product engine is built from, and what it must provide.

An operator owns one :class:`Structure` (geometry, dtype, weight mask, the weight itself and
lazily built, cached pattern data) and one engine per product it has run. An engine is a
:class:`Engine` subclass constructed from the structure; it computes

- ``matmat(X, threads)``: ``W @ X`` for column blocks ``X`` of shape ``(in_size, N)``,
- ``rmatmat(D, threads)``: ``W.T @ D`` for ``D`` of shape ``(out_size, N)``,
- ``weight_grad(X, D, threads)``: the kernel gradient, shape ``weight_shape``,

refreshes what it derived from the weight in ``refresh(weight)``, reports the bytes it holds
in ``nbytes`` and, before it builds anything, what it would build in ``estimate_nbytes``, so
that the memory budget refuses *before* allocating. ``applicable(structure, product)`` says
whether it can run a structure at all (the policy never picks an engine that cannot).
"""

from __future__ import annotations

import math
import os
import re
import threading
import weakref
from typing import ClassVar, Optional

import numpy as np
import scipy.sparse as sp

from ..factored import AdjointTables, adjoint_plan, adjoint_tables, forward_table
from ..geometry import ConvGeometry, parse_memory_budget
from ..pattern import (MemoryBudgetError, TiedPattern, ValueLayout, build_pattern, count_items, format_bytes,
                       pattern_nbytes, spatial_pattern, value_layout)

__all__ = ["ALIGNMENT", "PRODUCTS", "Structure", "Engine", "KernelEngine", "GuardedMatrix", "MatrixModifiedError",
           "aligned_empty", "bias_relu_inplace", "bias_values", "freeze", "is_aligned", "nonzero_outside",
           "release_blocks"]

#: The products every engine implements, by the names used everywhere (operator keywords,
#: ``op.engine(product)``, the benchmark).
PRODUCTS = ("forward", "adjoint", "weight_grad")


#: Bytes to which the compiled engines align the blocks they read and write: one cache line
#: and one AVX-512 register. numpy's large arrays start 16 bytes past a page boundary, so
#: every 64-byte row chunk of such a block straddles two cache lines: the 64->64 3x3 32x32
#: layer's forward at 90% zeros took 4.6-4.8 ms from such a block against 2.7 ms aligned.
ALIGNMENT = 64


#: Blocks smaller than this are allocated directly: malloc serves them from its heap without
#: fresh pages, and the cache's bookkeeping would cost more than it saves.
CACHE_MIN_BYTES = 1 << 16


class _BlockOwner:
    """The ``base`` of a cached block, and what ties the block's buffer to its lifetime.

    numpy stops a view's chain of bases at the first base that is not an ndarray: every view
    of the block (slices, transposes, ``frombuffer``, memoryviews, ``torch.from_numpy``)
    refers to the block, the block to this owner, and the owner to the byte buffer. So the
    owner dies exactly when nothing refers to the block any more, and its finalizer gives the
    buffer back to the cache -- no reliance on reference counts, whose values CPython does
    not promise (3.14 loads locals without taking references).
    """

    __slots__ = ("raw", "__array_interface__", "__weakref__")

    def __init__(self, raw: np.ndarray, address: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.raw = raw
        self.__array_interface__ = {"version": 3, "shape": shape, "typestr": dtype.str, "data": (address, False)}


def _parse_cache_limit(env: str) -> int:
    """``SPARSECONV_BLOCK_CACHE``: a size as memory budgets are written, or zero in any unit."""
    if re.fullmatch(r"\s*0*(\.0*)?\s*[A-Za-z]*\s*", env) and re.search(r"\d", env):
        return 0
    return parse_memory_budget(env, "SPARSECONV_BLOCK_CACHE")


class _BlockCache:
    """Byte buffers of released blocks, reused by :func:`aligned_empty` for blocks of the same size.

    Why: a network's products and element-wise passes allocate their outputs afresh at every
    call, a few MiB per training step, and glibc serves such sizes with fresh pages from the
    kernel once it has trimmed its heap -- every page is then zeroed and faulted in on first
    touch. A 90%-pruned LeNet-5 training step here took 6.5-7.1 ms with about 1150 page faults
    against 5.0-5.4 ms with none (the same step with glibc's trimming disabled). A block's
    buffer comes back only when nothing refers to the block any more (see
    :class:`_BlockOwner`), so a block the caller still holds, or any view of it, is never
    handed out twice.

    The lifecycle costs about 3 us per block (an owner, a weak reference whose callback gives
    the buffer back, the bookkeeping).

    The cache keeps at most :meth:`limit` bytes of released buffers (``SPARSECONV_BLOCK_CACHE``,
    bytes or a size such as ``"64MiB"``; default 256 MiB; 0 turns it off), dropping the
    oldest ones past that. Blocks in use are the caller's memory, not counted.
    """

    DEFAULT_LIMIT = 256 << 20

    def __init__(self) -> None:
        # Reentrant: a finalizer giving a buffer back may run (garbage collection) in a thread
        # that holds the lock already.
        self._lock = threading.RLock()
        self._free: dict[int, list[tuple[np.ndarray, int]]] = {}
        # Blocks in use: the weak reference to each one's owner -> its buffer, address and size.
        self._in_use: dict[weakref.ref, tuple[np.ndarray, int, int]] = {}
        self._bytes = 0
        self._limit: Optional[int] = None

    def limit(self) -> int:
        """The capacity in bytes (the environment is read at the first use)."""
        with self._lock:
            if self._limit is None:
                env = os.environ.get("SPARSECONV_BLOCK_CACHE")
                self._limit = self.DEFAULT_LIMIT if env is None else _parse_cache_limit(env)
            return self._limit

    @property
    def nbytes(self) -> int:
        """Bytes of the released buffers the cache keeps."""
        return self._bytes

    def block(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised aligned C-contiguous array, on a released buffer when one fits."""
        size = math.prod(shape) * dtype.itemsize + ALIGNMENT
        limit = self._limit if self._limit is not None else self.limit()
        if size < CACHE_MIN_BYTES or limit == 0 or dtype.fields is not None or dtype.subdtype is not None:
            raw = np.empty(size, dtype=np.uint8)
            # np.ndarray with an offset moves the data pointer even for zero elements.
            return np.ndarray(shape, dtype=dtype, buffer=raw, offset=-raw.ctypes.data % ALIGNMENT)
        with self._lock:
            bucket = self._free.get(size)
            found = bucket.pop() if bucket else None
            if found is not None:
                self._bytes -= size
        raw, address = found if found is not None else (None, 0)
        if raw is None:
            raw = np.empty(size, dtype=np.uint8)
            address = raw.__array_interface__["data"][0]
        owner = _BlockOwner(raw, address + (-address % ALIGNMENT), shape, dtype)
        block = np.asarray(owner)
        with self._lock:
            self._in_use[weakref.ref(owner, self._released)] = (raw, address, size)
        return block

    def _released(self, ref: weakref.ref) -> None:
        """Weak-reference callback: a block's owner died; keep its buffer, dropping the oldest
        released ones if the capacity is exceeded."""
        with self._lock:
            found = self._in_use.pop(ref, None)
            if found is None:
                return
            raw, address, size = found
            limit = self._limit if self._limit is not None else self.DEFAULT_LIMIT
            if size > limit:
                return
            if self._bytes + size > limit:
                for other, bucket in list(self._free.items()):
                    while bucket and self._bytes + size > limit:
                        bucket.pop(0)
                        self._bytes -= other
                    if not bucket:
                        del self._free[other]
            self._free.setdefault(size, []).append((raw, address))
            self._bytes += size

    def clear(self, limit: Optional[int] = None) -> None:
        """Forget the released buffers (blocks in use stay valid and come back when released);
        with ``limit``, also set the capacity (None: re-read the environment at the next use)."""
        with self._lock:
            self._free.clear()
            self._bytes = 0
            self._limit = limit


_block_cache = _BlockCache()


def release_blocks(limit: Optional[int] = None) -> None:
    """Release the buffers :func:`aligned_empty` keeps for reuse (see :class:`_BlockCache`).

    Parameters
    ----------
    limit : int, optional
        New capacity in bytes (0: no caching from now on). Default: ``SPARSECONV_BLOCK_CACHE``,
        else 256 MiB.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))):
        raise TypeError(f"limit must be a non-negative int (bytes) or None; got {limit!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be a non-negative int (bytes) or None; got {limit!r}")
    _block_cache.clear(None if limit is None else int(limit))


def aligned_empty(shape: tuple[int, ...], dtype: object) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of :data:`ALIGNMENT`.

    Blocks of at least :data:`CACHE_MIN_BYTES` reuse the buffer of a released block of the same
    size when there is one (see :func:`release_blocks`): no fresh pages to fault in.

    Parameters
    ----------
    shape : tuple of int
    dtype : dtype

    Returns
    -------
    ndarray
        Its ``base`` is the object that keeps the buffer (a cached block's :class:`_BlockOwner`,
        else a slightly larger byte array).
    """
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    return _block_cache.block(tuple(int(v) for v in shape), dtype)


def is_aligned(a: np.ndarray) -> bool:
    """Whether ``a``'s data starts at a multiple of :data:`ALIGNMENT` bytes."""
    return a.ctypes.data % ALIGNMENT == 0


def nonzero_outside(values: np.ndarray, kept: np.ndarray) -> bool:
    """Whether ``values`` has a non-zero (or NaN) entry at a flat index not in ``kept``.

    Counted as "more non-zeros in all of ``values`` than among the kept ones": one vectorised
    comparison and count plus a gather of the kept entries. Indexing with the inverted boolean
    mask instead took 100-115 us on a 120x16x5x5 kernel at 90% zeros (a branch per element),
    this 10 us (``np.count_nonzero`` of the floats themselves alone took 30 us: counting the
    booleans of ``values != 0`` is vectorised, counting floats is not).

    Parameters
    ----------
    values : ndarray
    kept : ndarray of int
        Distinct flat indices into ``values``.
    """
    flat = values.reshape(-1)
    return bool(np.count_nonzero(flat != 0) != np.count_nonzero(flat[kept] != 0))


def bias_values(bias: Optional[np.ndarray], channels: int, dtype: np.dtype) -> Optional[np.ndarray]:
    """A fused product's bias checked and in the product's ``dtype`` (never rounded), or None.

    Parameters
    ----------
    bias : array_like of shape (channels,), or None
    channels : int
        Output channels (row blocks) of the product.
    dtype : dtype
        The dtype the product computes in.

    Raises
    ------
    ValueError
        For a bias of another shape.
    TypeError
        For a bias that is not floating, or would be rounded in ``dtype`` (a float64 bias on a
        float32 product).
    """
    if bias is None:
        return None
    b = np.asarray(bias)
    if b.shape != (channels,):
        raise ValueError(f"bias must have shape ({channels},); got {b.shape}")
    if b.dtype.kind != "f" or not np.can_cast(b.dtype, dtype, "safe"):
        raise TypeError(f"bias must be a floating array that converts to the product's {np.dtype(dtype)} without "
                        f"rounding; got {b.dtype}")
    return b.astype(dtype, copy=False)


def bias_relu_inplace(Y: np.ndarray, bias: Optional[np.ndarray], relu: bool) -> np.ndarray:
    """``Y`` (a fresh ``(channels * positions, N)`` block) plus ``bias[c]`` on every row of
    channel ``c``, then through ``max(., 0)`` if ``relu``, in place; returns ``Y``.

    Two passes over ``Y`` where the compiled engines' fused store makes none; the same bits
    (``np.maximum`` turns -0.0 into +0.0 and keeps NaN, as the fused store does).
    """
    if bias is not None:
        view = np.reshape(Y, (bias.size, Y.shape[0] // bias.size, Y.shape[1]), copy=False)
        view += bias[:, None, None]
    if relu:
        np.maximum(Y, 0, out=Y)
    return Y


def freeze(array: np.ndarray) -> np.ndarray:
    """Make ``array`` read-only and return a view of it that cannot be made writeable again.

    numpy lets the owner of a buffer flip its ``writeable`` flag back, but not a view of a
    read-only owner: the view is what leaves the package.
    """
    array.flags.writeable = False
    return array[...]


class MatrixModifiedError(ValueError):
    """The public ``op.matrix`` no longer has the arrays the operator gave it."""


class GuardedMatrix:
    """A CSR matrix whose values the package writes and whose public face users cannot corrupt.

    The value array is owned privately; the package writes it through a private writeable
    view, the products read a private ``csr_array``, and :meth:`public` hands out a second
    ``csr_array`` over read-only views of the same buffers (no copy). In-place edits of the
    public arrays raise numpy's read-only error; scipy methods that restructure the matrix
    (``eliminate_zeros``, ``sort_indices`` on unsorted flags) fail the same way; replacing its
    arrays (``setdiag``, ``resize``, assignment) is detected by :meth:`check`, which the
    operator calls before writing new values, so nothing is written into a structure the
    public matrix no longer has.

    Parameters
    ----------
    values : ndarray of shape (nnz,)
        Contiguous; becomes owned by this object.
    indices, indptr : ndarray
        Read-only CSR index arrays.
    shape : (int, int)
    """

    def __init__(self, values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]):
        self.writer = values.view()
        self._values = values
        values.flags.writeable = False
        self.private = sp.csr_array((values, indices, indptr), shape=shape)
        self._public: Optional[sp.csr_array] = None
        self._public_arrays: tuple[np.ndarray, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of the values (the index arrays belong to the structure)."""
        return int(self._values.nbytes)

    def public(self) -> sp.csr_array:
        """The matrix users see: same buffers, read-only."""
        if self._public is None:
            p = self.private
            self._public = sp.csr_array((p.data[...], p.indices[...], p.indptr[...]), shape=p.shape)
            self._public.has_sorted_indices = True
            self._public_arrays = (self._public.indptr, self._public.indices, self._public.data)
        else:
            self.check()
        return self._public

    def check(self) -> None:
        """Raise :class:`MatrixModifiedError` if the public matrix's arrays were replaced."""
        m = self._public
        if m is None:
            return
        if (type(m) is not sp.csr_array or m.shape != self.private.shape
                or any(a is not b for a, b in zip((m.indptr, m.indices, m.data), self._public_arrays))):
            raise MatrixModifiedError(
                "op.matrix was modified: its data/indices/indptr arrays were replaced (by setdiag, resize, "
                "item assignment or direct assignment), so it no longer shows the values this operator "
                "computes with. Edit a copy instead (op.matrix.copy()); call op.release_matrix() to detach "
                "the modified matrix (it keeps its values; op.matrix then returns a fresh one)")

    def detach(self) -> None:
        """Give the public matrix up: later writes go to a new value array it does not share."""
        if self._public is None:
            return
        values = self.private.data.copy()
        p = self.private
        self.__init__(values, p.indices, p.indptr, p.shape)

    def hand_over(self) -> sp.csr_array:
        """The matrix with writeable arrays, for a caller that takes it over (no copy).

        Only for an owner about to be discarded (``conv_matrix``): afterwards nothing guards
        the arrays.
        """
        arrays = []
        for a in (self.private.data, self.private.indices, self.private.indptr):
            owner = a
            while isinstance(owner.base, np.ndarray):
                owner = owner.base
            owner.flags.writeable = True
            a.flags.writeable = True
            arrays.append(a)
        return sp.csr_array(tuple(arrays), shape=self.private.shape)

    def __getstate__(self) -> dict:
        # Views would be copied as arrays of their own and lose their link to the values.
        p = self.private
        return {"values": np.array(self._values), "indices": p.indices, "indptr": p.indptr, "shape": p.shape}

    def __setstate__(self, state: dict) -> None:
        for name in ("indices", "indptr"):
            state[name].flags.writeable = False
        self.__init__(state["values"], state["indices"], state["indptr"], state["shape"])


class Structure:
    """Everything the engines of one convolution share: geometry, dtype, mask, weight, pattern data.

    The weight is held here once (engines read it; the CSR engine derives its value array
    from it). Pattern data is built on first request, each piece after the memory budget has
    been charged for it, and kept.

    Parameters
    ----------
    geometry : ConvGeometry
    dtype : dtype
        float32 or float64.
    weight_mask : ndarray of bool, shape ``weight_shape``, optional
        Copied; the copy is read-only.
    memory_budget : int or str, optional
        See :func:`sparseconv.geometry.parse_memory_budget`.

    Attributes
    ----------
    geometry : ConvGeometry
    dtype : numpy.dtype
    mask : ndarray of bool or None
        Read-only.
    weight : ndarray of shape ``weight_shape``
        The current weight (write it only through the operator's ``set_weight``).
    public_weight : ndarray of shape ``weight_shape``
        A read-only view of it that cannot be made writeable (what ``op.weight`` returns).
    spatial : SpatialPattern
        The tap-level pattern of one (filter, channel) pair (small: built at construction).
    memory_budget : int
    built_bytes : int
        Bytes charged so far for built pattern data and engine arrays.
    lock : threading.RLock
        Held while anything is built (by the operator around an engine's ``prepare``), so
        that concurrent first calls build once.
    """

    # Class default: structures pickled before the cache existed unpickle without it.
    _kept: Optional[np.ndarray] = None

    def __init__(self, geometry: ConvGeometry, dtype: np.dtype, *, weight_mask: Optional[np.ndarray] = None,
                 memory_budget: object = None) -> None:
        self.geometry = geometry
        self.dtype = np.dtype(dtype)
        self.memory_budget = parse_memory_budget(memory_budget)
        if weight_mask is None:
            self.mask = None
        else:
            mask = np.asarray(weight_mask)
            if mask.dtype != bool or mask.shape != geometry.weight_shape:
                raise ValueError(f"weight_mask must be a bool array of shape {geometry.weight_shape}; "
                                 f"got {mask.dtype} array of shape {mask.shape}")
            self.mask = freeze(mask.copy())
        self.spatial = spatial_pattern(geometry)
        self.lock = threading.RLock()
        self._set_weight_arrays(np.zeros(geometry.weight_shape, dtype=self.dtype))
        self.built_bytes = 0
        self._pattern: Optional[TiedPattern] = None
        self._layout: Optional[ValueLayout] = None
        self._forward_table: Optional[np.ndarray] = None
        self._adjoint_tables: Optional[AdjointTables] = None
        self._kept: Optional[np.ndarray] = None

    def _set_weight_arrays(self, owner: np.ndarray) -> None:
        # ``weight`` writes through a view taken before the owner is frozen; ``public_weight``
        # is a view of the frozen owner, which nobody can make writeable again.
        self.weight = owner.view()
        self.public_weight = freeze(owner)

    def __getstate__(self) -> dict:
        # The two weight views would be copied as separate arrays: keep the values only.
        state = dict(self.__dict__)
        state["weight"] = np.array(self.weight)
        del state["public_weight"], state["lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        owner = state.pop("weight")
        self.__dict__.update(state)
        self.lock = threading.RLock()
        self._set_weight_arrays(owner)
        # Unpickled arrays come back writable: the mask and the indices found from it stay read-only.
        for name in ("mask", "_kept"):
            if getattr(self, name, None) is not None:
                setattr(self, name, freeze(getattr(self, name)))

    # ------------------------------------------------------------------ shape facts
    @property
    def mask_fraction(self) -> float:
        """Fraction of weights present (1.0 without a mask)."""
        return 1.0 if self.mask is None else float(self.mask.mean())

    @property
    def nnz(self) -> int:
        """Stored entries of the CSR matrix (counted without building it when every entry is one weight)."""
        if self._pattern is None and self.spatial.single_tap:
            g = self.geometry
            per_tap = np.bincount(self.spatial.tap, minlength=int(np.prod(g.kernel_size)))
            if self.mask is None:
                return int(g.out_channels * (g.in_channels // g.groups) * self.spatial.n_items)
            return int((self.mask.reshape(g.out_channels, -1, per_tap.size) * per_tap).sum())
        return self.pattern().nnz

    @property
    def nnz_bound(self) -> int:
        """:attr:`nnz` where it is known without building anything, else an upper bound (for
        estimates made before the memory budget is charged)."""
        if self._pattern is not None or self.spatial.single_tap:
            return self.nnz
        return count_items(self.geometry, self.spatial, self.mask)

    def kernel(self, dtype: Optional[np.dtype] = None) -> np.ndarray:
        """The weight as ``(F, C // G, prod(kernel))``, in ``dtype`` (default the structure's)."""
        g = self.geometry
        k = self.weight.reshape(g.out_channels, g.in_channels // g.groups, -1)
        return k if dtype is None or np.dtype(dtype) == self.dtype else k.astype(dtype)

    def finish_grad(self, grad: np.ndarray) -> np.ndarray:
        """A kernel gradient in the weight's shape and dtype, zero at masked weights.

        With a mask, the kept entries are gathered into a zeroed array through indices found
        once: 1.1x (LeNet C3) to 5.5x (a 64x64x3x3 kernel at 90% zeros) faster than assigning
        through the inverted boolean mask.
        """
        shape = self.geometry.weight_shape
        if self.mask is None:
            return grad.reshape(shape).astype(self.dtype, copy=False)
        kept = self.kept_indices()
        flat = grad.reshape(-1)
        out = np.zeros(flat.size, dtype=self.dtype)
        out[kept] = flat[kept]
        return out.reshape(shape)

    def kept_indices(self) -> Optional[np.ndarray]:
        """Flat indices of the weights the mask keeps (found once, read-only), or None without a mask."""
        if self.mask is None:
            return None
        if self._kept is None:
            self._kept = freeze(np.flatnonzero(self.mask))
        return self._kept

    # ------------------------------------------------------------------ budget
    def reserve(self, nbytes: int, what: str) -> None:
        """Charge ``nbytes`` to the memory budget, or raise before anything is allocated.

        Raises
        ------
        MemoryBudgetError
            When the bytes built so far plus ``nbytes`` exceed the budget.
        """
        self.check_fits(nbytes, what)
        self.built_bytes += nbytes

    def check_fits(self, nbytes: int, what: str) -> None:
        """Raise as :meth:`reserve` would, charging nothing (for a build charged in several steps).

        Raises
        ------
        MemoryBudgetError
            When the bytes built so far plus ``nbytes`` exceed the budget.
        """
        if self.built_bytes + nbytes > self.memory_budget:
            already = f" on top of {format_bytes(self.built_bytes)} already built" if self.built_bytes else ""
            raise MemoryBudgetError(
                f"{what} of this convolution ({self.geometry.describe()}) would need {format_bytes(nbytes)}"
                f"{already} but the memory budget is {format_bytes(self.memory_budget)}; pass "
                f"memory_budget=<bytes, or a string such as '8GiB'> or set the SPARSECONV_MEMORY_BUDGET "
                f"environment variable to raise it, or pick an engine that needs less (engine=...)")

    # ------------------------------------------------------------------ cached pattern data
    def pattern_nbytes(self) -> int:
        """Bytes of the CSR matrix (values, indices, row pointers, tying map), 0 once built."""
        if self._pattern is not None:
            return 0
        return pattern_nbytes(self.geometry, self.spatial, self.mask, self.dtype)

    def pattern(self) -> TiedPattern:
        """The CSR structure and tying map (index arrays read-only), built at first call.

        The budget is charged for the whole matrix, values included (the CSR engine
        allocates them right after).
        """
        if self._pattern is None:
            self.reserve(self.pattern_nbytes(), "the sparse matrix")
            p = build_pattern(self.geometry, weight_mask=self.mask, value_dtype=self.dtype,
                              memory_budget=self.memory_budget, spatial=self.spatial)
            for array in (p.indptr, p.indices, p.param_index):
                if array is not None:
                    array.flags.writeable = False
            self._pattern = p
        return self._pattern

    def value_layout(self) -> Optional[ValueLayout]:
        """How a weight fills the CSR value array in strided broadcasts (None: gather instead)."""
        p = self.pattern()
        if self._layout is None and p.param_index is not None:
            self._layout = value_layout(self.geometry, p.indptr, p.param_index, uniform_filters=self.mask is None)
        return self._layout

    def forward_table_nbytes(self) -> int:
        """Bytes of :meth:`forward_table`, 0 once built."""
        if self._forward_table is not None:
            return 0
        return int(np.prod(self.geometry.out_size)) * int(np.prod(self.geometry.kernel_size)) * np.intp(0).itemsize

    def forward_table(self) -> np.ndarray:
        """The tap table, see :func:`sparseconv.factored.forward_table` (read-only)."""
        if self._forward_table is None:
            self.reserve(self.forward_table_nbytes(), "the tap table")
            self._forward_table = freeze(forward_table(self.geometry, self.spatial))
        return self._forward_table

    def adjoint_tables_nbytes(self) -> int:
        """Bytes of :meth:`adjoint_tables` (counted without building them), 0 once built."""
        if self._adjoint_tables is not None:
            return 0
        scatter, slots = adjoint_plan(self.geometry, self.spatial)
        return (int(np.prod(self.geometry.kernel_size)) if scatter else slots) * np.intp(0).itemsize

    def adjoint_tables(self) -> AdjointTables:
        """The factored adjoint's tables, see :func:`sparseconv.factored.adjoint_tables`."""
        if self._adjoint_tables is None:
            self.reserve(self.adjoint_tables_nbytes(), "the adjoint tap tables")
            self._adjoint_tables = adjoint_tables(self.geometry, self.spatial)
        return self._adjoint_tables


class Engine:
    """Base class of product engines (see the module docstring for the protocol).

    Subclasses set :attr:`name`, implement the three products and, if they build anything,
    :meth:`estimate_nbytes`, :meth:`prepare` and :attr:`nbytes`. Inputs are real arrays of
    the structure's dtype, or float64 for a float32 structure (an engine then computes in
    float64 with the float32 weight values, exactly; the operator's LinearOperator interface
    uses this so that no input is rounded). ``N`` may be anything from 1 up (the operator
    answers empty batches itself).

    Parameters
    ----------
    structure : Structure
    """

    name: ClassVar[str] = ""

    def __init__(self, structure: Structure) -> None:
        self.structure = structure

    @classmethod
    def applicable(cls, structure: Structure, product: str) -> bool:
        """Whether this engine can run ``product`` on ``structure`` at all."""
        return True

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """Why this engine cannot run anything here (a missing optional dependency), or None."""
        return None

    @classmethod
    def estimate_nbytes(cls, structure: Structure, product: str) -> int:
        """Bytes :meth:`prepare` would build for ``product`` (not counting what is built already)."""
        return 0

    def prepare(self, product: str) -> None:
        """Build what ``product`` needs, charging the memory budget first. Idempotent."""

    @property
    def nbytes(self) -> int:
        """Bytes this engine holds itself (pattern data shared in the structure not included)."""
        return 0

    def matmat(self, X: np.ndarray, threads: Optional[int]) -> np.ndarray:
        """``W @ X``: ``(in_size, N) -> (out_size, N)``."""
        raise NotImplementedError

    def rmatmat(self, D: np.ndarray, threads: Optional[int]) -> np.ndarray:
        """``W.T @ D``: ``(out_size, N) -> (in_size, N)``."""
        raise NotImplementedError

    def weight_grad(self, X: np.ndarray, D: np.ndarray, threads: Optional[int]) -> np.ndarray:
        """Kernel gradient of ``<D, W @ X>``: shape ``weight_shape``, zero at masked weights."""
        raise NotImplementedError

    def matmat_bias_relu(self, X: np.ndarray, threads: Optional[int], bias: Optional[np.ndarray],
                         relu: bool) -> np.ndarray:
        """``W @ X`` plus ``bias[c]`` on every row of output channel ``c``, then ``max(., 0)`` if ``relu``.

        This default runs :meth:`matmat` and then one in-place pass for each step; the
        compiled engines override it to do both as each row is stored (one pass over memory).
        Both give the same bits: each output is rounded after the sum, after the bias, and
        the maximum is exact (NaN stays NaN, as with ``np.maximum``).

        Parameters
        ----------
        X : ndarray of shape (in_size, N)
        threads : int or None
        bias : ndarray of shape (out_channels,), or None
            Floating, of a dtype that casts to the product's without loss.
        relu : bool

        Returns
        -------
        ndarray of shape (out_size, N)
        """
        bias = bias_values(bias, self.structure.geometry.out_channels, np.result_type(X.dtype, self.structure.dtype))
        return bias_relu_inplace(self.matmat(X, threads), bias, relu)

    def refresh(self, weight: np.ndarray) -> None:
        """The structure's weight now holds ``weight``: update anything derived from it."""

    def check(self) -> None:
        """Raise if something this engine handed out was changed so that a refresh would be unsafe."""


class KernelEngine(Engine):
    """An engine whose products run on a kernel object built by :meth:`prepare`.

    Subclasses implement :meth:`prepare` (build ``self.kernel`` on first use, charging the
    budget first; idempotent); the products, :attr:`nbytes` and :meth:`refresh` delegate to
    the kernel object, which has ``matmat``, ``rmatmat``, ``weight_grad``, ``refresh`` and
    ``nbytes`` of its own (the compiled engines' classes).

    Parameters
    ----------
    structure : Structure
    """

    #: Whether the kernel object's ``matmat`` takes ``bias`` and ``relu`` (a fused store).
    fused_epilogue: ClassVar[bool] = False

    def __init__(self, structure: Structure) -> None:
        super().__init__(structure)
        self.kernel: Optional[object] = None

    @property
    def nbytes(self) -> int:
        """Bytes the kernel object holds (0 before it is built)."""
        return 0 if self.kernel is None else int(self.kernel.nbytes)

    def matmat(self, X: np.ndarray, threads: Optional[int]) -> np.ndarray:
        """``W @ X`` on the kernel object."""
        self.prepare("forward")
        return self.kernel.matmat(X, threads)

    def rmatmat(self, D: np.ndarray, threads: Optional[int]) -> np.ndarray:
        """``W.T @ D`` on the kernel object."""
        self.prepare("adjoint")
        return self.kernel.rmatmat(D, threads)

    def matmat_bias_relu(self, X: np.ndarray, threads: Optional[int], bias: Optional[np.ndarray],
                         relu: bool) -> np.ndarray:
        """As :meth:`Engine.matmat_bias_relu`; in one pass where the kernel object's ``matmat``
        takes ``bias`` and ``relu`` (the numba and implicit engines)."""
        if not self.fused_epilogue:
            return super().matmat_bias_relu(X, threads, bias, relu)
        self.prepare("forward")
        return self.kernel.matmat(X, threads, bias=bias, relu=relu)

    def weight_grad(self, X: np.ndarray, D: np.ndarray, threads: Optional[int]) -> np.ndarray:
        """The kernel gradient on the kernel object, shaped and masked by the structure."""
        self.prepare("weight_grad")
        return self.structure.finish_grad(self.kernel.weight_grad(X, D, threads))

    def refresh(self, weight: np.ndarray) -> None:
        """New values for the kernel object, if it is built."""
        if self.kernel is not None:
            self.kernel.refresh(weight)
