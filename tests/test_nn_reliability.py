"""Regression tests for the issue-14 items in nn, export, SGD and train, each named after its item."""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv as sc
from sparseconv.data import Dataset
from sparseconv.models import lenet5
from sparseconv.nn import (ELU, GELU, SGD, AdaptiveAvgPool2d, AvgPool1d, AvgPool2d, AvgPool3d, ChannelAffine, Conv1d,
                           Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, Dropout, Flatten,
                           Identity, LeakyReLU, Linear, MaxPool1d, MaxPool2d, MaxPool3d, Parameter, ReLU, Sequential,
                           Sigmoid, Softplus, Subsampling2d, SumPool2d, Tanh)
from sparseconv.testing import assert_allclose
from sparseconv.train import evaluate, train

# (id, layer factory taking the dtype, one sample's input shape)
LAYERS = [
    ("conv1d", lambda dt=np.float64: Conv1d(2, 3, 3, rng=0, dtype=dt), (2, 6)),
    ("conv2d", lambda dt=np.float64: Conv2d(2, 3, 3, padding=1, rng=0, dtype=dt), (2, 5, 4)),
    ("conv3d", lambda dt=np.float64: Conv3d(1, 2, 2, rng=0, dtype=dt), (1, 3, 3, 3)),
    ("conv2d-masked", lambda dt=np.float64: Conv2d(2, 3, 3, weight_mask=np.eye(3, dtype=bool)[:, :2, None, None]
                                     .repeat(3, 2).repeat(3, 3), rng=0, dtype=dt), (2, 5, 5)),
    ("convT1d", lambda dt=np.float64: ConvTranspose1d(2, 3, 3, stride=2, rng=0, dtype=dt), (2, 4)),
    ("convT2d", lambda dt=np.float64: ConvTranspose2d(2, 3, 2, stride=2, rng=0, dtype=dt), (2, 3, 3)),
    ("convT3d", lambda dt=np.float64: ConvTranspose3d(1, 2, 2, rng=0, dtype=dt), (1, 2, 2, 2)),
    ("linear", lambda dt=np.float64: Linear(5, 3, rng=0, dtype=dt), (5,)),
    ("avgpool1d", lambda dt=np.float64: AvgPool1d(2, dtype=dt), (2, 6)),
    ("avgpool2d", lambda dt=np.float64: AvgPool2d(2, dtype=dt), (2, 4, 4)),
    ("avgpool3d", lambda dt=np.float64: AvgPool3d(2, dtype=dt), (1, 4, 4, 2)),
    ("sumpool2d", lambda dt=np.float64: SumPool2d(2, dtype=dt), (2, 4, 4)),
    ("maxpool1d", lambda dt=np.float64: MaxPool1d(2, dtype=dt), (2, 6)),
    ("maxpool2d", lambda dt=np.float64: MaxPool2d(2, dtype=dt), (2, 4, 4)),
    ("maxpool3d", lambda dt=np.float64: MaxPool3d(2, dtype=dt), (1, 4, 4, 2)),
    ("adaptive2d", lambda dt=np.float64: AdaptiveAvgPool2d((2, 3), dtype=dt), (2, 5, 7)),
    ("subsampling2d", lambda dt=np.float64: Subsampling2d(2, dtype=dt), (2, 4, 4)),
    ("channel_affine", lambda dt=np.float64: ChannelAffine(np.array([2.0, -1.0]), np.array([0.5, 0.0]), dtype=dt),
     (2, 3)),
    ("relu", lambda dt=np.float64: ReLU(), (3, 2)),
    ("sigmoid", lambda dt=np.float64: Sigmoid(), (3, 2)),
    ("tanh", lambda dt=np.float64: Tanh(), (3, 2)),
    ("leaky_relu", lambda dt=np.float64: LeakyReLU(0.1), (3, 2)),
    ("elu", lambda dt=np.float64: ELU(), (3, 2)),
    ("gelu", lambda dt=np.float64: GELU(), (3, 2)),
    ("softplus", lambda dt=np.float64: Softplus(), (3, 2)),
    ("flatten", lambda dt=np.float64: Flatten(), (2, 3)),
    ("identity", lambda dt=np.float64: Identity(), (2, 3)),
    ("dropout", lambda dt=np.float64: Dropout(0.5, rng=0), (2, 3)),
]
LAYER_IDS = [c[0] for c in LAYERS]


# ---------------------------------------------------------------------- dy checked against forward
@pytest.mark.parametrize("make,shape", [c[1:] for c in LAYERS], ids=LAYER_IDS)
def test_every_backward_checks_dy_against_its_forward(make, shape):
    layer = make()
    y = layer.forward(np.random.default_rng(0).standard_normal((3, *shape)))
    name = type(layer).__name__
    for bad in [(2, *y.shape[1:]), (4, *y.shape[1:]), y.shape[:-1] + (y.shape[-1] + 1,), y.shape[1:]]:
        with pytest.raises(ValueError, match=rf"{name}\.backward: dy must have the shape of the matching "
                                             rf"forward's output, \({y.shape[0]}, "):
            layer.backward(np.zeros(bad))
    # the refused calls consumed nothing and changed no gradient: the right dy still works
    assert all(not p.grad.any() for p in layer.parameters())
    assert layer.backward(np.zeros(y.shape)).shape == (3, *shape)


def test_subsampling2d_backward_with_another_batch_size_is_refused():
    layer = Subsampling2d(2)
    layer.forward(np.ones((3, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"Subsampling2d\.backward: dy must have the shape .*\(3, 2, 2, 2\); "
                                         r"got \(1, 2, 2, 2\)"):
        layer.backward(np.ones((1, 2, 2, 2)))
    assert not layer.params["beta"].grad.any()


def test_linear_backward_wrong_dy_is_a_clear_error():
    layer = Linear(4, 3, rng=0)
    layer.forward(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"Linear\.backward: dy must have the shape .*\(2, 3\); got \(2, 4\)"):
        layer.backward(np.ones((2, 4)))


def test_flatten_backward_wrong_dy_is_a_clear_error():
    layer = Flatten()
    layer.forward(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"Flatten\.backward: dy must have the shape .*\(2, 12\); got \(2, 11\)"):
        layer.backward(np.ones((2, 11)))


def test_mlp_backward_wrong_dy_is_a_clear_error():
    mlp = sc.to_mlp(Sequential(Flatten(), Linear(6, 2, rng=0), Tanh()), (2, 3))
    mlp.forward(np.ones((4, 6)))
    with pytest.raises(ValueError, match=r"MLP\.backward: dy must have the shape .*\(4, 2\); got \(3, 2\)"):
        mlp.backward(np.ones((3, 2)))


# ---------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("make,shape", [c[1:] for c in LAYERS], ids=LAYER_IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_empty_batches_give_empty_outputs_of_the_right_shape(make, shape, dtype):
    layer = make(dtype)
    out = layer.output_shape(shape)
    y = layer.forward(np.zeros((0, *shape), dtype=dtype))
    assert y.shape == (0, *out) and y.dtype == dtype
    dx = layer.backward(np.zeros((0, *out), dtype=dtype))
    assert dx.shape == (0, *shape) and dx.dtype == dtype
    for name, p in layer.named_parameters():
        assert not p.grad.any(), name


def test_empty_batch_through_lenet5():
    net = lenet5()
    y = net.forward(np.zeros((0, 1, 32, 32), dtype=np.float32))
    assert y.shape == (0, 10)
    assert net.backward(y).shape == (0, 1, 32, 32)


# ---------------------------------------------------------------------- export dtype
def test_to_mlp_of_a_float32_network_starting_with_an_activation_stays_float32():
    net = Sequential(Tanh(), Conv2d(1, 2, 3, dtype=np.float32, rng=0), ReLU(), ReLU(), Flatten(),
                     Linear(18, 2, dtype=np.float32, rng=0))
    mlp = sc.to_mlp(net, (1, 5, 5))
    x = np.random.default_rng(0).standard_normal((2, 25)).astype(np.float32)
    y = mlp.forward(x)
    assert y.dtype == np.float32
    assert all(s.matrix.dtype == np.float32 for s in mlp.stages)
    assert_allclose(y, net.forward(x.reshape(2, 1, 5, 5)))
    assert mlp.backward(np.ones_like(y)).dtype == np.float32


# ---------------------------------------------------------------------- SGD hyper-parameters
@pytest.mark.parametrize("name,value,exc", [
    ("lr", np.nan, ValueError), ("lr", np.inf, ValueError), ("lr", -0.1, ValueError), ("lr", "0.1", TypeError),
    ("lr", None, TypeError), ("lr", True, TypeError), ("lr", 1j, TypeError), ("lr", np.array([0.1]), TypeError),
    ("momentum", np.nan, ValueError), ("momentum", -np.inf, ValueError), ("momentum", -0.5, ValueError),
    ("momentum", "0.9", TypeError), ("weight_decay", np.inf, ValueError), ("weight_decay", -1e-4, ValueError),
    ("weight_decay", [0.1], TypeError),
], ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__)
def test_sgd_refuses_nan_inf_negative_and_non_numbers(name, value, exc):
    kwargs = dict(lr=0.1)
    kwargs[name] = value
    with pytest.raises(exc, match=name):
        SGD([Parameter(np.zeros(2))], **kwargs)
    opt = SGD([Parameter(np.zeros(2))], lr=0.1)
    with pytest.raises(exc, match=name):
        setattr(opt, name, value)
    assert opt.lr == 0.1 and opt.momentum == 0.0 and opt.weight_decay == 0.0


def test_sgd_accepts_what_torch_accepts():
    p = Parameter(np.ones(2))
    p.grad[...] = 1.0
    SGD([p], lr=0).step()
    np.testing.assert_array_equal(p.data, np.ones(2))
    opt = SGD([p], lr=np.float32(0.5), momentum=1.0, weight_decay=np.int64(0))
    opt.step()
    assert_allclose(p.data, np.full(2, 0.5))


# ---------------------------------------------------------------------- train / evaluate
def _dataset(n_train, n_test):
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((n_train, 1, 32, 32)).astype(np.float32), np.zeros(n_train, np.int64),
                   rng.standard_normal((n_test, 1, 32, 32)).astype(np.float32), np.zeros(n_test, np.int64),
                   "synthetic", 10)


@pytest.mark.parametrize("n_train,n_test,split", [(0, 4, "train"), (4, 0, "test")], ids=["train", "test"])
def test_train_on_an_empty_split_is_a_clear_error(n_train, n_test, split):
    net = lenet5(build=False)
    before = net.state_dict()
    with pytest.raises(ValueError, match=f"the {split} split of the dataset is empty"):
        train(net, _dataset(n_train, n_test), epochs=1, progress=False, log=None)
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_evaluate_on_no_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="evaluate needs at least one sample"):
        evaluate(lenet5(build=False), np.zeros((0, 1, 32, 32), np.float32), np.zeros(0, np.int64))


def test_train_refuses_bad_hyperparameters_before_any_work():
    net = lenet5(build=False)
    before = net.state_dict()
    with pytest.raises(ValueError, match="lr"):
        train(net, _dataset(4, 2), epochs=1, lr=np.nan, progress=False, log=None)
    with pytest.raises(ValueError, match="epochs"):
        train(net, _dataset(4, 2), epochs=True, progress=False, log=None)
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


# ---------------------------------------------------------------------- construction-time validation
@pytest.mark.parametrize("make,exc,match", [
    (lambda: Conv2d(1, 1, 3, stride=0), ValueError, "stride must be >= 1"),
    (lambda: Conv2d(1, 1, 3, dilation=(1, 0)), ValueError, "dilation must be >= 1"),
    (lambda: Conv2d(1, 1, 3, padding=-1), ValueError, "padding must be non-negative"),
    (lambda: Conv2d(1, 1, 3, padding="half"), ValueError, "padding must be one of"),
    (lambda: Conv2d(1, 1, 3, stride=2, padding="same"), ValueError, "padding='same' requires stride 1"),
    (lambda: Conv2d(1, 1, 3, padding_mode="bogus"), ValueError, "padding_mode must be one of"),
    (lambda: Conv2d(2, 2, 3, groups=True), ValueError, "groups must be a positive int; got True"),
    (lambda: Conv2d(2, 2, 3, groups=2.0), ValueError, "groups must be a positive int"),
    (lambda: Conv2d(1, 1, 3, memory_budget=-5), ValueError, r"memory_budget must be positive .*got -5"),
    (lambda: Conv2d(1, 1, 3, memory_budget="lots"), ValueError, r"memory_budget must be a number of bytes .*'lots'"),
    (lambda: Conv2d(1, 1, 3, flip="yes"), TypeError, "flip must be a bool"),
    (lambda: Conv2d(1, 1, 3, bias=1), TypeError, "bias must be a bool"),
    (lambda: Conv2d(True, 1, 3), ValueError, "in_channels must be a positive int; got True"),
    (lambda: Conv1d(1, 1, (3, 3)), ValueError, "kernel_size must be an int or a sequence of 1 ints"),
    (lambda: ConvTranspose2d(1, 1, 3, stride=0), ValueError, "stride must be >= 1"),
    (lambda: ConvTranspose2d(1, 1, 3, stride=2, output_padding=2), ValueError, "output_padding must be smaller"),
    (lambda: ConvTranspose2d(1, 1, 3, padding="same"), ValueError, "no string spelling"),
    (lambda: ConvTranspose2d(2, 2, 3, groups=True), ValueError, "groups must be a positive int"),
    (lambda: ConvTranspose1d(1, 1, 3, memory_budget=0), ValueError, "memory_budget"),
    (lambda: MaxPool2d(2, stride=0), ValueError, "stride must be >= 1"),
    (lambda: AvgPool2d(0), ValueError, "kernel_size must be >= 1"),
    (lambda: Subsampling2d(2, stride=0), ValueError, "stride must be >= 1"),
    (lambda: Subsampling2d(True), ValueError, "channels must be a positive int"),
    (lambda: Linear(3, 0), ValueError, "out_features must be a positive int"),
], ids=["conv-stride0", "conv-dilation0", "conv-padneg", "conv-padstr", "conv-same-stride2", "conv-padmode",
        "conv-groups-bool", "conv-groups-float", "conv-budget-neg", "conv-budget-lots", "conv-flip-str",
        "conv-bias-int", "conv-cin-bool", "conv1d-kernel2d", "convT-stride0", "convT-outpad", "convT-padstr",
        "convT-groups-bool", "convT-budget0", "maxpool-stride0", "avgpool-k0", "subsampling-stride0",
        "subsampling-bool", "linear-out0"])
def test_bad_layer_options_are_refused_at_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("layer", [Conv2d, ConvTranspose2d], ids=["conv", "convT"])
def test_memory_budget_string_is_parsed(layer):
    """A budget string with a unit (geometry.parse_memory_budget) is accepted and held in bytes."""
    assert layer(1, 1, 3, memory_budget="1GiB").memory_budget == 2**30


def test_memory_budget_reaches_the_operator():
    from sparseconv.pattern import MemoryBudgetError
    layer = Conv2d(1, 4, 3, memory_budget=1000)
    with pytest.raises(MemoryBudgetError):
        layer.forward(np.ones((1, 1, 32, 32)))
