"""Layer state (issue 10, item 6): operator cache per input shape, shape queries from geometry,
parameter versions instead of array comparisons, and per-call contexts so one instance can
appear several times in a network with exact gradients.

References are independent of the code under test: the same network built from distinct
instances with copied weights, finite differences, and the dense convolution reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from sparseconv import reference as ref
from sparseconv.conv import ConvOperator
from sparseconv.nn import (SGD, AvgPool2d, ChannelAffine, Conv1d, Conv2d, ConvTranspose2d, Dropout, Flatten, Linear,
                           MaxPool2d, ReLU, Sequential, Subsampling2d, Tanh)
from sparseconv.testing import assert_allclose, gradcheck


def _gradients(net, x, dy):
    net.zero_grad()
    net.forward(x)
    dx = net.backward(dy)
    return dx, {name: p.grad.copy() for name, p in net.named_parameters()}


# ---------------------------------------------------------------------- reuse in one network
def _shared_relu_pair():
    """An MLP with the same ReLU instance after both hidden layers, and its twin with two ReLUs."""
    relu = ReLU()
    shared = Sequential(Linear(4, 6, rng=0), relu, Linear(6, 5, rng=1), relu, Linear(5, 3, rng=2))
    distinct = Sequential(Linear(4, 6, rng=0), ReLU(), Linear(6, 5, rng=1), ReLU(), Linear(5, 3, rng=2))
    return shared, distinct


def test_same_relu_twice_gives_the_gradients_of_two_distinct_relus():
    shared, distinct = _shared_relu_pair()
    x = np.random.default_rng(0).standard_normal((7, 4))
    dy = np.random.default_rng(1).standard_normal((7, 3))
    assert_allclose(shared.forward(x), distinct.forward(x))
    dx_s, g_s = _gradients(shared, x, dy)
    dx_d, g_d = _gradients(distinct, x, dy)
    assert_allclose(dx_s, dx_d)
    assert sorted(g_s) == sorted(g_d)
    for name in g_s:
        assert_allclose(g_s[name], g_d[name], err_msg=name)
    gradcheck(lambda v: float(np.sum(dy * shared.forward(v))), x, dx_s)


def test_same_conv_twice_accumulates_both_uses():
    # one Conv2d (padding keeps the shape) applied twice: its gradient is the sum over both uses
    conv = Conv2d(2, 2, 3, padding=1, rng=0)
    shared = Sequential(conv, Tanh(), conv, Tanh())
    a, b = Conv2d(2, 2, 3, padding=1, rng=0), Conv2d(2, 2, 3, padding=1, rng=0)
    distinct = Sequential(a, Tanh(), b, Tanh())
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 5))
    dy = np.random.default_rng(1).standard_normal((3, 2, 5, 5))
    assert_allclose(shared.forward(x), distinct.forward(x))
    dx_s, g_s = _gradients(shared, x, dy)
    dx_d, _ = _gradients(distinct, x, dy)
    assert_allclose(dx_s, dx_d)
    assert sorted(g_s) == ["0.bias", "0.weight"]
    assert_allclose(g_s["0.weight"], a.weight.grad + b.weight.grad)
    assert_allclose(g_s["0.bias"], a.bias.grad + b.bias.grad)
    base = conv.weight.data.copy()

    def loss(w):
        conv.weight.data = w
        return float(np.sum(dy * shared.forward(x)))

    gradcheck(loss, base, g_s["0.weight"])


def test_same_layer_at_two_input_shapes_in_one_network():
    # the same AvgPool2d on 8x8 and then on 4x4: two operators, each backward uses its own
    pool = AvgPool2d(2)
    shared = Sequential(pool, Tanh(), pool)
    distinct = Sequential(AvgPool2d(2), Tanh(), AvgPool2d(2))
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    dy = np.random.default_rng(1).standard_normal((2, 1, 2, 2))
    assert_allclose(shared.forward(x), distinct.forward(x))
    dx_s, _ = _gradients(shared, x, dy)
    dx_d, _ = _gradients(distinct, x, dy)
    assert_allclose(dx_s, dx_d)


@pytest.mark.parametrize("make,shape", [
    (lambda: MaxPool2d(2), (1, 8, 8)),
    (lambda: Subsampling2d(1), (1, 8, 8)),
    (lambda: ChannelAffine(np.array([0.5]), np.array([0.1])), (1, 4, 4)),
], ids=["maxpool", "subsampling", "channel_affine"])
def test_every_stateful_layer_can_be_reused(make, shape):
    layer = make()
    twin_a, twin_b = make(), make()
    shared = Sequential(layer, Tanh(), layer)
    distinct = Sequential(twin_a, Tanh(), twin_b)
    x = np.random.default_rng(0).permutation(np.arange(2 * int(np.prod(shape)), dtype=float)).reshape((2, *shape))
    x /= x.size
    y = shared.forward(x)
    assert_allclose(y, distinct.forward(x))
    dy = np.random.default_rng(1).standard_normal(y.shape)
    dx_s, g_s = _gradients(shared, x, dy)
    dx_d, _ = _gradients(distinct, x, dy)
    assert_allclose(dx_s, dx_d)
    for name, p in layer.named_parameters():
        assert_allclose(p.grad, twin_a.params[name].grad + twin_b.params[name].grad, err_msg=name)


def test_shared_parameters_are_listed_and_stepped_once():
    lin = Linear(3, 3, rng=0)
    net = Sequential(lin, Tanh(), lin)
    assert [name for name, _ in net.named_parameters()] == ["0.weight", "0.bias"]
    assert len(net.parameters()) == 2
    before = lin.weight.data.copy()
    net.forward(np.ones((1, 3)))
    net.backward(np.ones((1, 3)))
    grad = lin.weight.grad.copy()
    SGD(net.parameters(), lr=0.1).step()
    assert_allclose(lin.weight.data, before - 0.1 * grad)
    with pytest.raises(ValueError, match="more than once"):
        SGD([lin.weight, lin.weight], lr=0.1)


def test_nested_sequential_reuse():
    relu = ReLU()
    inner = Sequential(Linear(3, 3, rng=0), relu)
    net = Sequential(inner, relu, inner)
    twin = Sequential(Linear(3, 3, rng=0), ReLU(), ReLU(), Linear(3, 3, rng=0), ReLU())
    x = np.random.default_rng(0).standard_normal((4, 3))
    dy = np.random.default_rng(1).standard_normal((4, 3))
    assert_allclose(net.forward(x), twin.forward(x))
    dx, _ = _gradients(net, x, dy)
    dx_t, _ = _gradients(twin, x, dy)
    assert_allclose(dx, dx_t)


def test_backward_twice_after_one_forward_is_refused():
    layer = Tanh()
    layer.forward(np.ones((1, 2)))
    layer.backward(np.ones((1, 2)))
    with pytest.raises(ValueError, match="backward\\(\\) called before forward\\(\\)"):
        layer.backward(np.ones((1, 2)))


def test_inference_loops_do_not_accumulate_contexts():
    net = Sequential(Conv2d(1, 2, 3, rng=0), ReLU(), Flatten(), Linear(4, 2, rng=0))
    for _ in range(50):
        net.forward(np.ones((1, 1, 4, 3)))
    assert all(len(m._saved) <= 1 for m in net.modules())
    layer = Tanh()
    for _ in range(50):
        layer.forward(np.ones((1, 2)))
    assert len(layer._saved) == 1


# ---------------------------------------------------------------------- operator cache
def test_shape_queries_and_export_never_break_a_pending_backward():
    layer = Conv2d(1, 2, 3, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    dy = np.random.default_rng(1).standard_normal((2, 2, 6, 6))
    layer.forward(x)
    assert layer.output_shape((1, 6, 6)) == (2, 4, 4)
    layer.export((1, 5, 5))
    layer.connections((1, 7, 7))
    dx = layer.backward(dy)
    assert_allclose(dx, ConvOperator(layer.weight.data, (1, 8, 8)).backward_input(dy))


def test_output_shape_builds_nothing():
    layer = Conv2d(64, 64, 3, padding=1)
    # a 64 x 4096 x 4096 input would need tens of GiB of matrix; the shape comes from geometry
    assert layer.output_shape((64, 4096, 4096)) == (64, 4096, 4096)
    assert layer.op is None
    t = ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
    assert t.output_shape((3, 5, 5)) == (2, 10, 10)
    assert t.op is None


def test_output_shape_agrees_with_forward():
    cases = [(Conv1d(2, 3, 4, stride=3, padding=2, dilation=2), (2, 17)),
             (ConvTranspose2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)), (2, 4, 5)),
             (MaxPool2d(3, 2, 1), (2, 9, 8)), (AvgPool2d((2, 3)), (1, 7, 7)), (Subsampling2d(2, 3), (2, 9, 6))]
    for layer, shape in cases:
        y = layer.forward(np.ones((1, *shape)))
        assert y.shape[1:] == layer.output_shape(shape), layer


def test_cache_keeps_one_operator_per_shape():
    layer = Conv2d(1, 1, 3, rng=0)
    ops = [layer.build((1, n, n)) for n in (5, 6, 5)]
    assert ops[0] is ops[2] and ops[0] is not ops[1]
    for n in range(5, 5 + layer.CACHE_SIZE + 2):
        layer.build((1, n, n))
    assert len(layer._operators) == layer.CACHE_SIZE


# ---------------------------------------------------------------------- versions
def test_operator_values_refresh_only_when_the_version_changes(monkeypatch):
    calls = []
    original = ConvOperator.set_weight

    def counting(self, weight):
        calls.append(1)
        return original(self, weight)

    monkeypatch.setattr(ConvOperator, "set_weight", counting)
    layer = Conv2d(1, 2, 3, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6))
    layer.forward(x)
    built = len(calls)
    for _ in range(5):
        layer.forward(x)
    assert len(calls) == built
    opt = SGD(layer.parameters(), lr=0.1)
    layer.backward(np.ones((2, 2, 4, 4)))
    version = layer.weight.version
    opt.step()
    assert layer.weight.version != version
    y = layer.forward(x)
    assert len(calls) == built + 1
    assert_allclose(y, ref.conv_direct(x, layer.weight.data, layer.bias.data))


def test_versions_are_bumped_by_assign_load_and_sgd_and_never_reused():
    layer = Linear(2, 2, rng=0)
    seen = {layer.weight.version}
    layer.weight.data = np.zeros((2, 2))
    seen.add(layer.weight.version)
    layer.load_state_dict({"weight": np.ones((2, 2)), "bias": np.zeros(2)})
    seen.add(layer.weight.version)
    layer.weight.grad[...] = 1
    SGD(layer.parameters(), lr=0.5).step()
    seen.add(layer.weight.version)
    layer.weight.touch()
    seen.add(layer.weight.version)
    other = Linear(2, 2, rng=0)
    assert len(seen) == 5 and other.weight.version not in seen


def test_in_place_writes_to_parameter_data_are_refused():
    layer = Conv2d(1, 1, 3, rng=0)
    with pytest.raises(ValueError, match="read-only"):
        layer.weight.data[...] = 0
    with pytest.raises(ValueError, match="read-only"):
        layer.weight.data *= 2


def test_parameter_assignment_is_validated():
    p = Linear(2, 3, rng=0).weight
    before = p.data.copy()
    for value, exc, match in [(np.zeros((2, 3)), ValueError, r"shape \(3, 2\)"),
                              (np.zeros((3, 2), dtype=np.float32), TypeError, "dtype float32"),
                              (np.zeros((3, 2), dtype=complex), TypeError, "real numeric"),
                              (np.array([["a", "b"]] * 3), TypeError, "real numeric")]:
        with pytest.raises(exc, match=match):
            p.data = value
        np.testing.assert_array_equal(p.data, before)
    p.data = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(p.data, np.arange(6.0).reshape(3, 2))


def test_changing_parameters_between_forward_and_backward_is_refused():
    layer = Conv2d(1, 1, 3, rng=0)
    layer.forward(np.ones((1, 1, 5, 5)))
    layer.weight.data = np.zeros((1, 1, 3, 3))
    layer.export((1, 5, 5))       # refreshes the operator the pending call ran with
    with pytest.raises(ValueError, match="changed between forward\\(\\) and backward\\(\\)"):
        layer.backward(np.ones((1, 1, 3, 3)))
    lin = Linear(2, 2, rng=0)
    lin.forward(np.ones((1, 2)))
    lin.weight.data = np.zeros((2, 2))
    with pytest.raises(ValueError, match="changed between forward\\(\\) and backward\\(\\)"):
        lin.backward(np.ones((1, 2)))


def test_changed_weights_between_forward_and_backward_in_a_pass_are_refused():
    conv = Conv2d(1, 1, 3, padding=1, rng=0)
    net = Sequential(conv, Tanh(), conv)
    net.forward(np.ones((1, 1, 4, 4)))
    conv.weight.data = np.zeros((1, 1, 3, 3))
    conv.export((1, 4, 4))    # refreshes the operator both calls of the pass ran with
    with pytest.raises(ValueError, match="changed between forward\\(\\) and backward\\(\\)"):
        net.backward(np.ones((1, 1, 4, 4)))


def test_deep_copies_are_independent():
    net = Sequential(Conv2d(1, 2, 3, rng=0), Tanh(), Dropout(0.0), Flatten(), Linear(18, 2, rng=0))
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 5))
    y = net.forward(x)
    twin = copy.deepcopy(net)
    twin[0].weight.data = np.zeros((2, 1, 3, 3))
    assert_allclose(net.forward(x), y)
    assert not np.allclose(twin.forward(x), y)
