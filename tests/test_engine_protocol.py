"""The engine protocol: an engine added as one module plus one registry entry runs every
product of every operator, on the reference grid, and is charged to the memory budget."""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv as sc
from sparseconv import engines
from sparseconv import reference as ref
from sparseconv.testing import assert_allclose, dottest

from engine_dense import DenseEngine
from magnitudes import magnitudes
from test_conv import GRID


@pytest.fixture
def dense_registered(monkeypatch):
    monkeypatch.setitem(engines._MODULES, "dense", "engine_dense")
    DenseEngine.built.clear()


@pytest.mark.parametrize("case", GRID[::4], ids=[c.id for c in GRID[::4]])
def test_a_registered_engine_runs_the_grid(dense_registered, case):
    x, w, b, dy = case.arrays()
    op = sc.ConvOperator(w, (case.c, *case.in_size), bias=b, engine="dense", **case.opts)
    assert [op.engine(p) for p in engines.PRODUCTS] == ["dense"] * 3
    assert op._structure._forward_table is None  # nothing of the other engines is built
    sy, sdx, sdw = magnitudes(x, w, dy, case.opts)
    sy += float(np.abs(b).max())
    assert_allclose(op.forward(x), ref.conv_direct(x, w, b, **case.opts), scale=sy)
    dx_ref, dw_ref, _ = ref.conv_direct_backward(x, w, dy, **case.opts)
    assert_allclose(op.backward_input(dy), dx_ref, scale=sdx)
    assert_allclose(op.weight_grad(x, dy), dw_ref, scale=sdw)
    dottest(op)


def test_a_registered_engine_serves_per_call_and_through_the_other_operators(dense_registered):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3))
    op = sc.ConvOperator(w, (2, 6, 6), padding=1)
    x = rng.standard_normal((2, 2, 6, 6))
    assert_allclose(op.forward(x, engine="dense"), op.forward(x, engine="csr"))
    assert_allclose(op.as_linear_operator("dense") @ x.reshape(2, -1).T, op.matrix @ x.reshape(2, -1).T)
    up = sc.ConvTransposeOperator(rng.standard_normal((2, 3, 3, 3)), (2, 4, 4), stride=2, engine="dense")
    assert up.engine("forward") == "dense"
    assert_allclose(up.forward(np.ones((1, 2, 4, 4))), up.forward(np.ones((1, 2, 4, 4)), engine="csr"))
    pool = sc.PoolOperator((2, 6, 6), 2, engine="dense")
    assert_allclose(pool @ np.ones(72), np.ones(18))
    assert DenseEngine.built


def test_a_registered_engine_is_charged_to_the_budget(dense_registered):
    with pytest.raises(sc.MemoryBudgetError, match="the dense matrix of this convolution"):
        sc.ConvOperator(np.ones((2, 2, 3, 3)), (2, 16, 16), engine="dense", memory_budget="100KiB")
    assert DenseEngine.built == []


@pytest.mark.slow  # the 2x600x600 layer's CSR matrix (13 M entries) is built first
def test_an_engine_that_cannot_run_a_structure_is_refused(dense_registered):
    op = sc.ConvOperator(np.ones((2, 2, 3, 3)), (2, 600, 600))
    with pytest.raises(ValueError, match="engine 'dense' cannot run the forward product"):
        op.forward(np.ones((1, 2, 600, 600)), engine="dense")
