"""Method ``pylops``: ``pylops.signalprocessing.Convolve2D(method="fft")`` (optional).

What inverse-problem users pick for a single-channel image convolution: a true convolution
with 'same' output, one flattened image at a time through ``matvec`` / ``rmatvec``. Runs only
on such layers (``interface="linear_operator"``, one channel in and out, stride and dilation
1, 'same' padding of an odd kernel).
"""

from __future__ import annotations

from ..suites import Case
from ._base import MethodSkipped, Prepared, Settings

__all__ = ["NAME", "RANK", "prepare"]

NAME = "pylops"
RANK = 90


def prepare(case: Case, settings: Settings) -> Prepared:
    """Set up ``Convolve2D`` on the case's kernel, or skip where it does not apply or is not installed."""
    layer = case.layer
    fits = (layer.interface == "linear_operator" and layer.flip and layer.in_channels == layer.out_channels == 1
            and layer.stride == layer.dilation == 1 and layer.kernel % 2 == 1
            and layer.padding == layer.kernel // 2 and case.mask is None)
    if not fits:
        raise MethodSkipped("pylops' Convolve2D is a single-channel true convolution with 'same' output: it runs "
                            "on interface='linear_operator' layers with C=F=1, flip, stride 1, no dilation, an odd "
                            "kernel and 'same' padding, no mask")
    try:
        from pylops.signalprocessing import Convolve2D
    except ImportError as err:
        raise MethodSkipped(f"PyLops is not installed ({err}); pip install pylops to compare") from None
    half = layer.kernel // 2
    op = Convolve2D(dims=(layer.size, layer.size), h=case.w[0, 0], offset=(half, half), method="fft",
                    dtype=case.dtype)
    xv, dv = case.x.reshape(-1), case.dy.reshape(-1)
    return Prepared(method=NAME, passes={"forward": lambda: op.matvec(xv), "adjoint": lambda: op.rmatvec(dv)},
                    flat=True, buffer_name="n/a (scipy.signal.fftconvolve's own buffers)",
                    info={"pylops_method": "fft"})
