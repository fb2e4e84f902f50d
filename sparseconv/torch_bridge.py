"""PyTorch bridge: turn ``torch.nn`` modules into their sparseconv equivalents.

PyTorch is an optional extra (``pip install torch``); it is imported only when
:func:`from_torch` is called. The converted layers hold copies of the module's parameters and
build their sparse matrices for the given input shape, so the result can be compared with
PyTorch output for output, gradient for gradient.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .nn import (AvgPool2d, Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, Flatten,
                 Linear, MaxPool2d, Module, ReLU, Sequential, Sigmoid, Tanh)

__all__ = ["from_torch"]


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("from_torch needs PyTorch: pip install torch (CPU build is enough)") from None
    return torch


def _array(tensor, dtype: np.dtype) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(dtype, copy=True)


def _convert_conv(module, input_shape: tuple[int, ...], dtype: np.dtype) -> Module:
    ndim = len(module.kernel_size)
    cls = {1: Conv1d, 2: Conv2d, 3: Conv3d}[ndim]
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    layer = cls(module.in_channels, module.out_channels, tuple(module.kernel_size), stride=tuple(module.stride),
                padding=padding, dilation=tuple(module.dilation), groups=module.groups,
                padding_mode=module.padding_mode, bias=module.bias is not None, dtype=dtype)
    layer.params["weight"].data[...] = _array(module.weight, dtype)
    if module.bias is not None:
        layer.params["bias"].data[...] = _array(module.bias, dtype)
    layer.build(input_shape)
    return layer


def _convert_conv_transpose(module, input_shape: tuple[int, ...], dtype: np.dtype) -> Module:
    if module.padding_mode != "zeros":
        raise TypeError(f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported "
                        "(PyTorch itself only implements 'zeros' for transposed convolutions)")
    ndim = len(module.kernel_size)
    cls = {1: ConvTranspose1d, 2: ConvTranspose2d, 3: ConvTranspose3d}[ndim]
    layer = cls(module.in_channels, module.out_channels, tuple(module.kernel_size), stride=tuple(module.stride),
                padding=tuple(module.padding), output_padding=tuple(module.output_padding),
                dilation=tuple(module.dilation), groups=module.groups, bias=module.bias is not None, dtype=dtype)
    layer.params["weight"].data[...] = _array(module.weight, dtype)
    if module.bias is not None:
        layer.params["bias"].data[...] = _array(module.bias, dtype)
    layer.build(input_shape)
    return layer


def _pool_args(module, name: str) -> tuple:
    if getattr(module, "ceil_mode", False):
        raise TypeError(f"{name} with ceil_mode=True is not supported (output sizes use floor)")
    return module.kernel_size, module.stride, module.padding


def _convert(module, input_shape: tuple[int, ...], dtype: np.dtype, torch) -> Module:
    nn = torch.nn
    name = type(module).__name__
    if isinstance(module, nn.Sequential):
        layers, shape = [], tuple(input_shape)
        for i, child in enumerate(module):
            try:
                layer = _convert(child, shape, dtype, torch)
            except TypeError as err:
                raise TypeError(f"Sequential item {i}: {err}") from err
            layers.append(layer)
            shape = layer.output_shape(shape)
        return Sequential(*layers)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _convert_conv(module, input_shape, dtype)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return _convert_conv_transpose(module, input_shape, dtype)
    if isinstance(module, nn.Linear):
        layer = Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        layer.params["weight"].data[...] = _array(module.weight, dtype)
        if module.bias is not None:
            layer.params["bias"].data[...] = _array(module.bias, dtype)
        return layer
    if isinstance(module, nn.AvgPool2d):
        if not module.count_include_pad or module.divisor_override is not None:
            raise TypeError("AvgPool2d is supported with count_include_pad=True and no divisor_override "
                            "(the average of a fixed matrix divides by the full window)")
        kernel, stride, padding = _pool_args(module, name)
        layer = AvgPool2d(kernel, stride, padding, dtype=dtype)
        layer.build(input_shape)
        return layer
    if isinstance(module, nn.MaxPool2d):
        if module.dilation not in (1, (1, 1)) or module.return_indices:
            raise TypeError("MaxPool2d is supported with dilation=1 and return_indices=False")
        kernel, stride, padding = _pool_args(module, name)
        layer = MaxPool2d(kernel, stride, padding, dtype=dtype)
        layer.build(input_shape)
        return layer
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise TypeError(f"Flatten is supported with start_dim=1, end_dim=-1; got {module.start_dim}, "
                            f"{module.end_dim}")
        return Flatten()
    simple = {nn.ReLU: ReLU, nn.Tanh: Tanh, nn.Sigmoid: Sigmoid}
    for torch_cls, ours in simple.items():
        if isinstance(module, torch_cls):
            return ours()
    raise TypeError(f"unsupported torch module {name}: from_torch converts Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
                    "Linear, AvgPool2d, "
                    "MaxPool2d, ReLU, Tanh, Sigmoid, Flatten and Sequential containers of them")


def from_torch(module, input_shape: tuple[int, ...], *, dtype: Optional[object] = None) -> Module:
    """Convert a ``torch.nn`` module (or ``Sequential`` of them) to sparseconv layers.

    Parameters
    ----------
    module : torch.nn.Module
        ``Conv1d``/``Conv2d``/``Conv3d`` (every option, padding modes included),
        ``ConvTranspose1d``/``2d``/``3d``, ``Linear``,
        ``AvgPool2d`` (``count_include_pad=True``), ``MaxPool2d``, ``ReLU``, ``Tanh``,
        ``Sigmoid``, ``Flatten`` or a ``Sequential`` of these.
    input_shape : tuple of int
        One sample's input shape, e.g. ``(3, 32, 32)``; sparse matrices are built for it.
    dtype : {float32, float64}, optional
        Default: the module's parameter dtype (float32 for a default PyTorch module).

    Returns
    -------
    Module
        A layer or :class:`~sparseconv.nn.Sequential` with copies of the parameters.

    Raises
    ------
    TypeError
        For a module type or option with no sparse equivalent, naming it.
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    if dtype is None:
        first = next(module.parameters(), None)
        dtype = np.float32 if first is None else str(first.dtype).replace("torch.", "")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64; got {dt}")
    return _convert(module, tuple(input_shape), dt, torch)
