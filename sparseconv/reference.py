"""Independent reference convolutions: the witnesses the sparse operator is checked against.

Three formulations, each written the way a textbook writes it and none of them sharing the
sparse builder's index arithmetic:

- **direct** (:func:`conv_direct`, :func:`conv_direct_backward`): a loop over output
  positions, each contracting one strided, dilated window of the padded input with the
  kernel. The input gradient is the *full* convolution of the sensitivities with the kernel
  (correlation with ``rot180(w)``), folded back through the adjoint of the padding; the
  kernel gradient is the *valid* correlation of the padded input with the sensitivities.
- **im2col** (:func:`conv_im2col`, :func:`conv_im2col_backward`): patches unrolled with
  ``sliding_window_view``, one GEMM per group; the adjoint :func:`col2im` scatters them back.
- **dense** (:func:`dense_matrix`, :func:`conv_dense`, :func:`conv_dense_backward`): the
  layer's matrix, column by column, as the image of each unit input under :func:`conv_direct`.

Only ``np.pad``, slicing, ``sliding_window_view``, ``np.add.at`` and matrix products are used.
Option validation and every output size come from :func:`sparseconv.geometry.conv_geometry`.

Notation and layout
-------------------
``x`` is ``(N, C, *in_size)``, ``weight`` is ``(F, C // groups, *kernel_size)``, the output
``y`` and the sensitivities ``dy`` are ``(N, F, *out_size)``, with 1, 2 or 3 spatial
dimensions. ``flip=False`` is cross-correlation (the deep-learning "convolution")::

    y[n, f, o] = b[f] + sum_{c in group(f), k} w[f, c, k] * xpad[n, c, o * s + k * d]

``flip=True`` is a true convolution: the same with ``w`` rotated 180 degrees in every spatial
dimension. float32 and float64 inputs are computed in their own precision (integers become
float64); ``x`` and ``weight`` of different floating dtypes raise ``TypeError``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .geometry import (
    PADDING_MODES,
    ConvGeometry,
    IntOrTuple,
    PaddingSpec,
    check_array_dtype,
    check_batch,
    conv_geometry,
    normalize_tuple,
    output_size,
    resolve_dtype,
)

__all__ = [
    "pad",
    "pad_adjoint",
    "conv_direct",
    "conv_direct_backward",
    "im2col",
    "col2im",
    "conv_im2col",
    "conv_im2col_backward",
    "dense_matrix",
    "conv_dense",
    "conv_dense_backward",
]

# How each padding mode is spelled for np.pad.
_NP_PAD_MODES = {"zeros": "constant", "circular": "wrap", "reflect": "reflect", "replicate": "edge"}

_Grads = tuple[np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------------- padding
def _check_mode(mode: str) -> str:
    if mode not in PADDING_MODES:
        raise ValueError(f"mode must be one of {PADDING_MODES}; got {mode!r}")
    return _NP_PAD_MODES[mode]


def _check_pairs(padding_pairs: Sequence[Sequence[int]], ndim: int) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding_pairs)
    except (TypeError, ValueError):
        raise TypeError(f"padding_pairs must be a sequence of (low, high) int pairs, one per padded "
                        f"dimension; got {padding_pairs!r}") from None
    if any(v < 0 for pair in pairs for v in pair):
        raise ValueError(f"padding_pairs must be non-negative; got {padding_pairs!r}")
    if len(pairs) > ndim:
        raise ValueError(f"padding_pairs has {len(pairs)} pairs but the array has only {ndim} axes")
    return pairs


def pad(x: np.ndarray, padding_pairs: Sequence[Sequence[int]], mode: str = "zeros") -> np.ndarray:
    """Pad the trailing (spatial) axes of ``x``.

    Parameters
    ----------
    x : ndarray of shape (..., *in_size)
        Leading axes (batch, channels) are left alone.
    padding_pairs : sequence of (int, int)
        ``(low, high)`` for each of the last ``len(padding_pairs)`` axes.
    mode : {"zeros", "circular", "reflect", "replicate"}
        ``np.pad`` modes ``"constant"``, ``"wrap"``, ``"reflect"`` and ``"edge"``.

    Returns
    -------
    ndarray of shape (..., *padded_size)
        ``padded_size[i] = in_size[i] + low[i] + high[i]``, same dtype as ``x``.
    """
    x = np.asarray(x)
    np_mode = _check_mode(mode)
    pairs = _check_pairs(padding_pairs, x.ndim)
    lead = ((0, 0),) * (x.ndim - len(pairs))
    return np.pad(x, lead + pairs, mode=np_mode)


def pad_adjoint(xp: np.ndarray, in_size: Sequence[int], padding_pairs: Sequence[Sequence[int]],
                mode: str = "zeros") -> np.ndarray:
    """Adjoint of :func:`pad`: fold a padded array back onto the unpadded positions.

    For ``"zeros"`` this is a crop. For the other modes every padded position holds a copy of
    some input position, so its value is added back into that source. The source map is
    obtained by padding an array of flat indices with the same mode, so it is whatever
    ``np.pad`` does, by construction.

    Parameters
    ----------
    xp : ndarray of shape (..., *padded_size)
    in_size : sequence of int
        The unpadded spatial size, one entry per padded axis.
    padding_pairs : sequence of (int, int)
        As given to :func:`pad`.
    mode : {"zeros", "circular", "reflect", "replicate"}

    Returns
    -------
    ndarray of shape (..., *in_size)
        Satisfies ``<pad(x), y> == <x, pad_adjoint(y)>``; same dtype as ``xp``.
    """
    xp = np.asarray(xp)
    np_mode = _check_mode(mode)
    pairs = _check_pairs(padding_pairs, xp.ndim)
    in_size = tuple(int(i) for i in in_size)
    if len(in_size) != len(pairs):
        raise ValueError(f"in_size must have one entry per padding pair ({len(pairs)}); got {in_size}")
    nd = len(pairs)
    padded = tuple(i + lo + hi for i, (lo, hi) in zip(in_size, pairs))
    if xp.shape[xp.ndim - nd:] != padded:
        raise ValueError(f"xp must end with the padded size {padded} (in_size {in_size} plus padding "
                         f"{pairs}); got shape {xp.shape}")
    lead = xp.shape[:xp.ndim - nd]
    if mode == "zeros":
        return xp[(..., *(slice(lo, lo + i) for i, (lo, _) in zip(in_size, pairs)))].copy()
    source = np.pad(np.arange(int(np.prod(in_size))).reshape(in_size), pairs, mode=np_mode)
    flat = xp.reshape(-1, int(np.prod(padded)))
    out = np.zeros((flat.shape[0], int(np.prod(in_size))), dtype=xp.dtype)
    # add.at, not fancy-index +=, because several padded positions copy the same source.
    np.add.at(out, (slice(None), source.ravel()), flat)
    return out.reshape(*lead, *in_size)


# ---------------------------------------------------------------------- validation
def _compute_dtype(x: np.ndarray, weight: np.ndarray) -> np.dtype:
    """The dtype both arrays are computed in: their common float dtype, never an up-cast."""
    for arr, name in ((x, "x"), (weight, "weight")):
        resolve_dtype(arr, name)
    floats = {arr.dtype for arr in (x, weight) if arr.dtype.kind == "f"}
    if len(floats) > 1:
        raise TypeError(f"x and weight must have the same dtype; got x {x.dtype} and weight {weight.dtype} "
                        f"(convert one explicitly, e.g. weight.astype(x.dtype))")
    return floats.pop() if floats else np.dtype(np.float64)


def _setup(x: object, weight: object, opts: dict) -> tuple[np.ndarray, np.ndarray, ConvGeometry]:
    """Validate a batch and a weight against the options; return them in the compute dtype."""
    x = np.asarray(x)
    weight = np.asarray(weight)
    if weight.ndim in (3, 4, 5) and x.ndim != weight.ndim:
        raise ValueError(
            f"x must have shape (N, C, *spatial) with {weight.ndim - 2} spatial dimension(s) to match the "
            f"weight of shape {weight.shape}; got shape {x.shape}")
    dtype = _compute_dtype(x, weight)
    geometry = conv_geometry(weight.shape, x.shape[1:], **opts)
    x = check_batch(x, geometry.input_shape, dtype, "x")
    weight = check_array_dtype(weight, dtype, "weight")
    return x, weight, geometry


def _check_bias(bias: object, geometry: ConvGeometry, dtype: np.dtype) -> Optional[np.ndarray]:
    if bias is None:
        return None
    bias = check_array_dtype(bias, dtype, "bias")
    if bias.shape != (geometry.out_channels,):
        raise ValueError(f"bias must have shape (F,) = ({geometry.out_channels},); got {bias.shape}")
    return bias


def _check_dy(dy: object, geometry: ConvGeometry, n: int, dtype: np.dtype) -> np.ndarray:
    dy = check_batch(dy, geometry.output_shape, dtype, "dy")
    if dy.shape[0] != n:
        raise ValueError(f"dy must have shape (N, F, *out) = {(n, *geometry.output_shape)} to match x; "
                         f"got {dy.shape}")
    return dy


def _options(stride: IntOrTuple, padding: PaddingSpec, dilation: IntOrTuple, groups: int, padding_mode: str,
             flip: bool) -> dict:
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode,
                flip=flip)


def _add_bias(y: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
    if bias is not None:
        y += bias.reshape(-1, *([1] * (y.ndim - 2)))
    return y


def _rot180(weight: np.ndarray) -> np.ndarray:
    """Reverse every spatial axis of a ``(F, C, *kernel)`` array."""
    return np.flip(weight, axis=tuple(range(2, weight.ndim)))


def _effective_kernel(weight: np.ndarray, flip: bool) -> np.ndarray:
    """The kernel that is actually correlated with the input."""
    return _rot180(weight) if flip else weight


def _spatial_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the batch and every spatial axis: the bias gradient of ``(N, F, *out)``."""
    return a.sum(axis=(0, *range(2, a.ndim)))


# ---------------------------------------------------------------------- direct
def _correlate_padded(xp: np.ndarray, kernel: np.ndarray, stride: Sequence[int], dilation: Sequence[int],
                      groups: int) -> np.ndarray:
    """Valid, strided, dilated, grouped correlation of an already padded batch, window by window.

    ``xp`` is ``(N, C, *P)``, ``kernel`` is ``(F, C // groups, *k)``; returns ``(N, F, *out)``.
    """
    n, c = xp.shape[:2]
    f = kernel.shape[0]
    ksize = kernel.shape[2:]
    out = tuple(output_size(p, k, s, 0, 0, d) for p, k, s, d in zip(xp.shape[2:], ksize, stride, dilation))
    fg, cg = f // groups, c // groups
    mats = [kernel[g * fg:(g + 1) * fg].reshape(fg, -1) for g in range(groups)]
    y = np.zeros((n, f, *out), dtype=xp.dtype)
    for o in np.ndindex(out):
        window = xp[(slice(None), slice(None),
                     *(slice(oi * s, oi * s + d * (k - 1) + 1, d) for oi, s, d, k in zip(o, stride, dilation, ksize)))]
        for g in range(groups):
            patch = window[:, g * cg:(g + 1) * cg].reshape(n, -1)
            y[(slice(None), slice(g * fg, (g + 1) * fg), *o)] = patch @ mats[g].T
    return y


def conv_direct(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None, *, stride: IntOrTuple = 1,
                padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros",
                flip: bool = False) -> np.ndarray:
    """Convolution by the textbook sliding window: one window of the padded input per output position.

    Parameters
    ----------
    x : ndarray of shape (N, C, *in_size)
    weight : ndarray of shape (F, C // groups, *kernel_size)
    bias : ndarray of shape (F,), optional
    stride, padding, dilation, groups, padding_mode, flip
        As in :func:`sparseconv.geometry.conv_geometry`.

    Returns
    -------
    y : ndarray of shape (N, F, *out_size)
        In the dtype of ``x`` and ``weight``.

    Examples
    --------
    >>> x = np.arange(5.0)[None, None]
    >>> conv_direct(x, np.array([[[1.0, 0.0, -1.0]]]))
    array([[[-2., -2., -2.]]])
    """
    x, weight, geom = _setup(x, weight, _options(stride, padding, dilation, groups, padding_mode, flip))
    bias = _check_bias(bias, geom, x.dtype)
    xp = pad(x, geom.padding, geom.padding_mode)
    y = _correlate_padded(xp, _effective_kernel(weight, geom.flip), geom.stride, geom.dilation, geom.groups)
    return _add_bias(y, bias)


def conv_direct_backward(x: np.ndarray, weight: np.ndarray, dy: np.ndarray, *, stride: IntOrTuple = 1,
                         padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                         padding_mode: str = "zeros", flip: bool = False) -> _Grads:
    """Gradients of :func:`conv_direct` by the textbook rules.

    Parameters
    ----------
    x : ndarray of shape (N, C, *in_size)
    weight : ndarray of shape (F, C // groups, *kernel_size)
    dy : ndarray of shape (N, F, *out_size)
        Sensitivities of the output, ``dJ/dy``.
    stride, padding, dilation, groups, padding_mode, flip
        As in :func:`sparseconv.geometry.conv_geometry`.

    Returns
    -------
    dx : ndarray of shape (N, C, *in_size)
    dw : ndarray of shape (F, C // groups, *kernel_size)
        With respect to ``weight`` as given (also when ``flip=True``).
    db : ndarray of shape (F,)

    Notes
    -----
    With ``w`` the correlated kernel (``rot180(weight)`` if ``flip``):

    - ``dx``: insert ``s - 1`` zeros between the entries of ``dy``, pad by ``d * (k - 1)`` on
      both sides, correlate with ``rot180(w)`` (channels transposed within each group,
      dilation ``d``): that is the full convolution of ``dy`` with ``w``, i.e. the gradient
      with respect to the padded input. It is then folded back by :func:`pad_adjoint`.
    - ``dw[f, c, k] = sum_{n, o} dy[n, f, o] * xpad[n, c, o * s + k * d]``, the valid
      correlation of the padded input with ``dy``; rotated back if ``flip``.
    - ``db[f] = sum_{n, o} dy[n, f, o]``.
    """
    x, weight, geom = _setup(x, weight, _options(stride, padding, dilation, groups, padding_mode, flip))
    dy = _check_dy(dy, geom, x.shape[0], x.dtype)
    kernel = _effective_kernel(weight, geom.flip)
    groups, nd = geom.groups, geom.ndim
    fg, cg = geom.out_channels // groups, geom.in_channels // groups
    xp = pad(x, geom.padding, geom.padding_mode)

    n = x.shape[0]
    dy_flat = dy.reshape(n, geom.out_channels, -1)
    dkernel = np.zeros_like(kernel)
    for k in np.ndindex(geom.kernel_size):
        # The input samples that tap k met, one per output position.
        taps = xp[(slice(None), slice(None), *(slice(ki * d, ki * d + s * (o - 1) + 1, s) for ki, d, s, o in
                                                zip(k, geom.dilation, geom.stride, geom.out_size)))]
        taps = taps.reshape(n, geom.in_channels, -1)
        for g in range(groups):
            dkernel[(slice(g * fg, (g + 1) * fg), slice(None), *k)] = np.einsum(
                "nfo,nco->fc", dy_flat[:, g * fg:(g + 1) * fg], taps[:, g * cg:(g + 1) * cg])
    dw = _effective_kernel(dkernel, geom.flip)

    dilated = np.zeros((*dy.shape[:2], *(s * (o - 1) + 1 for s, o in zip(geom.stride, geom.out_size))),
                       dtype=dy.dtype)
    dilated[(slice(None), slice(None), *(slice(None, None, s) for s in geom.stride))] = dy
    full = pad(dilated, [(d * (k - 1),) * 2 for d, k in zip(geom.dilation, geom.kernel_size)], "zeros")
    # Within each group the adjoint maps F // G output channels back to C // G input channels.
    back_kernel = np.concatenate([kernel[g * fg:(g + 1) * fg].swapaxes(0, 1) for g in range(groups)])
    dxp_used = _correlate_padded(full, _rot180(back_kernel), (1,) * nd, geom.dilation, groups)
    # Trailing padded positions that no window reached (stride remainder) get no gradient.
    dxp = np.zeros((*x.shape[:2], *geom.padded_size), dtype=x.dtype)
    dxp[(slice(None), slice(None), *(slice(0, u) for u in dxp_used.shape[2:]))] = dxp_used
    dx = pad_adjoint(dxp, geom.in_size, geom.padding, geom.padding_mode)
    return dx, dw, _spatial_sum(dy)


# ---------------------------------------------------------------------- im2col
_LAYOUTS = ("columns", "rows")


def _check_layout(layout: str) -> str:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout!r}")
    return layout


def _windows(xp: np.ndarray, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
             layout: str = "columns") -> np.ndarray:
    """Unroll ``(N, C, *P)`` into patches with one copy of a ``sliding_window_view``.

    ``layout="columns"``: ``(N, C * prod(k), prod(out))``, rows ordered ``(c, *k)``;
    ``layout="rows"``: ``(N * prod(out), C * prod(k))``, rows ordered ``(n, *out)``.
    """
    nd = len(kernel_size)
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel_size, dilation))
    win = sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))  # (N, C, *positions, *extent)
    win = win[(slice(None), slice(None), *(slice(None, None, s) for s in stride),
               *(slice(None, None, d) for d in dilation))]  # (N, C, *out, *k)
    n, c = xp.shape[:2]
    out = int(np.prod(win.shape[2:2 + nd]))
    taps = c * int(np.prod(kernel_size))
    if layout == "rows":
        return win.transpose(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)).reshape(n * out, taps)
    win = win.transpose(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return win.reshape(n, taps, out)


def _patch_geometry(input_shape: Sequence[int], kernel_size: IntOrTuple, stride: IntOrTuple, padding: PaddingSpec,
                    dilation: IntOrTuple, padding_mode: str) -> ConvGeometry:
    """Geometry of one patch extraction: a single filter covering all channels."""
    input_shape = tuple(input_shape)
    if len(input_shape) not in (2, 3, 4):
        raise ValueError(f"the input must be (N, C, *spatial) with 1, 2 or 3 spatial dimensions; "
                         f"got a sample shape {input_shape}")
    kernel = normalize_tuple(kernel_size, len(input_shape) - 1, "kernel_size")
    return conv_geometry((1, input_shape[0], *kernel), input_shape, stride=stride, padding=padding,
                         dilation=dilation, padding_mode=padding_mode)


def im2col(x: np.ndarray, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1, padding: PaddingSpec = 0,
           dilation: IntOrTuple = 1, padding_mode: str = "zeros", layout: str = "columns") -> np.ndarray:
    """Unroll every (strided, dilated) patch of the padded input into a column (or a row).

    One copy of a ``sliding_window_view`` of the padded input: fast enough to be the im2col
    the benchmarks time.

    Parameters
    ----------
    x : ndarray of shape (N, C, *in_size)
    kernel_size : int or tuple of int
    stride, padding, dilation, padding_mode
        As in :func:`sparseconv.geometry.conv_geometry`. Groups and flip do not change the
        patches, so they are not options here.
    layout : {"columns", "rows"}, default "columns"
        ``"columns"``: one ``(C * prod(kernel_size), prod(out_size))`` matrix of patch
        columns per sample. ``"rows"``: one patch per row, the samples stacked -- the layout
        in which a whole batch is one GEMM with the ``(F, C * prod(kernel_size))`` kernel
        matrix.

    Returns
    -------
    cols : ndarray
        ``layout="columns"``: shape ``(N, C * prod(kernel_size), prod(out_size))`` with
        ``cols[n, (c, *k), (*o)] = xpad[n, c, o * s + k * d]``, C order on both axes.
        ``layout="rows"``: shape ``(N * prod(out_size), C * prod(kernel_size))`` with
        ``cols[(n, *o), (c, *k)]`` the same value.

    Examples
    --------
    >>> im2col(np.arange(4.0)[None, None], 2)
    array([[[0., 1., 2.],
            [1., 2., 3.]]])
    >>> im2col(np.arange(4.0)[None, None], 2, layout="rows")
    array([[0., 1.],
           [1., 2.],
           [2., 3.]])
    """
    _check_layout(layout)
    x = np.asarray(x)
    x = x.astype(resolve_dtype(x, "x"), copy=False)
    geom = _patch_geometry(x.shape[1:], kernel_size, stride, padding, dilation, padding_mode)
    x = check_batch(x, geom.input_shape, x.dtype, "x")
    # Without padding the window view reads x itself: no copy before the one of the unrolling.
    xp = pad(x, geom.padding, geom.padding_mode) if any(lo or hi for lo, hi in geom.padding) else x
    return _windows(xp, geom.kernel_size, geom.stride, geom.dilation, layout)


def col2im(cols: np.ndarray, input_shape: Sequence[int], kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
           padding: PaddingSpec = 0, dilation: IntOrTuple = 1, padding_mode: str = "zeros",
           layout: str = "columns") -> np.ndarray:
    """Adjoint of :func:`im2col`: add every patch entry back into the input position it came from.

    One strided slice add per kernel tap, in tap order (the order ``np.add.at`` over the
    unrolled index would use, so the sums are the same to the last bit).

    Parameters
    ----------
    cols : ndarray
        Shape ``(N, C * prod(kernel_size), prod(out_size))`` for ``layout="columns"``,
        ``(N * prod(out_size), C * prod(kernel_size))`` for ``layout="rows"``.
    input_shape : sequence of int
        ``(C, *in_size)``, one sample (the batch size is taken from ``cols``).
    kernel_size : int or tuple of int
    stride, padding, dilation, padding_mode, layout
        As given to :func:`im2col`.

    Returns
    -------
    ndarray of shape (N, C, *in_size)
        Satisfies ``<im2col(x), cols> == <x, col2im(cols)>``.
    """
    _check_layout(layout)
    cols = np.asarray(cols)
    cols = cols.astype(resolve_dtype(cols, "cols"), copy=False)
    geom = _patch_geometry(input_shape, kernel_size, stride, padding, dilation, padding_mode)
    c, nd = geom.in_channels, len(geom.kernel_size)
    taps, n_out = c * int(np.prod(geom.kernel_size)), int(np.prod(geom.out_size))
    if layout == "columns":
        if cols.ndim != 3 or cols.shape[1:] != (taps, n_out):
            raise ValueError(f"cols must have shape (N, C * prod(kernel), prod(out)) = (N, {taps}, {n_out}); "
                             f"got {cols.shape}")
        n = cols.shape[0]
        # (N, C, *k, *out): tap axes right after the channel.
        patches = cols.reshape(n, c, *geom.kernel_size, *geom.out_size)
    else:
        if cols.ndim != 2 or cols.shape[1] != taps or cols.shape[0] % n_out:
            raise ValueError(f"cols must have shape (N * prod(out), C * prod(kernel)) = (N * {n_out}, {taps}); "
                             f"got {cols.shape}")
        n = cols.shape[0] // n_out
        # (N, *out, C, *k) -> (N, C, *k, *out) as a view.
        patches = cols.reshape(n, *geom.out_size, c, *geom.kernel_size)
        patches = patches.transpose(0, 1 + nd, *range(2 + nd, 2 + 2 * nd), *range(1, 1 + nd))
    xp = np.zeros((n, c, *geom.padded_size), dtype=cols.dtype)
    for tap in np.ndindex(*geom.kernel_size):
        # Tap k reads positions k * d, k * d + s, ... of the padded input: one strided slice.
        target = tuple(slice(k * d, k * d + s * (o - 1) + 1, s)
                       for k, d, s, o in zip(tap, geom.dilation, geom.stride, geom.out_size))
        xp[(slice(None), slice(None), *target)] += patches[(slice(None), slice(None), *tap)]
    return pad_adjoint(xp, geom.in_size, geom.padding, geom.padding_mode)


def _group_blocks(geom: ConvGeometry) -> list[tuple[slice, slice]]:
    """Per group: its output-channel slice and its slice of im2col rows (channels are C order)."""
    fg = geom.out_channels // geom.groups
    rows = geom.in_channels // geom.groups * int(np.prod(geom.kernel_size))
    return [(slice(g * fg, (g + 1) * fg), slice(g * rows, (g + 1) * rows)) for g in range(geom.groups)]


def conv_im2col(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None, *, stride: IntOrTuple = 1,
                padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros",
                flip: bool = False) -> np.ndarray:
    """Convolution as im2col followed by one GEMM per group.

    Parameters
    ----------
    x : ndarray of shape (N, C, *in_size)
    weight : ndarray of shape (F, C // groups, *kernel_size)
    bias : ndarray of shape (F,), optional
    stride, padding, dilation, groups, padding_mode, flip
        As in :func:`sparseconv.geometry.conv_geometry`.

    Returns
    -------
    y : ndarray of shape (N, F, *out_size)
    """
    x, weight, geom = _setup(x, weight, _options(stride, padding, dilation, groups, padding_mode, flip))
    bias = _check_bias(bias, geom, x.dtype)
    cols = im2col(x, geom.kernel_size, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
                  padding_mode=geom.padding_mode)
    mat = _effective_kernel(weight, geom.flip).reshape(geom.out_channels, -1)
    y = np.empty((x.shape[0], geom.out_channels, cols.shape[2]), dtype=x.dtype)
    for fs, rs in _group_blocks(geom):
        y[:, fs] = mat[fs] @ cols[:, rs]
    return _add_bias(y.reshape(x.shape[0], *geom.output_shape), bias)


def conv_im2col_backward(x: np.ndarray, weight: np.ndarray, dy: np.ndarray, *, stride: IntOrTuple = 1,
                         padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                         padding_mode: str = "zeros", flip: bool = False) -> _Grads:
    """Gradients of :func:`conv_im2col`: ``dW = dY @ cols.T`` and ``dx = col2im(W.T @ dY)`` per group.

    Parameters
    ----------
    x : ndarray of shape (N, C, *in_size)
    weight : ndarray of shape (F, C // groups, *kernel_size)
    dy : ndarray of shape (N, F, *out_size)
    stride, padding, dilation, groups, padding_mode, flip
        As in :func:`sparseconv.geometry.conv_geometry`.

    Returns
    -------
    dx : ndarray of shape (N, C, *in_size)
    dw : ndarray of shape (F, C // groups, *kernel_size)
    db : ndarray of shape (F,)
    """
    x, weight, geom = _setup(x, weight, _options(stride, padding, dilation, groups, padding_mode, flip))
    dy = _check_dy(dy, geom, x.shape[0], x.dtype)
    patch = dict(stride=geom.stride, padding=geom.padding, dilation=geom.dilation, padding_mode=geom.padding_mode)
    cols = im2col(x, geom.kernel_size, **patch)
    mat = _effective_kernel(weight, geom.flip).reshape(geom.out_channels, -1)
    dy_mat = dy.reshape(*dy.shape[:2], -1)
    dmat = np.empty_like(mat)
    dcols = np.empty_like(cols)
    for fs, rs in _group_blocks(geom):
        dmat[fs] = np.einsum("nfo,nro->fr", dy_mat[:, fs], cols[:, rs])
        dcols[:, rs] = mat[fs].T @ dy_mat[:, fs]
    dw = _effective_kernel(dmat.reshape(weight.shape), geom.flip)
    dx = col2im(dcols, geom.input_shape, geom.kernel_size, **patch)
    return dx, dw, _spatial_sum(dy)


# ---------------------------------------------------------------------- dense
def dense_matrix(weight: np.ndarray, input_shape: Sequence[int], *, stride: IntOrTuple = 1, padding: PaddingSpec = 0,
                 dilation: IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros",
                 flip: bool = False) -> np.ndarray:
    """The layer's matrix on flattened samples, column ``j`` being :func:`conv_direct` of unit input ``e_j``.

    Parameters
    ----------
    weight : ndarray of shape (F, C // groups, *kernel_size)
    input_shape : sequence of int
        ``(C, *in_size)``, one sample.
    stride, padding, dilation, groups, padding_mode, flip
        As in :func:`sparseconv.geometry.conv_geometry`.

    Returns
    -------
    ndarray of shape (F * prod(out_size), C * prod(in_size))
        Rows ordered ``(f, *o)`` and columns ``(c, *i)``, C order, so that
        ``y[n].ravel() == D @ x[n].ravel()`` (without bias).

    Examples
    --------
    >>> dense_matrix(np.array([[[1.0, 2.0]]]), (1, 3))
    array([[1., 2., 0.],
           [0., 1., 2.]])
    """
    opts = _options(stride, padding, dilation, groups, padding_mode, flip)
    weight = np.asarray(weight)
    weight = weight.astype(resolve_dtype(weight, "weight"), copy=False)
    geom = conv_geometry(weight.shape, input_shape, **opts)
    identity = np.eye(geom.n_in, dtype=weight.dtype).reshape(geom.n_in, *geom.input_shape)
    return conv_direct(identity, weight, **opts).reshape(geom.n_in, geom.n_out).T.copy()


def conv_dense(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None, *, stride: IntOrTuple = 1,
               padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros",
               flip: bool = False) -> np.ndarray:
    """Convolution as the dense matrix product ``y[n] = D @ x[n] + b``.

    Parameters
    ----------
    x : ndarray of shape (N, C, *in_size)
    weight : ndarray of shape (F, C // groups, *kernel_size)
    bias : ndarray of shape (F,), optional
    stride, padding, dilation, groups, padding_mode, flip
        As in :func:`sparseconv.geometry.conv_geometry`.

    Returns
    -------
    y : ndarray of shape (N, F, *out_size)
    """
    opts = _options(stride, padding, dilation, groups, padding_mode, flip)
    x, weight, geom = _setup(x, weight, opts)
    bias = _check_bias(bias, geom, x.dtype)
    dense = dense_matrix(weight, geom.input_shape, **opts)
    y = (x.reshape(x.shape[0], -1) @ dense.T).reshape(x.shape[0], *geom.output_shape)
    return _add_bias(y, bias)


def conv_dense_backward(x: np.ndarray, weight: np.ndarray, dy: np.ndarray, *, stride: IntOrTuple = 1,
                        padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                        padding_mode: str = "zeros", flip: bool = False) -> _Grads:
    """Gradients of :func:`conv_dense` through the dense matrix and its derivative in each weight.

    Parameters
    ----------
    x : ndarray of shape (N, C, *in_size)
    weight : ndarray of shape (F, C // groups, *kernel_size)
    dy : ndarray of shape (N, F, *out_size)
    stride, padding, dilation, groups, padding_mode, flip
        As in :func:`sparseconv.geometry.conv_geometry`.

    Returns
    -------
    dx : ndarray of shape (N, C, *in_size)
    dw : ndarray of shape (F, C // groups, *kernel_size)
    db : ndarray of shape (F,)

    Notes
    -----
    ``dx[n] = D.T @ dy[n]``. ``D`` is linear in the weights, ``D = sum_p w[p] * D_p`` with
    ``D_p = dense_matrix(e_p)`` the 0/1 pattern of the entries tied to parameter ``p``, so
    ``dw[p] = sum_n dy[n] . (D_p @ x[n])``. One dense matrix per parameter: small sizes only.
    """
    opts = _options(stride, padding, dilation, groups, padding_mode, flip)
    x, weight, geom = _setup(x, weight, opts)
    dy = _check_dy(dy, geom, x.shape[0], x.dtype)
    n = x.shape[0]
    x_flat, dy_flat = x.reshape(n, -1), dy.reshape(n, -1)
    dx = (dy_flat @ dense_matrix(weight, geom.input_shape, **opts)).reshape(x.shape)
    dw = np.empty(weight.size, dtype=x.dtype)
    unit = np.zeros(weight.size, dtype=x.dtype)
    for p in range(weight.size):
        unit[p] = 1
        pattern = dense_matrix(unit.reshape(weight.shape), geom.input_shape, **opts)
        unit[p] = 0
        dw[p] = np.sum(dy_flat * (x_flat @ pattern.T))
    return dx, dw.reshape(weight.shape), _spatial_sum(dy)
