"""Every call the benchmarks make into sparseconv's operator API, in one place.

The benchmarks (this package and ``benchmarks/*.py``) never call ``ConvOperator``'s products,
engine queries, tap tables or LinearOperator view directly: they go through these functions,
so a change of the operator's keywords is an edit here alone.

Engines are named as issue 10 names them: ``"csr"`` (scipy's CSR kernel on the explicit
matrix), ``"factored"`` (tap gather + BLAS GEMM), later ``"numba"``; ``None`` means the
operator's defaults (``"auto"``, and its default LinearOperator view). Today's operator spells
them through ``method=`` keywords: :data:`_PRODUCT_METHOD`, :data:`_WEIGHT_GRAD_METHOD`,
:data:`_LINEAR_OPERATOR_METHOD` translate, and :data:`_ENGINE_OF_METHOD` translates back what
``method="auto"`` picked. An engine this sparseconv does not have is a
:class:`~sparseconv.bench.methods.MethodSkipped` with the reason.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import numpy as np

from ...conv import ConvOperator
from ...pattern import MemoryBudgetError
from ..suites import Case
from ..timing import time_once
from ._base import MethodSkipped

__all__ = ["ENGINES", "build", "shared_build", "engines_in_force", "passes", "set_weight", "matrix_facts",
           "matrix_entries", "forward", "value_array", "to_dense", "matrix"]

# How today's operator spells each engine (issue 10 renames these to engine="csr"/"factored").
_PRODUCT_METHOD = {"csr": "csr", "factored": "taps"}  # forward / backward_input(method=...)
_WEIGHT_GRAD_METHOD = {"csr": "entries", "factored": "taps"}  # weight_grad(method=...)
_LINEAR_OPERATOR_METHOD = {"csr": "csr", "factored": "taps"}  # as_linear_operator(method=...)
_ENGINE_OF_METHOD = {"csr": "csr", "taps": "factored"}  # what op.method(product) returns -> engine
# The operator's defaults: weight_grad() runs the tap-grouped GEMM, as_linear_operator() the CSR matrix.
_DEFAULT_WEIGHT_GRAD_ENGINE = "factored"
_DEFAULT_LINEAR_OPERATOR_ENGINE = "csr"
# The engines this sparseconv has, in the order the benchmarks list them.
ENGINES = tuple(_PRODUCT_METHOD)
# Today one operator holds every engine's structure, so the engine methods of one case share it
# (a 512x512 image with a 15x15 kernel is a 0.7 GB matrix): (case, budget, operator, seconds
# its construction took), the case and operator weakly held. After the restructure an operator
# is built for its engines: key this by engine too.
_shared: Optional[tuple[weakref.ref, int, weakref.ref, float]] = None


def _check_engine(engine: Optional[str]) -> None:
    if engine is not None and engine not in ENGINES:
        raise MethodSkipped(f"engine {engine!r} is not in this sparseconv (it has {', '.join(ENGINES)})")


def _construct(case: Case, budget: int) -> ConvOperator:
    layer = case.layer
    try:
        return ConvOperator(case.w, layer.input_shape, weight_mask=case.mask, memory_budget=budget, **layer.options)
    except MemoryBudgetError as err:
        raise MethodSkipped(str(err)) from None


def _tables(op: ConvOperator, case: Case, engine: Optional[str]) -> int:
    """Build the tables ``engine``'s products use; the bytes the operator holds for them."""
    used = engines_in_force(op, case.layer.passes, case.layer.interface, engine)
    m = op.matrix
    tying = op.tying.data.nbytes + op.tying.indices.nbytes if _shared_weights(op) else op.param_index.nbytes
    tables = []
    if "factored" in used.values():
        tables.append(op.tap_table())
    if used.get("adjoint") == "factored":
        adjoint = op.adjoint_tables()
        tables += [a for p in adjoint.phases for a in (p.table, p.taps)] + list(adjoint.scatter_rounds)
    return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + tying + sum(a.nbytes for a in tables))


def build(case: Case, budget: int, engine: Optional[str] = None) -> tuple[ConvOperator, int]:
    """A new operator for the case, with the tables its products will use already built (part of set-up).

    Parameters
    ----------
    case : Case
    budget : int
        The operator's memory budget in bytes.
    engine : str or None
        The engine the products will run on; None for the operator's defaults.

    Returns
    -------
    op : ConvOperator
    held_bytes : int
        Bytes the operator holds for these products: the matrix (values, indices, row
        pointers), its tying map, and the factored engine's tables where it uses them.

    Raises
    ------
    MethodSkipped
        When the operator would exceed ``budget``, or the engine is not available.
    """
    _check_engine(engine)
    op = _construct(case, budget)
    return op, _tables(op, case, engine)


def shared_build(case: Case, budget: int, engine: Optional[str] = None) -> tuple[ConvOperator, int, float]:
    """As :func:`build`, but the engine methods of one case share one operator while it is alive.

    Parameters
    ----------
    case, budget, engine
        As for :func:`build`.

    Returns
    -------
    op : ConvOperator
    held_bytes : int
    seconds : float
        Wall time of the operator's construction (when it was first built for this case)
        plus the tables built now for ``engine``.
    """
    global _shared
    _check_engine(engine)
    op = None
    if _shared is not None and _shared[0]() is case and _shared[1] == budget:
        op, seconds = _shared[2](), _shared[3]
    if op is None:
        _shared = None  # the previous case's operator must not be kept alive by the cache
        op, seconds = time_once(lambda: _construct(case, budget))
        _shared = (weakref.ref(case), budget, weakref.ref(op), seconds)
    held, table_s = time_once(lambda: _tables(op, case, engine))
    return op, held, seconds + table_s


def _shared_weights(op: ConvOperator) -> bool:
    """True when some stored entry is a sum of several weights (no one-to-one ``param_index``)."""
    try:
        op.param_index
    except ValueError:
        return True
    return False


def engines_in_force(op: ConvOperator, products: tuple[str, ...], interface: str,
                     engine: Optional[str] = None) -> dict[str, str]:
    """Which engine runs each product: ``engine`` itself, or what the operator's defaults pick.

    Parameters
    ----------
    op : ConvOperator
    products : tuple of {"forward", "adjoint", "weight_grad"}
    interface : {"batch", "linear_operator"}
    engine : str or None

    Returns
    -------
    dict of str to str
    """
    if engine is not None:
        return {p: engine for p in products}
    if interface == "linear_operator":
        return {p: _DEFAULT_LINEAR_OPERATOR_ENGINE for p in products}
    return {p: _DEFAULT_WEIGHT_GRAD_ENGINE if p == "weight_grad" else _ENGINE_OF_METHOD[op.method(p)]
            for p in products}


def passes(op: ConvOperator, case: Case, engine: Optional[str] = None) -> dict[str, Callable[[], Any]]:
    """Zero-argument callables running each of the layer's passes on the case's data.

    ``interface="batch"``: ``forward(x)``, ``backward_input(dy)``, ``weight_grad(x, dy)`` on
    NCHW batches. ``interface="linear_operator"``: ``matvec`` / ``rmatvec`` of the operator's
    LinearOperator view on one flattened sample (results are flat).

    Parameters
    ----------
    op : ConvOperator
    case : Case
    engine : str or None
        None: the operator's defaults.

    Returns
    -------
    dict of str to callable
    """
    _check_engine(engine)
    x, dy = case.x, case.dy
    if case.layer.interface == "linear_operator":
        view = (op.as_linear_operator() if engine is None
                else op.as_linear_operator(_LINEAR_OPERATOR_METHOD[engine]))
        xv, dv = x.reshape(-1), dy.reshape(-1)
        return {"forward": lambda: view.matvec(xv), "adjoint": lambda: view.rmatvec(dv)}
    if engine is None:
        return {"forward": lambda: op.forward(x), "adjoint": lambda: op.backward_input(dy),
                "weight_grad": lambda: op.weight_grad(x, dy)}
    product, gradient = _PRODUCT_METHOD[engine], _WEIGHT_GRAD_METHOD[engine]
    return {"forward": lambda: op.forward(x, method=product),
            "adjoint": lambda: op.backward_input(dy, method=product),
            "weight_grad": lambda: op.weight_grad(x, dy, method=gradient)}


def forward(op: ConvOperator, x: np.ndarray, engine: Optional[str] = None,
            threads: Optional[int] = None) -> np.ndarray:
    """``op``'s forward product of an NCHW batch on ``engine`` (None: the default) and ``threads``."""
    _check_engine(engine)
    if engine is None:
        return op.forward(x, threads=threads)
    return op.forward(x, method=_PRODUCT_METHOD[engine], threads=threads)


def set_weight(op: ConvOperator, w: np.ndarray) -> None:
    """New weight values into the operator's structure (the per-training-step refresh)."""
    op.set_weight(w)


def matrix_facts(op: ConvOperator) -> dict:
    """``matrix_shape``, ``nnz`` and ``density`` of the operator's matrix, for the JSON."""
    rows, cols = op.shape
    return {"matrix_shape": [rows, cols], "nnz": int(op.nnz), "density": op.nnz / (rows * cols)}


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
    """The explicit matrix's value array (what ``set_weight`` writes), e.g. to time a plain copy of it."""
    return op.matrix.data


def to_dense(op: ConvOperator) -> np.ndarray:
    """The operator's matrix as a dense ndarray of shape ``op.shape``."""
    return op.matrix.toarray()


def matrix(op: ConvOperator) -> Any:
    """The operator's explicit matrix, a ``scipy.sparse.csr_array`` of shape ``op.shape``."""
    return op.matrix
