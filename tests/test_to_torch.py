"""to_torch: sparseconv networks as torch modules, checked against native PyTorch (skipped without PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest

from sparseconv.testing import assert_allclose

torch = pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install torch")
prune = pytest.importorskip("torch.nn.utils.prune")
from sparseconv import from_torch, to_torch  # noqa: E402
from sparseconv.models import lenet5  # noqa: E402
from sparseconv.nn import Conv2d, Subsampling2d  # noqa: E402

nn = torch.nn
F = torch.nn.functional

LAYERS = [
    ("conv1d-s2-p1", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9)),
    ("conv2d-g2-d2-reflect", lambda: nn.Conv2d(4, 6, 3, dilation=2, groups=2, padding=2, padding_mode="reflect"),
     (4, 7, 6)),
    ("conv3d-circular", lambda: nn.Conv3d(2, 3, 2, padding=1, padding_mode="circular"), (2, 3, 4, 3)),
    ("convT2d-s2-op1", lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 3, 4)),
    ("convT1d-nobias", lambda: nn.ConvTranspose1d(2, 3, 4, stride=3, bias=False), (2, 5)),
    ("avgpool2d", lambda: nn.AvgPool2d(2, stride=1, padding=1), (2, 5, 4)),
    ("maxpool2d-overlapping", lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 7, 6)),
    ("avgpool1d", lambda: nn.AvgPool1d(3, stride=2, padding=1), (2, 9)),
    ("avgpool3d", lambda: nn.AvgPool3d(2, stride=(1, 2, 2)), (2, 3, 4, 5)),
    ("maxpool1d", lambda: nn.MaxPool1d(3, stride=2, padding=1), (2, 9)),
    ("maxpool3d", lambda: nn.MaxPool3d(2), (2, 4, 4, 5)),
    ("adaptiveavg2d", lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 7, 5)),
    ("activations", lambda: nn.Sequential(nn.Linear(5, 6), nn.LeakyReLU(0.2), nn.Linear(6, 6), nn.ELU(0.7),
                                          nn.Linear(6, 6), nn.GELU("tanh"), nn.Linear(6, 4), nn.Softplus(2.0)),
     (5,)),
]


def _native_vs_converted(module, input_shape, seed=0):
    """The same batch and output gradient through native torch and through to_torch(from_torch(.))."""
    torch.manual_seed(seed)
    module = module.double()
    converted = to_torch(from_torch(module, input_shape, dtype=np.float64))
    x = torch.tensor(np.random.default_rng(seed).standard_normal((3, *input_shape)))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = module(x1), converted(x2)
    dy = torch.tensor(np.random.default_rng(seed + 1).standard_normal(tuple(y1.shape)))
    y1.backward(dy)
    y2.backward(dy)
    assert_allclose(y2.detach().numpy(), y1.detach().numpy())
    assert_allclose(x2.grad.numpy(), x1.grad.numpy())
    theirs = dict(module.named_parameters())
    mine = dict(converted.named_parameters())
    assert sorted(mine) == sorted(theirs)
    for name, p in mine.items():
        assert_allclose(p.grad.numpy(), theirs[name].grad.numpy(), err_msg=name)
    return converted


@pytest.mark.parametrize("make,input_shape", [c[1:] for c in LAYERS], ids=[c[0] for c in LAYERS])
def test_layers_match_native_torch(make, input_shape):
    _native_vs_converted(make(), input_shape)


def _gradcheck(module, input_shape, seed=0):
    """torch.autograd.gradcheck of a converted module with respect to its input and every parameter."""
    torch.manual_seed(seed)
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    x = torch.tensor(np.random.default_rng(seed).standard_normal((2, *input_shape)), requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("make,input_shape", [c[1:] for c in LAYERS], ids=[c[0] for c in LAYERS])
def test_gradcheck(make, input_shape):
    _gradcheck(to_torch(from_torch(make().double(), input_shape, dtype=np.float64)), input_shape)


def test_gradcheck_of_a_pruned_convolution_and_of_lenet_sub_sampling():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    prune.l1_unstructured(conv, "weight", amount=0.6)
    converted = to_torch(from_torch(conv, (3, 5, 5)))
    assert converted.layer.op.nnz < from_torch(nn.Conv2d(3, 4, 3, padding=1), (3, 5, 5)).op.nnz
    # Masked taps read as zero, so the numerical derivative there is zero, as the analytic one.
    _gradcheck(converted, (3, 5, 5))
    sub = to_torch(Subsampling2d(3, 2, dtype=np.float64))
    with torch.no_grad():
        sub.beta.copy_(torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64))
    _gradcheck(sub, (3, 4, 6))


def test_pruned_transposed_convolution_and_channel_affine():
    torch.manual_seed(4)
    net = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.ReLU(), nn.BatchNorm2d(4)).double()
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    with torch.no_grad():
        net[2].running_mean.uniform_(-1, 1)
        net[2].running_var.uniform_(0.5, 2)
    net.eval()
    converted = to_torch(from_torch(net, (3, 4, 5)))
    assert [type(m).__name__ for m in converted] == ["SparseConv", "ReLU", "ChannelAffine"]
    x = torch.tensor(np.random.default_rng(0).standard_normal((2, 3, 4, 5)))
    with torch.no_grad():
        assert_allclose(converted(x).numpy(), net(x).numpy())
    _gradcheck(converted, (3, 4, 5))
    y = converted(x.clone().requires_grad_())
    y.sum().backward()
    assert np.all(converted[0].weight.grad.numpy()[net[0].weight_mask.numpy() == 0] == 0)


def test_pruned_linear_round_trip_trains_like_the_torch_original():
    torch.manual_seed(7)
    original = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    prune.l1_unstructured(original[0], "weight", amount=0.5)
    converted = to_torch(from_torch(original, (6,)))
    mask = original[0].weight_mask.numpy() == 1
    opt_o = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt_c = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    rng = np.random.default_rng(0)
    for step in range(3):
        x, y = torch.tensor(rng.standard_normal((4, 6))), torch.tensor(rng.integers(0, 3, 4))
        losses = []
        for model, opt in ((original, opt_o), (converted, opt_c)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
        assert_allclose(losses[1], losses[0], err_msg=f"step {step}")
        assert_allclose(converted[0].weight.grad.numpy(), original[0].weight_orig.grad.numpy())
        assert np.all(converted[0].weight.grad.numpy()[~mask] == 0)
        opt_o.step()
        opt_c.step()
        effective = (original[0].weight_orig * original[0].weight_mask).detach().numpy()
        assert_allclose(converted[0].weight.detach().numpy(), effective, err_msg=f"step {step}")


def test_lenet5_matches_its_native_torch_twin():
    """LeNet-5 with C3's connection table: to_torch against torch's dense layers on the same weights."""
    net = lenet5(dtype=np.float64, seed=3)
    converted = to_torch(net)
    params = {name: torch.tensor(p.data) for name, p in net.named_parameters()}

    def native(x):
        for i in (0, 4, 8):
            x = torch.tanh(F.conv2d(x, params[f"{i}.weight"], params[f"{i}.bias"]))
            if i < 8:
                beta, bias = params[f"{i + 2}.beta"], params[f"{i + 2}.bias"]
                x = torch.tanh(F.avg_pool2d(x, 2) * 4 * beta.reshape(-1, 1, 1) + bias.reshape(-1, 1, 1))
        x = torch.tanh(F.linear(x.flatten(1), params["11.weight"], params["11.bias"]))
        return F.linear(x, params["13.weight"], params["13.bias"])

    x = torch.tensor(np.random.default_rng(0).standard_normal((4, 1, 32, 32)))
    with torch.no_grad():
        assert_allclose(converted(x).numpy(), native(x).numpy())


def _pruned_cnn():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.Tanh(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 5)).double()
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    prune.global_unstructured([(net[0], "weight"), (net[3], "weight")], pruning_method=prune.L1Unstructured,
                              amount=0.7)
    return net


@pytest.mark.parametrize("optimiser", ["sgd", "adam"])
def test_a_converted_pruned_network_trains_like_the_torch_original(optimiser):
    original = _pruned_cnn()
    converted = to_torch(from_torch(original, (1, 12, 12)))
    masks = {i: original[i].weight_mask.numpy() == 1 for i in (0, 3)}

    def make_opt(params):
        if optimiser == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
        return torch.optim.Adam(params, lr=0.01)

    opt_o, opt_c = make_opt(original.parameters()), make_opt(converted.parameters())
    rng = np.random.default_rng(0)
    for step in range(5):
        x = torch.tensor(rng.standard_normal((6, 1, 12, 12)))
        y = torch.tensor(rng.integers(0, 5, 6))
        losses = []
        for model, opt in ((original, opt_o), (converted, opt_c)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert_allclose(losses[1], losses[0], err_msg=f"step {step}")
        for i in (0, 3):
            effective = (original[i].weight_orig * original[i].weight_mask).detach().numpy()
            mine = converted[i].weight.detach().numpy()
            assert_allclose(mine, effective, err_msg=f"step {step} layer {i}")
            assert np.all(mine[~masks[i]] == 0), "pruned weights must stay exactly zero"
    # Each forward first writes changed Parameters into the module's sparseconv layer.
    converted(x)
    assert np.array_equal(converted[3].layer.params["weight"].data, converted[3].weight.detach().numpy())


def test_a_layer_used_twice_stays_tied():
    from sparseconv.nn import Sequential, Tanh

    conv = Conv2d(2, 2, 3, padding=1, dtype=np.float64, rng=0)
    act = Tanh()
    converted = to_torch(Sequential(conv, act, conv, act))
    assert converted[0] is converted[2] and len(list(converted.parameters())) == 2
    x = torch.tensor(np.random.default_rng(0).standard_normal((2, 2, 5, 5)), requires_grad=True)
    w = torch.tensor(conv.params["weight"].data.copy(), requires_grad=True)
    b = torch.tensor(conv.params["bias"].data.copy(), requires_grad=True)
    expected = torch.tanh(F.conv2d(torch.tanh(F.conv2d(x, w, b, padding=1)), w, b, padding=1))
    expected.sum().backward()
    converted(x.detach()).sum().backward()
    assert_allclose(converted[0].weight.grad.numpy(), w.grad.numpy())


def test_to_torch_copies_the_network():
    net = lenet5(dtype=np.float64, seed=0)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    converted = to_torch(net)
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1.0)
    assert all(np.array_equal(before[k], v) for k, v in net.state_dict().items())
    assert [name for name, _ in converted.named_parameters()] == list(before)


def test_wrong_input_and_unknown_layers_are_refused():
    converted = to_torch(Conv2d(1, 2, 3, dtype=np.float64))
    with pytest.raises(TypeError, match=r"Conv2d: input must have dtype torch.float64 .*got torch.float32"):
        converted(torch.zeros(1, 1, 5, 5))
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor; got ndarray"):
        converted(np.zeros((1, 1, 5, 5)))

    class Custom(Conv2d.__mro__[-2]):  # a bare sparseconv Module subclass
        pass

    from sparseconv.nn import Sequential, Tanh
    with pytest.raises(TypeError, match=r"Sequential item 1: to_torch has no torch module for Custom"):
        to_torch(Sequential(Tanh(), Custom()))
    with pytest.raises(TypeError, match=r"network must be a sparseconv Module .*got Linear"):
        to_torch(nn.Linear(2, 2))
