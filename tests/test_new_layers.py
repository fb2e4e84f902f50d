"""The layers added for PyTorch coverage: Identity, Dropout, LeakyReLU, ELU, GELU, Softplus,
ChannelAffine, AvgPool1d/3d, MaxPool1d/3d, AdaptiveAvgPool1d/2d/3d.

Each passes a float64 finite-difference check for its input and parameters
(``sparseconv.testing.gradcheck``) and is compared with ``torch.nn.functional`` (those
comparisons are skipped when PyTorch is not installed); linear ones export through
``to_mlp`` to the same outputs and input gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv as sc
from sparseconv.nn import (ELU, GELU, AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d, AvgPool1d, AvgPool3d,
                           ChannelAffine, Conv2d, Dropout, Flatten, Identity, LeakyReLU, Linear, MaxPool1d, MaxPool2d,
                           MaxPool3d, Sequential, Softplus, Tanh, adaptive_avg_pool_matrix)
from sparseconv.testing import assert_allclose, gradcheck


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install torch")


def check_gradients(layer, x, seed=0):
    """Finite differences for the input and every parameter of ``layer`` at ``x``."""
    y = layer.forward(x)
    dy = np.random.default_rng(seed).standard_normal(y.shape)
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(dy)
    gradcheck(lambda v: float(np.sum(dy * layer.forward(v))), x, dx)
    for name, p in layer.named_parameters():
        base, grad = p.data.copy(), p.grad.copy()

        def loss(v, p=p):
            p.data = v
            return float(np.sum(dy * layer.forward(x)))

        gradcheck(loss, base, grad)
        p.data = base


# Inputs kept away from the kinks (0 for LeakyReLU/ELU) so central differences are smooth.
def _smooth_batch(shape, seed=1):
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.where(np.abs(x) < 0.05, 0.5, x)


# ---------------------------------------------------------------------- activations
ACTIVATION_CASES = [
    ("leaky_relu-default", lambda: LeakyReLU(), lambda F, t: F.leaky_relu(t)),
    ("leaky_relu-0.2", lambda: LeakyReLU(0.2), lambda F, t: F.leaky_relu(t, 0.2)),
    ("elu-default", lambda: ELU(), lambda F, t: F.elu(t)),
    ("elu-0.5", lambda: ELU(alpha=0.5), lambda F, t: F.elu(t, alpha=0.5)),
    ("gelu-none", lambda: GELU(), lambda F, t: F.gelu(t)),
    ("gelu-tanh", lambda: GELU("tanh"), lambda F, t: F.gelu(t, approximate="tanh")),
    ("softplus-default", lambda: Softplus(), lambda F, t: F.softplus(t)),
    ("softplus-b2-t3", lambda: Softplus(beta=2.0, threshold=3.0), lambda F, t: F.softplus(t, beta=2.0, threshold=3.0)),
]


@pytest.mark.parametrize("make,functional", [c[1:] for c in ACTIVATION_CASES], ids=[c[0] for c in ACTIVATION_CASES])
def test_activation_finite_differences(make, functional):
    check_gradients(make(), _smooth_batch((3, 2, 5)))


@pytest.mark.parametrize("make,functional", [c[1:] for c in ACTIVATION_CASES], ids=[c[0] for c in ACTIVATION_CASES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_activation_matches_torch(make, functional, dtype):
    torch = _torch()
    x = (4 * _smooth_batch((3, 2, 7))).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = functional(torch.nn.functional, xt)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(dtype)
    yt.backward(torch.tensor(dy))
    layer = make()
    y = layer.forward(x)
    assert y.dtype == dtype
    assert_allclose(y, yt.detach().numpy())
    assert_allclose(layer.backward(dy), xt.grad.numpy())


def test_softplus_threshold_region_is_the_identity():
    x = np.array([[30.0, -30.0, 0.0]])
    assert_allclose(Softplus().forward(x), np.array([[30.0, np.log1p(np.exp(-30.0)), np.log(2.0)]]))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: LeakyReLU("0.1"), TypeError, "negative_slope must be a real number"),
    (lambda: LeakyReLU(np.nan), ValueError, "negative_slope must be finite"),
    (lambda: ELU(np.inf), ValueError, "alpha must be finite"),
    (lambda: GELU("erf"), ValueError, "approximate must be 'none' or 'tanh'; got 'erf'"),
    (lambda: Softplus(beta=0), ValueError, "beta must be > 0"),
    (lambda: Softplus(threshold=None), TypeError, "threshold must be a real number"),
    (lambda: Dropout(1.5), ValueError, r"p must be a probability in \[0, 1\]"),
    (lambda: Dropout(-0.1), ValueError, "p must be >= 0"),
    (lambda: Dropout(True), TypeError, "p must be a real number"),
], ids=["leaky-str", "leaky-nan", "elu-inf", "gelu-erf", "softplus-beta0", "softplus-none", "dropout-1.5",
        "dropout-neg", "dropout-bool"])
def test_activation_options_are_validated(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---------------------------------------------------------------------- identity and dropout
def test_identity_passes_through_and_exports_as_nothing():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    layer = Identity()
    np.testing.assert_array_equal(layer.forward(x), x)
    np.testing.assert_array_equal(layer.backward(2 * x), 2 * x)
    net = Sequential(Flatten(), Identity(), Linear(12, 2, rng=0))
    mlp = sc.to_mlp(net, (3, 4))
    assert len(mlp.stages) == 1
    assert_allclose(mlp.forward(x.reshape(2, -1)), net.forward(x))


def test_dropout_eval_mode_is_the_identity():
    x = np.random.default_rng(0).standard_normal((4, 5))
    layer = Dropout(0.5, rng=0).eval()
    np.testing.assert_array_equal(layer.forward(x), x)
    np.testing.assert_array_equal(layer.backward(x), x)


def test_dropout_training_mode_is_inverted_dropout():
    p = 0.3
    x = np.ones((200, 100))
    layer = Dropout(p, rng=0)
    y = layer.forward(x)
    kept = y != 0
    # survivors scaled by 1 / (1 - p); the drop rate is p within 4 binomial standard deviations
    assert_allclose(y[kept], np.full(kept.sum(), 1 / (1 - p)))
    assert abs((~kept).mean() - p) < 4 * np.sqrt(p * (1 - p) / x.size)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    assert_allclose(layer.backward(dy), dy * kept / (1 - p))


def test_dropout_seeded_masks_repeat():
    x = np.ones((3, 8))
    a, b = Dropout(0.5, rng=7), Dropout(0.5, rng=7)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    np.testing.assert_array_equal(a.forward(x), b.forward(x))


def test_dropout_p1_and_p0():
    x = np.ones((2, 3))
    np.testing.assert_array_equal(Dropout(1.0, rng=0).forward(x), np.zeros_like(x))
    np.testing.assert_array_equal(Dropout(0.0, rng=0).forward(x), x)


def test_dropout_gradient_is_that_of_its_own_mask():
    # finite differences through a fixed mask: the same seed replays the same mask
    x = np.random.default_rng(0).standard_normal((3, 6))
    dy = np.random.default_rng(1).standard_normal(x.shape)
    layer = Dropout(0.4, rng=3)
    layer.forward(x)
    dx = layer.backward(dy)
    gradcheck(lambda v: float(np.sum(dy * Dropout(0.4, rng=3).forward(v))), x, dx)


def test_to_mlp_refuses_dropout_in_training_mode_and_exports_it_in_eval():
    net = Sequential(Flatten(), Dropout(0.5, rng=0), Linear(6, 2, rng=0))
    with pytest.raises(ValueError, match=r"dropout in training mode.*net\.eval\(\)"):
        sc.to_mlp(net, (2, 3))
    net.eval()
    x = np.random.default_rng(0).standard_normal((2, 2, 3))
    assert_allclose(sc.to_mlp(net, (2, 3)).forward(x.reshape(2, -1)), net.forward(x))


# ---------------------------------------------------------------------- per-channel affine
@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 3, 2)], ids=["0d", "1d", "2d", "3d"])
def test_channel_affine_gradients_and_export(spatial):
    rng = np.random.default_rng(0)
    layer = ChannelAffine(rng.standard_normal(3), rng.standard_normal(3))
    x = rng.standard_normal((2, 3, *spatial))
    check_gradients(layer, x)
    y = layer.forward(x)
    expected = x * layer.params["scale"].data.reshape((-1,) + (1,) * len(spatial)) \
        + layer.params["shift"].data.reshape((-1,) + (1,) * len(spatial))
    assert_allclose(y, expected)
    net = Sequential(layer, Flatten())
    assert_allclose(sc.to_mlp(net, (3, *spatial)).forward(x.reshape(2, -1)), y.reshape(2, -1))


def test_channel_affine_is_batchnorm_in_eval_mode():
    torch = _torch()
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    shift = (bn.bias - bn.running_mean * torch.tensor(scale)).detach().numpy()
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    assert_allclose(ChannelAffine(scale, shift).forward(x), bn(torch.tensor(x)).detach().numpy())


@pytest.mark.parametrize("args,exc,match", [
    ((np.ones((2, 2)),), ValueError, "scale must be a real 1-D array"),
    ((np.ones(3), np.ones(2)), ValueError, r"shift must be a real array of shape \(3,\)"),
    ((np.array([1.0, np.nan]),), ValueError, "scale must be finite"),
    ((np.ones(2, dtype=complex),), ValueError, "scale must be a real 1-D array"),
], ids=["scale-2d", "shift-shape", "scale-nan", "scale-complex"])
def test_channel_affine_rejects_bad_arrays(args, exc, match):
    with pytest.raises(exc, match=match):
        ChannelAffine(*args)


def test_channel_affine_keeps_float32():
    layer = ChannelAffine(np.ones(2, dtype=np.float32))
    assert layer.dtype == np.float32
    assert layer.forward(np.ones((1, 2, 3), dtype=np.float32)).dtype == np.float32


# ---------------------------------------------------------------------- pooling
POOL_CASES = [
    ("avg1d-k3-s2-p1", lambda: AvgPool1d(3, 2, 1), (2, 9), lambda F, t: F.avg_pool1d(t, 3, 2, 1)),
    ("avg3d-k2", lambda: AvgPool3d(2), (2, 4, 5, 4), lambda F, t: F.avg_pool3d(t, 2)),
    ("avg3d-k3-s2-p1", lambda: AvgPool3d((3, 2, 3), (2, 1, 2), (1, 0, 1)), (1, 5, 4, 6),
     lambda F, t: F.avg_pool3d(t, (3, 2, 3), (2, 1, 2), (1, 0, 1))),
    ("max1d-k2", lambda: MaxPool1d(2), (3, 8), lambda F, t: F.max_pool1d(t, 2)),
    ("max1d-k3-s2-p1", lambda: MaxPool1d(3, 2, 1), (2, 9), lambda F, t: F.max_pool1d(t, 3, 2, 1)),
    ("max3d-k2", lambda: MaxPool3d(2), (2, 4, 4, 5), lambda F, t: F.max_pool3d(t, 2)),
    ("max3d-k3-s2-p1", lambda: MaxPool3d(3, 2, 1), (1, 5, 6, 5), lambda F, t: F.max_pool3d(t, 3, 2, 1)),
    ("adaptive1d-3-from-7", lambda: AdaptiveAvgPool1d(3), (2, 7), lambda F, t: F.adaptive_avg_pool1d(t, 3)),
    ("adaptive1d-5-from-3", lambda: AdaptiveAvgPool1d(5), (2, 3), lambda F, t: F.adaptive_avg_pool1d(t, 5)),
    ("adaptive2d-1", lambda: AdaptiveAvgPool2d(1), (3, 5, 6), lambda F, t: F.adaptive_avg_pool2d(t, 1)),
    ("adaptive2d-3x4-from-7x5", lambda: AdaptiveAvgPool2d((3, 4)), (2, 7, 5),
     lambda F, t: F.adaptive_avg_pool2d(t, (3, 4))),
    ("adaptive2d-None-x2", lambda: AdaptiveAvgPool2d((None, 2)), (2, 4, 5),
     lambda F, t: F.adaptive_avg_pool2d(t, (None, 2))),
    ("adaptive3d-2x3x2-from-5x7x4", lambda: AdaptiveAvgPool3d((2, 3, 2)), (2, 5, 7, 4),
     lambda F, t: F.adaptive_avg_pool3d(t, (2, 3, 2))),
]
POOL_IDS = [c[0] for c in POOL_CASES]


@pytest.mark.parametrize("make,shape,functional", [c[1:] for c in POOL_CASES], ids=POOL_IDS)
def test_pool_finite_differences(make, shape, functional):
    # distinct, well separated values: max pooling is smooth around them
    n = int(np.prod(shape))
    x = np.random.default_rng(0).permutation(np.arange(2 * n, dtype=np.float64)).reshape((2, *shape)) / 4
    check_gradients(make(), x)


@pytest.mark.parametrize("make,shape,functional", [c[1:] for c in POOL_CASES], ids=POOL_IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_pool_matches_torch(make, shape, functional, dtype):
    torch = _torch()
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = functional(torch.nn.functional, xt)
    dy = np.random.default_rng(1).standard_normal(tuple(yt.shape)).astype(dtype)
    yt.backward(torch.tensor(dy))
    layer = make() if dtype == np.float64 else _with_dtype(make, np.float32)
    assert layer.output_shape(shape) == tuple(yt.shape[1:])
    y = layer.forward(x)
    assert y.dtype == dtype
    assert_allclose(y, yt.detach().numpy())
    assert_allclose(layer.backward(dy), xt.grad.numpy())


def _with_dtype(make, dtype):
    """The layer ``make()`` builds, rebuilt with ``dtype``."""
    layer = make()
    if isinstance(layer, (AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d)):
        return type(layer)(layer.output_size, dtype=dtype)
    return type(layer)(layer.kernel_size, layer.stride, layer.padding, dtype=dtype)


@pytest.mark.parametrize("make,shape,functional", [c[1:] for c in POOL_CASES if not c[0].startswith("max")],
                         ids=[c for c in POOL_IDS if not c.startswith("max")])
def test_linear_pools_export(make, shape, functional):
    net = Sequential(make(), Flatten())
    x = np.random.default_rng(0).standard_normal((2, *shape))
    mlp = sc.to_mlp(net, shape)
    y = net.forward(x)
    assert_allclose(mlp.forward(x.reshape(2, -1)), y)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    assert_allclose(mlp.backward(dy), net.backward(dy).reshape(2, -1))


@pytest.mark.parametrize("cls", [MaxPool1d, MaxPool2d, MaxPool3d])
def test_to_mlp_refuses_every_max_pool(cls):
    shape = (1,) + (4,) * {MaxPool1d: 1, MaxPool2d: 2, MaxPool3d: 3}[cls]
    with pytest.raises(ValueError, match="max pooling, which has no fixed matrix"):
        sc.to_mlp(cls(2), shape)


def test_adaptive_matrix_follows_pytorchs_window_rule():
    # in 5 -> out 3: windows [0, 2), [1, 4), [3, 5)  (start floor(o*5/3), end ceil((o+1)*5/3))
    dense = adaptive_avg_pool_matrix((5,), (3,)).toarray()
    expected = np.array([[1 / 2, 1 / 2, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]])
    assert_allclose(dense, expected)


def test_adaptive_matrix_with_divisible_sizes_is_average_pooling():
    # out divides in: the windows tile the input, exactly AvgPool's matrix
    assert_allclose(adaptive_avg_pool_matrix((6, 4), (3, 2)).toarray(), sc.pool_matrix((1, 6, 4), 2).toarray())


@pytest.mark.parametrize("make,exc,match", [
    (lambda: AdaptiveAvgPool2d(0), ValueError, "output_size must hold positive ints"),
    (lambda: AdaptiveAvgPool2d((2, 2, 2)), TypeError, "output_size must be an int or a sequence of 2 ints"),
    (lambda: AdaptiveAvgPool1d(1.5), TypeError, "output_size must be an int"),
    (lambda: AvgPool1d(0), ValueError, "kernel_size must be >= 1"),
    (lambda: MaxPool3d(2, stride=0), ValueError, "stride must be >= 1"),
    (lambda: AvgPool3d(2, padding=-1), ValueError, "padding must be non-negative"),
], ids=["adaptive-zero", "adaptive-len", "adaptive-float", "avg1d-k0", "max3d-s0", "avg3d-pneg"])
def test_pool_options_are_validated_at_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---------------------------------------------------------------------- in a network
def test_network_of_new_layers_matches_torch():
    torch = _torch()
    torch.manual_seed(0)
    tnet = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 4, 3), torch.nn.ELU(0.7), torch.nn.AdaptiveAvgPool2d((2, 3)), torch.nn.Flatten(),
        torch.nn.Linear(24, 5), torch.nn.Softplus(), torch.nn.Linear(5, 3), torch.nn.LeakyReLU(0.1),
    ).double()
    ours = Sequential(Conv2d(2, 4, 3, padding=1), GELU(), MaxPool2d(2), Conv2d(4, 4, 3), ELU(0.7),
                      AdaptiveAvgPool2d((2, 3)), Flatten(), Linear(24, 5), Softplus(), Linear(5, 3), LeakyReLU(0.1))
    for (name, p), (tname, tp) in zip(ours.named_parameters(), tnet.named_parameters()):
        assert name == tname
        p.data = tp.detach().numpy().copy()
    x = np.random.default_rng(0).standard_normal((3, 2, 12, 14))
    xt = torch.tensor(x, requires_grad=True)
    yt = tnet(xt)
    dy = np.random.default_rng(1).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    assert_allclose(ours.forward(x), yt.detach().numpy())
    assert_allclose(ours.backward(dy), xt.grad.numpy())
    theirs = dict(tnet.named_parameters())
    for name, p in ours.named_parameters():
        assert_allclose(p.grad, theirs[name].grad.numpy(), err_msg=name)


def test_float32_network_starting_with_an_activation_exports_in_float32():
    net = Sequential(Tanh(), Flatten(), Linear(6, 2, dtype=np.float32, rng=0))
    mlp = sc.to_mlp(net, (2, 3))
    assert mlp.stages[0].matrix.dtype == np.float32
    x = np.ones((2, 6), dtype=np.float32)
    assert mlp.forward(x).dtype == np.float32


def test_to_mlp_expands_nested_sequentials():
    net = Sequential(Sequential(Flatten(), Linear(6, 4, rng=0)), Tanh(), Sequential(Identity(), Linear(4, 2, rng=1)))
    x = np.random.default_rng(0).standard_normal((3, 2, 3))
    mlp = sc.to_mlp(net, (2, 3))
    assert [s.source for s in mlp.stages] == ["1:Linear", "4:Linear"]
    assert_allclose(mlp.forward(x.reshape(3, -1)), net.forward(x))
