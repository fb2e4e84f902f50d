"""Transposed-convolution layers: the transpose of a convolution's sparse matrix, trainable."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ..geometry import IntOrTuple, conv_transpose_geometry, normalize_tuple, validate_conv_options
from ..transpose import ConvTransposeOperator
from .layers import _ConvBase, _combined_mask, _float_dtype, _memory_budget, check_sample_shape

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


class _ConvTransposeNd(_ConvBase):
    """Shared implementation of :class:`ConvTranspose1d`, :class:`ConvTranspose2d` and :class:`ConvTranspose3d`.

    Everything but the weight layout, the operator and the shape rule is the convolution
    layers' (:class:`~sparseconv.nn.layers._ConvBase`): the operator cache, forward, backward,
    export, masks.
    """

    _option_defaults = {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1, "groups": 1}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
                 padding: Union[int, Sequence] = 0, output_padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 groups: int = 1, bias: bool = True, weight_mask: Optional[np.ndarray] = None,
                 input_size: Optional[Sequence[int]] = None, dtype: object = np.float64,
                 rng: Union[None, int, np.random.Generator] = None, memory_budget: Optional[int] = None):
        super().__init__()
        validate_conv_options(self.ndim, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, output_padding=output_padding, in_channels=in_channels,
                              out_channels=out_channels)
        in_channels, out_channels, groups = int(in_channels), int(out_channels), int(groups)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool; got {bias!r}")
        self.dtype = _float_dtype(dtype)
        self.memory_budget = _memory_budget(memory_budget)
        kernel = normalize_tuple(kernel_size, self.ndim, "kernel_size")
        self.options = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
                            groups=groups)
        shape = (in_channels, out_channels // groups, *kernel)
        self._connection = None
        self._groups = groups
        self._has_weight_mask = weight_mask is not None
        mask = _combined_mask(shape, self.ndim, None, weight_mask, groups)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        # PyTorch's default range: fan-in of the transposed layer is out_channels/groups * prod(k).
        self._init_parameters(shape, mask, int(np.prod(shape[1:])), bool(bias), rng, out_channels)
        if input_size is not None:
            self.build((in_channels, *normalize_tuple(input_size, self.ndim, "input_size")))

    def _make_operator(self, input_shape: tuple[int, ...]) -> ConvTransposeOperator:
        return ConvTransposeOperator(self.weight.data, input_shape, weight_mask=self.weight.mask,
                                     memory_budget=self.memory_budget, **self.options)

    def _weight_grad_columns(self, op: ConvTransposeOperator, X: np.ndarray, D: np.ndarray) -> np.ndarray:
        # The operator's kernel gradient takes batches; the batch-first views of the column
        # blocks are transposes (no copy), which it turns back into columns for its engine.
        n = X.shape[1]
        return op.weight_grad(X.T.reshape((n, *op.input_shape)), D.T.reshape((n, *op.out_shape)))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        check_sample_shape(input_shape, self.ndim, self.in_channels)
        return (self.out_channels, *conv_transpose_geometry(self.weight.shape, input_shape, **self.options).out_size)


class ConvTranspose1d(_ConvTransposeNd):
    """1-D transposed convolution, ``x : (N, C_in, L) -> (N, C_out, Lo)``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or tuple of int
    stride, padding, output_padding, dilation, groups
        As for :class:`sparseconv.transpose.ConvTransposeOperator` (PyTorch's conventions);
        weight of shape ``(C_in, C_out // groups, *kernel)``. Validated at construction.
    bias : bool, default True
    weight_mask : ndarray of bool, shape of the weight, optional
        Element-wise mask (pruning): weights where it is False have no entries in the matrix,
        are held at exactly zero and get zero gradient.
    input_size : tuple of int, optional
        Build the matrix now instead of at the first forward.
    dtype : {float64, float32}
    rng : int or numpy Generator, optional
    memory_budget : int, optional
        Bytes the operator may use.

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
    """3-D transposed convolution, ``(N, C_in, D, H, W) -> (N, C_out, Do, Ho, Wo)``; see :class:`ConvTranspose1d`."""

    ndim = 3
