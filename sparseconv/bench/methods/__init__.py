"""The benchmarked methods, one module each, found by name.

Every public module of this package is a method: it defines ``NAME`` (as results and
``--methods`` call it), ``RANK`` (its place in tables) and ``prepare(case, settings) ->
Prepared``, raising :class:`MethodSkipped` with the reason where it cannot run. The sparse
operator's engines are methods of three lines each (``sparse.py`` runs the operator's
defaults, ``csr.py`` and ``factored.py`` one engine each, see ``methods/_engine.py``); a new engine
is a new module. Every call into the operator's API is in ``methods/_operator.py``.

The methods:

sparse
    :class:`sparseconv.ConvOperator` with its defaults (engine ``"auto"``; the engine each
    product ran on is recorded).
csr, factored, numba, implicit, stencil
    The operator with one engine for every product (the compiled ones with the ``fast``
    extra).
dense
    The same matrix stored dense, one GEMM per pass.
im2col
    :func:`sparseconv.reference.im2col` (one copy of a window view) and one GEMM per group;
    the baseline every ratio divides by.
direct
    ``scipy.signal`` direct correlation (a reference point on small layers).
fft
    ``scipy.fft`` convolution with a cached kernel spectrum.
torch
    PyTorch's ``conv2d`` and autograd (optional).
pylops
    PyLops' ``Convolve2D(method="fft")`` on single-channel images (optional).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Optional

from ..suites import Case
from ._base import DEFAULT_MAX_DIRECT_MACS, DEFAULT_MEMORY_BUDGET, MethodSkipped, Prepared, Settings, resolve_budget

__all__ = ["METHODS", "PREPARERS", "DEFAULT_MEMORY_BUDGET", "DEFAULT_MAX_DIRECT_MACS", "MethodSkipped",
           "Prepared", "Settings", "prepare_method", "resolve_budget"]


def _discover() -> dict[str, Callable[[Case, Settings], Prepared]]:
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
               if not info.name.startswith("_")]
    modules.sort(key=lambda module: (module.RANK, module.NAME))
    return {module.NAME: module.prepare for module in modules}


# Method name -> its prepare function, in table order.
PREPARERS: dict[str, Callable[[Case, Settings], Prepared]] = _discover()
METHODS = tuple(PREPARERS)


def prepare_method(method: str, case: Case, settings: Optional[Settings] = None) -> Prepared:
    """Set a method up for a case (construction is timed here).

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    case : Case
    settings : Settings, optional
        Threads, memory budget, repeats and time limits; default :class:`Settings`.

    Returns
    -------
    Prepared

    Raises
    ------
    MethodSkipped
        With the reason the method cannot run here.
    """
    if method not in PREPARERS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    return PREPARERS[method](case, settings or Settings())
