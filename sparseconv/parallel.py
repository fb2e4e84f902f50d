"""Multi-threaded sparse-dense products: row blocks of a CSR matrix on a thread pool.

scipy's compiled CSR kernels release the GIL, so splitting the rows of ``A @ X`` into blocks
and running the blocks on Python threads uses every core with no extra memory: each block
is a *view* (a slice of ``indptr``, ``indices`` and ``data``) of the one matrix, so a value
update through ``matrix.data`` (``set_weight``) is seen by every block, and each block writes
its own rows of a preallocated output.

How many threads: the ``threads=`` keyword of each function, else the innermost
:func:`threads` context, else every core this process may run on. Nothing here changes a
process-wide setting (BLAS pools are left alone); the pool is private to this module.

Examples
--------
>>> import numpy as np, scipy.sparse as sp
>>> from sparseconv.parallel import csr_matmat, threads
>>> a = sp.random_array((1000, 500), density=0.01, format="csr", rng=0)
>>> x = np.ones((500, 8))
>>> with threads(1):
...     y1 = csr_matmat(a, x)
>>> bool(np.allclose(y1, csr_matmat(a, x, threads=2)))
True
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import scipy.sparse as sp

from . import _sparsetools

__all__ = ["available_cores", "get_threads", "threads", "row_blocks", "run_blocks", "csr_matmat", "csr_rmatmat"]

# Below this many multiply-adds per block a thread hand-off costs more than it saves.
_MIN_BLOCK_WORK = 1 << 17

_setting: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("sparseconv_threads", default=None)


class _Pool:
    """Daemon worker threads fed from one queue; grown on demand, never replaced or shut down.

    Callers with different thread counts share it: each submits as many tasks as it wants
    threads (minus the one it runs itself) and the pool has at least that many workers, so a
    caller never holds a pool that another caller has retired.
    """

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._local = threading.local()

    @property
    def size(self) -> int:
        """Worker threads started so far."""
        return len(self._workers)

    def in_worker(self) -> bool:
        """True on one of this pool's worker threads."""
        return getattr(self._local, "worker", False)

    def ensure(self, n: int) -> None:
        """Start workers until there are at least ``n``."""
        with self._lock:
            while len(self._workers) < n:
                worker = threading.Thread(target=self._work, name=f"sparseconv-{len(self._workers)}", daemon=True)
                worker.start()
                self._workers.append(worker)

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        """Queue ``fn(*args)``; its result or exception arrives through the returned future."""
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def _work(self) -> None:
        self._local.worker = True
        while True:
            future, fn, args = self._tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)


_POOL = _Pool()


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _check_threads(n: object, name: str = "threads") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive int; got {n!r}")
    return int(n)


def get_threads(threads: Optional[int] = None) -> int:
    """The thread count in force: ``threads`` if given, else the :func:`threads` context,
    else :func:`available_cores`."""
    if threads is not None:
        return _check_threads(threads)
    current = _setting.get()
    return available_cores() if current is None else current


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """Run sparseconv's products inside the block on ``n`` threads.

    The setting is a context variable: it applies to the calling thread (and tasks it
    spawns with a copied context) and is restored on exit, even after an exception. BLAS
    thread pools are not touched; use ``threadpoolctl`` for those.

    Parameters
    ----------
    n : int
        Positive; 1 runs everything on the calling thread.

    Yields
    ------
    int
        ``n``.
    """
    token = _setting.set(_check_threads(n))
    try:
        yield n
    finally:
        _setting.reset(token)


def row_blocks(indptr: np.ndarray, n_blocks: int) -> np.ndarray:
    """Split the rows of a CSR matrix into at most ``n_blocks`` runs of about equal nnz.

    Parameters
    ----------
    indptr : ndarray of shape (n_rows + 1,)
    n_blocks : int

    Returns
    -------
    ndarray of int64
        Strictly increasing row bounds ``[0, ..., n_rows]``.
    """
    n_rows = indptr.size - 1
    if n_blocks <= 1 or n_rows <= 1:
        return np.array([0, n_rows], dtype=np.int64)
    targets = np.linspace(0, int(indptr[-1]), n_blocks + 1)[1:-1]
    inner = np.searchsorted(indptr, targets, side="left")
    return np.unique(np.concatenate(([0], np.clip(inner, 0, n_rows), [n_rows]))).astype(np.int64)


def run_blocks(fn: Callable[[int, int], None], bounds: Sequence[int], n_threads: int) -> None:
    """Call ``fn(lo, hi)`` for each consecutive pair of ``bounds``, on up to ``n_threads``.

    The first block runs on the calling thread; exceptions from any block propagate. All
    callers share one pool, grown to the largest thread count asked for and never replaced,
    so concurrent calls with different counts are safe. Called from inside a block (a nested
    product), the blocks run on the calling thread: a worker never waits for the pool it
    belongs to.
    """
    pairs = list(zip(bounds[:-1], bounds[1:]))
    if n_threads <= 1 or len(pairs) <= 1 or _POOL.in_worker():
        for lo, hi in pairs:
            fn(int(lo), int(hi))
        return
    _POOL.ensure(min(n_threads, len(pairs)) - 1)
    futures = [_POOL.submit(fn, int(lo), int(hi)) for lo, hi in pairs[1:]]
    try:
        fn(int(pairs[0][0]), int(pairs[0][1]))
    finally:
        for fut in futures:
            fut.result()


def _blocks_for(indptr: np.ndarray, n_vecs: int, n_threads: int) -> int:
    work = int(indptr[-1]) * max(n_vecs, 1)
    return max(1, min(n_threads, work // _MIN_BLOCK_WORK))


def _zeroed_output(out: Optional[np.ndarray], shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A zero-filled C-contiguous result array: ``out`` (checked) or a new one."""
    if out is None:
        return np.zeros(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {shape}; "
                         f"got {out.dtype} array of shape {out.shape}")
    out[...] = 0
    return out


def csr_matmat(matrix: sp.csr_array, x: np.ndarray, *, out: Optional[np.ndarray] = None,
               threads: Optional[int] = None) -> np.ndarray:
    """``matrix @ x`` for a CSR matrix and a dense C-ordered block, rows split over threads.

    Parameters
    ----------
    matrix : scipy.sparse.csr_array or csr_matrix of shape (m, k)
    x : ndarray of shape (k, n) or (k,)
        Converted to a C-contiguous array of the matrix's dtype if it is not one.
    out : ndarray of shape (m, n), optional
        C-contiguous, the matrix's dtype; overwritten.
    threads : int, optional
        See :func:`get_threads`.

    Returns
    -------
    ndarray of shape (m, n) (or (m,))
        Bit-identical whatever the thread count: each row is summed by one thread, in
        storage order.
    """
    m, k = matrix.shape
    vector = np.ndim(x) == 1
    x2 = np.ascontiguousarray(np.reshape(x, (k, -1)), dtype=matrix.dtype)
    n_vecs = x2.shape[1]
    out = _zeroed_output(out, (m, n_vecs), matrix.dtype)
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    x_flat = x2.reshape(-1)

    def block(r0: int, r1: int) -> None:
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        if e0 == e1:
            return
        ptr = indptr[r0:r1 + 1] - indptr[r0] if r0 else indptr[:r1 + 1]
        if _sparsetools.csr_matvec is not None and n_vecs == 1:
            # The multi-vector kernel's inner loop over vectors costs ~6x on a single one.
            _sparsetools.csr_matvec(r1 - r0, k, ptr, indices[e0:e1], data[e0:e1], x_flat, out[r0:r1].reshape(-1))
        elif _sparsetools.csr_matvecs is not None:
            _sparsetools.csr_matvecs(r1 - r0, k, n_vecs, ptr, indices[e0:e1], data[e0:e1], x_flat,
                         out[r0:r1].reshape(-1))
        else:
            out[r0:r1] = sp.csr_array((data[e0:e1], indices[e0:e1], ptr), shape=(r1 - r0, k)) @ x2

    n_threads = get_threads(threads)
    bounds = row_blocks(indptr, _blocks_for(indptr, n_vecs, n_threads))
    run_blocks(block, bounds, n_threads)
    return out[:, 0] if vector else out


def csr_rmatmat(matrix: sp.csr_array, y: np.ndarray, *, out: Optional[np.ndarray] = None,
                threads: Optional[int] = None) -> np.ndarray:
    """``matrix.T @ y`` for a CSR matrix, without forming the transpose.

    Each thread scatters the products of one row block of ``matrix`` into its own
    ``(k, n)`` buffer and the buffers are summed: the extra memory is ``threads - 1``
    outputs (usually far smaller than a stored transpose, which would repeat the matrix's
    values and indices).

    Parameters
    ----------
    matrix : scipy.sparse.csr_array or csr_matrix of shape (m, k)
    y : ndarray of shape (m, n) or (m,)
    out : ndarray of shape (k, n), optional
        C-contiguous, the matrix's dtype; overwritten.
    threads : int, optional
        See :func:`get_threads`.

    Returns
    -------
    ndarray of shape (k, n) (or (k,))
        With one thread, bit-identical to scipy's ``matrix.T @ y``; with more, the partial
        sums are added in block order (a reordering of a floating-point sum, so results
        differ in the last bits).
    """
    m, k = matrix.shape
    vector = np.ndim(y) == 1
    y2 = np.ascontiguousarray(np.reshape(y, (m, -1)), dtype=matrix.dtype)
    n_vecs = y2.shape[1]
    out = _zeroed_output(out, (k, n_vecs), matrix.dtype)
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    n_threads = get_threads(threads)
    bounds = row_blocks(indptr, _blocks_for(indptr, n_vecs, n_threads))
    n_blocks = len(bounds) - 1
    partial = [out] + [np.zeros_like(out) for _ in range(n_blocks - 1)]
    starts = {int(lo): i for i, lo in enumerate(bounds[:-1])}

    def block(r0: int, r1: int) -> None:
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        if e0 == e1:
            return
        ptr = indptr[r0:r1 + 1] - indptr[r0] if r0 else indptr[:r1 + 1]
        dest = partial[starts[r0]]
        if _sparsetools.csc_matvec is not None and n_vecs == 1:
            # A row block of a CSR matrix is a column block of its transpose in CSC form.
            _sparsetools.csc_matvec(k, r1 - r0, ptr, indices[e0:e1], data[e0:e1], y2[r0:r1].reshape(-1), dest.reshape(-1))
        elif _sparsetools.csc_matvecs is not None:
            _sparsetools.csc_matvecs(k, r1 - r0, n_vecs, ptr, indices[e0:e1], data[e0:e1], y2[r0:r1].reshape(-1),
                         dest.reshape(-1))
        else:
            dest += sp.csr_array((data[e0:e1], indices[e0:e1], ptr), shape=(r1 - r0, k)).T @ y2[r0:r1]

    run_blocks(block, bounds, n_threads)
    if n_blocks > 1:
        def reduce(c0: int, c1: int) -> None:
            for extra in partial[1:]:
                out[c0:c1] += extra[c0:c1]

        run_blocks(reduce, np.linspace(0, k, n_threads + 1).astype(np.int64), n_threads)
    return out[:, 0] if vector else out
