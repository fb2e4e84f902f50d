"""Masked parameters through their cached kept indices: ``Parameter``, ``SGD``, ``set_weight``.

``Parameter.kept_indices()`` (the flat indices where the mask is True, found once) now drives
the mask checks of :meth:`~sparseconv.nn.Parameter.assign`, checkpoint loading and
``ConvOperator.set_weight`` (through ``nonzero_outside``), the masked update
``Parameter._update`` and the gradient masking of :meth:`~sparseconv.nn.SGD.step`. ``SGD`` is
compared bit for bit with an independent numpy re-implementation of the formula it had before
(``g = np.where(mask, g, 0)``; ``v = m v + g``; ``value -= lr v``; ``value[~mask] = 0``), over
several steps with momentum and weight decay and with gradients that are non-zero, infinite or
NaN at masked positions. The refusals are compared with ``np.any(value[~mask] != 0)``.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import sparseconv as sc
import sparseconv.nn as nn
from sparseconv.nn import SGD, Parameter

DTYPES = ["float32", "float64"]


def assert_same_bits(actual, desired, what=""):
    assert actual.dtype == desired.dtype and actual.shape == desired.shape, (what, actual.dtype, desired.dtype)
    uint = np.dtype(f"u{actual.dtype.itemsize}")
    assert np.array_equal(np.ascontiguousarray(actual).view(uint), np.ascontiguousarray(desired).view(uint)), what


def _mask(kind, shape, seed):
    if kind == "none":
        return None
    if kind == "all-kept":
        return np.ones(shape, bool)
    if kind == "none-kept":
        return np.zeros(shape, bool)
    return np.random.default_rng(seed).random(shape) < 0.35


MASKS = ["none", "random", "all-kept", "none-kept"]


def _parameter(shape, dtype, mask_kind, seed=0):
    mask = _mask(mask_kind, shape, seed)
    value = np.random.default_rng(seed + 1).standard_normal(shape).astype(dtype)
    if mask is not None:
        value = np.where(mask, value, 0).astype(dtype)
    return Parameter(value, mask), mask


def _gradients(shape, dtype, mask, steps, seed, junk_outside):
    """Gradients per step; with ``junk_outside``, NaN, infinities and large values where the mask is False."""
    rng = np.random.default_rng(seed)
    grads = []
    for _ in range(steps):
        g = rng.standard_normal(shape).astype(dtype)
        if junk_outside and mask is not None:
            junk = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30, -7.0], dtype=dtype), size=shape)
            g = np.where(mask, g, junk)
        grads.append(g)
    return grads


def sgd_reference(value, mask, grads, lr, momentum, weight_decay):
    """The masked SGD update as it was written before kept indices (an independent re-implementation)."""
    value = value.copy()
    v = np.zeros_like(value)
    for grad in grads:
        with np.errstate(invalid="ignore", over="ignore"):
            g = grad if weight_decay == 0 else grad + weight_decay * value
        if mask is not None:
            g = np.where(mask, g, 0)
        if momentum:
            v *= momentum
            v += g
            g = v
        value -= lr * g
        if mask is not None:
            value[~mask] = 0
    return value


SGD_SETTINGS = [(0.1, 0.0, 0.0), (0.1, 0.9, 0.0), (0.05, 0.0, 1e-2), (0.01, 0.9, 5e-4), (0.0, 0.5, 0.1)]


# (mask, junk gradients at the masked entries): junk only where there are masked entries.
MASK_CASES = [("none", False), ("all-kept", False), ("random", False), ("random", True), ("none-kept", False),
              ("none-kept", True)]


@pytest.mark.parametrize("lr, momentum, weight_decay", SGD_SETTINGS,
                         ids=[f"lr{a}-m{b}-wd{c}" for a, b, c in SGD_SETTINGS])
@pytest.mark.parametrize("mask_kind, junk_outside", MASK_CASES,
                         ids=[f"{m}-{'nan-inf-grads-at-masked' if j else 'clean-grads'}" for m, j in MASK_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_matches_the_masked_formula(dtype, mask_kind, junk_outside, lr, momentum, weight_decay):
    shape = (6, 3, 5)
    p, mask = _parameter(shape, dtype, mask_kind)
    start = p.data.copy()
    grads = _gradients(shape, dtype, mask, 5, 7, junk_outside)
    opt = SGD([p], lr, momentum=momentum, weight_decay=weight_decay)
    for g in grads:
        version = p.version
        p.grad[...] = g
        opt.step()
        assert p.version != version
    expected = sgd_reference(start, mask, grads, lr, momentum, weight_decay)
    assert_same_bits(p.data, expected, f"{mask_kind} after 5 steps")
    assert np.all(np.isfinite(p.data))
    if mask is not None:
        assert not np.any(p.data[~mask])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_layer_parameters_in_a_network(dtype):
    # A pruned conv and a masked Linear trained a few steps: the same bits as the formula.
    wmask = np.random.default_rng(1).random((4, 2, 3, 3)) < 0.4
    lmask = np.random.default_rng(2).random((3, 64)) < 0.5
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, weight_mask=wmask, dtype=dtype, rng=3), nn.Tanh(), nn.Flatten(),
                        nn.Linear(64, 3, weight_mask=lmask, dtype=dtype, rng=4))
    params = net.parameters()
    starts = [p.data.copy() for p in params]
    opt = SGD(params, 0.05, momentum=0.9, weight_decay=1e-3)
    rng = np.random.default_rng(5)
    seen = [[] for _ in params]
    for _ in range(3):
        x = rng.standard_normal((2, 2, 4, 4)).astype(dtype)
        opt.zero_grad()
        net.forward(x)
        net.backward(rng.standard_normal((2, 3)).astype(dtype), input_grad=False)
        for i, p in enumerate(params):
            seen[i].append(p.grad.copy())
        opt.step()
    for p, start, grads in zip(params, starts, seen):
        assert_same_bits(p.data, sgd_reference(start, p.mask, grads, 0.05, 0.9, 1e-3), repr(p))


def test_sgd_respects_a_new_mask():
    # set_weight_mask replaces the mask: the kept indices follow, and the next steps use them.
    layer = nn.Conv2d(1, 2, 3, dtype=np.float64, rng=0)
    p = layer.weight
    assert p.kept_indices() is None
    first = np.random.default_rng(1).random(p.shape) < 0.5
    layer.set_weight_mask(first)
    np.testing.assert_array_equal(p.kept_indices(), np.flatnonzero(first))
    second = np.random.default_rng(2).random(p.shape) < 0.5
    layer.set_weight_mask(second)
    kept = p.kept_indices()
    np.testing.assert_array_equal(kept, np.flatnonzero(second))
    start = p.data.copy()
    opt = SGD([p], 0.1, momentum=0.9)
    grads = _gradients(p.shape, np.float64, second, 3, 3, True)
    for g in grads:
        p.grad[...] = g
        opt.step()
    assert_same_bits(p.data, sgd_reference(start, second, grads, 0.1, 0.9, 0.0), "after the new mask")
    layer.set_weight_mask(None)
    assert p.kept_indices() is None


# ---------------------------------------------------------------------- kept indices
@pytest.mark.parametrize("mask_kind", MASKS)
def test_kept_indices(mask_kind):
    p, mask = _parameter((4, 5), np.float64, mask_kind)
    kept = p.kept_indices()
    if mask is None:
        assert kept is None
        return
    np.testing.assert_array_equal(kept, np.flatnonzero(mask))
    assert not kept.flags.writeable
    assert p.kept_indices() is kept
    with pytest.raises(ValueError):
        kept[...] = 0


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_kept_indices_survive_copies(how):
    p, mask = _parameter((4, 5), np.float64, "random")
    p.kept_indices()
    q = pickle.loads(pickle.dumps(p)) if how == "pickle" else copy.deepcopy(p)
    np.testing.assert_array_equal(q.kept_indices(), np.flatnonzero(mask))
    # The copy trains like the original.
    g = _gradients((4, 5), np.float64, mask, 1, 4, True)[0]
    for r in (p, q):
        r.grad[...] = g
        SGD([r], 0.1).step()
    assert_same_bits(q.data, p.data, "copy after a step")


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_kept_indices_read_only_after_copies(how):
    p, _ = _parameter((4, 5), np.float64, "random")
    p.kept_indices()
    q = pickle.loads(pickle.dumps(p)) if how == "pickle" else copy.deepcopy(p)
    assert not q.kept_indices().flags.writeable


# ---------------------------------------------------------------------- assign refusals
def _outside_value(mask, dtype, value, seed=0):
    v = np.where(mask, np.random.default_rng(seed).standard_normal(mask.shape), 0).astype(dtype)
    v[np.unravel_index(np.flatnonzero(~mask)[-1], mask.shape)] = value
    return v


OUTSIDE = {"one": 1.0, "tiny": 1e-30, "nan": np.nan, "inf": np.inf, "-inf": -np.inf, "negative-zero": -0.0,
           "zero": 0.0}


@pytest.mark.parametrize("layout", ["C", "F"])
@pytest.mark.parametrize("what", list(OUTSIDE))
@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_checks_masked_entries(dtype, what, layout):
    p, mask = _parameter((5, 4, 3), dtype, "random")
    before, version = p.data.copy(), p.version
    value = _outside_value(mask, dtype, OUTSIDE[what], seed=3)
    if layout == "F":
        value = np.asfortranarray(value)
    refuse = bool(np.any(value[~mask] != 0) | np.any(np.isnan(value[~mask])))
    assert refuse == (what not in ("negative-zero", "zero"))
    if refuse:
        with pytest.raises(ValueError, match="mask"):
            p.assign(value)
        assert_same_bits(p.data, before, "refused assign left the value")
        assert p.version == version
    else:
        p.assign(value)
        assert np.array_equal(p.data, value) and p.version != version
        # Stored as given (-0.0 stays -0.0) and held at zero through optimiser steps.
        p.grad[...] = 1.0
        SGD([p], 0.1, momentum=0.9).step()
        assert not np.any(p.data[~mask])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_after_negative_zero_at_masked_entries_same_bits(dtype):
    p, mask = _parameter((5, 4), dtype, "random")
    value = np.where(mask, p.data, np.array(-0.0, dtype)).astype(dtype)
    p.assign(value)
    grads = _gradients((5, 4), dtype, mask, 2, 8, True)
    opt = SGD([p], 0.1, momentum=0.9, weight_decay=1e-2)
    for g in grads:
        p.grad[...] = g
        opt.step()
    assert_same_bits(p.data, sgd_reference(value, mask, grads, 0.1, 0.9, 1e-2), "-0.0 at masked entries")


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_integer_values_checked_too(dtype):
    p, mask = _parameter((3, 4), dtype, "random")
    ints = np.zeros((3, 4), np.int64)
    ints[np.unravel_index(np.flatnonzero(~mask)[0], mask.shape)] = 2
    with pytest.raises(ValueError, match="mask"):
        p.assign(ints)
    ints[...] = 0
    ints[np.unravel_index(np.flatnonzero(mask)[0], mask.shape)] = 3
    p.assign(ints)
    assert p.data.reshape(-1)[np.flatnonzero(mask)[0]] == 3


def test_load_state_dict_checks_masked_entries():
    layer = nn.Linear(5, 3, weight_mask=np.random.default_rng(0).random((3, 5)) < 0.5, rng=0)
    state = layer.state_dict()
    bad = dict(state)
    w = state["weight"].copy()
    w[~layer.weight.mask] = 0.5
    bad["weight"] = w
    with pytest.raises(ValueError, match="mask"):
        layer.load_state_dict(bad)
    np.testing.assert_array_equal(layer.weight.data, state["weight"])
    ok = dict(state)
    w = state["weight"].copy()
    w[~layer.weight.mask] = -0.0
    ok["weight"] = w
    layer.load_state_dict(ok)


# ---------------------------------------------------------------------- ConvOperator.set_weight
@pytest.mark.parametrize("what", ["one", "nan", "inf", "negative-zero", "zero"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_operator_set_weight_checks_masked_entries(dtype, what):
    mask = np.random.default_rng(4).random((3, 2, 3, 3)) < 0.4
    w = np.where(mask, np.random.default_rng(5).standard_normal(mask.shape), 0).astype(dtype)
    op = sc.ConvOperator(w, (2, 6, 6), weight_mask=mask)
    x = np.random.default_rng(6).standard_normal((2 * 36, 2)).astype(dtype)
    y_before = op.matmat(x)
    w2 = _outside_value(mask, dtype, OUTSIDE[what], seed=7)
    if what in ("one", "nan", "inf"):
        with pytest.raises(ValueError, match="weight_mask"):
            op.set_weight(w2)
        assert_same_bits(op.matmat(x), y_before, "refused set_weight left the operator")
    else:
        op.set_weight(w2)
        op2 = sc.ConvOperator(np.where(mask, w2, 0).astype(dtype), (2, 6, 6), weight_mask=mask)
        assert_same_bits(op.matmat(x), op2.matmat(x), "set_weight")


def test_sgd_takes_an_f_ordered_gradient_of_a_masked_parameter():
    rng = np.random.default_rng(40)
    mask = rng.random((4, 3)) < 0.5
    w = np.where(mask, rng.standard_normal((4, 3)), 0.0)
    g = rng.standard_normal((4, 3))
    p = Parameter(w.copy(), mask=mask)
    p.grad = np.asfortranarray(g)
    SGD([p], 0.1).step()
    np.testing.assert_array_equal(p.data, w - 0.1 * np.where(mask, g, 0))


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_sgd_refuses_a_gradient_of_another_shape(masked):
    rng = np.random.default_rng(41)
    mask = rng.random((4, 3)) < 0.5 if masked else None
    w = rng.standard_normal((4, 3)) if mask is None else np.where(mask, rng.standard_normal((4, 3)), 0.0)
    p, q = Parameter(w.copy(), mask=mask), Parameter(w.copy(), mask=mask)
    p.grad = np.ones((4, 3))
    q.grad = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match=r"grad must have its shape \(4, 3\); got \(3, 4\)"):
        SGD([p, q], 0.1).step()
    # Refused before anything moved: p, checked first and valid, is unchanged too.
    np.testing.assert_array_equal(p.data, w)
    np.testing.assert_array_equal(q.data, w)


def test_sgd_clears_values_written_at_masked_entries_through_shared_memory():
    """A write behind the parameter's back (its memory shared with another library) that puts
    non-zeros at masked entries is cleared by the next update, as value[~mask] = 0 did."""
    rng = np.random.default_rng(42)
    mask = rng.random((5, 4)) < 0.5
    w = np.where(mask, rng.standard_normal((5, 4)), 0.0)
    p = Parameter(w.copy(), mask=mask)
    shared = p._value  # what torch.from_numpy(p.data) would share
    shared[~mask] = 7.0
    p.touch()
    g = rng.standard_normal((5, 4))
    p.grad[...] = g
    SGD([p], 0.1).step()
    want = np.where(mask, w - 0.1 * g, 0.0)
    np.testing.assert_array_equal(p.data, want)
