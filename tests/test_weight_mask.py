"""``weight_mask=`` on the convolution and transposed-convolution layers.

A masked weight is held at exactly zero (construction, assignment, SGD with momentum and
weight decay, load), its gradient is exactly zero, and the layer computes what the unmasked
layer computes with those weights zeroed (the dense reference, and PyTorch's pruned
modules when installed). For convolutions the mask also removes the entries from the matrix.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparseconv import reference as ref
from sparseconv.nn import (SGD, Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, Flatten,
                           Linear, Sequential, Tanh)
from sparseconv.testing import assert_allclose, gradcheck
from sparseconv.transpose import ConvTransposeOperator

CASES = [
    ("conv1d", Conv1d, (3, 4, 3), dict(padding=1), (3, 9)),
    ("conv2d-s2", Conv2d, (2, 3, 3), dict(stride=2, padding=1), (2, 7, 6)),
    ("conv2d-g2", Conv2d, (4, 4, 2), dict(groups=2), (4, 5, 5)),
    ("conv3d", Conv3d, (2, 2, 2), dict(), (2, 3, 4, 3)),
    ("convT1d-s2", ConvTranspose1d, (3, 2, 3), dict(stride=2, padding=1, output_padding=1), (3, 5)),
    ("convT2d", ConvTranspose2d, (2, 3, 2), dict(stride=2), (2, 3, 4)),
    ("convT3d", ConvTranspose3d, (2, 2, 2), dict(), (2, 2, 3, 2)),
]
IDS = [c[0] for c in CASES]


def _weight_shape(cls, c, f, k, opts):
    ndim = cls.ndim
    groups = opts.get("groups", 1)
    if cls in (ConvTranspose1d, ConvTranspose2d, ConvTranspose3d):
        return (c, f // groups, *(k,) * ndim)
    return (f, c // groups, *(k,) * ndim)


def _mask(shape, keep, seed=0):
    return np.random.default_rng(seed).random(shape) < keep


def _make(cls, args, opts, mask, **kwargs):
    return cls(*args, weight_mask=mask, rng=3, **opts, **kwargs)


@pytest.mark.parametrize("name,cls,args,opts,shape", CASES, ids=IDS)
def test_masked_weights_start_at_zero_and_the_output_is_the_zeroed_layer(name, cls, args, opts, shape):
    mask = _mask(_weight_shape(cls, *args, opts), 0.5)
    layer = _make(cls, args, opts, mask)
    w = layer.weight.data
    assert not w[~mask].any() and np.all(w[mask] != 0)
    np.testing.assert_array_equal(layer.weight_mask, mask)
    full = cls(*args, rng=3, **opts)
    full.weight.data = np.where(mask, full.weight.data, 0)
    full.bias.data = layer.bias.data
    x = np.random.default_rng(1).standard_normal((2, *shape))
    assert_allclose(layer.forward(x), full.forward(x))


@pytest.mark.parametrize("name,cls,args,opts,shape", [c for c in CASES if not c[0].startswith("convT")],
                         ids=[i for i in IDS if not i.startswith("convT")])
def test_conv_mask_removes_entries_and_matches_the_reference(name, cls, args, opts, shape):
    mask = _mask(_weight_shape(cls, *args, opts), 0.4, seed=5)
    layer = _make(cls, args, opts, mask)
    full = cls(*args, rng=3, **opts)
    x = np.random.default_rng(1).standard_normal((2, *shape))
    layer.forward(x)
    full.forward(x)
    assert layer.op.nnz < full.op.nnz
    assert_allclose(layer.forward(x), ref.conv_direct(x, layer.weight.data, layer.bias.data, **opts))


@pytest.mark.parametrize("name,cls,args,opts,shape", [c for c in CASES if c[0].startswith("convT")],
                         ids=[i for i in IDS if i.startswith("convT")])
def test_transposed_mask_removes_entries(name, cls, args, opts, shape):
    mask = _mask(_weight_shape(cls, *args, opts), 0.4, seed=5)
    layer = _make(cls, args, opts, mask)
    x = np.random.default_rng(1).standard_normal((2, *shape))
    layer.forward(x)
    # Entries from the mask: an unmasked operator with weight 1 at kept taps, 0 elsewhere,
    # stores every tap; its non-zeros are the kept taps' entries.
    indicator = ConvTransposeOperator(mask.astype(np.float64), shape, **opts)
    assert layer.op.nnz == np.count_nonzero(indicator.matrix.data) < indicator.nnz


@pytest.mark.parametrize("name,cls,args,opts,shape", CASES, ids=IDS)
def test_masked_gradients_are_exactly_zero_and_the_rest_pass_finite_differences(name, cls, args, opts, shape):
    mask = _mask(_weight_shape(cls, *args, opts), 0.5, seed=2)
    layer = _make(cls, args, opts, mask)
    x = np.random.default_rng(1).standard_normal((2, *shape))
    dy = np.random.default_rng(2).standard_normal(layer.forward(x).shape)
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(dy)
    g = layer.weight.grad
    assert np.all(g[~mask] == 0)
    gradcheck(lambda v: float(np.sum(dy * layer.forward(v))), x, dx)
    base = layer.weight.data.copy()

    def loss(v):
        w = base.copy()
        w[mask] = v
        layer.weight.data = w
        return float(np.sum(dy * layer.forward(x)))

    gradcheck(loss, base[mask], g[mask])


@pytest.mark.parametrize("name,cls,args,opts,shape", CASES, ids=IDS)
def test_masked_weights_stay_zero_through_sgd_steps(name, cls, args, opts, shape):
    mask = _mask(_weight_shape(cls, *args, opts), 0.5, seed=4)
    layer = _make(cls, args, opts, mask)
    opt = SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x = np.random.default_rng(1).standard_normal((2, *shape))
    for _ in range(3):
        opt.zero_grad()
        y = layer.forward(x)
        layer.backward(np.ones_like(y))
        # even a gradient written at masked entries from outside never moves them
        layer.weight.grad[~mask] = 5.0
        opt.step()
    assert np.all(layer.weight.data[~mask] == 0)
    assert np.any(layer.weight.data[mask] != 0)


def test_mask_and_connection_table_combine():
    table = np.array([[True, False], [True, True], [False, True]])
    mask = _mask((3, 2, 3, 3), 0.5, seed=1)
    layer = Conv2d(2, 3, 3, connection=table, weight_mask=mask, rng=0)
    expected = mask & table[:, :, None, None]
    np.testing.assert_array_equal(layer.weight.mask, expected)
    assert not layer.weight.data[~expected].any()
    assert layer.weight.size == expected.sum()
    assert "connection=table" in repr(layer) and "weight_mask=mask" in repr(layer)


def test_fully_pruned_and_unpruned_masks():
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5))
    empty = Conv2d(2, 3, 3, weight_mask=np.zeros((3, 2, 3, 3), bool), rng=0)
    y = empty.forward(x)
    assert_allclose(y, np.broadcast_to(empty.bias.data[:, None, None], y.shape))
    assert empty.op.nnz == 0
    dx = empty.backward(np.ones_like(y))
    assert not dx.any() and not empty.weight.grad.any()
    full_mask = Conv2d(2, 3, 3, weight_mask=np.ones((3, 2, 3, 3), bool), rng=0)
    plain = Conv2d(2, 3, 3, rng=0)
    np.testing.assert_array_equal(full_mask.forward(x), plain.forward(x))


def test_load_refuses_nonzero_masked_weights_and_keeps_the_network(tmp_path):
    mask = _mask((3, 2, 3, 3), 0.5)
    net = Sequential(Conv2d(2, 3, 3, weight_mask=mask, rng=0), Tanh(), Flatten(), Linear(27, 2, rng=0))
    before = net.state_dict()
    state = net.state_dict()
    state["0.weight"] = np.ones_like(state["0.weight"])
    with pytest.raises(ValueError, match=r"'0\.weight'.*non-zero values where this network's mask"):
        net.load_state_dict(state)
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    # a checkpoint that respects the mask loads
    net.save(tmp_path / "m.npz")
    other = Sequential(Conv2d(2, 3, 3, weight_mask=mask, rng=1), Tanh(), Flatten(), Linear(27, 2, rng=1))
    other.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(other[0].weight.data, net[0].weight.data)


def test_assignment_refuses_nonzero_masked_weights():
    mask = _mask((3, 2, 3), 0.5)
    layer = Conv1d(2, 3, 3, weight_mask=mask, rng=0)
    before = layer.weight.data.copy()
    with pytest.raises(ValueError, match="non-zero entries where the parameter's mask is False"):
        layer.weight.data = np.ones((3, 2, 3))
    np.testing.assert_array_equal(layer.weight.data, before)


def test_set_weight_mask_prunes_and_rebuilds():
    layer = Conv2d(2, 3, 3, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 6))
    layer.forward(x)
    nnz = layer.op.nnz
    mask = _mask((3, 2, 3, 3), 0.5, seed=3)
    layer.set_weight_mask(mask)
    assert "weight_mask=mask" in repr(layer)
    assert not layer.weight.data[~mask].any()
    y = layer.forward(x)
    assert layer.op.nnz < nnz
    assert_allclose(y, ref.conv_direct(x, layer.weight.data, layer.bias.data))
    layer.set_weight_mask(None)
    assert layer.weight.mask is None and "weight_mask" not in repr(layer)
    assert layer.forward(x).shape == y.shape and layer.op.nnz == nnz


@pytest.mark.parametrize("mask,match", [
    (np.ones((3, 2, 3), dtype=int), "weight_mask must be a bool array"),
    (np.ones((3, 2, 2), dtype=bool), r"weight_mask must be a bool array of the weight's shape \(3, 2, 3\)"),
], ids=["int", "shape"])
def test_bad_masks_are_refused(mask, match):
    with pytest.raises(ValueError, match=match):
        Conv1d(2, 3, 3, weight_mask=mask)


def test_mask_is_copied():
    mask = np.ones((3, 2, 3), dtype=bool)
    layer = Conv1d(2, 3, 3, weight_mask=mask, rng=0)
    mask[...] = False
    assert layer.weight.mask.all()
    with pytest.raises(ValueError, match="read-only"):
        layer.weight.mask[0] = False


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install torch")


@pytest.mark.parametrize("name,cls,args,opts,shape", CASES, ids=IDS)
def test_masked_layer_matches_torch_pruning(name, cls, args, opts, shape):
    torch = _torch()
    import torch.nn.utils.prune as prune
    tcls = getattr(torch.nn, cls.__name__)
    c, f, k = args
    torch.manual_seed(0)
    module = tcls(c, f, k, **opts).double()
    mask = _mask(tuple(module.weight.shape), 0.5, seed=6)
    prune.custom_from_mask(module, "weight", torch.tensor(mask))
    layer = cls(c, f, k, weight_mask=mask, **opts)
    layer.weight.data = module.weight.detach().numpy().copy()
    layer.bias.data = module.bias.detach().numpy().copy()
    x = np.random.default_rng(1).standard_normal((2, *shape))
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    dy = np.random.default_rng(2).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    assert_allclose(layer.forward(x), yt.detach().numpy())
    assert_allclose(layer.backward(dy), xt.grad.numpy())
    assert_allclose(layer.weight.grad, module.weight_orig.grad.numpy())


def test_copies_keep_the_mask_read_only():
    import copy
    import pickle
    layer = Conv1d(2, 3, 3, weight_mask=_mask((3, 2, 3), 0.5), rng=0)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        np.testing.assert_array_equal(twin.weight.mask, layer.weight.mask)
        assert not twin.weight.mask.flags.writeable and not twin.weight.data.flags.writeable
        x = np.random.default_rng(0).standard_normal((2, 2, 6))
        assert_allclose(twin.forward(x), layer.forward(x))


# ---------------------------------------------------------------------- Linear
def test_linear_mask_holds_weights_at_zero_with_zero_gradient():
    mask = _mask((4, 6), 0.5, seed=6)
    layer = Linear(6, 4, weight_mask=mask, rng=0)
    w = layer.weight.data
    assert not w[~mask].any() and np.all(w[mask] != 0)
    np.testing.assert_array_equal(layer.weight_mask, mask)
    assert layer.weight.size == mask.sum() and "weight_mask=mask" in repr(layer)
    x = np.random.default_rng(1).standard_normal((3, 6))
    dy = np.random.default_rng(2).standard_normal((3, 4))
    assert_allclose(layer.forward(x), x @ np.where(mask, w, 0).T + layer.bias.data)
    layer.zero_grad()
    layer.backward(dy)
    g = layer.weight.grad
    assert np.all(g[~mask] == 0)
    assert_allclose(g[mask], (dy.T @ x)[mask])
    # the column layout too
    layer.zero_grad()
    Y, _ = layer.forward_columns(x.T.copy(), (6,))
    layer.backward_columns(dy.T.copy(), (4,))
    assert np.all(layer.weight.grad[~mask] == 0)
    assert_allclose(layer.weight.grad[mask], (dy.T @ x)[mask])


def test_linear_mask_refuses_nonzero_values_and_sgd_never_moves_them(tmp_path):
    mask = _mask((3, 5), 0.5, seed=7)
    layer = Linear(5, 3, weight_mask=mask, rng=0)
    before = layer.weight.data.copy()
    with pytest.raises(ValueError, match="non-zero entries where the parameter's mask is False"):
        layer.weight.data = np.ones((3, 5))
    np.testing.assert_array_equal(layer.weight.data, before)
    net = Sequential(layer)
    state = net.state_dict()
    state["0.weight"] = np.ones((3, 5))
    with pytest.raises(ValueError, match=r"'0\.weight'.*non-zero values where this network's mask"):
        net.load_state_dict(state)
    np.testing.assert_array_equal(layer.weight.data, before)
    opt = SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x = np.random.default_rng(1).standard_normal((2, 5))
    for _ in range(3):
        opt.zero_grad()
        layer.backward(np.ones_like(layer.forward(x)))
        layer.weight.grad[~mask] = 5.0
        opt.step()
    assert np.all(layer.weight.data[~mask] == 0)
    assert np.any(layer.weight.data[mask] != before[mask])


@pytest.mark.parametrize("mask,match", [
    (np.ones((3, 4), bool), r"weight_mask must be a bool array of the weight's shape .*\(3, 5\).*\(3, 4\)"),
    (np.ones((3, 5)), r"weight_mask must be a bool array .*float64"),
], ids=["shape", "dtype"])
def test_linear_bad_masks_are_refused(mask, match):
    with pytest.raises(ValueError, match=match):
        Linear(5, 3, weight_mask=mask)


def test_linear_mask_is_copied():
    mask = _mask((3, 5), 0.5, seed=8)
    layer = Linear(5, 3, weight_mask=mask, rng=0)
    mask[:] = True
    assert not layer.weight_mask.all()
    assert not layer.weight_mask.flags.writeable
