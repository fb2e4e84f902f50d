"""Layers, losses, SGD and checkpoints of ``sparseconv.nn``.

Every layer passes a float64 finite-difference check for its input and every parameter
(central differences along random directions, ``sparseconv.testing.gradcheck``); forward
values are compared with direct formulas and the loop reference; failures must name the
loss or layer that rejected the input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest

from sparseconv import reference as ref
from sparseconv.models import LENET5_LAYERS, lenet5
from sparseconv.nn import (SGD, AvgPool2d, Conv1d, Conv2d, Conv3d, CrossEntropyLoss, Flatten, LayerInputError,
                           Linear, MaxPool2d, MSELoss, Parameter, ReLU, Sequential, Sigmoid, Subsampling2d,
                           SumPool2d, Tanh)
from sparseconv.testing import assert_allclose, gradcheck


# ---------------------------------------------------------------------- helpers
def layer_gradients(layer, x, dy):
    """``dJ/dx`` and each parameter's gradient for ``J = sum(dy * layer(x))``."""
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(dy)
    return dx, {name: p.grad.copy() for name, p in layer.named_parameters()}


def check_layer_gradients(layer, x, seed: int = 0, params=None):
    """Finite-difference check of ``layer`` for its input and the named parameters (default: all).

    Masked (unconnected) weights are not free variables: the check perturbs only the
    connected entries and requires the gradient of the others to be exactly zero.
    """
    y = layer.forward(x)
    dy = np.random.default_rng(seed).standard_normal(y.shape)
    dx, grads = layer_gradients(layer, x, dy)
    assert dx.shape == x.shape

    def loss_x(xv):
        return float(np.sum(dy * layer.forward(xv)))

    gradcheck(loss_x, x, dx)
    named = dict(layer.named_parameters())
    for name in named if params is None else params:
        p = named[name]
        base = p.data.copy()
        free = np.ones(base.shape, dtype=bool) if p.mask is None else p.mask
        assert not np.any(grads[name][~free])

        def loss_p(v, p=p, base=base, free=free):
            value = base.copy()
            value[free] = v
            p.data = value
            return float(np.sum(dy * layer.forward(x)))

        gradcheck(loss_p, base[free], grads[name][free])
        p.data = base


# ---------------------------------------------------------------------- convolution layers
def _table(f: int, c: int, seed: int) -> np.ndarray:
    """A random (F, C) connection table with at least one connection per output map."""
    rng = np.random.default_rng(seed)
    table = rng.random((f, c)) < 0.5
    table[np.arange(f), rng.integers(0, c, f)] = True
    return table


@dataclass(frozen=True)
class ConvCase:
    cls: type
    c: int
    f: int
    kernel: object
    in_size: tuple
    opts: dict = field(default_factory=dict)
    connection_seed: int = -1
    n: int = 2

    @property
    def id(self) -> str:
        def t(v):
            if isinstance(v, tuple):
                return "x".join("".join(map(str, e)) if isinstance(e, tuple) else str(e) for e in v)
            return str(v)
        short = {"stride": "s", "padding": "p", "dilation": "d", "groups": "g"}
        opts = [f"{short[k]}{t(v)}" for k, v in self.opts.items() if k in short]
        opts += [self.opts[k] for k in ("padding_mode",) if k in self.opts]
        opts += ["flip"] * bool(self.opts.get("flip")) + ["nobias"] * (self.opts.get("bias") is False)
        opts += ["table"] * (self.connection_seed >= 0)
        return "-".join([self.cls.__name__, f"N{self.n}-C{self.c}-F{self.f}", t(self.in_size), f"k{t(self.kernel)}",
                         *opts])

    def make(self, dtype=np.float64):
        connection = _table(self.f, self.c, self.connection_seed) if self.connection_seed >= 0 else None
        return self.cls(self.c, self.f, self.kernel, connection=connection, dtype=dtype, rng=7, **self.opts)

    def batch(self, seed: int = 1, dtype=np.float64) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((self.n, self.c, *self.in_size)).astype(dtype)


CONV_CASES = [
    ConvCase(Conv1d, 2, 3, 3, (9,)),
    ConvCase(Conv1d, 2, 4, 3, (10,), dict(stride=2, padding=1, dilation=2)),
    ConvCase(Conv1d, 4, 2, 2, (7,), dict(groups=2, padding="same", padding_mode="reflect")),
    ConvCase(Conv1d, 3, 4, 3, (8,), dict(bias=False), connection_seed=1),
    ConvCase(Conv2d, 1, 3, 3, (6, 5)),
    ConvCase(Conv2d, 3, 4, (3, 2), (7, 6), dict(stride=(2, 1), padding=((1, 0), (0, 1)))),
    ConvCase(Conv2d, 2, 2, 3, (6, 6), dict(padding="full", flip=True)),
    ConvCase(Conv2d, 4, 4, 3, (5, 5), dict(groups=4, padding=1, padding_mode="circular", bias=False)),
    ConvCase(Conv2d, 2, 3, 2, (6, 7), dict(dilation=2, padding_mode="replicate", padding=1)),
    ConvCase(Conv2d, 6, 5, 3, (6, 6), connection_seed=2),
    ConvCase(Conv3d, 2, 3, 2, (4, 3, 5)),
    ConvCase(Conv3d, 2, 2, (2, 3, 2), (4, 5, 4), dict(stride=2, padding=1, padding_mode="reflect")),
    ConvCase(Conv3d, 3, 4, 2, (3, 4, 3), dict(flip=True), connection_seed=3),
]
CONV_IDS = [c.id for c in CONV_CASES]


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_layer_forward_matches_reference(case: ConvCase):
    layer = case.make()
    x = case.batch()
    options = {k: v for k, v in case.opts.items() if k != "bias"}
    bias = None if layer.bias is None else layer.bias.data
    # masked weights are zero, so the dense reference with the stored weight is the partial network
    assert_allclose(layer.forward(x), ref.conv_direct(x, layer.weight.data, bias, **options))


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_layer_finite_differences(case: ConvCase):
    check_layer_gradients(case.make(), case.batch())


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c.connection_seed >= 0],
                         ids=[c.id for c in CONV_CASES if c.connection_seed >= 0])
def test_connection_table_removes_unconnected_pairs(case: ConvCase):
    table = _table(case.f, case.c, case.connection_seed)
    layer = case.make()
    full = ConvCase(case.cls, case.c, case.f, case.kernel, case.in_size, case.opts).make()
    x = case.batch()
    layer.forward(x)
    full.forward(x)
    # groups=1: every (output map, input map) pair has the same spatial pattern
    assert layer.op.nnz == full.op.nnz * table.sum() // table.size
    assert layer.weight.size == table.sum() * int(np.prod(layer.kernel_size))
    assert not layer.weight.data[~layer.weight.mask].any()
    rows_per_map = int(np.prod(layer.op.out_shape[1:]))
    cols_per_map = int(np.prod(case.in_size))
    matrix = layer.op.matrix.tocsr()
    for f in range(case.f):
        for c in range(case.c):
            block = matrix[f * rows_per_map:(f + 1) * rows_per_map, c * cols_per_map:(c + 1) * cols_per_map]
            assert (block.nnz > 0) == table[f, c], (f, c)


def test_connection_table_shape_and_dtype_are_checked():
    with pytest.raises(ValueError, match="connection"):
        Conv2d(3, 4, 3, connection=np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="connection"):
        Conv2d(3, 4, 3, connection=np.ones((4, 3)))


def test_conv_layer_float32_stays_float32():
    case = CONV_CASES[5]
    layer = case.make(dtype=np.float32)
    x = case.batch(dtype=np.float32)
    y = layer.forward(x)
    assert y.dtype == np.float32
    dx = layer.backward(np.ones_like(y))
    assert dx.dtype == np.float32
    assert layer.weight.grad.dtype == np.float32 and layer.bias.grad.dtype == np.float32


def test_conv_layer_follows_in_place_weight_updates():
    case = CONV_CASES[4]
    layer = case.make()
    x = case.batch()
    layer.forward(x)
    layer.weight.data = -2.0 * layer.weight.data
    assert_allclose(layer.forward(x), ref.conv_direct(x, layer.weight.data, layer.bias.data))


def test_conv_layer_gradients_accumulate():
    case = CONV_CASES[4]
    layer = case.make()
    x = case.batch()
    dy = np.random.default_rng(2).standard_normal(layer.forward(x).shape)
    _, once = layer_gradients(layer, x, dy)
    layer.forward(x)
    layer.backward(dy)
    assert_allclose(layer.weight.grad, 2 * once["weight"])
    layer.zero_grad()
    assert not layer.weight.grad.any() and not layer.bias.grad.any()


# ---------------------------------------------------------------------- other layers
def test_linear_forward_and_finite_differences():
    layer = Linear(5, 3, rng=0)
    x = np.random.default_rng(1).standard_normal((4, 5))
    assert_allclose(layer.forward(x), x @ layer.params["weight"].data.T + layer.params["bias"].data)
    check_layer_gradients(layer, x)
    check_layer_gradients(Linear(5, 3, bias=False, rng=0), x)


def _sum_pool(x: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = x.shape
    return x[:, :, :h // k * k, :w // k * k].reshape(n, c, h // k, k, w // k, k).sum(axis=(3, 5))


@pytest.mark.parametrize("cls,divisor", [(AvgPool2d, 4.0), (SumPool2d, 1.0)], ids=["avg", "sum"])
def test_pool_layers(cls, divisor):
    layer = cls(2)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 5))
    assert_allclose(layer.forward(x), _sum_pool(x, 2) / divisor)
    check_layer_gradients(layer, x)
    check_layer_gradients(cls(3, stride=2, padding=1), x)


def test_max_pool_layer_finite_differences_away_from_ties():
    # values a whole unit apart: no finite-difference step can change a window's winner
    x = np.random.default_rng(0).permutation(2 * 3 * 6 * 6).reshape(2, 3, 6, 6).astype(np.float64)
    check_layer_gradients(MaxPool2d(2), x)
    check_layer_gradients(MaxPool2d(3, stride=2, padding=1), x)


def test_max_pool_layer_integer_input_computes_in_layer_dtype():
    y = MaxPool2d(2).forward(np.arange(16).reshape(1, 1, 4, 4))
    assert y.dtype == np.float64


@pytest.mark.parametrize("kernel", [2, (2, 3)], ids=["k2", "k2x3"])
def test_subsampling_formulas(kernel):
    rng = np.random.default_rng(0)
    layer = Subsampling2d(3, kernel)
    beta, b = rng.standard_normal(3), rng.standard_normal(3)
    layer.params["beta"].data = beta
    layer.params["bias"].data = b
    x = rng.standard_normal((2, 3, 6, 6))
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    down = x.reshape(2, 3, 6 // kh, kh, 6 // kw, kw).sum(axis=(3, 5))
    assert_allclose(layer.forward(x), beta[:, None, None] * down + b[:, None, None])
    delta = rng.standard_normal(down.shape)
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(delta)
    # NOTES section 3: dJ/dbeta = sum(delta * down(x)), dJ/db = sum(delta), per map
    assert_allclose(layer.params["beta"].grad, (delta * down).sum(axis=(0, 2, 3)))
    assert_allclose(layer.params["bias"].grad, delta.sum(axis=(0, 2, 3)))
    up = np.repeat(np.repeat(delta * beta[:, None, None], kh, axis=2), kw, axis=3)
    assert_allclose(dx, up)
    check_layer_gradients(layer, x)


def test_subsampling_starts_as_average():
    layer = Subsampling2d(2)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    assert_allclose(layer.forward(x), _sum_pool(x, 2) / 4)


@pytest.mark.parametrize("cls,formula", [
    (ReLU, lambda z: np.where(z > 0, z, 0.0)),
    (Sigmoid, lambda z: 1 / (1 + np.exp(-z))),
    (Tanh, lambda z: (np.exp(z) - np.exp(-z)) / (np.exp(z) + np.exp(-z))),
], ids=["relu", "sigmoid", "tanh"])
def test_activations(cls, formula):
    rng = np.random.default_rng(0)
    # |z| >= 0.1 keeps ReLU's kink out of the finite-difference stencil
    z = rng.choice([-1.0, 1.0], (3, 2, 4)) * rng.uniform(0.1, 3.0, (3, 2, 4))
    layer = cls()
    assert_allclose(layer.forward(z), formula(z))
    check_layer_gradients(layer, z)


def test_sigmoid_does_not_overflow():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        a = Sigmoid().forward(np.array([[-1000.0, 0.0, 1000.0]]))
    np.testing.assert_array_equal(a, [[0.0, 0.5, 1.0]])


def test_flatten():
    layer = Flatten()
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    y = layer.forward(x)
    np.testing.assert_array_equal(y, x.reshape(2, 60))
    check_layer_gradients(layer, x)


def test_sequential_finite_differences():
    net = Sequential(Conv2d(2, 3, 3, padding=1, rng=0), Tanh(), Subsampling2d(3), Sigmoid(), Conv2d(3, 4, 2, rng=1),
                     Tanh(), AvgPool2d(2, stride=1), Flatten(), Linear(4, 3, rng=2))
    x = np.random.default_rng(3).standard_normal((2, 2, 6, 6))
    assert net.forward(x).shape == (2, 3)
    assert [name for name, _ in net.named_parameters()] == [
        "0.weight", "0.bias", "2.beta", "2.bias", "4.weight", "4.bias", "8.weight", "8.bias"]
    check_layer_gradients(net, x)


def test_lenet5_finite_differences():
    net = lenet5(dtype=np.float64, seed=0)
    x = np.random.default_rng(1).standard_normal((2, 1, 32, 32))
    check_layer_gradients(net, x, params=["0.weight", "2.beta", "4.weight", "6.bias", "8.weight", "13.weight"])


# ---------------------------------------------------------------------- losses
def test_mse_value_and_gradient():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    loss = MSELoss()
    assert_allclose(loss(pred, target), 0.5 * np.sum((pred - target) ** 2) / 4)
    gradcheck(lambda p: MSELoss()(p, target), pred, loss.backward())


def test_mse_with_labels_uses_one_hot():
    pred = np.random.default_rng(0).standard_normal((3, 4))
    labels = np.array([0, 3, 1])
    assert_allclose(MSELoss()(pred, labels), MSELoss()(pred, np.eye(4)[labels]))


def test_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((5, 4)), np.array([0, 3, 1, 1, 2])
    loss = CrossEntropyLoss()
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert_allclose(loss(logits, labels), -np.mean(log_softmax[np.arange(5), labels]))
    gradcheck(lambda z: CrossEntropyLoss()(z, labels), logits, loss.backward())
    softmax = np.exp(log_softmax)
    assert_allclose(loss.backward(), (softmax - np.eye(4)[labels]) / 5)


def test_cross_entropy_is_stable_for_large_logits():
    logits = np.array([[1e4, 0.0, -1e4], [1e4, 0.0, -1e4]])
    loss = CrossEntropyLoss()
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value = loss(logits, np.array([0, 1]))
    # sample 0: log(1 + e^-1e4 + e^-2e4) = 0; sample 1: 1e4 + that
    assert_allclose(value, (0.0 + 1e4) / 2)
    np.testing.assert_array_equal(loss.backward(), [[0.0, 0.0, 0.0], [0.5, -0.5, 0.0]])


@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, MSELoss], ids=["cross-entropy", "mse"])
@pytest.mark.parametrize("labels,error", [
    (np.array([0, 4, 1]), ValueError),
    (np.array([0, -1, 1]), ValueError),
    (np.array([0, 1]), ValueError),
    (np.array([[0], [1], [2]]), ValueError),
    (np.array([0.0, 1.0, 2.0]), TypeError),
], ids=["too-large", "negative", "too-few", "column", "float"])
def test_bad_labels_name_the_loss(loss_cls, labels, error):
    logits = np.random.default_rng(0).standard_normal((3, 4))
    with pytest.raises(error, match=loss_cls.__name__):
        loss_cls()(logits, labels)


@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, MSELoss], ids=["cross-entropy", "mse"])
def test_loss_backward_before_call(loss_cls):
    with pytest.raises(ValueError, match="before"):
        loss_cls().backward()


# ---------------------------------------------------------------------- SGD
def test_sgd_plain_step():
    p = Parameter(np.array([1.0, -2.0, 3.0]))
    p.grad[...] = [0.5, 0.5, -1.0]
    SGD([p], lr=0.1).step()
    assert_allclose(p.data, [0.95, -2.05, 3.1])


def test_sgd_momentum_and_weight_decay_by_hand():
    lr, mu, wd = 0.1, 0.9, 0.01
    d0 = np.array([1.0, -2.0])
    g1, g2 = np.array([0.5, 0.25]), np.array([-1.0, 2.0])
    p = Parameter(d0.copy())
    opt = SGD([p], lr=lr, momentum=mu, weight_decay=wd)
    p.grad[...] = g1
    opt.step()
    v1 = g1 + wd * d0
    d1 = d0 - lr * v1
    assert_allclose(p.data, d1)
    opt.zero_grad()
    assert not p.grad.any()
    p.grad[...] = g2
    opt.step()
    v2 = mu * v1 + g2 + wd * d1
    assert_allclose(p.data, d1 - lr * v2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=np.nan), "lr"),
    (dict(lr=0.1, momentum=-0.5), "momentum"), (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
], ids=["lr-negative", "lr-nan", "momentum-negative", "decay-negative"])
def test_sgd_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGD([Parameter(np.zeros(2))], **kwargs)


def test_masked_weights_stay_zero_through_training():
    table = _table(5, 4, 0)
    net = Sequential(Conv2d(4, 5, 3, connection=table, rng=0), Tanh(), Flatten(), Linear(5 * 4 * 4, 3, rng=1))
    rng = np.random.default_rng(2)
    x, labels = rng.standard_normal((6, 4, 6, 6)), rng.integers(0, 3, 6)
    opt = SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    loss = CrossEntropyLoss()
    conv = net[0]
    net.forward(x)
    nnz = conv.op.nnz
    for _ in range(5):
        opt.zero_grad()
        loss(net.forward(x), labels)
        net.backward(loss.backward())
        opt.step()
    mask = conv.weight.mask
    assert np.count_nonzero(mask) < mask.size
    assert np.all(conv.weight.data[~mask] == 0)
    assert np.all(conv.weight.data[mask] != 0)
    assert conv.op.nnz == nnz
    assert_allclose(net[0].forward(x), ref.conv_direct(x, conv.weight.data, conv.bias.data))


def test_training_smoke_loss_decreases():
    # two classes a classifier can separate: bright top half vs bright bottom half
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 8)
    x = (0.1 * rng.standard_normal((16, 1, 32, 32))).astype(np.float32)
    x[labels == 0, :, :16] += 1.0
    x[labels == 1, :, 16:] += 1.0
    net = lenet5(seed=0)
    c3 = net[LENET5_LAYERS["C3"]].weight
    opt = SGD(net.parameters(), lr=0.05, momentum=0.9)
    loss = CrossEntropyLoss()
    history = []
    for _ in range(8):
        opt.zero_grad()
        history.append(loss(net.forward(x), labels))
        net.backward(loss.backward())
        opt.step()
    final = loss(net.forward(x), labels)
    assert np.all(np.isfinite(history))
    assert final < 0.5 * history[0], history + [final]
    assert np.all(c3.data[~c3.mask] == 0)


# ---------------------------------------------------------------------- state and checkpoints
def _outputs(net, seed: int = 5) -> np.ndarray:
    return net.forward(np.random.default_rng(seed).standard_normal((2, 1, 32, 32)).astype(net[0].dtype))


def test_state_dict_round_trip():
    source, target = lenet5(seed=1), lenet5(seed=2)
    assert not np.array_equal(_outputs(source), _outputs(target))
    state = source.state_dict()
    assert sorted(state) == sorted(name for name, _ in target.named_parameters())
    assert state["4.weight"].shape == (16, 6, 5, 5)
    target.load_state_dict(state)
    np.testing.assert_array_equal(_outputs(target), _outputs(source))
    # state_dict holds copies
    state["0.weight"][...] = 0
    assert source[0].weight.data.any()


def test_save_load_round_trip_without_pickle(tmp_path):
    source = lenet5(seed=1)
    path = tmp_path / "lenet5.npz"
    source.save(path)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(source.state_dict())
        for name, value in source.state_dict().items():
            np.testing.assert_array_equal(data[name], value)
    target = lenet5(seed=2)
    target.load(path)
    np.testing.assert_array_equal(_outputs(target), _outputs(source))
    assert os.listdir(tmp_path) == ["lenet5.npz"]


def test_save_overwrites_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    lenet5(seed=1).save(path)
    second = lenet5(seed=2)
    second.save(path)
    third = lenet5(seed=3)
    third.load(path)
    np.testing.assert_array_equal(_outputs(third), _outputs(second))


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError], ids=["ctrl-c", "disk-full"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, interruption):
    path = tmp_path / "ckpt.npz"
    first = lenet5(seed=1)
    first.save(path)
    before = path.read_bytes()

    def savez_interrupted(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip archive")
        raise interruption("interrupted while writing")

    monkeypatch.setattr(np, "savez", savez_interrupted)
    with pytest.raises(interruption):
        lenet5(seed=2).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    restored = lenet5(seed=3)
    restored.load(path)
    np.testing.assert_array_equal(_outputs(restored), _outputs(first))


def test_load_names_the_differing_parameter(tmp_path):
    path = tmp_path / "ckpt.npz"
    lenet5(classes=10).save(path)
    with pytest.raises(ValueError, match=r"'13\.weight'.*\(7, 84\).*\(10, 84\)"):
        lenet5(classes=7).load(path)
    with pytest.raises(ValueError, match=r"missing parameters \['2\.weight', '2\.bias'\]"):
        Sequential(Conv2d(1, 6, 5), Tanh(), Conv2d(6, 16, 5)).load_state_dict(
            {"0.weight": np.zeros((6, 1, 5, 5)), "0.bias": np.zeros(6)})


def test_load_rejects_weights_where_the_table_has_no_connection():
    net = lenet5()
    state = net.state_dict()
    state["4.weight"][...] = 1.0
    with pytest.raises(ValueError, match=r"4\.weight"):
        net.load_state_dict(state)


# ---------------------------------------------------------------------- input errors
def test_sequential_names_the_layer_that_rejects_its_input():
    net = lenet5()
    with pytest.raises(LayerInputError, match=r"layer 0 \(Conv2d"):
        net.forward(np.zeros((2, 3, 32, 32)))
    small = Sequential(Conv2d(1, 2, 3), Flatten(), Linear(10, 3))
    with pytest.raises(LayerInputError, match=r"layer 2 \(Linear"):
        small.forward(np.zeros((1, 1, 6, 6)))
    assert issubclass(LayerInputError, ValueError)


def test_sequential_wraps_dtype_errors():
    net = lenet5(dtype=np.float64)
    with pytest.raises(LayerInputError, match=r"layer 0 \(Conv2d.*float32"):
        net.forward(np.zeros((1, 1, 32, 32), dtype=np.float32))


@pytest.mark.parametrize("make,dy", [
    (lambda: Conv2d(1, 2, 3), np.zeros((1, 2, 2, 2))),
    (lambda: Conv1d(1, 2, 3), np.zeros((1, 2, 2))),
    (lambda: Linear(3, 2), np.zeros((1, 2))),
    (lambda: AvgPool2d(2), np.zeros((1, 1, 2, 2))),
    (lambda: SumPool2d(2), np.zeros((1, 1, 2, 2))),
    (lambda: MaxPool2d(2), np.zeros((1, 1, 2, 2))),
    (lambda: Subsampling2d(1), np.zeros((1, 1, 2, 2))),
    (lambda: ReLU(), np.zeros((1, 2))),
    (lambda: Tanh(), np.zeros((1, 2))),
    (lambda: Flatten(), np.zeros((1, 2))),
    (lambda: lenet5(), np.zeros((1, 10))),
], ids=["conv2d", "conv1d", "linear", "avgpool", "sumpool", "maxpool", "subsampling", "relu", "tanh", "flatten",
        "lenet5"])
def test_backward_before_forward(make, dy):
    with pytest.raises(ValueError, match="before forward"):
        make().backward(dy)
