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
    (lambda: nn.BatchNorm2d(3), r"unsupported torch module BatchNorm2d"),
    (lambda: nn.Sequential(nn.Conv2d(1, 1, 3), nn.Dropout()), r"Sequential item 1: unsupported torch module Dropout"),
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
