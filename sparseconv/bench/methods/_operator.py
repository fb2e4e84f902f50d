"""Every call the benchmarks make into sparseconv's operator API, in one place.

The benchmarks (this package and ``benchmarks/*.py``) never construct a ``ConvOperator`` or
call its products directly: they go through these functions, so a change of the operator's
API is an edit here alone.

Engines are the registry's (:data:`sparseconv.engines.ENGINE_NAMES`): ``"csr"`` (scipy's CSR
kernel on the explicit matrix), ``"factored"`` (tap gather + BLAS GEMM), and any engine that
registers later (a ``"numba"`` engine joins by registering; its method is then a three-line
module). ``None`` means the operator's default, ``"auto"``, which picks an engine per
product. An operator is constructed with ``engine=`` and so builds only what that engine
needs (the explicit matrix only for ``"csr"``); its products then need no engine keyword. An
engine this sparseconv does not register, cannot import, or cannot run on a layer is a
:class:`~sparseconv.bench.methods.MethodSkipped` with the reason.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import numpy as np

from ...conv import ConvOperator
from ...engines import ENGINE_NAMES, engine_class
from ...pattern import MemoryBudgetError
from ..suites import Case
from ..timing import time_once
from ._base import MethodSkipped

__all__ = ["ENGINES", "build", "shared_build", "engines_in_force", "passes", "set_weight", "matrix_facts",
           "matrix_entries", "forward", "value_array", "to_dense", "matrix"]

#: The engines this sparseconv registers, in the order the benchmarks list them.
ENGINES = ENGINE_NAMES

# Operators alive for the engine methods of one case: (case, budget, engine asked for,
# operator, seconds its construction took), case and operator weakly held so that the cache
# never keeps an operator (a 512x512 image with a 15x15 kernel is a 0.7 GB matrix) alive.
# One is shared by the methods whose passes run on the same engines: "sparse" and "csr" on a
# layer where "auto" picks the CSR kernel for every pass hold one matrix, not two.
_shared: list[tuple[weakref.ref, int, Optional[str], weakref.ref, float]] = []


def _check_engine(engine: Optional[str]) -> None:
    """Raise :class:`MethodSkipped` unless ``engine`` is None or a registered, importable engine."""
    if engine is None:
        return
    try:
        engine_class(engine)  # the live registry: an engine registered at run time counts too
    except ValueError:
        raise MethodSkipped(f"engine {engine!r} is not in this sparseconv (it has {', '.join(ENGINES)})") from None
    except ImportError as err:
        raise MethodSkipped(f"engine {engine!r} is registered but cannot be imported here: {err}") from None


def _construct(case: Case, budget: int, engine: Optional[str]) -> ConvOperator:
    """The case's operator on ``engine`` with every engine its passes use built."""
    layer = case.layer
    try:
        op = ConvOperator(case.w, layer.input_shape, weight_mask=case.mask, memory_budget=budget, engine=engine,
                          **layer.options)
        op.prepare(*layer.passes)
    except MemoryBudgetError as err:
        raise MethodSkipped(str(err)) from None
    except ValueError as err:
        if engine is not None and f"engine {engine!r} cannot run" in str(err):
            raise MethodSkipped(str(err)) from None
        raise
    return op


def build(case: Case, budget: int, engine: Optional[str] = None) -> tuple[ConvOperator, int]:
    """A new operator for the case, with the engines its passes use already built (part of set-up).

    Parameters
    ----------
    case : Case
    budget : int
        The operator's memory budget in bytes.
    engine : str or None
        The engine every product runs on; None for the operator's default (``"auto"``).

    Returns
    -------
    op : ConvOperator
    held_bytes : int
        Bytes the operator holds for these products (:attr:`ConvOperator.nbytes`): the
        explicit matrix and its tying map where an engine built them, the factored engine's
        tables where it uses them.

    Raises
    ------
    MethodSkipped
        When the operator would exceed ``budget``, or the engine is not available or cannot
        run this layer.
    """
    _check_engine(engine)
    op = _construct(case, budget, engine)
    return op, int(op.nbytes)


def shared_build(case: Case, budget: int, engine: Optional[str] = None) -> tuple[ConvOperator, int, float]:
    """As :func:`build`, but methods of one case whose passes run on the same engines share one operator.

    An operator built for ``engine`` is reused for the same case, budget and engine while it
    is alive, and one built with the default (``None``) also for an engine that it runs every
    pass of the case on.

    Parameters
    ----------
    case, budget, engine
        As for :func:`build`.

    Returns
    -------
    op : ConvOperator
    held_bytes : int
    seconds : float
        Wall time of the operator's construction, its engines included, when it was first
        built.
    """
    _check_engine(engine)
    _shared[:] = [entry for entry in _shared if entry[0]() is case and entry[1] == budget and entry[3]() is not None]
    wanted = None if engine is None else {p: engine for p in case.layer.passes}
    for _, _, built_for, op_ref, seconds in _shared:
        op = op_ref()
        if op is not None and (built_for == engine or (wanted is not None and engines_in_force(
                op, case.layer.passes) == wanted)):
            return op, int(op.nbytes), seconds
    op, seconds = time_once(lambda: _construct(case, budget, engine))
    _shared.append((weakref.ref(case), budget, engine, weakref.ref(op), seconds))
    return op, int(op.nbytes), seconds


def engines_in_force(op: ConvOperator, products: tuple[str, ...]) -> dict[str, str]:
    """Which engine runs each product when it is called without an engine keyword.

    Parameters
    ----------
    op : ConvOperator
    products : tuple of {"forward", "adjoint", "weight_grad"}

    Returns
    -------
    dict of str to str
    """
    return {p: op.engine(p) for p in products}


def passes(op: ConvOperator, case: Case, engine: Optional[str] = None) -> dict[str, Callable[[], Any]]:
    """Zero-argument callables running each of the layer's passes on the case's data.

    ``interface="batch"``: ``forward(x)``, ``backward_input(dy)``, ``weight_grad(x, dy)`` on
    NCHW batches. ``interface="linear_operator"``: ``matvec`` / ``rmatvec`` of the operator
    itself (a scipy ``LinearOperator``) on one flattened sample (results are flat).

    Parameters
    ----------
    op : ConvOperator
    case : Case
    engine : str or None
        The engine the passes must run on; None: the operator's own choice. Named in the
        calls only where the operator would choose another.

    Returns
    -------
    dict of str to callable
    """
    _check_engine(engine)
    x, dy = case.x, case.dy
    pinned = engine is not None and any(op.engine(p) != engine for p in case.layer.passes)
    if case.layer.interface == "linear_operator":
        lin = op.as_linear_operator(engine) if pinned else op
        xv, dv = x.reshape(-1), dy.reshape(-1)
        return {"forward": lambda: lin.matvec(xv), "adjoint": lambda: lin.rmatvec(dv)}
    if not pinned:
        return {"forward": lambda: op.forward(x), "adjoint": lambda: op.backward_input(dy),
                "weight_grad": lambda: op.weight_grad(x, dy)}
    return {"forward": lambda: op.forward(x, engine=engine),
            "adjoint": lambda: op.backward_input(dy, engine=engine),
            "weight_grad": lambda: op.weight_grad(x, dy, engine=engine)}


def forward(op: ConvOperator, x: np.ndarray, engine: Optional[str] = None,
            threads: Optional[int] = None) -> np.ndarray:
    """``op``'s forward product of an NCHW batch on ``engine`` (None: the operator's) and ``threads``."""
    _check_engine(engine)
    return op.forward(x, engine=engine, threads=threads)


def set_weight(op: ConvOperator, w: np.ndarray) -> None:
    """New weight values into the operator's structure (the per-training-step refresh)."""
    op.set_weight(w)


def matrix_facts(op: ConvOperator) -> dict:
    """``matrix_shape``, ``nnz`` and ``density`` of the operator's matrix, for the JSON."""
    rows, cols = op.shape
    return {"matrix_shape": [rows, cols], "nnz": int(op.nnz), "density": op.nnz / (rows * cols)}


def _shared_weights(op: ConvOperator) -> bool:
    """True when some stored entry is a sum of several weights (no one-to-one ``param_index``)."""
    try:
        op.param_index
    except ValueError:
        return True
    return False


def matrix_entries(op: ConvOperator) -> tuple[np.ndarray, np.ndarray, int, tuple[int, int]]:
    """The explicit matrix's entries as the dense method stores them.

    Returns
    -------
    flat : ndarray of int64, shape (nnz,)
        Row-major position ``row * cols + col`` of every stored entry.
    param_index : ndarray of shape (nnz,)
        The weight each entry is tied to (flat index into the kernel).
    n_params : int
    shape : (int, int)
    """
    m = op.matrix
    rows, cols = m.shape
    if _shared_weights(op):
        raise MethodSkipped("some entries of the matrix hold a sum of several weights (no one-to-one param_index)")
    flat = np.repeat(np.arange(rows, dtype=np.int64), np.diff(m.indptr)) * cols + m.indices
    return flat, op.param_index, op.n_params, (rows, cols)


def value_array(op: ConvOperator) -> np.ndarray:
    """The explicit matrix's value array, e.g. to time a plain copy of it.

    It is the buffer :meth:`ConvOperator.set_weight` writes in place (``op.matrix.data`` is a
    read-only view of the CSR engine's values). Reading it builds the matrix if no engine of
    ``op`` had; ``set_weight`` keeps it in sync from then on.
    """
    return op.matrix.data


def to_dense(op: ConvOperator) -> np.ndarray:
    """The operator's matrix as a dense ndarray of shape ``op.shape``."""
    return op.matrix.toarray()


def matrix(op: ConvOperator) -> Any:
    """The operator's explicit matrix, a ``scipy.sparse.csr_array`` of shape ``op.shape``."""
    return op.matrix
