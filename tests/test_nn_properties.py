"""Property-based tests (hypothesis) of the nn layer contract.

For random valid *and* invalid arguments: either the right result, checked against an
independent reference, or a ``ValueError``/``TypeError`` raised by sparseconv -- never another
exception type, and never a changed object after a refused call.
"""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseconv import reference as ref
from sparseconv.nn import (ELU, SGD, AvgPool2d, Conv2d, Flatten, LeakyReLU, Linear, MaxPool2d, Parameter, ReLU,
                           Sequential, Tanh)
from sparseconv.testing import assert_allclose

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ints with bad ones mixed in: zero, negative, bools, floats, strings, None
loose_int = st.one_of(st.integers(-1, 4), st.booleans(), st.floats(0.5, 3.5), st.just("2"), st.none())
good_int = st.integers(1, 3)


@SETTINGS
@given(stride=st.one_of(good_int, loose_int), dilation=st.one_of(good_int, loose_int),
       padding=st.one_of(st.integers(-1, 3), st.sampled_from(["valid", "same", "full", "half"]), st.just((1, 0))),
       groups=st.one_of(st.sampled_from([1, 2]), loose_int),
       padding_mode=st.sampled_from(["zeros", "circular", "reflect", "replicate", "bogus"]),
       kernel=st.integers(1, 3), size=st.tuples(st.integers(1, 7), st.integers(1, 7)), seed=st.integers(0, 99))
def test_conv2d_is_refused_at_construction_or_right(stride, dilation, padding, groups, padding_mode, kernel, size,
                                                    seed):
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)
    try:
        layer = Conv2d(2, 4, kernel, rng=seed, **options)
    except (ValueError, TypeError):
        return
    x = np.random.default_rng(seed).standard_normal((2, 2, *size))
    try:
        y = layer.forward(x)
    except ValueError:
        # only the input size can be wrong now: the reference must refuse these sizes too
        try:
            ref.conv_direct(x, layer.weight.data, layer.bias.data, **options)
        except ValueError:
            return
        raise
    assert y.shape[1:] == layer.output_shape(x.shape[1:])
    assert_allclose(y, ref.conv_direct(x, layer.weight.data, layer.bias.data, **options))


@SETTINGS
@given(value=st.one_of(
    st.just(np.zeros((2, 3))), st.just(np.ones((3, 2))), st.just(np.ones((3, 2), np.float32)),
    st.just(np.ones((3, 2), complex)), st.just(np.ones((3, 2), bool)), st.just(np.arange(6).reshape(3, 2)),
    st.just(np.full((3, 2), "a")), st.just(None), st.just(3.0), st.just([[1.0, 2.0]] * 3)))
def test_parameter_assignment_is_exact_or_refused_unchanged(value):
    p = Parameter(np.random.default_rng(0).standard_normal((3, 2)))
    before, version = p.data.copy(), p.version
    try:
        p.data = value
    except (ValueError, TypeError):
        np.testing.assert_array_equal(p.data, before)
        assert p.version == version
        return
    np.testing.assert_array_equal(p.data, np.asarray(value, dtype=np.float64))
    assert p.version != version


@SETTINGS
@given(lr=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.text(max_size=2),
                    st.none(), st.booleans()),
       momentum=st.one_of(st.floats(-1, 2), st.just(np.nan), st.just("x")),
       weight_decay=st.one_of(st.floats(-1, 1), st.just(np.inf)))
def test_sgd_takes_finite_non_negative_numbers_or_names_the_argument(lr, momentum, weight_decay):
    p = Parameter(np.ones(3))
    p.grad[...] = 1.0
    try:
        opt = SGD([p], lr, momentum=momentum, weight_decay=weight_decay)
    except (ValueError, TypeError) as err:
        assert any(name in str(err) for name in ("lr", "momentum", "weight_decay"))
        return
    opt.step()
    assert np.all(np.isfinite(p.data))
    assert_allclose(p.data, 1.0 - float(lr) * (1.0 + float(weight_decay)) * np.ones(3))


# A pool of layers that keep the shape (N, 2, 6, 6), some used several times in one network.
def _pool():
    return [Conv2d(2, 2, 3, padding=1, rng=0), Conv2d(2, 2, 3, padding=1, padding_mode="reflect", rng=1), ReLU(),
            Tanh(), LeakyReLU(0.2), ELU(0.5)]


@SETTINGS
@given(picks=st.lists(st.integers(0, 5), min_size=1, max_size=6), seed=st.integers(0, 99))
def test_networks_with_repeated_layers_have_the_gradients_of_distinct_copies(picks, seed):
    pool = _pool()
    layers = [pool[i] for i in picks]
    head = [AvgPool2d(1), MaxPool2d(1)]
    tail = [Flatten(), Linear(72, 3, rng=2)]
    shared = Sequential(*head, *layers, *tail)
    # the reference: a fresh copy per occurrence, gradients summed per pool layer afterwards
    copies = [copy.deepcopy(layer) for layer in layers]
    distinct = Sequential(*copy.deepcopy(head), *copies, *copy.deepcopy(tail))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2, 6, 6))
    dy = rng.standard_normal((2, 3))
    shared.zero_grad()
    distinct.zero_grad()
    assert_allclose(shared.forward(x), distinct.forward(x))
    assert_allclose(shared.backward(dy), distinct.backward(dy))
    for i, layer in enumerate(pool):
        for name, p in layer.named_parameters():
            expected = sum(c.params[name].grad for c, j in zip(copies, picks) if j == i)
            assert_allclose(p.grad, expected if picks.count(i) else np.zeros_like(p.grad), err_msg=f"{i}.{name}")
