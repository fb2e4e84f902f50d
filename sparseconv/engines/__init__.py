"""Product engines of the convolution operators, and the registry that names them.

Every operator product (``"forward"`` ``W @ X``, ``"adjoint"`` ``W.T @ D``, ``"weight_grad"``)
runs on an *engine*: ``"csr"`` (scipy's CSR kernel on the explicit matrix,
:mod:`sparseconv.engines.csr`), ``"factored"`` (tap gathers and BLAS GEMMs,
:mod:`sparseconv.engines.factored`), ``"numba"`` (compiled CSR kernels on column blocks,
:mod:`sparseconv.engines.numba`, optional extra ``fast``), ``"implicit"`` (the same compiled
loops over per-filter tap lists, no matrix stored, zero padding,
:mod:`sparseconv.engines.implicit`) or ``"stencil"`` (compiled direct convolution of
zero-padded, stride-1 image layers, :mod:`sparseconv.engines.stencil`). ``"auto"`` asks the
policy (:func:`~sparseconv.engines.policy.choose_engine`), which decides per product at
construction from the layer's shape, mask and memory budget. The protocol an engine
implements is in :mod:`sparseconv.engines.base`. Adding one is a module defining ``ENGINE``
(its class) plus one line in ``_MODULES`` below.
"""

from __future__ import annotations

import importlib

from .base import PRODUCTS, Engine, GuardedMatrix, MatrixModifiedError, Structure
from .policy import choose_engine, default_engine

__all__ = ["PRODUCTS", "ENGINE_NAMES", "Engine", "GuardedMatrix", "MatrixModifiedError", "Structure",
           "choose_engine", "default_engine", "engine_class", "resolve_engine_name"]

# name -> module defining ENGINE (relative to this package). Imported on first use, so an
# engine with an optional dependency costs nothing until it is asked for.
_MODULES = {
    "csr": ".csr",
    "factored": ".factored",
    "numba": ".numba",
    "implicit": ".implicit",
    "stencil": ".stencil",
}

#: Every registered engine name.
ENGINE_NAMES = tuple(_MODULES)

def engine_class(name: str) -> type[Engine]:
    """The engine class registered as ``name``.

    Raises
    ------
    ValueError
        For an unknown name.
    ImportError
        When the engine's module (or a dependency of it) cannot be imported.
    """
    if name not in _MODULES:
        raise ValueError(f"engine must be one of {('auto',) + ENGINE_NAMES}; got {name!r}")
    return importlib.import_module(_MODULES[name], __name__).ENGINE


def resolve_engine_name(name: object, argument: str = "engine") -> str:
    """Check an engine keyword: ``"auto"`` or a registered name.

    Raises
    ------
    ValueError
        Naming ``argument``, the accepted names and the value given.
    """
    if isinstance(name, str) and (name == "auto" or name in _MODULES):
        return name
    raise ValueError(f"{argument} must be one of {('auto',) + ENGINE_NAMES}; got {name!r}")
