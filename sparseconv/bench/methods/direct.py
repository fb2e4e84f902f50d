"""Method ``direct``: ``scipy.signal.correlate`` / ``convolve`` with ``method="direct"``.

One call per (filter, channel) pair with the batch as a leading axis. scipy has no stride or
dilation: every position is computed and then subsampled, the kernel is dilated with zeros.
This N-d path is slower per multiply-add than ``correlate2d`` on single images, which would
need ``N`` times more Python calls; either way it is a reference point, not a contender.
"""

from __future__ import annotations

import numpy as np

from ..suites import Case
from ._base import MethodSkipped, Prepared, Settings, dilated_kernel, pad

__all__ = ["NAME", "RANK", "prepare"]

NAME = "direct"
RANK = 60


def prepare(case: Case, settings: Settings) -> Prepared:
    """Set up the direct correlation, or skip it beyond ``settings.max_direct_macs``."""
    from scipy import signal

    layer = case.layer
    n, c, h, _ = layer.x_shape
    f, cg, k, _ = layer.weight_shape
    fg = f // layer.groups
    s, p, d, o = layer.stride, layer.padding, layer.dilation, layer.out_size
    extent = d * (k - 1) + 1
    hp = h + 2 * p
    valid = hp - extent + 1
    work = n * f * cg * valid * valid * extent * extent
    if work > settings.max_direct_macs:
        raise MethodSkipped(
            f"scipy.signal's direct correlation would do {work:,} multiply-adds per pass (every position "
            f"before striding, zeros of the dilated kernel included), over max_direct_macs="
            f"{settings.max_direct_macs:,} (--max-direct-macs); it runs at well under 0.1 GMAC/s")
    wd = dilated_kernel(case.kernel, d)
    x, dy = case.x, case.dy
    span = s * (o - 1) + 1

    def dilate_dy() -> np.ndarray:
        out = np.zeros((n, f, span, span), dtype=case.dtype)
        out[:, :, ::s, ::s] = dy
        return out

    def forward() -> np.ndarray:
        xp = pad(x, p)
        y = np.zeros((n, f, valid, valid), dtype=case.dtype)
        for fi in range(f):
            c0 = (fi // fg) * cg
            for ci in range(cg):
                y[:, fi] += signal.correlate(xp[:, c0 + ci], wd[fi, ci][None], mode="valid", method="direct")
        return np.ascontiguousarray(y[:, :, ::s, ::s])

    def adjoint() -> np.ndarray:
        dyd = dilate_dy()
        full = span + extent - 1
        dxp = np.zeros((n, c, hp, hp), dtype=case.dtype)
        for fi in range(f):
            c0 = (fi // fg) * cg
            for ci in range(cg):
                dxp[:, c0 + ci, :full, :full] += signal.convolve(dyd[:, fi], wd[fi, ci][None], mode="full",
                                                                method="direct")
        return np.ascontiguousarray(dxp[:, :, p:p + h, p:p + h])

    def weight_grad() -> np.ndarray:
        xp, dyd = pad(x, p), dilate_dy()
        grad = np.empty(layer.weight_shape, dtype=case.dtype)
        for fi in range(f):
            c0 = (fi // fg) * cg
            for ci in range(cg):
                full = signal.correlate(xp[:, c0 + ci], dyd[:, fi], mode="valid", method="direct")
                grad[fi, ci] = full[0, :extent:d, :extent:d]
        return grad

    return Prepared(method=NAME, passes={"forward": forward, "adjoint": adjoint, "weight_grad": weight_grad},
                    buffer_name="padded input", buffer_bytes=int(n * c * hp * hp * case.dtype.itemsize),
                    info={"calls_per_pass": f * cg, "multiply_adds_per_pass": work})
