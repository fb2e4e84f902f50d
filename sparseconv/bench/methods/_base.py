"""What every benchmarked method shares: its set-up result, its settings, and the ways it declines to run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ...geometry import default_memory_budget

__all__ = ["DEFAULT_MEMORY_BUDGET", "DEFAULT_MAX_DIRECT_MACS", "MethodSkipped", "Settings", "Prepared",
           "check_budget", "format_bytes", "pad", "dilated_kernel", "resolve_budget"]

# Bytes any one method's main buffer may take; also capped at half the physical memory.
DEFAULT_MEMORY_BUDGET = 1 << 30
# scipy.signal's N-d direct correlation runs at well under 0.1 GMAC/s: beyond this many
# multiply-adds per pass (stride and dilation waste included) it would dominate the run.
DEFAULT_MAX_DIRECT_MACS = 30_000_000


def resolve_budget(memory_budget: Optional[int]) -> int:
    """The memory budget in bytes: ``memory_budget``, or 1 GiB capped at the default budget.

    Raises
    ------
    ValueError
        For a budget that is not a positive int.
    """
    if memory_budget is None:
        return min(DEFAULT_MEMORY_BUDGET, default_memory_budget())
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes; got {memory_budget!r}")
    return int(memory_budget)


class MethodSkipped(Exception):
    """A method cannot run on a case; the message says why (recorded as the skip reason)."""


@dataclass(frozen=True)
class Settings:
    """What a method's set-up may use.

    Attributes
    ----------
    threads : int
        Thread count in force (``scipy.fft`` workers; BLAS, torch and sparseconv's pool are
        set by :func:`sparseconv.bench.timing.thread_limits`).
    budget : int
        Bytes the method's main buffer may take; default :func:`resolve_budget` of None.
    repeats : int
        Repeats of the construction and refresh timings (at most 3 are used).
    max_seconds : float
        Time budget of one measurement.
    max_direct_macs : int
        Largest per-pass work the ``direct`` method is allowed.
    """

    threads: int = 1
    budget: int = field(default_factory=lambda: resolve_budget(None))
    repeats: int = 3
    max_seconds: float = 3.0
    max_direct_macs: int = DEFAULT_MAX_DIRECT_MACS


@dataclass
class Prepared:
    """A method set up for one case: a zero-argument callable per pass.

    Attributes
    ----------
    method : str
    passes : dict of str to callable
        One per pass of the case's layer (``"forward"``, ``"adjoint"``, ``"weight_grad"``);
        each returns its result (an ndarray, or a torch tensor).
    to_numpy : callable
        Converts a pass's result to an ndarray (outside the timed region).
    flat : bool
        True when the passes return flattened samples (the LinearOperator interface); they
        are compared after reshaping to the pass's shape.
    buffer_name : str
        What the method's main buffer is.
    buffer_bytes : int or None
        Its size in bytes (None when the method's allocator is not visible to us).
    build_s : float or None
        One-time set-up: the pattern and values of the matrix, the kernel spectrum.
    refresh : callable or None
        Re-applies the current weights to the prepared structure (the per-training-step cost
        a changed weight incurs: ``set_weight``, a new kernel spectrum).
    traced : bool
        True when the method allocates through numpy, so ``tracemalloc`` sees its buffers.
    info : dict
        Extra facts for the JSON (matrix shape, nnz, engines, FFT size, ...).
    """

    method: str
    passes: dict[str, Callable[[], Any]]
    to_numpy: Callable[[Any], np.ndarray] = np.asarray
    flat: bool = False
    buffer_name: str = ""
    buffer_bytes: Optional[int] = None
    build_s: Optional[float] = None
    refresh: Optional[Callable[[], Any]] = None
    traced: bool = True
    info: dict = field(default_factory=dict)


def format_bytes(n: Optional[float]) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"-"``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_budget(need: int, what: str, budget: int) -> None:
    """Raise :class:`MethodSkipped` when ``need`` bytes exceed ``budget``."""
    if need > budget:
        raise MethodSkipped(f"{what} would need {format_bytes(need)}, over the memory budget of "
                            f"{format_bytes(budget)} (--memory-budget)")


def pad(x: np.ndarray, p: int) -> np.ndarray:
    """Zero-pad the two spatial axes of ``(N, C, H, W)`` by ``p`` on every side."""
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x


def dilated_kernel(w: np.ndarray, dilation: int) -> np.ndarray:
    """``(F, Cg, k, k)`` -> ``(F, Cg, e, e)`` with ``e = d (k - 1) + 1``, zeros between taps."""
    if dilation == 1:
        return w
    f, cg, k, _ = w.shape
    extent = dilation * (k - 1) + 1
    out = np.zeros((f, cg, extent, extent), dtype=w.dtype)
    out[:, :, ::dilation, ::dilation] = w
    return out
