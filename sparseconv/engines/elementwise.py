"""Element-wise and per-channel passes over column blocks, compiled where numba is.

The layers of a column-layout network (:class:`sparseconv.nn.Sequential`) spend, between
their sparse products, passes over whole activation blocks: an activation's derivative times
the incoming sensitivities, a per-channel scale and shift (LeNet-5's trainable sub-sampling,
:class:`~sparseconv.nn.ChannelAffine`) and its backward, a convolution's bias gradient. numpy
makes each of them several passes with a temporary per operator; on a 90%-pruned LeNet-5
training step they were a quarter of the time. Each function here is one pass of a compiled
kernel (:mod:`sparseconv.engines._numba_kernels`) when numba is available and the blocks are
C-contiguous float32/float64 of one dtype, and the same arithmetic in numpy otherwise:

- :func:`tanh_grad`, :func:`sigmoid_grad`, :func:`channel_affine` and the ``out`` of
  :func:`channel_affine_grad` round every operation as numpy does, so both paths give the same
  bits (the tests check it);
- :func:`window_affine` and :func:`window_affine_grad` are LeNet-5's trainable sub-sampling
  (sums of 2-D windows, scaled and shifted per channel) and its backward, each one pass; both
  paths add the window's terms in the same order and give the same bits, except the input
  gradient where three or more windows overlap (the contributions then add in another order);
- the sums (:func:`channel_sums`, the parameter gradients of :func:`channel_affine_grad`) are
  accumulated in float64 on both paths (products of float32 values are exact there), so they
  agree to float64 rounding and are more accurate than numpy's float32 ``sum``.

A block is ``(C * P, N)``: ``C`` runs of ``P`` rows (a channel's positions), ``N`` samples.
Outputs are aligned blocks from :func:`~sparseconv.engines.base.aligned_empty` (its buffers
are reused, so no fresh pages). The passes run on one thread: the blocks of such networks are a few hundred KiB to a few MiB,
and handing them to a thread pool cost more than it saved when measured.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..geometry import FLOAT_DTYPES
from . import numba as _numba
from .base import aligned_empty

__all__ = ["channel_affine", "channel_affine_grad", "channel_sums", "sigmoid_grad", "sigmoid_slope", "tanh_grad",
           "tanh_slope", "window_affine", "window_affine_grad"]

def _compiled(*arrays: np.ndarray) -> bool:
    """Whether the compiled kernels take these arrays: numba present, one float dtype, C order."""
    dtype = arrays[0].dtype
    return (dtype in FLOAT_DTYPES and all(a.dtype == dtype and a.flags.c_contiguous for a in arrays)
            and _numba.available())


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape; got {a.shape} and {b.shape}")


def _float_array(value: object, name: str) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array; got {a.dtype}")
    return a


def _activation_grad(kernel: str, D: object, A: object) -> np.ndarray:
    D, A = _float_array(D, "D"), _float_array(A, "A")
    _same_shape(D, A, "D and A")
    if D.size and _compiled(D, A):
        out = aligned_empty(D.shape, D.dtype)
        getattr(_numba._require(), kernel)(D.reshape(-1), A.reshape(-1), out.reshape(-1), D.dtype.type(1))
        return out
    d = tanh_slope(A) if kernel == "tanh_grad_into" else sigmoid_slope(A)
    return np.multiply(D, d, out=d) if d.dtype == np.result_type(D, d) else D * d


def tanh_slope(A: np.ndarray) -> np.ndarray:
    """``1 - A**2``, the derivative of ``tanh`` through its output, in one fresh array.

    Parameters
    ----------
    A : ndarray, floating

    Returns
    -------
    ndarray of ``A``'s shape and dtype
        ``A * A`` then ``1 - .``, each rounded in ``A``'s dtype (the 1 is a Python int, a weak
        scalar), with no temporary.
    """
    d = np.multiply(A, A)
    np.subtract(1, d, out=d)
    return d


def sigmoid_slope(A: np.ndarray) -> np.ndarray:
    """``(1 - A) * A``, the derivative of the logistic function through its output, in one fresh array.

    Parameters
    ----------
    A : ndarray, floating

    Returns
    -------
    ndarray of ``A``'s shape and dtype
        ``1 - A`` then ``. * A``, each rounded in ``A``'s dtype, with no temporary.
    """
    d = np.subtract(1, A)
    d *= A
    return d


def tanh_grad(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``D * (1 - A**2)``: sensitivities through ``tanh``, given its output ``A``.

    Parameters
    ----------
    D, A : ndarray of one shape, float32 or float64
        Any shape and memory order (the compiled pass takes C-contiguous arrays of one dtype).

    Returns
    -------
    ndarray of that shape, a new array
        The same bits as numpy's ``D * (1 - A * A)`` (each operation rounded in the arrays' dtype).
    """
    return _activation_grad("tanh_grad_into", D, A)


def sigmoid_grad(D: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``D * ((1 - A) * A)``: sensitivities through the logistic function, given its output ``A``.

    Parameters
    ----------
    D, A : ndarray of one shape, float32 or float64

    Returns
    -------
    ndarray of that shape, a new array
        The same bits as numpy's ``D * ((1 - A) * A)``.
    """
    return _activation_grad("sigmoid_grad_into", D, A)


def _channel_params(block: np.ndarray, name: str, values: object, channels: int, vname: str) -> np.ndarray:
    """``values`` checked as ``(channels,)`` and converted to the block's dtype, which must hold
    them exactly (no silent rounding)."""
    v = np.asarray(values)
    if v.dtype.kind not in "iuf":
        raise TypeError(f"{vname} must be a real (integer or float) array; got {v.dtype}")
    if v.shape != (channels,):
        raise ValueError(f"{vname} must have shape ({channels},), one value per channel of {name}; got {v.shape}")
    cast = np.ascontiguousarray(v, dtype=block.dtype)
    if not np.array_equal(cast, v, equal_nan=True):
        raise ValueError(f"{vname} has values that {block.dtype} cannot hold exactly (the dtype of {name}); "
                         f"convert it explicitly, e.g. {vname}.astype(np.{block.dtype.name})")
    return cast


def _channel_block(block: object, name: str, channels: int) -> np.ndarray:
    b = _float_array(block, name)
    if b.ndim != 2:
        raise ValueError(f"{name} must be a column block of shape (C * P, N); got shape {b.shape}")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)):
        raise TypeError(f"channels must be a positive int; got {channels!r}")
    if channels < 1:
        raise ValueError(f"channels must be a positive int; got {channels!r}")
    if b.shape[0] % channels:
        raise ValueError(f"{name} has {b.shape[0]} rows, not a multiple of channels = {channels}")
    return b


def channel_affine(Z: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``Z * scale[c] + shift[c]`` on the rows of each channel ``c`` of a column block.

    Parameters
    ----------
    Z : ndarray of shape (C * P, N), float32 or float64
    scale, shift : array_like of shape (C,)
        Real values that ``Z``'s dtype holds exactly (else ``ValueError``).

    Returns
    -------
    ndarray of shape (C * P, N), a new C-contiguous array
        The same bits as numpy's ``Z * scale + shift`` per channel (a product, then a sum,
        each rounded in ``Z``'s dtype).
    """
    channels = int(np.shape(scale)[0]) if np.ndim(scale) == 1 else -1
    if channels < 1:
        raise ValueError(f"scale must be a 1-D array with one value per channel; got shape {np.shape(scale)}")
    Z = _channel_block(Z, "Z", channels)
    scale = _channel_params(Z, "Z", scale, channels, "scale")
    shift = _channel_params(Z, "Z", shift, channels, "shift")
    if Z.size and _compiled(Z):
        out = aligned_empty(Z.shape, Z.dtype)
        _numba._require().channel_affine_into(Z, scale, shift, out)
        return out
    per = np.reshape(Z, (channels, Z.shape[0] // channels, Z.shape[1]), copy=False)
    return np.ascontiguousarray((per * scale[:, None, None] + shift[:, None, None]).reshape(Z.shape))


def channel_affine_grad(D: np.ndarray, Z: np.ndarray, scale: np.ndarray,
                        input_grad: bool = True) -> tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """The backward of :func:`channel_affine` in one pass: ``(D * scale, sum(D * Z), sum(D))``.

    Parameters
    ----------
    D : ndarray of shape (C * P, N), float32 or float64
        Sensitivities of the output.
    Z : ndarray of shape (C * P, N), ``D``'s dtype
        The forward's input.
    scale : array_like of shape (C,)
    input_grad : bool, default True
        False: the first result is None (only the parameter gradients are wanted).

    Returns
    -------
    dZ : ndarray of shape (C * P, N) or None
        ``D * scale[c]`` per channel, the same bits as numpy's product.
    dscale, dshift : ndarray of shape (C,), float64
        ``sum(D * Z)`` and ``sum(D)`` over each channel's rows and all columns, accumulated in
        float64.
    """
    channels = int(np.shape(scale)[0]) if np.ndim(scale) == 1 else -1
    if channels < 1:
        raise ValueError(f"scale must be a 1-D array with one value per channel; got shape {np.shape(scale)}")
    D = _channel_block(D, "D", channels)
    Z = _float_array(Z, "Z")
    _same_shape(D, Z, "D and Z")
    if Z.dtype != D.dtype:
        raise TypeError(f"D and Z must have one dtype; got {D.dtype} and {Z.dtype}")
    scale = _channel_params(D, "D", scale, channels, "scale")
    if D.size and _compiled(D, Z):
        out = aligned_empty(D.shape, D.dtype)
        dscale, dshift = np.empty(channels), np.empty(channels)
        n = D.shape[1]
        _numba._require().channel_affine_grad_into(D, Z, scale, out, dscale, dshift, np.empty(n), np.empty(n))
        return (out if input_grad else None), dscale, dshift
    per_d = np.reshape(D, (channels, D.shape[0] // channels, D.shape[1]), copy=False)
    per_z = np.reshape(Z, per_d.shape, copy=False)
    dscale = np.einsum("cpn,cpn->c", per_d, per_z, dtype=np.float64)
    dshift = per_d.sum(axis=(1, 2), dtype=np.float64)
    dZ = np.ascontiguousarray((per_d * scale[:, None, None]).reshape(D.shape)) if input_grad else None
    return dZ, dscale, dshift


def channel_sums(D: np.ndarray, channels: int) -> np.ndarray:
    """``sum(D)`` over each channel's rows and all columns, in float64 (a bias gradient).

    Parameters
    ----------
    D : ndarray of shape (C * P, N), float32 or float64
    channels : int
        ``C``.

    Returns
    -------
    ndarray of shape (C,), float64
    """
    D = _channel_block(D, "D", channels)
    if D.size and _compiled(D):
        sums = np.empty(int(channels))
        _numba._require().channel_sums_into(D, sums, np.empty(D.shape[1]))
        return sums
    return np.reshape(D, (int(channels), D.shape[0] // int(channels), D.shape[1])).sum(axis=(1, 2), dtype=np.float64)


def _window_geometry(shape: object, kernel: object, stride: object) -> tuple[int, int, int, int, int, int, int, int]:
    """``(C, h, w, kh, kw, sh, sw, ho, wo)`` checked: every window inside the plane."""
    def pair(value: object, name: str) -> tuple[int, int]:
        t = tuple(value) if isinstance(value, (tuple, list)) else None
        if (t is None or len(t) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in t)):
            raise ValueError(f"{name} must be a pair of positive ints; got {value!r}")
        return int(t[0]), int(t[1])

    t = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if (t is None or len(t) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in t)):
        raise ValueError(f"shape must be (C, H, W) of positive ints; got {shape!r}")
    (kh, kw), (sh, sw) = pair(kernel, "kernel"), pair(stride, "stride")
    c, h, w = (int(v) for v in t)
    if kh > h or kw > w:
        raise ValueError(f"kernel {(kh, kw)} is larger than the plane {(h, w)}")
    return c, h, w, kh, kw, sh, sw, (h - kh) // sh + 1, (w - kw) // sw + 1


def window_affine(X: np.ndarray, shape: tuple[int, int, int], kernel: tuple[int, int], stride: tuple[int, int],
                  scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window sums of a column block, then ``* scale[c] + shift[c]``: ``(down, Y)``.

    ``down[c, i, j] = sum_{a < kh, b < kw} X[c, i * sh + a, j * sw + b]`` for every sample
    (terms added in that order, from zero): :class:`~sparseconv.nn.Subsampling2d` in the column
    layout, where the same sum as a sparse product (a pooling matrix) costs a general CSR
    product plus a separate scale-and-shift pass.

    Parameters
    ----------
    X : ndarray of shape (C * H * W, N), float32 or float64
    shape : (C, H, W)
    kernel, stride : (int, int)
        No padding: only windows inside the plane, ``ho = (H - kh) // sh + 1`` of them per column.
    scale, shift : array_like of shape (C,)

    Returns
    -------
    down, Y : ndarray of shape (C * ho * wo, N), new C-contiguous arrays of ``X``'s dtype
    """
    c, h, w, kh, kw, sh, sw, ho, wo = _window_geometry(shape, kernel, stride)
    X = _float_array(X, "X")
    if X.ndim != 2 or X.shape[0] != c * h * w:
        raise ValueError(f"X must be a column block of shape ({c * h * w}, N) for samples of shape {tuple(shape)}; "
                         f"got {X.shape}")
    scale = _channel_params(X, "X", scale, c, "scale")
    shift = _channel_params(X, "X", shift, c, "shift")
    n = X.shape[1]
    if X.size and _compiled(X):
        down, Y = aligned_empty((c * ho * wo, n), X.dtype), aligned_empty((c * ho * wo, n), X.dtype)
        _numba._require().window_affine_into(X, h, w, kh, kw, sh, sw, scale, shift, down, Y)
        return down, Y
    planes = X.reshape(c, h, w, n)
    down = np.zeros((c, ho, wo, n), X.dtype)
    for a in range(kh):
        for b in range(kw):
            down += planes[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw]
    Y = down * scale[:, None, None, None] + shift[:, None, None, None]
    return down.reshape(c * ho * wo, n), Y.reshape(c * ho * wo, n)


def window_affine_grad(D: np.ndarray, down: np.ndarray, shape: tuple[int, int, int], kernel: tuple[int, int],
                       stride: tuple[int, int], scale: np.ndarray,
                       input_grad: bool = True) -> tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """The backward of :func:`window_affine`: ``(dX, sum(D * down), sum(D))`` per channel.

    Parameters
    ----------
    D, down : ndarray of shape (C * ho * wo, N), one float dtype
        Sensitivities of ``Y``, and the forward's window sums.
    shape, kernel, stride
        As for :func:`window_affine`.
    scale : array_like of shape (C,)
    input_grad : bool, default True
        False: ``dX`` is None.

    Returns
    -------
    dX : ndarray of shape (C * H * W, N) or None
        ``D * scale[c]`` added to every input of each window (zero where no window reaches).
    dscale, dshift : ndarray of shape (C,), float64
        Accumulated in float64.
    """
    c, h, w, kh, kw, sh, sw, ho, wo = _window_geometry(shape, kernel, stride)
    D, down = _float_array(D, "D"), _float_array(down, "down")
    if D.ndim != 2 or D.shape[0] != c * ho * wo:
        raise ValueError(f"D must be a column block of shape ({c * ho * wo}, N) for outputs of shape "
                         f"{(c, ho, wo)}; got {D.shape}")
    _same_shape(D, down, "D and down")
    if D.dtype != down.dtype:
        raise TypeError(f"D and down must have one dtype; got {D.dtype} and {down.dtype}")
    scale = _channel_params(D, "D", scale, c, "scale")
    n = D.shape[1]
    if D.size and _compiled(D, down):
        dX = aligned_empty((c * h * w, n), D.dtype)
        dscale, dshift = np.empty(c), np.empty(c)
        _numba._require().window_affine_grad_into(D, down, h, w, kh, kw, sh, sw, scale, dX, dscale, dshift,
                                                  np.empty(n), np.empty(n), bool(input_grad))
        return (dX if input_grad else None), dscale, dshift
    per_d = D.reshape(c, ho * wo, n)
    dscale = np.einsum("cpn,cpn->c", per_d, down.reshape(per_d.shape), dtype=np.float64)
    dshift = per_d.sum(axis=(1, 2), dtype=np.float64)
    if not input_grad:
        return None, dscale, dshift
    g = D.reshape(c, ho, wo, n) * scale[:, None, None, None]
    dX = np.zeros((c, h, w, n), D.dtype)
    for a in range(kh):
        for b in range(kw):
            dX[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw] += g
    return dX.reshape(c * h * w, n), dscale, dshift
