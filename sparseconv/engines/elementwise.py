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

from . import numba as _numba
from .base import aligned_empty

__all__ = ["channel_affine", "channel_affine_grad", "channel_sums", "sigmoid_grad", "tanh_grad"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _compiled(*arrays: np.ndarray) -> bool:
    """Whether the compiled kernels take these arrays: numba present, one float dtype, C order."""
    dtype = arrays[0].dtype
    return (dtype in _FLOATS and all(a.dtype == dtype and a.flags.c_contiguous for a in arrays)
            and _numba.available())


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape; got {a.shape} and {b.shape}")


def _float_array(value: object, name: str) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float32 or float64 array; got {a.dtype}")
    return a


def _activation_grad(kernel: str, D: object, A: object) -> np.ndarray:
    D, A = _float_array(D, "D"), _float_array(A, "A")
    _same_shape(D, A, "D and A")
    if D.size and _compiled(D, A):
        out = aligned_empty(D.shape, D.dtype)
        getattr(_numba._require(), kernel)(D.reshape(-1), A.reshape(-1), out.reshape(-1), D.dtype.type(1))
        return out
    one = np.result_type(D, A).type(1)
    if kernel == "tanh_grad_into":
        d = np.multiply(A, A)
        np.subtract(one, d, out=d)
    else:
        d = np.subtract(one, A)
        d *= A
    return np.multiply(D, d, out=d) if d.dtype == np.result_type(D, d) else D * d


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
    """``values`` checked as ``(channels,)`` of the block's dtype (exactly representable)."""
    v = np.asarray(values)
    if v.shape != (channels,):
        raise ValueError(f"{vname} must have shape ({channels},), one value per channel of {name}; got {v.shape}")
    if v.dtype.kind not in "biuf" or not np.can_cast(v.dtype, block.dtype, "same_kind"):
        raise TypeError(f"{vname} must be a real array; got {v.dtype}")
    return np.ascontiguousarray(v, dtype=block.dtype)


def _channel_block(block: object, name: str, channels: int) -> np.ndarray:
    b = _float_array(block, name)
    if b.ndim != 2:
        raise ValueError(f"{name} must be a column block of shape (C * P, N); got shape {b.shape}")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
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
        Cast to ``Z``'s dtype.

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
