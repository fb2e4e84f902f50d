"""The one timing loop of the benchmarks: calibrate, interleave, repeat; and the thread limits it runs under.

Every benchmark in this package and in ``benchmarks/`` times through
:func:`measure_interleaved` (or :func:`measure`, its one-callable case): warm-up outside the
timed region, a loop sized so one repeat lasts long enough for the timer, repeats taken
round-robin across the callables so load from other processes hits them alike, garbage
collection off while timing. :func:`time_once` times one-off work whose result is needed,
:func:`traced_call` one call with its numpy allocations.
"""

from __future__ import annotations

import contextlib
import gc
import time
import tracemalloc
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional

import numpy as np

from ..parallel import get_threads as sparse_threads_in_force
from ..parallel import threads as sparse_threads

__all__ = [
    "DEFAULT_MAX_SECONDS",
    "MIN_REPEAT_SECONDS",
    "measure_interleaved",
    "measure",
    "measure_each",
    "time_once",
    "traced_call",
    "thread_limits",
]

DEFAULT_MAX_SECONDS = 3.0
# One timed repeat loops a fast call until it lasts this long, so timer resolution and
# call overhead do not dominate microsecond-scale passes.
MIN_REPEAT_SECONDS = 0.005
_MAX_NUMBER = 10_000


def _calibrate(fn: Callable[[], Any], warmup: bool, min_repeat_seconds: float) -> tuple[int, float, list[float]]:
    """Warm ``fn`` up and choose its calls per repeat: ``(number, seconds per call, times so far)``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if not warmup:
        return 1, first, [first]
    # Size the loop from the fastest of up to three warm-up calls: one call stalled by another
    # process must not turn a microsecond pass into a single-call measurement.
    spent = first
    for _ in range(2):
        if spent > min_repeat_seconds * 4:
            break
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        first, spent = min(first, elapsed), spent + elapsed
    return max(1, min(_MAX_NUMBER, int(min_repeat_seconds / max(first, 1e-9)))), first, []


def measure_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 5,
                        max_seconds: float = DEFAULT_MAX_SECONDS, warmup: bool = True,
                        min_repeat_seconds: float = MIN_REPEAT_SECONDS,
                        contexts: Optional[Mapping[str, Callable[[], ContextManager]]] = None) -> dict[str, dict]:
    """Median and minimum wall time of several callables, their repeats taken in turn.

    Each callable is warmed up (outside the timed region) and its loop sized: a call shorter
    than ``min_repeat_seconds`` is repeated ``number`` times per timed repeat, as ``timeit``
    does, and a slow call gets fewer repeats so that its measurement stays within
    ``max_seconds`` (at least one). The repeats are then taken round-robin -- one repeat of
    each callable, then the next round -- so that a burst of load from other processes lands
    on every callable alike instead of on whichever happened to be running: ratios between
    them stay meaningful on a shared machine.

    Parameters
    ----------
    fns : mapping of str to callable
    repeats : int, default 5
    max_seconds : float
    warmup : bool, default True
        False for one-off work such as construction: every call, the first included, is a
        timed repeat of one call.
    min_repeat_seconds : float
        Shortest timed repeat; fast calls are looped up to this.
    contexts : mapping of str to callable returning a context manager, optional
        Entered around the calibration and around every repeat of that key's callable, outside
        the timed region (e.g. ``lambda: thread_limits(1)`` to time one side of a ratio on one
        thread).

    Returns
    -------
    dict of str to dict
        Per key: ``median_s``, ``min_s``, ``times_s`` (seconds per call, one per repeat),
        ``repeats`` (as run), ``number`` (calls per repeat).
    """
    contexts = dict(contexts or {})
    unknown = set(contexts) - set(fns)
    if unknown:
        raise ValueError(f"contexts must be keyed by names of fns {sorted(fns)}; got {sorted(unknown)}")

    def context(key: str) -> ContextManager:
        return contexts[key]() if key in contexts else contextlib.nullcontext()

    plan = {}
    for key, fn in fns.items():
        with context(key):
            number, per_call, times = _calibrate(fn, warmup, min_repeat_seconds)
        plan[key] = (number, max(1, min(repeats, int(max_seconds / max(per_call * number, 1e-9)))), times)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside one repeat is noise
    try:
        for _ in range(max(n for _, n, _ in plan.values())):
            for key, fn in fns.items():
                number, n_repeats, times = plan[key]
                if len(times) >= n_repeats:
                    continue
                with context(key):
                    t0 = time.perf_counter()
                    for _ in range(number):
                        fn()
                    times.append((time.perf_counter() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {key: {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "times_s": times,
                  "repeats": len(times), "number": number} for key, (number, _, times) in plan.items()}


def measure(fn: Callable[[], Any], *, repeats: int = 5, max_seconds: float = DEFAULT_MAX_SECONDS,
            warmup: bool = True, min_repeat_seconds: float = MIN_REPEAT_SECONDS) -> dict:
    """Median and minimum wall time of ``fn()``: :func:`measure_interleaved` of one callable.

    Parameters
    ----------
    fn : callable
    repeats, max_seconds, warmup, min_repeat_seconds
        As for :func:`measure_interleaved`.

    Returns
    -------
    dict
        ``median_s``, ``min_s``, ``times_s``, ``repeats``, ``number``.
    """
    return measure_interleaved({"fn": fn}, repeats=repeats, max_seconds=max_seconds, warmup=warmup,
                               min_repeat_seconds=min_repeat_seconds)["fn"]


def measure_each(fns: Mapping[str, Callable[[], Any]], *, blocked: bool = False, repeats: int = 5,
                 max_seconds: float = DEFAULT_MAX_SECONDS) -> dict[str, dict]:
    """Every callable timed: in alternating rounds (:func:`measure_interleaved`) or, with
    ``blocked``, each in a block of its own repeats (:func:`measure`), one after the other.

    Alternating rounds spread a burst of load over every callable alike, but also run each one
    right after the others, while their thread pools (OpenMP, OpenBLAS workers) still
    busy-wait on the same cores; blocks leave those pools idle.

    Parameters
    ----------
    fns : mapping of str to callable
    blocked : bool, default False
    repeats, max_seconds
        As for :func:`measure_interleaved`.

    Returns
    -------
    dict of str to dict
        As :func:`measure_interleaved` returns.
    """
    if blocked:
        return {k: measure(f, repeats=repeats, max_seconds=max_seconds) for k, f in fns.items()}
    return measure_interleaved(fns, repeats=repeats, max_seconds=max_seconds)


def time_once(fn: Callable[[], Any]) -> tuple[Any, float]:
    """One call of ``fn`` and its wall time, for one-off work whose result is needed.

    Returns
    -------
    result : object
        What ``fn()`` returned.
    seconds : float
    """
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def traced_call(fn: Callable[[], Any], traced: bool = True) -> tuple[Optional[int], float, Any]:
    """One call of ``fn`` with the peak of the numpy allocations it made (``tracemalloc``).

    Parameters
    ----------
    fn : callable
    traced : bool, default True
        False for callables whose allocator ``tracemalloc`` cannot see (torch): not traced.

    Returns
    -------
    peak_bytes : int or None
        Peak traced memory above what was allocated before the call; None when not traced.
    seconds : float
        Wall time of the call (under tracing when traced: slower than untraced).
    result : object
    """
    if not traced:
        result, seconds = time_once(fn)
        return None, seconds, result
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result, seconds = time_once(fn)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    return int(peak), seconds, result


@contextlib.contextmanager
def thread_limits(threads: int, *, use_torch: bool = True) -> Iterator[dict]:
    """Run sparseconv, BLAS / OpenMP pools (threadpoolctl) and torch on ``threads`` inside the block.

    Parameters
    ----------
    threads : int
    use_torch : bool, default True
        Also set ``torch.set_num_threads`` when PyTorch is installed.

    Yields
    ------
    dict
        What was in force: ``threads``, ``sparseconv_threads`` (its own pool for sparse
        products), ``pools`` (threadpoolctl's view of each loaded library) or ``pools_note``
        when threadpoolctl is missing, ``torch_threads``.
    """
    state: dict[str, Any] = {"threads": threads, "torch_threads": None}
    with contextlib.ExitStack() as stack:
        stack.enter_context(sparse_threads(threads))
        state["sparseconv_threads"] = sparse_threads_in_force()
        if use_torch:
            # Imported first: threadpoolctl only limits the libraries loaded when it is entered,
            # and torch brings its own OpenMP runtime.
            try:
                import torch
            except ImportError:
                pass
            else:
                previous = torch.get_num_threads()
                torch.set_num_threads(threads)
                stack.callback(torch.set_num_threads, previous)
                state["torch_threads"] = torch.get_num_threads()
        try:
            import threadpoolctl
        except ImportError as err:
            state["pools"] = None
            state["pools_note"] = (f"threadpoolctl is not installed ({err}): BLAS runs with its default "
                                   f"thread count, the requested {threads} is not enforced")
        else:
            stack.enter_context(threadpoolctl.threadpool_limits(limits=threads))
            state["pools"] = [{k: info.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                                         "num_threads", "threading_layer")}
                              for info in threadpoolctl.threadpool_info()]
        yield state
