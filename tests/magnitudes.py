"""Scales for comparing sums that may cancel.

A convolution output or gradient entry is a sum of products; its rounding error is bounded by
the unit roundoff times the sum of the *absolute* products, not times the result (which can
cancel to almost nothing). These helpers compute that sum with the im2col reference on
absolute values, to pass as ``scale`` to :func:`sparseconv.testing.assert_allclose`.
"""

from __future__ import annotations

import numpy as np

from sparseconv import reference as ref


def magnitudes(x: np.ndarray, w: np.ndarray, dy: np.ndarray, opts: dict) -> tuple[float, float, float]:
    """Largest ``sum |terms|`` of the forward output, the input gradient and the kernel gradient."""
    ax, aw, ady = np.abs(x), np.abs(w), np.abs(dy)
    y = ref.conv_im2col(ax, aw, **opts)
    dx, dw, _ = ref.conv_im2col_backward(ax, aw, ady, **opts)
    return tuple(max(float(a.max()), np.finfo(a.dtype).tiny) for a in (y, dx, dw))
