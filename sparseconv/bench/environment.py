"""What a benchmark ran on: library versions, CPU, cores, load and threading environment, for the JSON."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["OPTIONAL_LIBRARIES", "environment_info", "load_average", "malloc_no_trim"]

# Optional libraries whose versions are recorded (None when not installed).
OPTIONAL_LIBRARIES = ("torch", "pylops", "numba", "threadpoolctl", "matplotlib", "tqdm")


def malloc_no_trim() -> None:
    """Make glibc keep freed memory for reuse: no page faults from re-allocated blocks.

    Sets ``M_TRIM_THRESHOLD`` to 1 GiB (freed heap memory is not returned to the kernel) and
    ``M_MMAP_THRESHOLD`` to 32 MiB, its maximum (blocks up to that size come from the heap).
    Process-wide and not undone: for benchmark processes, before anything is timed. Without
    it, a block allocated afresh at every call (PyTorch's outputs, numpy temporaries) may get
    fresh pages each time, zeroed and faulted in on first touch (about 1.5 us per 4 KiB page
    on the machine the README's numbers come from: 3 ms for an 8 MiB output).

    Raises
    ------
    RuntimeError
        Where the C library has no ``mallopt`` (not glibc) or refuses the settings.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    # M_TRIM_THRESHOLD = -1 and M_MMAP_THRESHOLD = -3 in malloc.h; mallopt returns 1 on success.
    if mallopt is None or mallopt(-1, 1 << 30) != 1 or mallopt(-3, 32 << 20) != 1:
        raise RuntimeError("malloc_no_trim needs glibc's mallopt")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages: how busy the machine was with other work.

    Returns
    -------
    list of 3 float, or None
        None where the platform does not report it.
    """
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _source_digest() -> str:
    """SHA-256 of the sparseconv package's Python sources: ties a result to the code that produced it."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def environment_info() -> dict:
    """Library versions, CPU, core counts, load and threading environment, for the JSON.

    Returns
    -------
    dict
        ``python``, ``platform``, ``machine``, ``cpu``, ``cpu_count``, ``cpus_available``,
        ``load_average``, ``sparseconv_source_sha256``, ``versions``, ``thread_env``,
        ``scipy_threading``.
    """
    import scipy

    from .. import __version__

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "load_average": load_average(),
        "sparseconv_source_sha256": _source_digest(),
        "versions": {"sparseconv": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
                     **{name: _version(name) for name in OPTIONAL_LIBRARIES}},
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                      "MKL_NUM_THREADS", "SPARSECONV_MEMORY_BUDGET",
                                                      "SPARSECONV_ENGINE")},
        "scipy_threading": ("scipy.sparse's own kernels are single-threaded; sparseconv splits the "
                            "sparse products into row blocks on its own thread pool (sparseconv.parallel), "
                            "which the thread setting sizes, as it does BLAS and OpenMP pools "
                            "(threadpoolctl: dense, im2col, the GEMMs of the factored engine), "
                            "scipy.fft workers and torch"),
    }
