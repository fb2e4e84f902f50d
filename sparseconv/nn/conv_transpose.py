"""Transposed-convolution layers: the transpose of a convolution's sparse matrix, trainable."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ..geometry import IntOrTuple, normalize_tuple
from ..transpose import ConvTransposeOperator
from .layers import _ConvNd
from .module import Module, Parameter

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


class _ConvTransposeNd(_ConvNd):
    """Shared implementation of :class:`ConvTranspose1d`, :class:`ConvTranspose2d` and :class:`ConvTranspose3d`.

    Everything but the weight layout and the operator is a convolution layer's: building per
    input shape, refreshing values after an update, forward, backward, export.
    """

    ndim = 0
    _option_defaults = {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1, "groups": 1}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
                 padding: Union[int, Sequence] = 0, output_padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 groups: int = 1, bias: bool = True, input_size: Optional[Sequence[int]] = None,
                 dtype: object = np.float64, rng: Union[None, int, np.random.Generator] = None):
        # _ConvNd.__init__ builds a forward convolution's weight layout; this one is transposed.
        Module.__init__(self)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not isinstance(groups, (int, np.integer)) or groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must be a positive int dividing in_channels={in_channels} and "
                             f"out_channels={out_channels}; got {groups!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64; got {self.dtype}")
        kernel = normalize_tuple(kernel_size, self.ndim, "kernel_size")
        self.options = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
                            groups=groups)
        shape = (in_channels, out_channels // groups, *kernel)
        # PyTorch's default range: fan-in of the transposed layer is out_channels/groups * prod(k).
        bound = 1.0 / np.sqrt(int(np.prod(shape[1:])))
        gen = np.random.default_rng(rng)
        self.params["weight"] = Parameter(gen.uniform(-bound, bound, shape).astype(self.dtype))
        if bias:
            self.params["bias"] = Parameter(gen.uniform(-bound, bound, out_channels).astype(self.dtype))
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.op: Optional[ConvTransposeOperator] = None
        self._x: Optional[np.ndarray] = None
        if input_size is not None:
            self.build((in_channels, *normalize_tuple(input_size, self.ndim, "input_size")))

    def _make_operator(self, input_shape: tuple[int, ...]) -> ConvTransposeOperator:
        return ConvTransposeOperator(self.weight.data, input_shape, **self.options)


class ConvTranspose1d(_ConvTransposeNd):
    """1-D transposed convolution, ``x : (N, C_in, L) -> (N, C_out, Lo)``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or tuple of int
    stride, padding, output_padding, dilation, groups
        As for :class:`sparseconv.transpose.ConvTransposeOperator` (PyTorch's conventions);
        weight of shape ``(C_in, C_out // groups, *kernel)``.
    bias : bool, default True
    input_size : tuple of int, optional
        Build the matrix now instead of at the first forward.
    dtype : {float64, float32}
    rng : int or numpy Generator, optional

    Notes
    -----
    ``Lo = (L - 1) s - 2 p + d (k - 1) + output_padding + 1``; forward is ``W.T @ x`` for the
    matrix ``W`` of the matching forward convolution.
    """

    ndim = 1


class ConvTranspose2d(_ConvTransposeNd):
    """2-D transposed convolution, ``x : (N, C_in, H, W) -> (N, C_out, Ho, Wo)``; see :class:`ConvTranspose1d`."""

    ndim = 2


class ConvTranspose3d(_ConvTransposeNd):
    """3-D transposed convolution, ``x : (N, C_in, D, H, W) -> (N, C_out, Do, Ho, Wo)``; see :class:`ConvTranspose1d`."""

    ndim = 3
