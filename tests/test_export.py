"""Conv-as-MLP export: ``to_mlp`` turns a network into explicit matrices that compute the same.

LeNet-5's exported MLP must give the network's outputs and input gradients to float64
precision, with and without composing adjacent linear stages; stage shapes, ``nnz`` and
matrix kinds are checked, and the sub-sampling stage against a matrix built here by loops.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sparseconv import reference as ref
from sparseconv.export import MLP, Stage, to_mlp
from sparseconv.models import LENET5_LAYERS, lenet5
from sparseconv.nn import (SGD, AvgPool2d, Conv2d, CrossEntropyLoss, Flatten, Linear, MaxPool2d, Module, ReLU,
                           Sequential, Sigmoid, SumPool2d, Tanh)
from sparseconv.testing import assert_allclose

# (stage source layer, matrix shape, nnz, sparse, activation) for LeNet-5 on 32x32 inputs
LENET5_STAGES = [
    ("C1", (6 * 28 * 28, 32 * 32), 6 * 28 * 28 * 25, True, "tanh"),
    ("S2", (6 * 14 * 14, 6 * 28 * 28), 6 * 28 * 28, True, "tanh"),
    ("C3", (16 * 10 * 10, 6 * 14 * 14), 60 * 25 * 100, True, "tanh"),
    ("S4", (16 * 5 * 5, 16 * 10 * 10), 16 * 10 * 10, True, "tanh"),
    ("C5", (120, 16 * 5 * 5), 120 * 400, True, "tanh"),
    ("F6", (84, 120), 84 * 120, False, "tanh"),
    ("OUT", (10, 84), 10 * 84, False, None),
]


def sum_pool_matrix_loop(channels: int, h: int, w: int, k: int) -> np.ndarray:
    """Dense non-overlapping ``k x k`` sum-pooling matrix on flattened (C, H, W) samples."""
    ho, wo = h // k, w // k
    dense = np.zeros((channels * ho * wo, channels * h * w))
    for c in range(channels):
        for oy in range(ho):
            for ox in range(wo):
                for ky in range(k):
                    for kx in range(k):
                        dense[(c * ho + oy) * wo + ox, (c * h + oy * k + ky) * w + ox * k + kx] = 1.0
    return dense


def _trained_looking_lenet5() -> Sequential:
    """LeNet-5 with non-trivial sub-sampling coefficients (they start at 1/4 and 0)."""
    net = lenet5(dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    for name in ("S2", "S4"):
        layer = net[LENET5_LAYERS[name]]
        layer.params["beta"].data = rng.uniform(0.1, 0.5, layer.channels)
        layer.params["bias"].data = rng.standard_normal(layer.channels)
    return net


@pytest.fixture(scope="module")
def net():
    return _trained_looking_lenet5()


@pytest.mark.parametrize("compose", [False, True], ids=["separate", "composed"])
def test_lenet5_mlp_equals_network(net, compose):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 1, 32, 32))
    dy = rng.standard_normal((3, 10))
    mlp = to_mlp(net, (1, 32, 32), compose=compose)
    assert isinstance(mlp, MLP)
    y_net = net.forward(x)
    dx_net = net.backward(dy)
    y_mlp = mlp.forward(x.reshape(3, -1))
    dx_mlp = mlp.backward(dy)
    assert y_mlp.shape == (3, 10) and dx_mlp.shape == (3, 1024)
    assert_allclose(y_mlp, y_net)
    assert_allclose(dx_mlp, dx_net.reshape(3, -1))


def test_lenet5_stages(net):
    stages = to_mlp(net, (1, 32, 32)).stages
    assert len(stages) == len(LENET5_STAGES)
    for stage, (name, shape, nnz, sparse, activation) in zip(stages, LENET5_STAGES):
        assert isinstance(stage, Stage)
        assert stage.matrix.shape == shape, name
        assert stage.shape == shape, name
        assert stage.nnz == nnz, name
        assert sp.issparse(stage.matrix) == sparse, name
        assert getattr(stage.activation, "name", None) == activation, name
        assert stage.bias is not None and stage.bias.shape == (shape[0],), name


def test_lenet5_composed_stages_are_unchanged(net):
    # every linear layer of LeNet-5 is followed by an activation: nothing to compose
    separate = to_mlp(net, (1, 32, 32)).stages
    composed = to_mlp(net, (1, 32, 32), compose=True).stages
    assert [s.shape for s in composed] == [s.shape for s in separate]


def test_conv_stage_is_the_layer_matrix_with_repeated_bias(net):
    stage = to_mlp(net, (1, 32, 32)).stages[0]
    conv = net[LENET5_LAYERS["C1"]]
    x = np.random.default_rng(3).standard_normal((2, 1, 32, 32))
    expected = ref.conv_direct(x, conv.weight.data, conv.bias.data).reshape(2, -1)
    assert_allclose((stage.matrix @ x.reshape(2, -1).T).T + stage.bias, expected)
    np.testing.assert_array_equal(stage.bias, np.repeat(conv.bias.data, 28 * 28))


def test_subsampling_stage_is_diag_beta_times_sum_pool(net):
    stages = to_mlp(net, (1, 32, 32)).stages
    for position, name, (c, h) in ((1, "S2", (6, 28)), (3, "S4", (16, 10))):
        layer = net[LENET5_LAYERS[name]]
        beta = np.repeat(layer.params["beta"].data, (h // 2) ** 2)
        expected = np.diag(beta) @ sum_pool_matrix_loop(c, h, h, 2)
        assert_allclose(stages[position].matrix.toarray(), expected)
        np.testing.assert_array_equal(stages[position].bias, np.repeat(layer.params["bias"].data, (h // 2) ** 2))


def _linear_chain() -> Sequential:
    return Sequential(Conv2d(2, 3, 3, padding=1, rng=0), AvgPool2d(2), Tanh(), Conv2d(3, 4, 2, rng=1),
                      SumPool2d(2, stride=1), Flatten(), Linear(4, 5, rng=2), Linear(5, 3, rng=3), Sigmoid())


@pytest.mark.parametrize("compose", [False, True], ids=["separate", "composed"])
def test_adjacent_linear_stages(compose):
    net = _linear_chain()
    mlp = to_mlp(net, (2, 6, 6), compose=compose)
    if compose:
        # conv+avgpool, conv+sumpool+linear+linear
        assert [s.shape for s in mlp.stages] == [(27, 72), (3, 27)]
        assert [getattr(s.activation, "name", None) for s in mlp.stages] == ["tanh", "sigmoid"]
    else:
        assert [s.shape for s in mlp.stages] == [(108, 72), (27, 108), (16, 27), (4, 16), (5, 4), (3, 5)]
        assert [getattr(s.activation, "name", None) for s in mlp.stages] == [None, "tanh", None, None, None, "sigmoid"]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 6, 6))
    dy = rng.standard_normal((2, 3))
    y_net = net.forward(x)
    dx_net = net.backward(dy)
    assert_allclose(mlp.forward(x.reshape(2, -1)), y_net)
    assert_allclose(mlp.backward(dy), dx_net.reshape(2, -1))


def test_composed_matrix_is_the_product():
    net = Sequential(Conv2d(1, 2, 3, rng=0), AvgPool2d(2))
    separate = to_mlp(net, (1, 6, 6)).stages
    (composed,) = to_mlp(net, (1, 6, 6), compose=True).stages
    assert sp.issparse(composed.matrix)
    assert_allclose(composed.matrix.toarray(), (separate[1].matrix @ separate[0].matrix).toarray())
    assert_allclose(composed.bias, separate[1].matrix @ separate[0].bias)


def test_export_follows_in_place_training_updates():
    # the conv layers cache their sparse operator; an SGD step changes the weights in place
    net = _linear_chain()
    rng = np.random.default_rng(5)
    x, labels = rng.standard_normal((4, 2, 6, 6)), np.array([0, 1, 2, 1])
    loss = CrossEntropyLoss()
    opt = SGD(net.parameters(), lr=0.5)
    loss(net.forward(x), labels)
    net.backward(loss.backward())
    opt.step()
    mlp = to_mlp(net, (2, 6, 6))
    assert_allclose(mlp.stages[0].matrix.toarray(), ref.dense_matrix(net[0].weight.data, (2, 6, 6), padding=1))
    assert_allclose(mlp.forward(x.reshape(4, -1)), net.forward(x))


def test_max_pool_is_refused():
    net = Sequential(Conv2d(1, 2, 3), ReLU(), MaxPool2d(2), Flatten(), Linear(8, 2))
    with pytest.raises(ValueError, match=r"layer 2:MaxPool2d is max pooling.*no fixed matrix"):
        to_mlp(net, (1, 6, 6))


def test_unsupported_layer_is_refused():
    class Custom(Module):  # a layer with no matrix to export
        def output_shape(self, input_shape):
            return input_shape

    with pytest.raises(ValueError, match="cannot be exported"):
        to_mlp(Sequential(Custom()), (3,))


def test_activation_first_gets_an_identity_stage():
    net = Sequential(Tanh(), Flatten(), Linear(12, 2, rng=0))
    mlp = to_mlp(net, (3, 2, 2))
    first = mlp.stages[0]
    assert first.activation.name == "tanh" and first.bias is None
    assert_allclose(first.matrix.toarray(), np.eye(12))
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    assert_allclose(mlp.forward(x.reshape(2, -1)), net.forward(x))


def test_consecutive_activations_get_their_own_stage():
    net = Sequential(Linear(4, 3, rng=0), Tanh(), ReLU())
    mlp = to_mlp(net, (4,))
    assert [getattr(s.activation, "name", None) for s in mlp.stages] == ["tanh", "relu"]
    x = np.random.default_rng(0).standard_normal((5, 4))
    assert_allclose(mlp.forward(x), net.forward(x))


def test_single_layer_export():
    conv = Conv2d(2, 3, 3, padding=1, rng=0)
    (stage,) = to_mlp(conv, (2, 5, 5)).stages
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5))
    expected = ref.conv_direct(x, conv.weight.data, conv.bias.data, padding=1).reshape(2, -1)
    assert_allclose((stage.matrix @ x.reshape(2, -1).T).T + stage.bias, expected)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 1023), (1024,)], ids=["unflattened", "short", "no-batch"])
def test_mlp_forward_rejects_wrong_shape(net, shape):
    mlp = to_mlp(net, (1, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 1024\)"):
        mlp.forward(np.zeros(shape))


def test_mlp_backward_before_forward(net):
    with pytest.raises(ValueError, match="before forward"):
        to_mlp(net, (1, 32, 32)).backward(np.zeros((1, 10)))


def test_float32_network_exports_float32_matrices():
    net = lenet5(dtype=np.float32, seed=0)
    mlp = to_mlp(net, (1, 32, 32))
    assert all(s.matrix.dtype == np.float32 for s in mlp.stages)
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    y = mlp.forward(x.reshape(2, -1))
    assert y.dtype == np.float32
    assert_allclose(y, net.forward(x))
