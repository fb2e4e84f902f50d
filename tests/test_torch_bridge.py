"""from_torch: converted layers give PyTorch's outputs and gradients (skipped without PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest

from sparseconv.testing import assert_allclose

torch = pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install torch")
from sparseconv.torch_bridge import from_torch  # noqa: E402

nn = torch.nn

CONVS = [
    ("conv1d-s2-p1", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 11)),
    ("conv1d-same-circular", lambda: nn.Conv1d(2, 2, 4, padding="same", padding_mode="circular"), (2, 9)),
    ("conv2d-s2-p1", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 8, 7)),
    ("conv2d-d2-g2-reflect", lambda: nn.Conv2d(4, 6, (3, 2), dilation=(2, 1), groups=2, padding=(2, 1),
                                              padding_mode="reflect"), (4, 9, 8)),
    ("conv2d-depthwise-replicate", lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1, padding_mode="replicate"),
     (3, 6, 6)),
    ("conv2d-same-even-kernel", lambda: nn.Conv2d(2, 3, (4, 2), padding="same"), (2, 7, 6)),
    ("conv2d-valid-nobias", lambda: nn.Conv2d(2, 3, 3, padding="valid", bias=False), (2, 5, 6)),
    ("convT1d-s2-op1", lambda: nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 5)),
    ("convT2d-s2-d2-g2", lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), groups=2,
                                                   padding=(1, 0)), (4, 4, 5)),
    ("convT3d-s2", lambda: nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False), (2, 3, 2, 3)),
    ("conv3d-s2-circular", lambda: nn.Conv3d(2, 3, 3, stride=(2, 1, 2), padding=1, padding_mode="circular"),
     (2, 5, 4, 6)),
]


def _compare(module, input_shape, n=3, seed=0):
    torch.manual_seed(seed)
    module = module.double()
    ours = from_torch(module, input_shape)
    x = np.random.default_rng(seed).standard_normal((n, *input_shape))
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    dy = np.random.default_rng(seed + 1).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    y = ours.forward(x)
    assert_allclose(y, yt.detach().numpy())
    assert_allclose(ours.backward(dy), xt.grad.numpy())
    theirs = dict(module.named_parameters())
    mine = dict(ours.named_parameters())
    assert sorted(mine) == sorted(theirs)
    for name, p in mine.items():
        assert_allclose(p.grad, theirs[name].grad.numpy(), err_msg=name)
    return ours


# PyTorch warns that even kernels with padding="same" copy the input; that is its cost, not a problem here.
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")
@pytest.mark.parametrize("make,input_shape", [c[1:] for c in CONVS], ids=[c[0] for c in CONVS])
def test_convolutions_match_torch(make, input_shape):
    _compare(make(), input_shape)


def test_sequential_with_pools_and_activations_matches_torch():
    net = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3),
                        nn.Tanh(), nn.AvgPool2d(2, stride=1, padding=1), nn.Flatten(), nn.Linear(6 * 5 * 5, 10),
                        nn.Sigmoid())
    ours = _compare(net, (1, 12, 12))
    assert [type(layer).__name__ for layer in ours] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "Tanh", "AvgPool2d",
                                                        "Flatten", "Linear", "Sigmoid"]


def test_float32_module_gives_float32_layers():
    ours = from_torch(nn.Conv2d(1, 2, 3), (1, 5, 5))
    assert ours.params["weight"].data.dtype == np.float32
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 5)).astype(np.float32)
    with torch.no_grad():
        expected = nn.Conv2d(1, 2, 3)(torch.tensor(x)).numpy()
    assert ours.forward(x).dtype == np.float32 and expected.dtype == np.float32


@pytest.mark.parametrize("module,match", [
    (lambda: nn.Softmax(dim=1), r"unsupported torch module Softmax"),
    (lambda: nn.Sequential(nn.Conv2d(1, 1, 3), nn.Softmax(1)), r"Sequential item 1: unsupported torch module Softmax"),
    (lambda: nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1)), r"Sequential item 1: BatchNorm2d is in training mode"),
    (lambda: nn.Sequential(nn.Conv2d(1, 1, 3), nn.Dropout()), r"Sequential item 1: Dropout is in training mode"),
    (lambda: nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.BatchNorm1d(5).eval()),
     r"Sequential item 2: BatchNorm1d\(5\) cannot take samples of shape \(16,\)"),
    (lambda: nn.MaxPool1d(2, dilation=2), r"MaxPool1d is supported with dilation=1"),
    (lambda: nn.AvgPool3d(2, divisor_override=3), r"AvgPool3d is supported with count_include_pad=True"),
    (lambda: nn.Dropout(), r"Dropout is in training mode"),
    (lambda: nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1, track_running_stats=False)).eval(),
     r"track_running_stats=False"),
    (lambda: nn.MaxPool2d(2, ceil_mode=True), r"ceil_mode=True is not supported"),
    (lambda: nn.AvgPool2d(2, count_include_pad=False, padding=1), r"count_include_pad=True"),
    (lambda: nn.Flatten(0), r"Flatten is supported with start_dim=1"),
])
def test_unsupported_modules_are_named(module, match):
    with pytest.raises(TypeError, match=match):
        from_torch(module(), (1, 6, 6))


def test_not_a_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module; got ndarray"):
        from_torch(np.ones(3), (3,))


# ---------------------------------------------------------------------- pruning masks in
prune = pytest.importorskip("torch.nn.utils.prune")


def _conv_nnz_expected(module, input_shape, kept):
    """Entries of the unpruned layer's matrix whose tied weight survives pruning (zero padding)."""
    full = from_torch(module, input_shape)
    return int(np.count_nonzero(kept.ravel()[full.op.param_index]))


def _check_pruned(module, input_shape, kept):
    """Outputs and gradients equal torch's; only kept taps are stored; pruned taps have zero gradient."""
    ours = _compare_pruned(module, input_shape)
    assert ours.op.nnz == _conv_nnz_expected(module, input_shape, kept)
    assert np.all(ours.params["weight"].grad[~kept] == 0)
    assert np.all(ours.params["weight"].data[~kept] == 0)
    return ours


def _compare_pruned(module, input_shape, n=3, seed=0):
    module = module.double()
    ours = from_torch(module, input_shape)
    x = np.random.default_rng(seed).standard_normal((n, *input_shape))
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    dy = np.random.default_rng(seed + 1).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    assert_allclose(ours.forward(x), yt.detach().numpy())
    assert_allclose(ours.backward(dy), xt.grad.numpy())
    for name, p in ours.named_parameters():
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = owner[int(part)]
        theirs = getattr(owner, leaf + "_orig", None)
        theirs = getattr(owner, leaf) if theirs is None else theirs
        # torch's weight_orig.grad is the effective weight's gradient times the mask: zero when pruned.
        assert_allclose(p.grad, theirs.grad.numpy(), err_msg=name)
    return ours


def _mask(module):
    return module.weight_mask.numpy() == 1


PRUNE_METHODS = [
    ("random_unstructured", lambda m: prune.random_unstructured(m, "weight", amount=0.5)),
    ("l1_unstructured", lambda m: prune.l1_unstructured(m, "weight", amount=0.5)),
    ("ln_structured-filters", lambda m: prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)),
    ("random_structured-channels", lambda m: prune.random_structured(m, "weight", amount=0.5, dim=1)),
    ("custom_from_mask", lambda m: prune.custom_from_mask(
        m, "weight", torch.tensor(np.random.default_rng(3).random(tuple(m.weight.shape)) < 0.4))),
    ("identity", lambda m: prune.identity(m, "weight")),
    ("l1-then-random (pruning container)", lambda m: (prune.l1_unstructured(m, "weight", amount=0.3),
                                                      prune.random_unstructured(m, "weight", amount=0.3))),
]
PRUNED_CONVS = [
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), (3, 9)),
    ("conv2d-s2-g2", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 8, 7)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, padding=1), (2, 4, 3, 4)),
]


@pytest.mark.parametrize("method", [m[1] for m in PRUNE_METHODS], ids=[m[0] for m in PRUNE_METHODS])
@pytest.mark.parametrize("make,input_shape", [c[1:] for c in PRUNED_CONVS], ids=[c[0] for c in PRUNED_CONVS])
def test_every_torch_pruning_method_is_honoured(method, make, input_shape):
    torch.manual_seed(0)
    module = make()
    method(module)
    _check_pruned(module, input_shape, _mask(module))


@pytest.mark.parametrize("amount", [0.0, 0.5, 1.0], ids=["0%", "50%", "100%"])
def test_pruned_fractions_including_a_fully_pruned_layer(amount):
    torch.manual_seed(1)
    module = nn.Conv2d(3, 4, 3, padding=1)
    prune.l1_unstructured(module, "weight", amount=amount)
    kept = _mask(module)
    assert kept.mean() == pytest.approx(1 - amount, abs=0.01)
    ours = _check_pruned(module, (3, 6, 5), kept)
    if amount == 1.0:
        assert ours.op.nnz == 0


def test_global_unstructured_over_a_network():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Tanh(), nn.Flatten(),
                        nn.Linear(5 * 4 * 4, 3))
    prune.global_unstructured([(net[0], "weight"), (net[2], "weight")], pruning_method=prune.L1Unstructured,
                              amount=0.6)
    ours = _compare_pruned(net, (2, 6, 6))
    for i in (0, 2):
        kept = _mask(net[i])
        assert ours[i].op.nnz == _conv_nnz_expected(net[i], ours[i].op.input_shape, kept)
    total = sum(_mask(net[i]).size for i in (0, 2))
    assert sum(int(_mask(net[i]).sum()) for i in (0, 2)) == total - round(0.6 * total)


def test_training_steps_match_torch_on_the_pruned_model():
    from sparseconv.nn import SGD, CrossEntropyLoss

    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 3 * 3, 5)).double()
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    prune.ln_structured(net[2], "weight", amount=0.3, n=1, dim=0)
    ours = from_torch(net, (1, 8, 8))
    rng = np.random.default_rng(0)
    opt_t = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = SGD(ours.parameters(), 0.1, momentum=0.9, weight_decay=1e-2)
    loss = CrossEntropyLoss()
    for _ in range(5):
        x, y = rng.standard_normal((4, 1, 8, 8)), rng.integers(0, 5, 4)
        opt_t.zero_grad()
        value_t = torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(y))
        value_t.backward()
        opt_t.step()
        opt.zero_grad()
        value = loss(ours.forward(x), y)
        ours.backward(loss.backward())
        opt.step()
        assert_allclose(value, value_t.item())
    for i in (0, 2):
        effective = (net[i].weight_orig * net[i].weight_mask).detach().numpy()
        assert_allclose(ours[i].params["weight"].data, effective, err_msg=f"layer {i}")
        assert np.all(ours[i].params["weight"].data[~_mask(net[i])] == 0)


def test_prune_zeros_treats_exact_zeros_as_pruned():
    torch.manual_seed(4)
    module = nn.Conv2d(2, 3, 3, padding=1).double()
    with torch.no_grad():
        module.weight[torch.rand(module.weight.shape) < 0.6] = 0
    kept = module.weight.detach().numpy() != 0
    dense = from_torch(module, (2, 5, 5))
    sparse = from_torch(module, (2, 5, 5), prune_zeros=True)
    assert sparse.op.nnz == _conv_nnz_expected(module, (2, 5, 5), kept) < dense.op.nnz
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5))
    with torch.no_grad():
        assert_allclose(sparse.forward(x), module(torch.tensor(x)).numpy())


@pytest.mark.parametrize("setup,match", [
    (lambda m: prune.l1_unstructured(m, "bias", amount=0.5), r"pruned bias \(bias_mask\).*prune.remove"),
    (lambda m: prune.custom_from_mask(m, "weight", torch.full(m.weight.shape, 0.5)), r"only 0 and 1"),
], ids=["pruned-bias", "fractional-mask"])
def test_unusable_pruning_is_refused(setup, match):
    module = nn.Conv2d(2, 3, 3)
    setup(module)
    with pytest.raises((TypeError, ValueError), match=match):
        from_torch(module, (2, 5, 5))


def test_prune_zeros_leaves_linear_layers_dense():
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        module[1].weight[0] = 0
    ours = from_torch(module, (4,), prune_zeros=True)
    x = np.random.default_rng(0).standard_normal((2, 4))
    with torch.no_grad():
        assert_allclose(ours.forward(x), module(torch.tensor(x)).numpy())


@pytest.mark.parametrize("method", [m[1] for m in PRUNE_METHODS], ids=[m[0] for m in PRUNE_METHODS])
def test_pruned_linear_converts_with_its_mask(method):
    torch.manual_seed(5)
    module = nn.Linear(6, 4)
    method(module)
    kept = _mask(module)
    ours = _compare_pruned(module, (6,))
    np.testing.assert_array_equal(ours.weight_mask, kept)
    assert np.all(ours.params["weight"].grad[~kept] == 0)
    assert np.all(ours.params["weight"].data[~kept] == 0)


def test_pruned_linear_trains_like_torch():
    from sparseconv.nn import SGD, CrossEntropyLoss

    torch.manual_seed(6)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    prune.l1_unstructured(net[1], "weight", amount=0.6)
    prune.random_structured(net[3], "weight", amount=0.25, dim=1)
    ours = from_torch(net, (3, 4))
    rng = np.random.default_rng(0)
    opt_t = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = SGD(ours.parameters(), 0.1, momentum=0.9, weight_decay=1e-2)
    loss = CrossEntropyLoss()
    for _ in range(3):
        x, y = rng.standard_normal((4, 3, 4)), rng.integers(0, 5, 4)
        opt_t.zero_grad()
        value_t = torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(y))
        value_t.backward()
        opt.zero_grad()
        value = loss(ours.forward(x), y)
        ours.backward(loss.backward())
        assert_allclose(value, value_t.item())
        for i in (1, 3):
            assert_allclose(ours[i].params["weight"].grad, net[i].weight_orig.grad.numpy(), err_msg=f"layer {i}")
            assert_allclose(ours[i].params["bias"].grad, net[i].bias.grad.numpy(), err_msg=f"layer {i}")
        opt_t.step()
        opt.step()
    for i in (1, 3):
        effective = (net[i].weight_orig * net[i].weight_mask).detach().numpy()
        assert_allclose(ours[i].params["weight"].data, effective, err_msg=f"layer {i}")
        assert np.all(ours[i].params["weight"].data[~_mask(net[i])] == 0)
        assert_allclose(ours[i].params["bias"].data, net[i].bias.detach().numpy(), err_msg=f"layer {i}")


# ---------------------------------------------------------------------- batch norm, chains, dtypes
def _randomise_batchnorm(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))


FOLDS = [
    ("conv2d-nobias-bn2d", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                                 nn.ReLU()), (3, 6, 5)),
    ("conv1d-grouped-bn1d", lambda: nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.BatchNorm1d(6, eps=1e-3)),
     (4, 9)),
    ("conv3d-bn3d-noaffine", lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3, affine=False)), (2, 3, 4, 3)),
    ("convT2d-grouped-bn2d", lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                                                   nn.BatchNorm2d(6)), (4, 3, 4)),
    ("linear-bn1d", lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5), nn.Tanh()), (3, 4)),
]


@pytest.mark.parametrize("make,input_shape", [f[1:] for f in FOLDS], ids=[f[0] for f in FOLDS])
def test_eval_batchnorm_folds_exactly(make, input_shape):
    torch.manual_seed(5)
    net = make().double()
    for i, m in enumerate(net):
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            _randomise_batchnorm(m, i)
    net.eval()
    ours = from_torch(net, input_shape)
    assert len(ours) == len(net) - 1  # the batch norm is inside the layer before it
    x = np.random.default_rng(0).standard_normal((4, *input_shape))
    with torch.no_grad():
        expected = net(torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours.forward(x), expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("make,input_shape", [
    (lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), (3, 4, 5)),
    (lambda: nn.BatchNorm3d(2), (2, 3, 2, 3)),
    (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.BatchNorm1d(3)), (2, 7)),
], ids=["after-relu", "alone-3d", "after-tanh-1d"])
def test_unfoldable_eval_batchnorm_is_a_channel_affine_layer(make, input_shape):
    torch.manual_seed(9)
    net = make().double()
    for i, m in enumerate(net.modules()):
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            _randomise_batchnorm(m, i)
    net.eval()
    ours = from_torch(net, input_shape)
    layers = list(ours) if hasattr(ours, "layers") else [ours]
    assert "ChannelAffine" in [type(layer).__name__ for layer in layers]
    x = np.random.default_rng(0).standard_normal((3, *input_shape))
    with torch.no_grad():
        expected = net(torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours.forward(x), expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


LAYERS = [
    ("avgpool1d", lambda: nn.AvgPool1d(3, stride=2, padding=1), (2, 9)),
    ("avgpool3d", lambda: nn.AvgPool3d(2, stride=(1, 2, 2)), (2, 3, 4, 5)),
    ("maxpool1d", lambda: nn.MaxPool1d(3, stride=2, padding=1), (2, 9)),
    ("maxpool3d", lambda: nn.MaxPool3d(2), (2, 4, 4, 5)),
    ("adaptiveavg1d", lambda: nn.AdaptiveAvgPool1d(4), (2, 9)),
    ("adaptiveavg2d", lambda: nn.AdaptiveAvgPool2d((3, None)), (2, 7, 5)),
    ("adaptiveavg3d-global", lambda: nn.AdaptiveAvgPool3d(1), (2, 3, 4, 5)),
    ("leakyrelu", lambda: nn.LeakyReLU(0.2), (2, 5)),
    ("elu", lambda: nn.ELU(0.7), (2, 5)),
    ("gelu", lambda: nn.GELU(), (2, 5)),
    ("gelu-tanh", lambda: nn.GELU(approximate="tanh"), (2, 5)),
    ("softplus", lambda: nn.Softplus(beta=2.0, threshold=1.0), (2, 5)),
]


@pytest.mark.parametrize("make,input_shape", [c[1:] for c in LAYERS], ids=[c[0] for c in LAYERS])
def test_more_layers_match_torch(make, input_shape):
    module = make()
    ours = from_torch(module, input_shape, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((3, *input_shape)) * 2
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    dy = np.random.default_rng(1).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    assert_allclose(ours.forward(x), yt.detach().numpy())
    assert_allclose(ours.backward(dy), xt.grad.numpy())


def test_eval_dropout_and_identity_alone_are_identity_layers():
    for module in (nn.Dropout(0.3).eval(), nn.Identity()):
        ours = from_torch(module, (3,))
        assert type(ours).__name__ == "Identity"
        x = np.arange(6.0).reshape(2, 3)
        assert np.array_equal(ours.forward(x), x)


def test_folding_keeps_the_pruning_mask():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3)).double()
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    _randomise_batchnorm(net[1], 0)
    net.eval()
    ours = from_torch(net, (2, 5, 5))
    assert ours[0].op.nnz == _conv_nnz_expected(net[0], (2, 5, 5), _mask(net[0]))
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 5))
    with torch.no_grad():
        assert_allclose(ours.forward(x), net(torch.tensor(x)).numpy())


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(0.3)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.flat(self.drop(self.act(self.conv(x)))))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class _FunctionalActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return torch.relu(self.conv(x))


def test_a_chain_like_module_converts_in_eval_mode():
    torch.manual_seed(7)
    model = _Chain().double().eval()
    ours = from_torch(model, (1, 6, 6))
    assert [type(layer).__name__ for layer in ours] == ["Conv2d", "Tanh", "Flatten", "Linear"]
    x = np.random.default_rng(2).standard_normal((3, 1, 6, 6))
    with torch.no_grad():
        assert_allclose(ours.forward(x), model(torch.tensor(x)).numpy())


@pytest.mark.parametrize("model", [_Residual, _FunctionalActivation], ids=["residual", "functional-relu"])
def test_a_module_whose_forward_is_not_its_children_chain_is_refused(model):
    with pytest.raises(TypeError, match=rf"{model.__name__}'s forward is not its children applied in order"):
        from_torch(model().eval(), (2, 5, 5) if model is _Residual else (1, 5, 5))


def test_training_mode_dropout_in_a_chain_is_refused():
    with pytest.raises(TypeError, match=r"_Chain item 2: Dropout is in training mode.*eval\(\)"):
        from_torch(_Chain(), (1, 6, 6))


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_precision_modules_widen_to_float32(half):
    torch.manual_seed(8)
    module = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).to(getattr(torch, half))
    ours = from_torch(module, (2, 5, 5))
    assert all(p.data.dtype == np.float32 for p in ours.parameters())
    widened = module.float()  # exact: every half value is a float32 value
    x = np.random.default_rng(3).standard_normal((2, 2, 5, 5)).astype(np.float32)
    with torch.no_grad():
        assert_allclose(ours.forward(x), widened(torch.tensor(x)).numpy())
    assert from_torch(module.to(getattr(torch, half)), (2, 5, 5), dtype=np.float64)[0].dtype == np.float64
