"""The benchmark method of a sparse operator engine: build the operator once, time its products.

Each engine method is a small module (``sparse.py``, ``csr.py``, ``factored.py``) that calls
:func:`engine_method` with its engine's name; a new engine is a new module of three lines.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..suites import Case
from ..timing import measure
from . import _operator
from ._base import Prepared, Settings

__all__ = ["engine_method"]


def engine_method(name: str, engine: Optional[str]) -> Callable[[Case, Settings], Prepared]:
    """The ``prepare`` function of the method ``name`` running the operator on ``engine``.

    Parameters
    ----------
    name : str
        The method's name in the results.
    engine : str or None
        The engine every product runs on; None for the operator's defaults (``"auto"``).

    Returns
    -------
    callable
        ``prepare(case, settings) -> Prepared``: the operator and its tables built (their
        construction timed separately and counted in the method's buffer), one callable per
        pass, ``set_weight`` as the refresh.
    """

    def prepare(case: Case, settings: Settings) -> Prepared:
        op, held = _operator.build(case, settings.budget, engine)
        build = measure(lambda: _operator.build(case, settings.budget, engine), repeats=min(settings.repeats, 3),
                        max_seconds=settings.max_seconds, warmup=False)
        engines = _operator.engines_in_force(op, case.layer.passes, case.layer.interface, engine)
        w = case.w
        return Prepared(
            method=name, passes=_operator.passes(op, case, engine), flat=case.layer.interface == "linear_operator",
            buffer_name="sparse matrix (values, indices, indptr, tying map) and the factored engine's tables",
            buffer_bytes=held, build_s=build["median_s"], refresh=lambda: _operator.set_weight(op, w),
            info={**_operator.matrix_facts(op), "engines": engines, "interface": case.layer.interface})

    prepare.__name__ = f"prepare_{name}"
    prepare.__doc__ = (f"Set up method {name!r}: the operator with "
                       f"{'its default engines' if engine is None else f'engine {engine!r}'} for every product.")
    return prepare
