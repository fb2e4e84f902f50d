"""The policy's memory-budget rule: ``"implicit"`` where the numba engine's matrix would not fit.

With numba importable, the products the policy gives to ``"numba"`` go to ``"implicit"`` instead
when ``NumbaProtocolEngine.full_nbytes(structure)`` -- everything the numba engine builds for all
three products -- exceeds the layer's memory budget and the padding is zeros (one decision per
layer: the products' engines share the budget). The tests check the choice from the estimates,
that the chosen engines then run every product within the budget (charged bytes, ``op.nbytes``)
and give the direct convolution's results, that budgets which fit the implicit engine never
fail, that a refused product leaves the budget as it was, and that repeating padding modes and
the no-numba policy never choose it.
"""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv as sc
from sparseconv import reference as ref
from sparseconv.engines import PRODUCTS, choose_engine, engine_class
from sparseconv.engines.base import Structure
from sparseconv.testing import assert_allclose

from cases import Case

pytest.importorskip("numba", reason="the rule concerns the compiled engines (pip install 'sparseconv[fast]')")

NUMBA = engine_class("numba")
IMPLICIT = engine_class("implicit")

# A pruned layer (70% of the weights masked: the compiled engines take every product) and a
# narrow dense one (the CSR kernel's products, hence "numba"; its kernel gradient is factored).
PRUNED = Case((16, 16), (3, 3), c=8, f=8, padding=1, dtype="float32")
NARROW = Case((12, 12), (3, 3), c=3, f=2, padding=1, stride=(1, 2))


def _mask(case: Case):
    if case is NARROW:
        return None
    return np.random.default_rng(0).random(case.weight_shape) < 0.3


def _structure(case: Case, budget=None) -> Structure:
    return Structure(case.geometry(), np.dtype(case.dtype), weight_mask=_mask(case), memory_budget=budget)


def _operator(case: Case, budget=None) -> sc.ConvOperator:
    mask = _mask(case)
    w = np.random.default_rng(1).standard_normal(case.weight_shape)
    if mask is not None:
        w = np.where(mask, w, 0)
    return sc.ConvOperator(w.astype(case.dtype), (case.c, *case.in_size), weight_mask=mask, memory_budget=budget,
                           **case.opts)


def _run_all_products(op: sc.ConvOperator, case: Case) -> None:
    """Forward, adjoint and kernel gradient against the direct convolution."""
    x, _, _, dy = case.arrays(2)
    w = np.asarray(op.weight)
    dx, dw, _ = ref.conv_direct_backward(x, w, dy, **case.opts)
    assert_allclose(op.forward(x), ref.conv_direct(x, w, None, **case.opts))
    assert_allclose(op.backward_input(dy), dx)
    mask = op.weight_mask
    assert_allclose(op.weight_grad(x, dy), dw if mask is None else np.where(mask, dw, 0))


@pytest.mark.parametrize("case", [PRUNED, NARROW], ids=["pruned", "narrow"])
def test_default_budget_keeps_the_numba_engine(case):
    op = _operator(case)
    expected = {"forward": "numba", "adjoint": "numba", "weight_grad": "numba" if case is PRUNED else "factored"}
    assert {p: op.engine(p) for p in PRODUCTS} == expected


@pytest.mark.parametrize("case", [PRUNED, NARROW], ids=["pruned", "narrow"])
def test_small_budget_picks_implicit_and_products_run_within_it(case):
    """A budget below the numba engine's estimate for every product but above the implicit
    engine's whole tables (and the factored kernel gradient's tap table, which the narrow layer
    keeps): every numba product becomes implicit, nothing exceeds the budget."""
    s = _structure(case)
    budget = IMPLICIT.estimate_nbytes(s, "adjoint") + engine_class("factored").estimate_nbytes(s, "weight_grad") + 1
    assert budget < NUMBA.full_nbytes(s)
    op = _operator(case, budget)
    expected = {"forward": "implicit", "adjoint": "implicit",
                "weight_grad": "implicit" if case is PRUNED else "factored"}
    assert {p: op.engine(p) for p in PRODUCTS} == expected
    _run_all_products(op, case)
    assert 0 < op.nbytes <= budget


@pytest.mark.parametrize("case", [PRUNED, NARROW], ids=["pruned", "narrow"])
@pytest.mark.parametrize("scale", [0.3, 0.5, 0.99, 1.0, 1.01, 1.6, 2.0])
def test_choice_follows_the_numba_estimate(case, scale):
    """For the layer: ``"implicit"`` exactly where the numba engine's whole footprint exceeds the budget."""
    full = NUMBA.full_nbytes(_structure(case))
    budget = int(scale * full)
    s = _structure(case, budget)
    for product in PRODUCTS:
        uncompiled_factored = case is NARROW and product == "weight_grad"
        if uncompiled_factored:
            expected = "factored"
        else:
            expected = "implicit" if full > budget else "numba"
        assert choose_engine(s, product) == expected, (product, budget)


MIXES = {
    # name -> (budget from the estimates, the engines it leads to)
    "all-numba-ample": (lambda s: 10 * NUMBA.full_nbytes(s), ("numba", "numba", "numba")),
    "all-numba-exact": (lambda s: NUMBA.full_nbytes(s), ("numba", "numba", "numba")),
    "all-implicit-one-byte-short": (lambda s: NUMBA.full_nbytes(s) - 1, ("implicit", "implicit", "implicit")),
    "all-implicit": (lambda s: IMPLICIT.estimate_nbytes(s, "adjoint") + 1, ("implicit", "implicit", "implicit")),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_choices_run_within_the_budget(mix):
    """Budgets on both sides of the numba engine's footprint: every product runs, is right,
    and the bytes charged stay within the budget."""
    budget_of, expected = MIXES[mix]
    budget = budget_of(_structure(PRUNED))
    op = _operator(PRUNED, budget)
    assert tuple(op.engine(p) for p in PRODUCTS) == expected
    _run_all_products(op, PRUNED)
    assert op.nbytes <= budget


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_repeating_padding_never_picks_implicit(mode):
    case = Case(PRUNED.in_size, PRUNED.kernel, c=PRUNED.c, f=PRUNED.f, padding=1, padding_mode=mode,
                dtype=PRUNED.dtype)
    for budget in (None, 10_000, 1_000):
        s = Structure(case.geometry(), np.dtype(case.dtype), weight_mask=_mask(PRUNED), memory_budget=budget)
        assert not IMPLICIT.applicable(s, "forward")
        for product in PRODUCTS:
            assert choose_engine(s, product) != "implicit", (product, budget)


def test_without_numba_the_policy_never_picks_compiled_engines(uncompiled_policy):
    for case in (PRUNED, NARROW):
        s = _structure(case, 1_000)
        assert {choose_engine(s, p) for p in PRODUCTS} <= {"csr", "factored"}


def _implicit_fits_but_auto_fails(which: str) -> int:
    """A budget inside a window where per-product estimates (not the rule) would lead to a failure."""
    s = _structure(PRUNED)
    if which == "construction":
        # The forward's numba estimate just fits, so the forward is numba, the adjoint implicit:
        # their sum does not fit.
        budget = NUMBA.estimate_nbytes(s, "forward") + 1
    else:
        # Each product's numba estimate just fits on its own; forward + adjoint + the kernel
        # gradient's entry order together do not.
        budget = NUMBA.estimate_nbytes(s, "weight_grad") + 1
    assert IMPLICIT.estimate_nbytes(s, "adjoint") < budget  # all-implicit would fit easily
    return budget


@pytest.mark.parametrize("which", ["construction", "weight_grad"])
def test_auto_never_exceeds_a_budget_the_implicit_engine_fits_in(which):
    budget = _implicit_fits_but_auto_fails(which)
    op = _operator(PRUNED, budget)
    _run_all_products(op, PRUNED)
    assert op.nbytes <= budget


@pytest.mark.parametrize("engine", ["implicit", "numba"])
def test_a_refused_adjoint_leaves_the_forward_its_budget(engine):
    case = Case((8, 8), (3, 3), c=3, f=4, padding=1)
    x, w, _, dy = case.arrays(0)
    cls = engine_class(engine)
    s = Structure(case.geometry(), np.dtype(case.dtype))
    forward, adjoint = cls.estimate_nbytes(s, "forward"), cls.estimate_nbytes(s, "adjoint")
    built = sc.ConvOperator(w, (case.c, *case.in_size), engine="factored", **case.opts).nbytes
    budget = built + (forward + adjoint) // 2
    op = sc.ConvOperator(w, (case.c, *case.in_size), engine="factored", memory_budget=budget, **case.opts)
    assert op.nbytes == built and built + forward <= budget < built + adjoint
    with pytest.raises(sc.MemoryBudgetError):
        op.backward_input(dy, engine=engine)
    assert op.nbytes == built  # the refused product built and charged nothing
    # The forward alone fits, and is charged once.
    assert_allclose(op.forward(x, engine=engine), ref.conv_direct(x, w, None, **case.opts))
    assert op.nbytes <= built + forward


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_numba_estimates_and_refusals_build_nothing(mode):
    """Repeating padding (entries may hold weight sums): the numba engine's estimate builds no
    pattern, and a product the budget refuses leaves the operator as it was."""
    case = Case((8, 8), (3, 3), c=3, f=4, padding=1, padding_mode=mode)
    x, w, _, _ = case.arrays(0)
    op = sc.ConvOperator(w, (case.c, *case.in_size), engine="factored", **case.opts)
    s = op._structure
    built = s.built_bytes
    assert NUMBA.estimate_nbytes(s, "forward") > 0 and NUMBA.full_nbytes(s) > 0
    assert s.built_bytes == built and s._pattern is None
    tight = sc.ConvOperator(w, (case.c, *case.in_size), engine="factored", memory_budget=op.nbytes + 64, **case.opts)
    with pytest.raises(sc.MemoryBudgetError):
        tight.forward(x, engine="numba")
    assert tight.nbytes == op.nbytes and tight._structure._pattern is None
