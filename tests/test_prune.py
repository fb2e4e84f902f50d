"""sparseconv.prune: magnitude masks, layers rebuilt with them, checked against the direct convolution."""

from __future__ import annotations

import numpy as np
import pytest

from sparseconv import reference as ref
from sparseconv.models import lenet5
from sparseconv.nn import SGD, Conv1d, Conv2d, Conv3d, CrossEntropyLoss, Flatten, Linear, Sequential, Tanh
from sparseconv.prune import apply_masks, magnitude_masks, mask_summary, prune
from sparseconv.testing import assert_allclose


def _small_net(seed=0):
    return Sequential(Conv2d(2, 4, 3, padding=1, rng=seed, input_size=(7, 6)), Tanh(),
                      Conv2d(4, 6, 3, stride=2, groups=2, rng=seed + 1), Tanh(), Flatten(),
                      Linear(6 * 3 * 2, 3, rng=seed + 2))


def _weights(net):
    return {name: p.data for name, p in net.named_parameters() if name.endswith("weight")}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_global_masks_keep_the_largest_weights_at_the_exact_sparsity(sparsity):
    net = _small_net()
    masks = magnitude_masks(net, sparsity)
    assert sorted(masks) == ["0.weight", "2.weight"]  # the Linear layer is not pruned
    w = _weights(net)
    kept = np.concatenate([np.abs(w[k])[masks[k]] for k in masks])
    dropped = np.concatenate([np.abs(w[k])[~masks[k]] for k in masks])
    total = kept.size + dropped.size
    assert dropped.size == round(sparsity * total)
    if kept.size and dropped.size:
        assert kept.min() >= dropped.max()


def test_layer_scope_prunes_each_layer_to_the_sparsity():
    net = _small_net()
    masks = magnitude_masks(net, 0.6, scope="layer")
    for name, mask in masks.items():
        w = np.abs(_weights(net)[name])
        assert np.count_nonzero(~mask) == round(0.6 * mask.size)
        assert w[mask].min() >= w[~mask].max()


@pytest.mark.parametrize("structure,axis", [("filter", 0), ("channel", 1)])
def test_structured_masks_drop_whole_units_of_smallest_norm(structure, axis):
    net = _small_net()
    masks = magnitude_masks(net, 0.5, scope="layer", structure=structure)
    for name, mask in masks.items():
        w = _weights(net)[name]
        other = tuple(a for a in range(w.ndim) if a != axis)
        unit_kept = mask.all(axis=other)
        assert np.array_equal(unit_kept, mask.any(axis=other)), "units are kept or dropped whole"
        assert np.count_nonzero(~unit_kept) == round(0.5 * w.shape[axis])
        norms = np.sqrt((w ** 2).sum(axis=other))
        assert norms[unit_kept].min() >= norms[~unit_kept].max()


def test_masks_only_grow_and_count_the_connection_table_as_absent():
    net = lenet5(seed=1)
    table = net[4].params["weight"].mask.copy()
    half, masks = prune(net, 0.5)
    assert not np.any(masks["4.weight"] & ~table)
    ninety, masks90 = prune(half, 0.9)
    summary = mask_summary(ninety)
    assert summary["weights"] - summary["kept"] == round(0.9 * summary["weights"])
    for name in masks:
        assert not np.any(masks90[name] & ~masks[name])
    # Pruning less than is already absent changes nothing.
    again, masks_again = prune(ninety, 0.5)
    assert all(np.array_equal(masks_again[k], masks90[k]) for k in masks90)


CONVS = [
    ("conv1d-s2-p1", lambda: Conv1d(3, 4, 3, stride=2, padding=1, rng=0), (3, 11)),
    ("conv2d-g2-d2-reflect", lambda: Conv2d(4, 6, 3, dilation=2, groups=2, padding=2, padding_mode="reflect", rng=1),
     (4, 7, 8)),
    ("conv3d-circular", lambda: Conv3d(2, 3, 2, padding=1, padding_mode="circular", rng=2), (2, 3, 4, 3)),
]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0], ids=["0%", "50%", "100%"])
@pytest.mark.parametrize("make,input_shape", [c[1:] for c in CONVS], ids=[c[0] for c in CONVS])
def test_a_pruned_layer_stores_only_kept_taps_and_matches_the_direct_convolution(make, input_shape, sparsity):
    layer = make()
    layer.build(input_shape)
    original = layer.params["weight"].data.copy()
    pruned, masks = prune(layer, sparsity)
    keep = masks["weight"]
    assert np.array_equal(layer.params["weight"].data, original), "the input network is left unchanged"
    op = pruned.op
    assert op.input_shape == input_shape
    # An entry of the unpruned matrix stays when one of the taps tied to it is kept.
    assert op.nnz == int(np.count_nonzero(layer.op.tying @ keep.ravel().astype(float)))
    w = np.where(keep, original, 0)
    opts = {k: v for k, v in layer.options.items()}
    x = np.random.default_rng(0).standard_normal((2, *input_shape))
    assert_allclose(pruned.forward(x), ref.conv_direct(x, w, layer.params["bias"].data, **opts))
    dy = np.random.default_rng(1).standard_normal((2, *op.out_shape))
    dx = pruned.backward(dy)
    ref_dx, ref_dw, ref_db = ref.conv_direct_backward(x, w, dy, **opts)
    assert_allclose(dx, ref_dx)
    # The kernel gradient is the direct one at kept taps and exactly zero at pruned ones.
    assert_allclose(pruned.params["weight"].grad, np.where(keep, ref_dw, 0))
    assert np.all(pruned.params["weight"].grad[~keep] == 0)


def test_fine_tuning_keeps_pruned_weights_at_zero():
    net, masks = prune(_small_net(), 0.7)
    opt = SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-2)
    loss = CrossEntropyLoss()
    rng = np.random.default_rng(0)
    for _ in range(5):
        opt.zero_grad()
        loss(net.forward(rng.standard_normal((4, 2, 7, 6))), rng.integers(0, 3, 4))
        net.backward(loss.backward())
        opt.step()
    for name, p in net.named_parameters():
        if name in masks:
            assert np.all(p.data[~masks[name]] == 0)
            assert np.any(p.data[masks[name]] != 0)


def test_mask_summary_counts_weights_kept_and_entries():
    net = lenet5(seed=0)
    dense = mask_summary(net)
    assert dense["weights"] == 150 + 2400 + 48000
    assert dense["kept"] == 150 + 1500 + 48000  # C3's connection table
    pruned, masks = prune(net, 0.75)
    summary = mask_summary(pruned)
    assert summary["kept"] == dense["weights"] - round(0.75 * dense["weights"])
    for name, keep in masks.items():
        layer = net[int(name.split(".")[0])]
        assert summary["layers"][name]["entries"] == int(np.count_nonzero(layer.op.tying @ keep.ravel().astype(float)))
    assert summary["entries"] == sum(v["entries"] for v in summary["layers"].values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.5), r"sparsity must be a number in \[0, 1\]; got 1.5"),
    (dict(sparsity=True), r"sparsity must be a number in \[0, 1\]; got True"),
    (dict(sparsity=0.5, scope="model"), r"scope must be one of \('global', 'layer'\); got 'model'"),
    (dict(sparsity=0.5, structure="row"), r"structure must be one of .*; got 'row'"),
    (dict(sparsity=0.5, structure="filter"), r"structure='filter' prunes whole filters .* scope='layer'"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        magnitude_masks(_small_net(), **kwargs)


def test_nothing_to_prune_is_refused():
    with pytest.raises(ValueError, match=r"network has no layer to prune"):
        prune(Sequential(Flatten(), Linear(3, 2)), 0.5)


def test_bad_masks_are_refused_and_change_nothing():
    net = lenet5(seed=0)
    good = magnitude_masks(net, 0.5)
    with pytest.raises(ValueError, match=r"masks names '11.weight', which is not a prunable weight"):
        apply_masks(net, {"11.weight": np.ones((84, 120), bool)})
    with pytest.raises(ValueError, match=r"mask '0.weight' must be a bool array of shape \(6, 1, 5, 5\)"):
        apply_masks(net, {"0.weight": good["0.weight"].astype(int)})
    with pytest.raises(ValueError, match=r"mask '4.weight' keeps weights that the layer does not have"):
        apply_masks(net, {"4.weight": np.ones((16, 6, 5, 5), bool)})
    assert mask_summary(net)["kept"] == 150 + 1500 + 48000


@pytest.mark.parametrize("layout", ["columns", "batch_first"])
def test_prune_keeps_the_layout(layout):
    net = lenet5(seed=0, build=False, layout=layout)
    pruned, _ = prune(net, 0.5)
    assert pruned.layout == layout
