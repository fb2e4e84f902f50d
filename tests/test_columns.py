"""Networks run batch-innermost: every layer on column blocks (issue 11, item 2).

Each layer type is run three ways -- its own batch-first ``forward``/``backward``, its
``forward_columns``/``backward_columns``, and inside a ``Sequential`` in either layout -- and
the results are compared with each other and with independent references: the textbook
convolution of :mod:`sparseconv.reference`, PyTorch's functional layers in float64, and central
differences (:func:`sparseconv.testing.gradcheck`). LeNet-5 is checked end to end the same way.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import sparseconv.nn as nn
from sparseconv.models import C3_TABLE, lenet5
from sparseconv.reference import conv_direct, conv_direct_backward
from sparseconv.testing import assert_allclose

from column_refs import check_network_gradients

torch = pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install torch")
F = torch.nn.functional


def _mask(shape, keep, seed):
    return np.random.default_rng(seed).random(shape) < keep


# id -> (factory(dtype), sample shape). Every layer type of sparseconv.nn, with the options
# that change the column computation (stride, padding, groups, masks, overlapping windows).
LAYERS = {
    "conv1d-s2-p1": (lambda dt: nn.Conv1d(3, 4, 3, stride=2, padding=1, dtype=dt, rng=1), (3, 9)),
    "conv2d": (lambda dt: nn.Conv2d(3, 5, 3, dtype=dt, rng=2), (3, 7, 6)),
    "conv2d-groups-dil-reflect": (lambda dt: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2,
                                                       padding_mode="reflect", dtype=dt, rng=3), (4, 6, 7)),
    "conv2d-mask90": (lambda dt: nn.Conv2d(8, 8, 3, padding=1, weight_mask=_mask((8, 8, 3, 3), 0.1, 4),
                                           dtype=dt, rng=4), (8, 6, 6)),
    "conv2d-connection": (lambda dt: nn.Conv2d(6, 16, 5, connection=C3_TABLE.T.copy(), dtype=dt, rng=5),
                          (6, 7, 7)),
    "conv2d-nobias": (lambda dt: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), bias=False, dtype=dt, rng=6), (2, 6, 5)),
    "conv3d": (lambda dt: nn.Conv3d(2, 3, 2, padding=1, dtype=dt, rng=7), (2, 3, 4, 3)),
    "convT1d": (lambda dt: nn.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1, dtype=dt, rng=8), (3, 5)),
    "convT2d-groups": (lambda dt: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=dt, rng=9),
                       (4, 4, 3)),
    "convT2d-mask": (lambda dt: nn.ConvTranspose2d(4, 4, 3, weight_mask=_mask((4, 4, 3, 3), 0.3, 10),
                                                   dtype=dt, rng=10), (4, 3, 4)),
    "convT3d": (lambda dt: nn.ConvTranspose3d(2, 2, 2, stride=2, dtype=dt, rng=11), (2, 2, 3, 2)),
    "linear": (lambda dt: nn.Linear(12, 5, dtype=dt, rng=12), (12,)),
    "linear-nobias": (lambda dt: nn.Linear(7, 3, bias=False, dtype=dt, rng=13), (7,)),
    "avgpool1d-pad": (lambda dt: nn.AvgPool1d(3, stride=2, padding=1, dtype=dt), (2, 9)),
    "avgpool2d": (lambda dt: nn.AvgPool2d(2, dtype=dt), (3, 6, 4)),
    "avgpool3d": (lambda dt: nn.AvgPool3d(2, stride=1, dtype=dt), (2, 3, 3, 4)),
    "sumpool2d": (lambda dt: nn.SumPool2d((2, 3), dtype=dt), (2, 4, 6)),
    "maxpool1d-overlap": (lambda dt: nn.MaxPool1d(3, stride=1, dtype=dt), (2, 7)),
    "maxpool2d-pad": (lambda dt: nn.MaxPool2d(3, stride=2, padding=1, dtype=dt), (3, 7, 6)),
    "maxpool3d": (lambda dt: nn.MaxPool3d(2, dtype=dt), (2, 4, 4, 2)),
    "adaptive1d": (lambda dt: nn.AdaptiveAvgPool1d(3, dtype=dt), (2, 7)),
    "adaptive2d": (lambda dt: nn.AdaptiveAvgPool2d((3, None), dtype=dt), (3, 5, 4)),
    "adaptive3d": (lambda dt: nn.AdaptiveAvgPool3d(2, dtype=dt), (2, 3, 5, 4)),
    "subsampling2d": (lambda dt: nn.Subsampling2d(3, 2, dtype=dt), (3, 6, 4)),
    "channel-affine": (lambda dt: nn.ChannelAffine(np.array([0.5, -2.0, 1.5]), np.array([0.1, 0.0, -0.3]),
                                                   dtype=dt), (3, 4, 2)),
    "relu": (lambda dt: nn.ReLU(), (3, 4)),
    "sigmoid": (lambda dt: nn.Sigmoid(), (2, 3, 2)),
    "tanh": (lambda dt: nn.Tanh(), (5,)),
    "leaky-relu": (lambda dt: nn.LeakyReLU(0.2), (2, 5)),
    "elu": (lambda dt: nn.ELU(0.7), (2, 5)),
    "gelu": (lambda dt: nn.GELU(), (2, 5)),
    "gelu-tanh": (lambda dt: nn.GELU("tanh"), (2, 5)),
    "softplus": (lambda dt: nn.Softplus(2.0, 3.0), (2, 5)),
    "flatten": (lambda dt: nn.Flatten(), (2, 3, 4)),
    "identity": (lambda dt: nn.Identity(), (3, 2)),
    "dropout": (lambda dt: nn.Dropout(0.4, rng=14), (3, 5)),
    "nested": (lambda dt: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, dtype=dt, rng=15), nn.ReLU(),
                                        nn.Flatten(), nn.Linear(48, 4, dtype=dt, rng=16)), (2, 4, 4)),
}


class BatchFirstOnly(nn.Module):
    """A user layer with only the batch-first methods: ``y = x * w`` per channel (any sample shape)."""

    def __init__(self, channels, dtype):
        super().__init__()
        self.params["w"] = nn.Parameter(np.linspace(-1.0, 2.0, channels).astype(dtype))

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def forward(self, x):
        self._save(x)
        return x * self.params["w"].data.reshape((-1,) + (1,) * (x.ndim - 2))

    def backward(self, dy):
        x = self._restore()
        self._release()
        w = self.params["w"].data.reshape((-1,) + (1,) * (x.ndim - 2))
        self.params["w"].grad += (dy * x).sum(axis=(0, *range(2, x.ndim)))
        return dy * w


LAYERS["user-batch-first-only"] = (lambda dt: BatchFirstOnly(3, dt), (3, 4, 2))


def _data(shape, n, dtype, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(dtype)


def _run(net, x, dy):
    """Output, input gradient and parameter gradients of one forward/backward pass."""
    net.zero_grad()
    y = net.forward(x)
    dx = net.backward(dy)
    return y, dx, {k: p.grad.copy() for k, p in net.named_parameters()}


def _twins(name, dtype):
    """The same layer twice (deep copies: a seeded Dropout draws the same masks in both)."""
    factory, shape = LAYERS[name]
    layer = factory(dtype)
    return layer, copy.deepcopy(layer), shape


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_same_in_both_layouts(name, dtype):
    """forward_columns/backward_columns give the batch-first results (transposed) to rounding."""
    layer, twin, shape = _twins(name, dtype)
    n = 5
    x = _data(shape, n, dtype, 0)
    twin.zero_grad()
    y_ref = twin.forward(x)
    dy = _data(y_ref.shape[1:], n, dtype, 1)
    dx_ref = twin.backward(dy)
    g_ref = {k: p.grad.copy() for k, p in twin.named_parameters()}

    layer.zero_grad()
    X = np.ascontiguousarray(x.reshape(n, -1).T)
    Y, out = layer.forward_columns(X, shape)
    assert out == y_ref.shape[1:]
    assert Y.shape == (int(np.prod(out)), n)
    assert_allclose(Y.T.reshape(y_ref.shape), y_ref)
    dX = layer.backward_columns(np.ascontiguousarray(dy.reshape(n, -1).T), out)
    assert dX.shape == X.shape
    assert_allclose(dX.T.reshape(x.shape), dx_ref)
    for k, p in layer.named_parameters():
        assert_allclose(p.grad, g_ref[k], err_msg=k)


@pytest.mark.parametrize("name", list(LAYERS))
def test_sequential_layouts_agree_and_match_finite_differences(name):
    """A network in "columns" equals the same network in "batch_first"; both gradients are right."""
    layer, twin, shape = _twins(name, np.float64)
    cols = nn.Sequential(layer, nn.Tanh(), layout="columns")
    first = nn.Sequential(twin, nn.Tanh(), layout="batch_first")
    n = 4
    x = _data(shape, n, np.float64, 2)
    dy = _data(first.output_shape(shape), n, np.float64, 3)
    y_c, dx_c, g_c = _run(cols, x, dy)
    y_b, dx_b, g_b = _run(first, x, dy)
    assert_allclose(y_c, y_b)
    assert_allclose(dx_c, dx_b)
    assert g_c.keys() == g_b.keys()
    for k in g_c:
        assert_allclose(g_c[k], g_b[k], err_msg=k)
    if isinstance(layer, nn.Dropout):
        return  # each forward draws a new mask: not a fixed function of x to difference

    check_network_gradients(cols, x, dy, dx_c, g_c)


CONVS = {
    "conv2d-s2-p1": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    "conv2d-groups-dilation": dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, groups=2, padding=2),
    "conv2d-circular": dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="circular"),
    "conv1d-flip": dict(in_channels=2, out_channels=2, kernel_size=4, flip=True, padding=[(1, 2)]),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_columns_against_direct_convolution(name):
    """Column products against the textbook sliding-window convolution and its backward."""
    opts = dict(CONVS[name])
    cin, cout, k = opts.pop("in_channels"), opts.pop("out_channels"), opts.pop("kernel_size")
    ndim = 1 if name.startswith("conv1d") else 2
    layer = (nn.Conv1d if ndim == 1 else nn.Conv2d)(cin, cout, k, rng=20, **opts)
    shape = (cin, *([9] * ndim))
    n = 3
    x = _data(shape, n, np.float64, 4)
    X = np.ascontiguousarray(x.reshape(n, -1).T)
    Y, out = layer.forward_columns(X, shape)
    w, b = layer.weight.data, layer.bias.data
    y_ref = conv_direct(x, w, b, **opts)
    assert_allclose(Y.T.reshape(y_ref.shape), y_ref)
    dy = _data(out, n, np.float64, 5)
    layer.zero_grad()
    dX = layer.backward_columns(np.ascontiguousarray(dy.reshape(n, -1).T), out)
    dx_ref, dw_ref, db_ref = conv_direct_backward(x, w, dy, **opts)
    assert_allclose(dX.T.reshape(x.shape), dx_ref)
    assert_allclose(layer.weight.grad, dw_ref)
    assert_allclose(layer.bias.grad, db_ref)


def _t(a):
    return torch.from_numpy(np.array(a))


TORCH_CASES = {
    "convT2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1, rng=21), (3, 4, 5),
                lambda x, m: F.conv_transpose2d(x, _t(m.weight.data), _t(m.bias.data), stride=2, padding=1,
                                                output_padding=1)),
    "maxpool2d": (lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 7, 6),
                  lambda x, m: F.max_pool2d(x, 3, stride=2, padding=1)),
    "avgpool2d": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 7, 6),
                  lambda x, m: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=True)),
    "adaptive2d": (lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 7, 5),
                   lambda x, m: F.adaptive_avg_pool2d(x, (3, 2))),
    "linear": (lambda: nn.Linear(6, 4, rng=22), (6,),
               lambda x, m: F.linear(x, _t(m.weight.data), _t(m.bias.data))),
}


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_columns_against_torch(name):
    """Column products and their gradients against torch.nn.functional in float64."""
    factory, shape, fn = TORCH_CASES[name]
    layer = factory()
    n = 3
    x = _data(shape, n, np.float64, 6)
    X = np.ascontiguousarray(x.reshape(n, -1).T)
    Y, out = layer.forward_columns(X, shape)
    xt = _t(x).requires_grad_(True)
    yt = fn(xt, layer)
    assert_allclose(Y.T.reshape(yt.shape), yt.detach().numpy())
    dy = _data(out, n, np.float64, 7)
    yt.backward(_t(dy))
    dX = layer.backward_columns(np.ascontiguousarray(dy.reshape(n, -1).T), out)
    assert_allclose(dX.T.reshape(x.shape), xt.grad.numpy())


def _torch_lenet(net):
    """PyTorch's twin of a sparseconv LeNet-5 (float64), C3's table applied as a weight mask."""
    tnn = torch.nn
    c1, s2, c3, s4, c5, f6, out = (net[i] for i in (0, 2, 4, 6, 8, 11, 13))

    class Sub(tnn.Module):
        def __init__(self, layer):
            super().__init__()
            self.beta = tnn.Parameter(_t(layer.params["beta"].data.astype(np.float64)))
            self.bias = tnn.Parameter(_t(layer.params["bias"].data.astype(np.float64)))

        def forward(self, x):
            down = F.avg_pool2d(x, 2) * 4
            return down * self.beta[:, None, None] + self.bias[:, None, None]

    def conv(layer):
        m = tnn.Conv2d(layer.in_channels, layer.out_channels, 5).double()
        m.weight.data = _t(layer.weight.data.astype(np.float64))
        m.bias.data = _t(layer.bias.data.astype(np.float64))
        return m

    def lin(layer):
        m = tnn.Linear(layer.in_features, layer.out_features).double()
        m.weight.data = _t(layer.weight.data.astype(np.float64))
        m.bias.data = _t(layer.bias.data.astype(np.float64))
        return m

    return tnn.Sequential(conv(c1), tnn.Tanh(), Sub(s2), tnn.Tanh(), conv(c3), tnn.Tanh(), Sub(s4), tnn.Tanh(),
                          conv(c5), tnn.Tanh(), tnn.Flatten(), lin(f6), tnn.Tanh(), lin(out))


def test_lenet5_columns_batch_first_and_torch_agree():
    """LeNet-5 (float64) in both layouts and PyTorch's twin: logits, loss, every gradient."""
    net = lenet5(dtype=np.float64, seed=3, layout="columns")
    twin = copy.deepcopy(net)
    twin.layout = "batch_first"
    assert net.layout == "columns"
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 1, 32, 32))
    labels = rng.integers(0, 10, 6)
    results = []
    for model in (net, twin):
        model.zero_grad()
        loss = nn.CrossEntropyLoss()
        value = loss(model.forward(x), labels)
        dx = model.backward(loss.backward())
        results.append((value, dx, {k: p.grad.copy() for k, p in model.named_parameters()}))
    (v_c, dx_c, g_c), (v_b, dx_b, g_b) = results
    assert_allclose(v_c, v_b)
    assert_allclose(dx_c, dx_b)
    for k in g_c:
        assert_allclose(g_c[k], g_b[k], err_msg=k)

    tnet = _torch_lenet(net)
    xt = _t(x).requires_grad_(True)
    lt = F.cross_entropy(tnet(xt), torch.from_numpy(labels))
    lt.backward()
    assert_allclose(v_c, lt.item())
    assert_allclose(dx_c, xt.grad.numpy())
    mask = C3_TABLE.T[:, :, None, None]
    torch_grads = [p.grad.numpy() for p in tnet.parameters()]
    ours = [g_c[k] for k, _ in net.named_parameters()]
    assert len(torch_grads) == len(ours)
    for i, (a, b) in enumerate(zip(ours, torch_grads)):
        if a.shape == (16, 6, 5, 5):
            b = b * mask  # C3's missing connections have no weights here
        assert_allclose(a, b, err_msg=f"parameter {i}")


def test_lenet5_float32_layouts_agree():
    net = lenet5(seed=4, layout="columns")
    twin = copy.deepcopy(net)
    twin.layout = "batch_first"
    x = np.random.default_rng(9).standard_normal((64, 1, 32, 32)).astype(np.float32)
    dy = np.random.default_rng(10).standard_normal((64, 10)).astype(np.float32)
    y_c, dx_c, g_c = _run(net, x, dy)
    y_b, dx_b, g_b = _run(twin, x, dy)
    assert y_c.dtype == np.float32 and dx_c.dtype == np.float32
    assert_allclose(y_c, y_b)
    assert_allclose(dx_c, dx_b)
    for k in g_c:
        assert_allclose(g_c[k], g_b[k], err_msg=k)


def test_layer_reused_at_two_positions_in_columns():
    """One ReLU and one Conv2d instance used twice: per-call state stacks in column layout too."""
    relu = nn.ReLU()
    conv = nn.Conv2d(2, 2, 3, padding=1, rng=30)
    net = nn.Sequential(conv, relu, conv, relu, layout="columns")
    distinct = nn.Sequential(conv, nn.ReLU(), copy.deepcopy(conv), nn.ReLU(), layout="batch_first")
    x = _data((2, 5, 5), 3, np.float64, 11)
    dy = _data((2, 5, 5), 3, np.float64, 12)
    y, dx, g = _run(net, x, dy)
    distinct.zero_grad()
    y_ref = distinct.forward(x)
    dx_ref = distinct.backward(dy)
    assert_allclose(y, y_ref)
    assert_allclose(dx, dx_ref)
    assert_allclose(g["0.weight"], distinct[0].weight.grad + distinct[2].weight.grad)


@pytest.mark.parametrize("layout", ["columns", "batch_first"])
def test_empty_batch(layout):
    net = lenet5(dtype=np.float64, layout="columns")
    net.layout = layout
    y = net.forward(np.zeros((0, 1, 32, 32)))
    assert y.shape == (0, 10)
    assert net.backward(np.zeros((0, 10))).shape == (0, 1, 32, 32)
    assert all(not np.any(p.grad) for p in net.parameters())


def test_layout_option_validated():
    with pytest.raises(ValueError, match="layout must be one of"):
        nn.Sequential(nn.ReLU(), layout="nchw")
    net = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="layout must be one of"):
        net.layout = "rows"
    assert net.layout == "columns"  # the default: batch-innermost from input to output
    assert net[0:1].layout == "columns"
    net.layout = "batch_first"
    assert net[0:1].layout == "batch_first"
    assert lenet5(build=False, layout="batch_first").layout == "batch_first"
    assert lenet5(build=False).layout == "columns"
    with pytest.raises(ValueError, match="layout must be one of"):
        lenet5(build=False, layout="NCHW")


def test_backward_in_the_other_layout_is_refused_and_consumes_nothing():
    layer = nn.Conv2d(1, 2, 3, rng=31)
    x = _data((1, 5, 5), 2, np.float64, 13)
    Y, out = layer.forward_columns(np.ascontiguousarray(x.reshape(2, -1).T), (1, 5, 5))
    with pytest.raises(ValueError, match=r"forward_columns\(\); call backward_columns\(\)"):
        layer.backward(np.zeros((2, *out)))
    with pytest.raises(ValueError, match=r"D must have the shape of the matching forward's output, \(18, 2\)"):
        layer.backward_columns(np.zeros((18, 3)), out)
    dX = layer.backward_columns(np.zeros((18, 2)), out)
    assert dX.shape == (25, 2)
    layer.forward(x)
    with pytest.raises(ValueError, match=r"forward\(\); call backward\(\)"):
        layer.backward_columns(np.zeros((18, 2)), out)


def test_sequential_backward_checks_dy_and_names_bad_input_layer():
    net = lenet5(dtype=np.float64, layout="columns")
    net.forward(np.zeros((2, 1, 32, 32)))
    with pytest.raises(ValueError, match=r"dy must have the shape of the matching forward's output, \(2, 10\)"):
        net.backward(np.zeros((3, 10)))
    net.backward(np.zeros((2, 10)))
    with pytest.raises(nn.LayerInputError, match=r"layer 0 \(Conv2d"):
        net.forward(np.zeros((2, 3, 32, 32)))
    with pytest.raises(nn.LayerInputError, match="layer 0"):
        net.forward(np.zeros((2, 1, 32, 32), dtype=np.float32))


def test_memory_order_follows_the_engine(uncompiled_policy):
    """The batch enters as the transposed view of x (no copy); a CSR layer gets (and returns) a
    C-contiguous block, a factored layer the F-contiguous one (its batch-first view), and
    element-wise layers keep the order they are given -- no transposes back to rows between."""
    seen = []

    class Spy(nn.Identity):
        def forward_columns(self, X, shape):
            seen.append((X.shape, X.flags.c_contiguous, X.flags.f_contiguous, X.base is not None))
            return super().forward_columns(X, shape)

    pruned = nn.Conv2d(8, 8, 3, padding=1, weight_mask=_mask((8, 8, 3, 3), 0.1, 40), rng=41)
    dense = nn.Conv2d(8, 8, 3, padding=1, rng=42)
    assert pruned.build((8, 6, 6)).engine("forward") == "csr"
    assert dense.build((8, 6, 6)).engine("forward") == "factored"
    net = nn.Sequential(Spy(), pruned, Spy(), nn.ReLU(), Spy(), dense, Spy(), nn.ReLU(), Spy(), layout="columns")
    x = np.ones((5, 8, 6, 6))
    net.forward(x)
    view_of_x, after_csr, after_relu, after_factored, after_relu2 = seen
    assert view_of_x == ((288, 5), False, True, True)
    assert after_csr[:3] == after_relu[:3] == ((288, 5), True, False)
    assert after_factored[:3] == after_relu2[:3] == ((288, 5), False, True)


def test_refused_backward_consumes_nothing_in_columns():
    """A dy of the wrong dtype is refused before any layer runs; the right one then works."""
    net = lenet5(seed=5, layout="columns")
    x = np.random.default_rng(14).standard_normal((3, 1, 32, 32)).astype(np.float32)
    dy = np.random.default_rng(15).standard_normal((3, 10))
    net.zero_grad()
    net.forward(x)
    with pytest.raises(TypeError, match="has dtype float64 but the operator computes in float32"):
        net.backward(dy)
    assert all(not np.any(p.grad) for p in net.parameters())
    dx = net.backward(dy.astype(np.float32))
    twin = lenet5(seed=5, layout="batch_first")
    twin.zero_grad()
    twin.forward(x)
    assert_allclose(dx, twin.backward(dy.astype(np.float32)))
