"""The benchmark method of a sparse operator engine: build the operator once, time its products.

Each engine method is a small module (``sparse.py``, ``csr.py``, ``factored.py``) that calls
:func:`engine_method` with its engine's name (``None`` for the operator's default, ``"auto"``);
an engine registered in :mod:`sparseconv.engines` gets its method from a new module of three
lines.
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
        The engine every product runs on (a name of :data:`sparseconv.engines.ENGINE_NAMES`);
        None for the operator's default (``"auto"``, per product).

    Returns
    -------
    callable
        ``prepare(case, settings) -> Prepared``: the operator constructed on ``engine`` with
        what its passes use built (timed -- the median of up to three builds, or the first
        alone when it takes over a third of ``settings.max_seconds`` -- and counted in the
        method's buffer), one callable per pass, ``set_weight`` as the refresh. Engine
        methods of one case whose passes run on the same engines share one operator
        (``_operator.shared_build``).
    """

    def prepare(case: Case, settings: Settings) -> Prepared:
        op, held, build_s = _operator.shared_build(case, settings.budget, engine)
        if settings.repeats > 1 and 3 * build_s < settings.max_seconds:
            # Cheap enough to repeat: the median of up to three builds is less noisy than the first.
            # (A large operator is built once: two alive at once would double the peak memory.)
            build_s = measure(lambda: _operator.build(case, settings.budget, engine),
                              repeats=min(settings.repeats, 3), max_seconds=settings.max_seconds,
                              warmup=False)["median_s"]
        engines = _operator.engines_in_force(op, case.layer.passes)
        w = case.w
        return Prepared(
            method=name, passes=_operator.passes(op, case, engine), flat=case.layer.interface == "linear_operator",
            buffer_name="what the operator built for its engines: the sparse matrix (values, indices, indptr, "
                        "tying map) where used, the factored engine's tables, the compiled engines' transposed "
                        "matrix or tap lists where used",
            buffer_bytes=held, build_s=build_s, refresh=lambda: _operator.set_weight(op, w),
            info={**_operator.matrix_facts(op), "engines": engines, "interface": case.layer.interface})

    prepare.__name__ = f"prepare_{name}"
    prepare.__doc__ = (f"Set up method {name!r}: the operator with "
                       f"{'its default engines' if engine is None else f'engine {engine!r}'} for every product.")
    return prepare
