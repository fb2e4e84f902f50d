"""``Conv -> ReLU`` pairs fused in column networks: the same outputs and gradients as unfused.

In the ``"columns"`` layout a :class:`~sparseconv.nn.Sequential` runs a convolution followed by a
``ReLU`` as one ``forward_columns_relu`` call, and the ReLU records the output for its backward.
Each network here runs in both layouts (the ``"batch_first"`` one never fuses) and, in float64,
through PyTorch's functional layers with the same parameters and under central differences
(:func:`sparseconv.testing.gradcheck`). A counter on ``forward_columns_relu`` checks that the
pairs meant to fuse do and the others (``Conv -> Tanh``, ``Linear -> ReLU``) do not.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import sparseconv.nn as nn
from sparseconv.nn.layers import _ConvBase
from sparseconv.testing import assert_allclose

from column_refs import check_network_gradients

DTYPES = ("float64", "float32")


def _mask(shape, keep, seed):
    return np.random.default_rng(seed).random(shape) < keep


def _pairs(dt):
    return [nn.Conv2d(2, 4, 3, padding=1, dtype=dt, rng=1), nn.ReLU(),
            nn.Conv2d(4, 5, 3, stride=2, dtype=dt, rng=2), nn.ReLU()]


def _shared_relu(dt):
    relu = nn.ReLU()
    return [nn.Conv2d(2, 4, 3, padding=1, dtype=dt, rng=3), relu, nn.AvgPool2d(2, dtype=dt), relu,
            nn.Conv2d(4, 3, (2, 3), padding=(1, 0), dtype=dt, rng=4), relu]


def _tanh_between(dt):
    return [nn.Conv2d(2, 3, 3, dtype=dt, rng=5), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1, bias=False, dtype=dt, rng=6),
            nn.ReLU()]


def _transposed(dt):
    return [nn.ConvTranspose2d(2, 3, 3, stride=2, dtype=dt, rng=7), nn.ReLU(),
            nn.Conv2d(3, 2, 3, stride=2, padding=1, dtype=dt, rng=8), nn.ReLU()]


def _masked(dt):
    return [nn.Conv2d(2, 8, 3, padding=1, weight_mask=_mask((8, 2, 3, 3), 0.3, 9), dtype=dt, rng=9), nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1, weight_mask=_mask((6, 8, 3, 3), 0.2, 10), dtype=dt, rng=10), nn.ReLU()]


def _mixed(dt):
    return [nn.ReLU(), nn.Conv1d(2, 3, 3, stride=2, padding=1, dtype=dt, rng=11), nn.ReLU(),
            nn.Flatten(), nn.Linear(15, 6, dtype=dt, rng=12), nn.ReLU(), nn.Linear(6, 2, dtype=dt, rng=13)]


def _nested(dt):
    # Its own layout is batch-first (it applies to its own forward, as the outer network's
    # batch-first pass calls it); the outer column pass runs it on columns.
    inner = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, dtype=dt, rng=14), nn.ReLU(),
                          nn.Conv2d(3, 3, 3, padding=1, dtype=dt, rng=15), layout="batch_first")
    return [inner, nn.ReLU(), nn.Conv2d(3, 2, 1, dtype=dt, rng=16), nn.ReLU()]


def _conv3d(dt):
    return [nn.Conv3d(2, 3, 2, padding=1, groups=1, dtype=dt, rng=17), nn.ReLU(),
            nn.Conv3d(3, 3, (1, 2, 2), groups=3, dtype=dt, rng=18), nn.ReLU()]


# name -> (layers(dtype), sample shape, forward_columns_relu calls per forward). Every
# Conv -> ReLU pair fuses, the one that ends the network too (its output is copied out).
NETWORKS = {
    "conv-relu-pairs": (_pairs, (2, 7, 7), 2),
    "shared-relu": (_shared_relu, (2, 6, 6), 2),
    "conv-tanh-no-fusion": (_tanh_between, (2, 7, 7), 1),
    "convtranspose-relu": (_transposed, (2, 3, 4), 2),
    "masked-numba": (_masked, (2, 6, 5), 2),
    "relu-conv1d-linear": (_mixed, (2, 9), 1),
    "nested-sequential": (_nested, (2, 5, 5), 2),
    "conv3d-groups": (_conv3d, (2, 3, 2, 3), 2),
}


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of ``forward_columns_relu`` on every convolution layer."""
    calls = []
    original = _ConvBase.forward_columns_relu

    def counting(self, X, shape):
        calls.append(type(self).__name__)
        return original(self, X, shape)

    monkeypatch.setattr(_ConvBase, "forward_columns_relu", counting)
    return calls


def _run(net, x, dy):
    """Output, input gradient and parameter gradients of one forward/backward pass."""
    net.zero_grad()
    y = np.array(net.forward(x))
    dx = net.backward(dy)
    return y, dx, {k: p.grad.copy() for k, p in net.named_parameters()}


def _both_layouts(name, dtype, n=5, seed=0):
    make, shape, _ = NETWORKS[name]
    net = nn.Sequential(*make(dtype))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(dtype)
    dy = rng.standard_normal((n, *net.output_shape(shape))).astype(dtype)
    net.layout = "batch_first"
    first = _run(net, x, dy)
    net.layout = "columns"
    cols = _run(net, x, dy)
    return net, x, dy, first, cols


def _assert_same(first, cols, tag):
    (y_b, dx_b, g_b), (y_c, dx_c, g_c) = first, cols
    assert_allclose(y_c, y_b, err_msg=f"{tag} output")
    assert_allclose(dx_c, dx_b, err_msg=f"{tag} input gradient")
    assert g_c.keys() == g_b.keys()
    for k in g_b:
        assert_allclose(g_c[k], g_b[k], err_msg=f"{tag} {k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_columns_equal_batch_first(name, dtype, fused_calls):
    net, x, dy, first, cols = _both_layouts(name, dtype)
    _assert_same(first, cols, name)
    # The batch-first pass never fuses; the column pass fuses exactly the Conv -> ReLU pairs.
    assert len(fused_calls) == NETWORKS[name][2], fused_calls
    if isinstance(net.layers[-1], nn.ReLU):
        assert np.all(cols[0] >= 0)
    if name == "masked-numba":
        # The compiled engine where numba is installed, the scipy/numpy rule's otherwise.
        compiled = net.layers[0].op.supports("numba", "forward")
        engines = {layer.op.engine("forward") for layer in net.layers[::2]}
        assert engines == {"numba"} if compiled else engines <= {"csr", "factored"}


@pytest.mark.parametrize("engine", ["csr", "factored", "numba", "implicit"])
def test_columns_equal_batch_first_on_each_engine(engine, monkeypatch, fused_calls):
    """Every operator built on one engine (``SPARSECONV_ENGINE``): the fused store of the
    compiled engines and the in-place passes of the others."""
    if engine in ("numba", "implicit"):
        pytest.importorskip("numba", reason="the compiled engines need numba (pip install 'sparseconv[fast]')")
    monkeypatch.setenv("SPARSECONV_ENGINE", engine)
    for dtype in DTYPES:
        net, x, dy, first, cols = _both_layouts("conv-relu-pairs", dtype, n=17)
        _assert_same(first, cols, f"{engine} {dtype}")
        assert {layer.op.engine("forward") for layer in net.layers[::2]} == {engine}
    assert len(fused_calls) == 2 * len(DTYPES)


def test_fused_output_bits_equal_the_unfused_calls():
    """The fused pair gives the bits of the layer's ``forward_columns`` then ``ReLU.forward_columns``."""
    conv = nn.Conv2d(3, 4, 3, padding=1, rng=0, weight_mask=_mask((4, 3, 3, 3), 0.4, 0))
    twin = copy.deepcopy(conv)
    relu, relu_twin = nn.ReLU(), nn.ReLU()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3 * 36, 9))
    X[5, 2] = np.nan
    A, out = conv.forward_columns_relu(X, (3, 6, 6))
    relu.record_columns(A, out)
    Z, out_twin = twin.forward_columns(X, (3, 6, 6))
    A_twin, _ = relu_twin.forward_columns(Z, out_twin)
    assert out == out_twin == (4, 6, 6)
    assert np.array_equal(A, A_twin, equal_nan=True) and np.isnan(A).any()
    D = rng.standard_normal(A.shape)
    dX = conv.backward_columns(relu.backward_columns(D, out), out)
    dX_twin = twin.backward_columns(relu_twin.backward_columns(D, out), out)
    assert np.array_equal(dX, dX_twin, equal_nan=True)
    assert np.array_equal(conv.weight.grad, twin.weight.grad, equal_nan=True)
    assert np.array_equal(conv.bias.grad, twin.bias.grad, equal_nan=True)


def _unfused(layers):
    """The same layers with an Identity between every Conv and the ReLU after it (no fusion)."""
    out = []
    for i, layer in enumerate(layers):
        out.append(layer)
        if isinstance(layer, _ConvBase) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU):
            out.append(nn.Identity())
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["conv-relu-pairs", "shared-relu", "convtranspose-relu", "masked-numba"])
def test_fused_network_has_the_bits_of_the_unfused_one(name, dtype, fused_calls):
    """Same network in "columns", with and without fusion: identical outputs and gradients."""
    make, shape, calls = NETWORKS[name]
    fused = nn.Sequential(*make(dtype), layout="columns")
    unfused = nn.Sequential(*_unfused(copy.deepcopy(fused.layers)), layout="columns")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((17, *shape)).astype(dtype)
    dy = rng.standard_normal((17, *fused.output_shape(shape))).astype(dtype)
    results = [_run(net, x, dy) for net in (fused, unfused)]
    assert len(fused_calls) == calls  # the unfused copy made none
    (y1, dx1, g1), (y2, dx2, g2) = results
    assert np.array_equal(y1, y2) and np.array_equal(dx1, dx2)
    assert len(g1) == len(g2)
    for a, b in zip(g1.values(), g2.values()):
        assert np.array_equal(a, b)


def test_a_rejected_input_names_the_fused_layer():
    net = nn.Sequential(*_pairs("float64"), layout="columns")
    with pytest.raises(nn.LayerInputError, match=r"layer 0 \(Conv2d"):
        net.forward(np.ones((2, 3, 7, 7)))
    with pytest.raises(nn.LayerInputError, match=r"layer 0 \(Conv2d"):
        net.forward(np.ones((2, 2, 7, 7), np.float32))


# ---------------------------------------------------------------------- independent references
@pytest.mark.parametrize("name", ["conv-relu-pairs", "shared-relu", "convtranspose-relu", "masked-numba"])
def test_fused_network_matches_finite_differences(name):
    """float64 central differences of ``<dy, net(x)>`` in x and in every parameter (free entries)."""
    net, x, dy, _, (y, dx, grads) = _both_layouts(name, "float64", n=3, seed=1)
    net.layout = "columns"
    check_network_gradients(net, x, dy, dx, grads)


def _torch_forward(layers, x, torch, params):
    """The layers as PyTorch functional calls on the same parameters (float64); each layer's
    torch tensors go to ``params[id(layer)]``."""
    F = torch.nn.functional
    for layer in layers:
        if isinstance(layer, nn.Sequential):
            x = _torch_forward(layer.layers, x, torch, params)
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            w = torch.tensor(np.array(layer.weight.data), requires_grad=True)
            b = None if layer.bias is None else torch.tensor(np.array(layer.bias.data), requires_grad=True)
            params[id(layer)] = {"weight": w, "bias": b}
            opts = {k: layer.options[k] for k in ("stride", "padding", "dilation", "groups")}
            if isinstance(layer, nn.ConvTranspose2d):
                x = F.conv_transpose2d(x, w, b, output_padding=layer.options["output_padding"], **opts)
            else:
                x = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.ndim](x, w, b, **opts)
        elif isinstance(layer, nn.ReLU):
            x = F.relu(x)
        elif isinstance(layer, nn.Tanh):
            x = torch.tanh(x)
        elif isinstance(layer, nn.AvgPool2d):
            x = F.avg_pool2d(x, 2)
        elif isinstance(layer, nn.Flatten):
            x = x.flatten(1)
        elif isinstance(layer, nn.Linear):
            w = torch.tensor(np.array(layer.weight.data), requires_grad=True)
            b = torch.tensor(np.array(layer.bias.data), requires_grad=True)
            params[id(layer)] = {"weight": w, "bias": b}
            x = F.linear(x, w, b)
        else:
            raise AssertionError(f"no torch counterpart for {layer!r}")
    return x


@pytest.mark.parametrize("name", sorted(set(NETWORKS) - {"conv3d-groups"}))
def test_fused_network_matches_torch(name):
    torch = pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install torch")
    net, x, dy, _, (y, dx, grads) = _both_layouts(name, "float64", n=4, seed=2)
    xt = torch.tensor(x, requires_grad=True)
    params = {}
    yt = _torch_forward(net.layers, xt, torch, params)
    yt.backward(torch.tensor(dy))
    assert_allclose(y, yt.detach().numpy())
    assert_allclose(dx, xt.grad.numpy())
    for k, p in net.named_parameters():
        owner = net
        for part in k.split(".")[:-1]:
            owner = owner.layers[int(part)]
        theirs = params[id(owner)][k.split(".")[-1]].grad.numpy()
        free = np.ones(p.shape, bool) if p.mask is None else p.mask
        assert_allclose(grads[k][free], theirs[free], err_msg=k)
        assert not np.any(grads[k][~free]), k


# ---------------------------------------------------------------------- reported bugs
class CappedReLU(nn.ReLU):
    """``min(max(z, 0), 6)`` (PyTorch's ReLU6): a ReLU subclass overriding ``function`` and
    ``derivative`` as :class:`~sparseconv.nn.Activation` documents."""

    def function(self, z):
        return np.minimum(np.maximum(z, 0), 6)

    def derivative(self, z, a):
        return ((z > 0) & (z < 6)).astype(z.dtype)


def test_relu_subclass_with_its_own_function_is_not_fused_away(fused_calls):
    x = 10 * np.random.default_rng(0).standard_normal((3, 1, 6, 6))
    outputs = {}
    for layout in ("batch_first", "columns"):
        # Identity after the pair: a plain ReLU there would be fused.
        net = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), CappedReLU(), nn.Identity(), layout=layout)
        outputs[layout] = np.array(net.forward(x))
    assert outputs["batch_first"].max() == 6
    assert_allclose(outputs["columns"], outputs["batch_first"])
    assert fused_calls == []


class DoubledConv(nn.Conv2d):
    """A convolution subclass whose column forward scales its input by 2."""

    def forward_columns(self, X, shape):
        return super().forward_columns(2 * X, shape)

    def forward(self, x):
        return super().forward(2 * x)


def test_conv_subclass_with_its_own_column_forward_is_not_fused_away(fused_calls):
    x = np.random.default_rng(1).standard_normal((3, 1, 6, 6))
    outputs = {}
    for layout in ("batch_first", "columns"):
        net = nn.Sequential(DoubledConv(1, 2, 3, rng=0), nn.ReLU(), nn.Identity(), layout=layout)
        outputs[layout] = np.array(net.forward(x))
    assert_allclose(outputs["columns"], outputs["batch_first"])
    assert fused_calls == []


@pytest.mark.parametrize("tail", [[], [nn.Flatten()], [nn.Identity(), nn.Dropout(0.5)], "nested"],
                         ids=["pair-ends-network", "then-flatten", "then-identity-dropout-eval", "nested"])
def test_editing_the_output_in_place_does_not_change_the_gradient(tail, fused_calls):
    """A fused ReLU records its output for its backward; the network copies its output out when
    it is that block (here through layers that pass it on unchanged, or a nested network)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 6, 6))
    grads = {}
    for layout in ("batch_first", "columns"):
        conv = nn.Conv2d(1, 2, 3, rng=0)
        if tail == "nested":
            net = nn.Sequential(nn.Sequential(conv, nn.ReLU(), layout=layout), nn.Identity(), layout=layout)
        else:
            net = nn.Sequential(conv, nn.ReLU(), *copy.deepcopy(tail), layout=layout)
        net.eval()  # Dropout passes its input on unchanged
        y = net.forward(x)
        dy = np.ones_like(y)
        y -= 100.0  # a residual computed in place, e.g. y -= target
        grads[layout] = (net.backward(dy), conv.weight.grad.copy())
    assert fused_calls, "the pair was meant to fuse"
    assert np.linalg.norm(grads["batch_first"][0]) > 0
    assert_allclose(grads["columns"][0], grads["batch_first"][0])
    assert_allclose(grads["columns"][1], grads["batch_first"][1])


class ForwardDoubledConv(nn.Conv2d):
    """A user's convolution that changes only ``forward``/``backward`` (not the column methods)."""

    def forward(self, x):
        return 2 * super().forward(x)

    def backward(self, dy):
        return super().backward(2 * dy)


class CachedDerivativeTanh(nn.Tanh):
    """An activation whose derivative returns an array it keeps (a cache): never written into."""

    def __init__(self):
        super().__init__()
        self.cache = {}

    def derivative(self, z, a):
        if z.shape not in self.cache:
            self.cache[z.shape] = np.ones(z.shape, z.dtype)
        return self.cache[z.shape]


@pytest.mark.parametrize("tail", [[nn.Flatten()], [nn.ReLU(), nn.Flatten()]], ids=["alone", "before-relu"])
def test_subclass_overriding_only_forward_runs_its_forward_in_columns(tail, fused_calls):
    """The column pass goes through the subclass's forward/backward (Module.forward_columns)."""
    x = np.random.default_rng(2).standard_normal((3, 1, 6, 6))
    runs = {}
    for layout in ("batch_first", "columns"):
        conv = ForwardDoubledConv(1, 2, 3, rng=0)
        net = nn.Sequential(conv, *copy.deepcopy(tail), layout=layout)
        y = np.array(net.forward(x))
        dx = net.backward(np.ones_like(y))
        runs[layout] = (y, dx, conv.weight.grad.copy())
    for a, b in zip(runs["columns"], runs["batch_first"]):
        assert_allclose(a, b)
    assert fused_calls == []


def test_a_derivative_the_activation_keeps_is_not_overwritten():
    act = CachedDerivativeTanh()
    net = nn.Sequential(act, layout="columns")
    x = np.zeros((2, 3))
    for _ in range(3):
        net.forward(x)
        assert np.array_equal(net.backward(np.full((2, 3), 5.0)), np.full((2, 3), 5.0))
    assert act.cache and all(np.all(c == 1) for c in act.cache.values())


def test_scalar_input_is_a_layer_input_error():
    for layout in ("columns", "batch_first"):
        with pytest.raises(nn.LayerInputError):
            nn.Sequential(nn.ReLU(), nn.Flatten(), layout=layout).forward(np.float64(1.0))
