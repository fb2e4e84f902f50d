"""ConvTranspose1d/2d/3d layers: finite differences, weight refresh, export, errors."""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv as sc
from sparseconv.nn import SGD, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, Sequential, Tanh
from sparseconv.testing import assert_allclose, gradcheck

CASES = [
    ("1d-s2-op1", lambda: ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1, rng=0), (3, 5)),
    ("2d-s2-g2", lambda: ConvTranspose2d(4, 2, (3, 2), stride=(2, 1), groups=2, padding=(1, 0), rng=1), (4, 3, 4)),
    ("2d-d2-nobias", lambda: ConvTranspose2d(2, 3, 2, dilation=2, bias=False, rng=2), (2, 3, 3)),
    ("3d-s2", lambda: ConvTranspose3d(2, 2, 2, stride=2, rng=3), (2, 2, 3, 2)),
]


@pytest.mark.parametrize("make,input_shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_finite_differences(make, input_shape):
    layer = make()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *input_shape))
    dy = rng.standard_normal((2, *layer.output_shape(input_shape)))
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(dy)
    gradcheck(lambda v: float(np.sum(dy * layer.forward(v))), x, dx)
    for name, p in layer.params.items():
        original = p.data.copy()
        grad = p.grad.copy()

        def loss(value, p=p):
            p.data = value
            return float(np.sum(dy * layer.forward(x)))

        gradcheck(loss, original, grad)
        p.data = original


def test_training_step_refreshes_the_matrix():
    layer = ConvTranspose2d(1, 1, 2, stride=2, rng=0)
    x = np.ones((1, 1, 2, 2))
    before = layer.forward(x).copy()
    layer.backward(np.ones_like(before))
    SGD(layer.parameters(), lr=0.1).step()
    after = layer.forward(x)
    w = layer.params["weight"].data
    expected = sc.transpose.ConvTransposeOperator(w, (1, 2, 2), stride=2).forward(x) + layer.params["bias"].data
    assert not np.allclose(before, after)
    assert_allclose(after, expected.reshape(after.shape))


def test_export_equals_layer():
    net = Sequential(ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, rng=0), Tanh())
    mlp = sc.to_mlp(net, (2, 4, 4))
    x = np.random.default_rng(1).standard_normal((3, 2, 4, 4))
    y = net.forward(x)
    assert_allclose(mlp.forward(x.reshape(3, -1)), y.reshape(3, -1))
    dy = np.random.default_rng(2).standard_normal(y.shape)
    assert_allclose(mlp.backward(dy.reshape(3, -1)), net.backward(dy).reshape(3, -1))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(in_channels=0), ValueError, "in_channels must be a positive int; got 0"),
    (dict(groups=3), ValueError, "groups=3 must divide in_channels=2"),
    (dict(dtype=np.float16), TypeError, "dtype must be float32 or float64; got float16"),
])
def test_constructor_errors(kwargs, exc, match):
    args = dict(in_channels=2, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ConvTranspose2d(**args)


def test_wrong_input_shape():
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 2, \*, \*\)"):
        ConvTranspose2d(2, 4, 3).forward(np.ones((1, 3, 4, 4)))
