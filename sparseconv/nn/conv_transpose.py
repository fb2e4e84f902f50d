"""Transposed-convolution layers: the transpose of a convolution's sparse matrix, trainable."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ..geometry import IntOrTuple, conv_transpose_output_size, normalize_padding, normalize_tuple
from ..transpose import ConvTransposeOperator
from .layers import _ConvBase, _combined_mask, _float_dtype, _is_int, _memory_budget, _positive_int, check_sample_shape

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


def _transposed_out_size(kernel: tuple[int, ...], in_size: Sequence[int], stride: IntOrTuple,
                         padding: Union[int, Sequence], output_padding: IntOrTuple,
                         dilation: IntOrTuple) -> tuple[int, ...]:
    """Output size of a transposed convolution, every option validated (PyTorch's rules).

    Sizes come from :func:`sparseconv.geometry.conv_transpose_output_size`; this only adds
    the option checks the layer needs before it has an input.
    """
    ndim = len(kernel)
    if isinstance(padding, str):
        raise ValueError("padding of a transposed convolution must be an int, per-dimension ints or (low, high) "
                         f"pairs (PyTorch has no string spelling for it); got {padding!r}")
    stride_t = normalize_tuple(stride, ndim, "stride")
    dilation_t = normalize_tuple(dilation, ndim, "dilation")
    extra = normalize_tuple(output_padding, ndim, "output_padding", minimum=0)
    pads = normalize_padding(padding, kernel, stride_t, dilation_t)
    out = []
    for axis, (i, k, s, d, (lo, hi), e) in enumerate(zip(in_size, kernel, stride_t, dilation_t, pads, extra)):
        if e >= max(s, d):
            raise ValueError(f"output_padding must be smaller than max(stride, dilation) in every dimension "
                             f"(PyTorch's rule); spatial dimension {axis} has output_padding={e}, stride={s}, "
                             f"dilation={d}")
        o = conv_transpose_output_size(i, k, s, lo, hi, d, e)
        if o < 1:
            raise ValueError(f"padding {(lo, hi)} crops the whole output along spatial dimension {axis}: input "
                             f"size {i}, kernel {k}, stride {s}, dilation {d}, output_padding {e} give output "
                             f"size {o} < 1")
        out.append(o)
    return tuple(out)


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
        in_channels = _positive_int(in_channels, "in_channels")
        out_channels = _positive_int(out_channels, "out_channels")
        if not _is_int(groups) or groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must be a positive int dividing in_channels={in_channels} and "
                             f"out_channels={out_channels}; got {groups!r}")
        groups = int(groups)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool; got {bias!r}")
        self.dtype = _float_dtype(dtype)
        self.memory_budget = _memory_budget(memory_budget)
        kernel = normalize_tuple(kernel_size, self.ndim, "kernel_size")
        self.options = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
                            groups=groups)
        # Validate the options on a synthetic input large enough that nothing is cropped away.
        probe = [1] * self.ndim
        if not isinstance(padding, str):
            pads = normalize_padding(padding, kernel, normalize_tuple(stride, self.ndim, "stride"),
                                     normalize_tuple(dilation, self.ndim, "dilation"))
            probe = [lo + hi + 1 for lo, hi in pads]
        _transposed_out_size(kernel, probe, stride, padding, output_padding, dilation)
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
        # The operator stores every tap; masked ones hold zeros (kept so by the Parameter) and
        # the layer zeroes their gradient.
        return ConvTransposeOperator(self.weight.data, input_shape, memory_budget=self.memory_budget, **self.options)

    def _weight_grad_columns(self, op: ConvTransposeOperator, X: np.ndarray, D: np.ndarray) -> np.ndarray:
        # The operator's kernel gradient takes batches; the batch-first views of the column
        # blocks are transposes (no copy), which it turns back into columns for its engine.
        n = X.shape[1]
        return op.weight_grad(X.T.reshape((n, *op.input_shape)), D.T.reshape((n, *op.out_shape)))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        check_sample_shape(input_shape, self.ndim, self.in_channels)
        o = self.options
        out = _transposed_out_size(self.kernel_size, input_shape[1:], o["stride"], o["padding"], o["output_padding"],
                                   o["dilation"])
        return (self.out_channels, *out)


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
        Element-wise mask (pruning): weights where it is False are held at exactly zero and
        get zero gradient.
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
