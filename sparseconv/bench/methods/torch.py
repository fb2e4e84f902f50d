"""Method ``torch``: ``torch.nn.functional.conv2d`` (optional).

The forward pass under ``torch.no_grad()``; each gradient as the backward call alone,
``torch.autograd.grad`` on a graph recorded once with only the argument of interest requiring
a gradient (so autograd computes just that one).
"""

from __future__ import annotations

import numpy as np

from ..suites import Case
from ._base import MethodSkipped, Prepared, Settings

__all__ = ["NAME", "RANK", "prepare"]

NAME = "torch"
RANK = 80


def prepare(case: Case, settings: Settings) -> Prepared:
    """Set up PyTorch's convolution on the case's data, or skip when PyTorch is not installed."""
    try:
        import torch
        import torch.nn.functional as tf
    except ImportError as err:
        raise MethodSkipped(f"PyTorch is not installed ({err}); pip install torch to compare") from None
    layer = case.layer
    xt, wt, dyt = (torch.from_numpy(np.ascontiguousarray(a)) for a in (case.x, case.kernel, case.dy))

    def conv(inp, weight):
        return tf.conv2d(inp, weight, None, stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation, groups=layer.groups)

    def forward():
        with torch.no_grad():
            return conv(xt, wt)

    x_leaf = xt.detach().clone().requires_grad_(True)
    y_x = conv(x_leaf, wt)
    w_leaf = wt.detach().clone().requires_grad_(True)
    y_w = conv(xt, w_leaf)
    return Prepared(
        method=NAME,
        passes={"forward": forward,
                "adjoint": lambda: torch.autograd.grad(y_x, x_leaf, dyt, retain_graph=True)[0],
                "weight_grad": lambda: torch.autograd.grad(y_w, w_leaf, dyt, retain_graph=True)[0]},
        to_numpy=lambda t: t.detach().numpy(), buffer_name="n/a (torch's own allocator)", traced=False,
        info={"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "mkldnn": bool(torch.backends.mkldnn.is_available())})
