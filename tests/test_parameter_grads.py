"""``Sequential.backward(dy, input_grad=False)``: parameter gradients without the input gradient.

With ``input_grad=False`` the network returns None, does not run back through the layers before
the first one holding parameters, and calls ``parameter_grads`` (batch-first) or
``parameter_grads_columns`` (columns) on that layer, which skips its own input-gradient
product. The claims checked here, in both layouts and both float dtypes:

- the parameter gradients are the *same bits* as with ``input_grad=True`` (same forward, same
  ``dy``), for networks starting with a convolution, with parameterless layers first, nested
  ``Sequential``\\ s, a layer instance used twice, masked weights, LeNet-5, and a network with
  no parameters at all; and they are right (float64 central differences);
- spies on every top-level layer: nothing before the first layer with parameters runs, that
  layer gets ``parameter_grads[_columns]`` and no backward;
- a user's subclass overriding ``backward`` or ``backward_columns`` still has its override run;
- ``input_grad`` must be a bool, a refused call changes nothing; after the call the pass is
  consumed, and the next forward/backward gives what a fresh copy of the network gives.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

import sparseconv.nn as nn
from sparseconv.models import lenet5
from sparseconv.testing import assert_allclose

from column_refs import check_network_gradients

DTYPES = ["float32", "float64"]
LAYOUTS = ["columns", "batch_first"]
N = 3


def _mask(shape, keep, seed):
    return np.random.default_rng(seed).random(shape) < keep


def _conv_first(dt):
    return [nn.Conv2d(2, 4, 3, padding=1, dtype=dt, rng=1), nn.ReLU(), nn.MaxPool2d(2, dtype=dt),
            nn.Conv2d(4, 3, 3, padding=1, dtype=dt, rng=2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 5, dtype=dt, rng=3)]


def _pool_flatten_first(dt):
    return [nn.ReLU(), nn.MaxPool2d(2, dtype=dt), nn.Flatten(), nn.Linear(18, 6, dtype=dt, rng=4), nn.Tanh(),
            nn.Linear(6, 4, dtype=dt, rng=5)]


def _flatten_relu_first(dt):
    return [nn.Flatten(), nn.ReLU(), nn.Linear(72, 5, dtype=dt, rng=6), nn.Sigmoid()]


def _affine_first(dt):
    return [nn.ChannelAffine(np.array([0.5, -2.0]), np.array([0.1, 0.3]), dtype=dt), nn.Tanh(),
            nn.Conv2d(2, 3, 3, dtype=dt, rng=7), nn.ReLU()]


def _subsampling_first(dt):
    return [nn.Tanh(), nn.Subsampling2d(2, 2, dtype=dt), nn.Sigmoid(), nn.Conv2d(2, 3, 3, padding=1, dtype=dt, rng=8),
            nn.Flatten(), nn.Linear(27, 3, dtype=dt, rng=9)]


def _transpose_first(dt):
    return [nn.ReLU(), nn.ConvTranspose2d(2, 3, 3, stride=2, dtype=dt, rng=10), nn.Tanh(),
            nn.Conv2d(3, 2, 3, stride=2, dtype=dt, rng=11)]


def _conv1d_groups(dt):
    return [nn.Tanh(), nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, dtype=dt, rng=12), nn.ReLU(), nn.Flatten(),
            nn.Linear(30, 3, dtype=dt, rng=13)]


def _nested(dt):
    innermost = nn.Sequential(nn.MaxPool2d(2, dtype=dt), nn.Conv2d(2, 3, 3, padding=1, dtype=dt, rng=14))
    inner = nn.Sequential(nn.Tanh(), innermost)
    return [nn.ReLU(), inner, nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(27, 4, dtype=dt, rng=15))]


def _shared_linear(dt):
    lin = nn.Linear(8, 8, dtype=dt, rng=16)
    return [nn.Tanh(), lin, nn.Tanh(), lin, nn.Sigmoid(), nn.Linear(8, 3, dtype=dt, rng=17)]


def _shared_conv_first(dt):
    conv = nn.Conv2d(2, 2, 3, padding=1, dtype=dt, rng=18)
    return [conv, nn.ReLU(), conv, nn.Tanh()]


def _masked(dt):
    return [nn.MaxPool2d(2, stride=1, dtype=dt),
            nn.Conv2d(2, 4, 3, padding=1, weight_mask=_mask((4, 2, 3, 3), 0.4, 19), dtype=dt, rng=19), nn.ReLU(),
            nn.Flatten(), nn.Linear(100, 5, weight_mask=_mask((5, 100), 0.3, 20), dtype=dt, rng=20)]


def _parameterless(dt):
    return [nn.ReLU(), nn.MaxPool2d(2, dtype=dt), nn.Tanh(), nn.Flatten()]


# name -> (layers(dtype), sample shape)
NETWORKS = {
    "conv-first": (_conv_first, (2, 6, 6)),
    "relu-maxpool-flatten-first": (_pool_flatten_first, (2, 6, 6)),
    "flatten-relu-first": (_flatten_relu_first, (2, 6, 6)),
    "channelaffine-first": (_affine_first, (2, 6, 6)),
    "subsampling-first": (_subsampling_first, (2, 6, 6)),
    "convtranspose-first": (_transpose_first, (2, 3, 3)),
    "conv1d-groups": (_conv1d_groups, (4, 9)),
    "nested-sequentials": (_nested, (2, 6, 6)),
    "shared-linear": (_shared_linear, (8,)),
    "shared-conv-first": (_shared_conv_first, (2, 5, 5)),
    "masked-weights": (_masked, (2, 6, 6)),
    "no-parameters": (_parameterless, (2, 6, 6)),
}


def _network(name, dtype, layout, seed=0):
    make, shape = NETWORKS[name]
    net = nn.Sequential(*make(dtype), layout=layout)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, *shape)).astype(dtype)
    dy = rng.standard_normal((N, *net.output_shape(shape))).astype(dtype)
    return net, x, dy


def _grads(net):
    return {k: p.grad.copy() for k, p in net.named_parameters()}


def _pass(net, x, dy, input_grad):
    """Output, returned value and parameter gradients of one forward/backward from zero gradients."""
    net.zero_grad()
    y = np.array(net.forward(x))
    r = net.backward(dy, input_grad=input_grad)
    return y, r, _grads(net)


def assert_same_bits(actual, desired, what):
    assert actual.dtype == desired.dtype and actual.shape == desired.shape, (what, actual.dtype, actual.shape)
    uint = np.dtype(f"u{actual.dtype.itemsize}")
    assert np.array_equal(np.ascontiguousarray(actual).view(uint), np.ascontiguousarray(desired).view(uint)), \
        f"{what}: not the same bits (largest difference {np.max(np.abs(actual - desired))})"


def assert_same_grads(actual, desired, tag):
    assert actual.keys() == desired.keys()
    for k in desired:
        assert_same_bits(actual[k], desired[k], f"{tag} {k}")


def _first_with_parameters(net):
    return next((i for i, layer in enumerate(net.layers) if layer.parameters()), len(net.layers))


class Spy:
    """Counts the backward-type calls the network makes on each of its top-level layers.

    Instance attributes, so the classes' dispatch (which reads class dictionaries) is
    unchanged; a call a layer makes on itself (``Sequential.parameter_grads`` calling its own
    ``backward``) is not counted.
    """

    METHODS = ("backward", "backward_columns", "parameter_grads", "parameter_grads_columns")

    def __init__(self, net):
        self.calls = Counter()
        depth = Counter()
        for layer in {id(layer): layer for layer in net.layers}.values():
            for name in self.METHODS:
                real = getattr(layer, name)

                def spy(*args, _real=real, _id=id(layer), _name=name, **kwargs):
                    if not depth[_id]:
                        self.calls[(_id, _name)] += 1
                    depth[_id] += 1
                    try:
                        return _real(*args, **kwargs)
                    finally:
                        depth[_id] -= 1

                setattr(layer, name, spy)

    def count(self, layer, *names):
        return sum(self.calls[(id(layer), n)] for n in names)


# ---------------------------------------------------------------------- same bits
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_parameter_grads_same_bits(name, dtype, layout):
    net, x, dy = _network(name, dtype, layout)
    y_full, dx, g_full = _pass(net, x, dy, True)
    assert dx.shape == x.shape
    y_only, none, g_only = _pass(net, x, dy, False)
    assert none is None
    assert_same_bits(y_only, y_full, f"{name} output")
    assert_same_grads(g_only, g_full, f"{name} {layout}")
    assert bool(g_full) == (name != "no-parameters")
    # The gradients are not all zero (a pass that skipped a layer would leave zeros).
    for k, g in g_full.items():
        assert np.any(g != 0), k
    for k, p in net.named_parameters():
        if p.mask is not None:
            assert not np.any(p.grad[~p.mask]), k


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lenet5_parameter_grads_same_bits(dtype, layout):
    net = lenet5(dtype=dtype, layout=layout, seed=3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 1, 32, 32)).astype(dtype)
    dy = rng.standard_normal((4, 10)).astype(dtype)
    y_full, dx, g_full = _pass(net, x, dy, True)
    y_only, none, g_only = _pass(net, x, dy, False)
    assert none is None and dx.shape == x.shape
    assert_same_bits(y_only, y_full, "lenet5 output")
    assert_same_grads(g_only, g_full, f"lenet5 {dtype} {layout}")
    assert len(g_full) == 14  # 3 convolutions, 2 linear layers, 2 sub-samplings
    c3 = net.layers[4].weight
    assert c3.mask is not None and not np.any(c3.grad[~c3.mask])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_parameter_grads_skip_the_layers_before(name, layout):
    net, x, dy = _network(name, "float64", layout)
    stop = _first_with_parameters(net)
    spy = Spy(net)
    net.forward(x)
    assert net.backward(dy, input_grad=False) is None
    positions = {}
    for i, layer in enumerate(net.layers):
        positions.setdefault(id(layer), []).append(i)
    own = "parameter_grads_columns" if layout == "columns" else "parameter_grads"
    back = "backward_columns" if layout == "columns" else "backward"
    for layer in net.layers:
        where = positions[id(layer)]
        # Each use after the first layer with parameters runs its backward; the use at that
        # position only adds its parameter gradients; the uses before it are not run back.
        assert spy.count(layer, back) == sum(i > stop for i in where), (layer, where, spy.calls)
        assert spy.count(layer, own) == sum(i == stop for i in where), (layer, where, spy.calls)
        other = {"backward", "backward_columns", "parameter_grads", "parameter_grads_columns"} - {back, own}
        assert spy.count(layer, *other) == 0, (layer, spy.calls)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequential_parameter_grads_method(layout):
    # Sequential.parameter_grads(dy) is backward(dy, input_grad=False).
    net, x, dy = _network("conv-first", "float64", layout)
    _, _, g_full = _pass(net, x, dy, True)
    net.zero_grad()
    net.forward(x)
    assert net.parameter_grads(dy) is None
    assert_same_grads(_grads(net), g_full, "parameter_grads")


def test_nested_sequential_parameter_grads_columns():
    # A Sequential used as a layer, driven through the column protocol directly.
    net, x, dy = _network("nested-sequentials", "float64", "columns")
    X = np.ascontiguousarray(x.reshape(N, -1).T)
    D = np.ascontiguousarray(dy.reshape(N, -1).T)
    net.zero_grad()
    _, out = net.forward_columns(X, x.shape[1:])
    dX = net.backward_columns(D, out)
    assert dX.shape == X.shape
    g_full = _grads(net)
    net.zero_grad()
    _, out = net.forward_columns(X, x.shape[1:])
    assert net.parameter_grads_columns(D, out) is None
    assert_same_grads(_grads(net), g_full, "parameter_grads_columns")
    with pytest.raises(ValueError):
        net.backward_columns(D, out)


# ---------------------------------------------------------------------- right, not just equal
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["conv-first", "relu-maxpool-flatten-first", "channelaffine-first",
                                  "subsampling-first", "convtranspose-first", "nested-sequentials",
                                  "shared-linear", "masked-weights"])
def test_parameter_grads_central_differences(name, layout):
    net, x, dy = _network(name, "float64", layout, seed=5)
    _, dx, _ = _pass(net, x, dy, True)
    _, _, grads = _pass(net, x, dy, False)
    check_network_gradients(net, x, dy, dx, grads)


# ---------------------------------------------------------------------- user subclasses
class DoublingBackward(nn.Conv2d):
    """Overrides ``backward``: the parameter gradients of ``2 * dy``, and a log entry."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    def backward(self, dy):
        self.log.append("backward")
        return super().backward(2 * dy)


class DoublingColumns(nn.Conv2d):
    """Overrides ``backward_columns`` only (so batch-first passes do not see it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    def backward_columns(self, D, shape):
        self.log.append("backward_columns")
        return super().backward_columns(2 * D, shape)


class DoublingLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    def backward(self, dy):
        self.log.append("backward")
        return super().backward(2 * dy)


def _subclass_net(cls, dt):
    if issubclass(cls, nn.Linear):
        return [nn.ReLU(), nn.Flatten(), cls(50, 4, dtype=dt, rng=21), nn.Tanh()]
    return [nn.ReLU(), cls(2, 3, 3, dtype=dt, rng=21), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4, dtype=dt, rng=22)]


PLAIN = {DoublingBackward: nn.Conv2d, DoublingColumns: nn.Conv2d, DoublingLinear: nn.Linear}
SUBCLASS_CASES = [(DoublingBackward, "columns"), (DoublingBackward, "batch_first"), (DoublingColumns, "columns"),
                  (DoublingLinear, "columns"), (DoublingLinear, "batch_first")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, layout", SUBCLASS_CASES, ids=[f"{c.__name__}-{lay}" for c, lay in SUBCLASS_CASES])
def test_subclass_override_is_honoured(cls, layout, dtype):
    rng = np.random.default_rng(23)
    x = rng.standard_normal((N, 2, 5, 5)).astype(dtype)
    sub = nn.Sequential(*_subclass_net(cls, dtype), layout=layout)
    plain = nn.Sequential(*_subclass_net(PLAIN[cls], dtype), layout=layout)
    dy = rng.standard_normal((N, *sub.output_shape(x.shape[1:]))).astype(dtype)
    layer = sub.layers[1] if cls is not DoublingLinear else sub.layers[2]
    _, _, g_plain = _pass(plain, x, dy, True)
    _, _, g_full = _pass(sub, x, dy, True)
    assert len(layer.log) == 1
    _, none, g_only = _pass(sub, x, dy, False)
    assert none is None
    assert len(layer.log) == 2, "the override did not run with input_grad=False"
    assert_same_grads(g_only, g_full, f"{cls.__name__} {layout}")
    # And the override's effect is in the gradients: the overriding layer's are twice the plain
    # layer's, the others' the same (to rounding: an overriding layer in the column layout
    # runs its batch-first backward, which sums in another order).
    prefix = "1." if cls is not DoublingLinear else "2."
    for k in g_plain:
        expected = 2 * g_plain[k] if k.startswith(prefix) else g_plain[k]
        assert_allclose(g_only[k], expected, err_msg=f"{cls.__name__} {k}")


# ---------------------------------------------------------------------- arguments and state
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", [0, 1, None, "False", 0.0, np.int64(0), [False]],
                         ids=["0", "1", "None", "str", "float", "int64", "list"])
def test_input_grad_must_be_bool(value, layout):
    net, x, dy = _network("conv-first", "float64", layout)
    fresh = copy.deepcopy(net)
    net.forward(x)
    with pytest.raises(TypeError, match="input_grad"):
        net.backward(dy, input_grad=value)
    # Refused: nothing consumed, nothing accumulated; the backward can still be made.
    assert all(not np.any(p.grad) for p in net.parameters())
    dx = net.backward(dy)
    _, dx_ref, g_ref = _pass(fresh, x, dy, True)
    assert_same_bits(dx, dx_ref, "dx after a refused call")
    assert_same_grads(_grads(net), g_ref, "grads after a refused call")


def test_input_grad_is_keyword_only():
    net, x, dy = _network("conv-first", "float64", "columns")
    net.forward(x)
    with pytest.raises(TypeError):
        net.backward(dy, False)


@pytest.mark.parametrize("value", [np.False_, np.True_], ids=["np.False_", "np.True_"])
def test_input_grad_numpy_bool(value):
    net, x, dy = _network("conv-first", "float64", "columns")
    _, _, g_ref = _pass(copy.deepcopy(net), x, dy, True)
    net.forward(x)
    r = net.backward(dy, input_grad=value)
    assert (r is None) == (not value)
    assert_same_grads(_grads(net), g_ref, "numpy bool")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["conv-first", "relu-maxpool-flatten-first", "nested-sequentials", "no-parameters",
                                  "shared-linear"])
def test_pass_is_consumed_then_next_pass_works(name, layout):
    net, x, dy = _network(name, "float64", layout)
    fresh = copy.deepcopy(net)
    net.forward(x)
    net.backward(dy, input_grad=False)
    for input_grad in (True, False):
        with pytest.raises(ValueError, match="backward"):
            net.backward(dy, input_grad=input_grad)
    # The next pass, with other data, is what a fresh copy of the network computes.
    rng = np.random.default_rng(9)
    x2 = rng.standard_normal(x.shape)
    dy2 = rng.standard_normal(dy.shape)
    got = _pass(net, x2, dy2, True)
    ref = _pass(fresh, x2, dy2, True)
    assert_same_bits(got[0], ref[0], "output")
    assert_same_bits(got[1], ref[1], "dx")
    assert_same_grads(got[2], ref[2], "grads")
    # And again without the input gradient, twice in a row (no stale saved state piles up).
    for _ in range(2):
        got = _pass(net, x2, dy2, False)
        assert_same_grads(got[2], ref[2], "grads, repeated")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameter_grads_accumulate(layout):
    # Like backward, input_grad=False adds to the gradients already there.
    net, x, dy = _network("relu-maxpool-flatten-first", "float64", layout)
    _, _, once = _pass(net, x, dy, True)
    net.forward(x)
    net.backward(dy, input_grad=False)
    for k, p in net.named_parameters():
        assert_same_bits(p.grad, once[k] + once[k], f"accumulated {k}")


WRONG_DY = [(name, layout) for name in ("conv-first", "relu-maxpool-flatten-first", "no-parameters")
            for layout in LAYOUTS]


def _wrong_dy_id(case):
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("name, layout", WRONG_DY, ids=list(map(_wrong_dy_id, WRONG_DY)))
def test_wrong_dy_is_refused(name, layout):
    net, x, dy = _network(name, "float64", layout)
    net.forward(x)
    with pytest.raises(ValueError):
        net.backward(np.zeros((N + 1, *dy.shape[1:])), input_grad=False)
    # Refused: the pass is still there to be consumed with the right dy.
    _, _, g_ref = _pass(copy.deepcopy(net), x, dy, True)
    net.zero_grad()
    assert net.backward(dy, input_grad=False) is None
    assert_same_grads(_grads(net), g_ref, "grads after a refused dy")
