"""nn conventions PyTorch users expect (issue 13, item 4): train()/eval()/training, module
walking (modules, named_modules, children, apply), Sequential indexing, slicing, append, len,
iteration, and lenet5()'s default dtype being train's float32.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparseconv.models import lenet5
from sparseconv.nn import Conv2d, Dropout, Flatten, Linear, Module, ReLU, Sequential, Tanh
from sparseconv.testing import assert_allclose


def _net():
    inner = Sequential(Linear(4, 4, rng=0), Dropout(0.5, rng=0))
    return Sequential(Flatten(), inner, ReLU(), Linear(4, 2, rng=1)), inner


def test_train_and_eval_set_training_everywhere_and_return_self():
    net, inner = _net()
    assert net.training and all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    assert net.train() is net
    assert all(m.training for m in net.modules())
    assert net.train(False) is net and not inner[1].training
    with pytest.raises(TypeError, match="mode must be a bool; got 'no'"):
        net.train("no")


def test_eval_changes_dropout_only():
    net, _ = _net()
    x = np.ones((3, 2, 2))
    net.eval()
    y_eval = net.forward(x)
    reference = Sequential(Flatten(), net[1][0], ReLU(), net[3])
    assert_allclose(y_eval, reference.forward(x))


def test_named_modules_and_children():
    net, inner = _net()
    names = [name for name, _ in net.named_modules()]
    assert names == ["", "0", "1", "1.0", "1.1", "2", "3"]
    assert [m for _, m in net.named_modules()][2] is inner
    assert list(net.children()) == list(net.layers)
    assert [n for n, _ in net.named_children()] == ["0", "1", "2", "3"]
    assert list(net.modules())[0] is net and len(list(net.modules())) == 7
    assert list(Linear(2, 2).children()) == []
    assert [n for n, _ in net.named_modules(prefix="model")][:3] == ["model", "model.0", "model.1"]


def test_shared_modules_are_walked_once():
    relu = ReLU()
    net = Sequential(Linear(2, 2), relu, Linear(2, 2), relu)
    assert [n for n, _ in net.named_modules()] == ["", "0", "1", "2"]


def test_apply_visits_children_first_and_returns_self():
    net, inner = _net()
    visited = []
    assert net.apply(visited.append) is net
    assert visited[-1] is net
    assert visited.index(inner[0]) < visited.index(inner)
    assert len(visited) == 7

    def init(m: Module) -> None:
        if isinstance(m, Linear):
            m.weight.data = np.zeros(m.weight.shape)

    net.apply(init)
    assert not net[3].weight.data.any() and not inner[0].weight.data.any()
    with pytest.raises(TypeError, match="fn must be callable"):
        net.apply(3)


def test_sequential_indexing_slicing_len_iteration():
    layers = [Conv2d(1, 2, 3, rng=0), Tanh(), Flatten(), Linear(4, 3, rng=0)]
    net = Sequential(*layers)
    assert len(net) == 4
    assert list(net) == layers
    assert net[0] is layers[0] and net[-1] is layers[-1]
    head = net[:2]
    assert isinstance(head, Sequential) and len(head) == 2
    assert head[0] is layers[0] and head[1] is layers[1]
    assert list(net[::2]) == [layers[0], layers[2]]
    # a slice shares its layers: running it and the rest is running the whole network
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 3))
    assert_allclose(net[2:].forward(net[:2].forward(x)), net.forward(x))
    with pytest.raises(IndexError):
        net[4]
    with pytest.raises(TypeError, match="indices must be ints or slices; got str"):
        net["0"]


def test_sequential_append():
    net = Sequential(Flatten())
    lin = Linear(4, 2, rng=0)
    assert net.append(lin) is net
    assert len(net) == 2 and net[1] is lin
    assert [n for n, _ in net.named_parameters()] == ["1.weight", "1.bias"]
    with pytest.raises(TypeError, match="Sequential.append takes a Module; got int"):
        net.append(3)


def test_iteration_is_over_a_snapshot():
    net = Sequential(Flatten(), Tanh())
    seen = []
    for layer in net:
        seen.append(layer)
        if len(net) < 4:
            net.append(Tanh())
    assert len(seen) == 2


def test_lenet5_default_dtype_is_trains_float32():
    net = lenet5()
    assert all(p.dtype == np.float32 for p in net.parameters())
    y = net(np.zeros((2, 1, 32, 32), dtype=np.float32))
    assert y.dtype == np.float32 and y.shape == (2, 10)
