"""PyTorch bridge, both ways: ``torch.nn`` modules in (:func:`from_torch`), torch modules out (:func:`to_torch`).

PyTorch is an optional extra (``pip install torch``, the CPU build is enough); it is imported
only when one of these functions is called.

:func:`from_torch` turns a module into sparseconv layers holding copies of its parameters,
with sparse matrices built for the given input shape, so the result can be compared with
PyTorch output for output and gradient for gradient. Pruning masks left by
``torch.nn.utils.prune`` become the layers' weight masks: pruned taps have no entries in the
matrices and zero gradient. Eval-mode batch normalisation is folded into the layer before it
(or becomes a per-channel affine layer).

:func:`to_torch` goes the other way: a sparseconv layer or network becomes a ``torch.nn.Module``
whose forward and backward run sparseconv's operators through ``torch.autograd.Function``
subclasses, so a sparse (pruned) network trains inside an ordinary PyTorch loop.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np

from . import nn as ours
from .nn import Module, Sequential
from .nn.layers import _ConvBase, _MaxPoolNd
from .testing import tolerance

__all__ = ["from_torch", "to_torch"]


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("the PyTorch bridge needs PyTorch: pip install torch (the CPU build is enough)") from None
    return torch


# ====================================================================== torch -> sparseconv
def _array(tensor, dtype: np.dtype) -> np.ndarray:
    """A numpy copy of a tensor in ``dtype``; float16/bfloat16 widen exactly through float32."""
    t = tensor.detach().cpu()
    if not t.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point tensor; got {t.dtype}")
    if t.itemsize < 4:
        # numpy has no bfloat16; every float16 and bfloat16 value is exactly a float32 value.
        t = t.float()
    return t.numpy().astype(dtype, copy=True)


def _pruned(module, name: str, dtype: np.dtype, prune_zeros: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A parameter's effective value and kept-entry mask (None: every entry kept).

    ``torch.nn.utils.prune`` replaces parameter ``name`` by ``name + "_orig"`` and a 0/1 buffer
    ``name + "_mask"``; the effective value is their product.
    """
    mask_t = getattr(module, name + "_mask", None)
    orig = getattr(module, name + "_orig", None)
    kept = None
    if mask_t is not None and orig is not None:
        mask_np = _array(mask_t, np.dtype(np.float64))
        if not np.all((mask_np == 0) | (mask_np == 1)):
            raise ValueError(f"{type(module).__name__}.{name}_mask must hold only 0 and 1 (a pruning mask); "
                             f"got values {np.unique(mask_np)[:5]}")
        kept = mask_np == 1
        value = np.where(kept, _array(orig, dtype), np.zeros((), dtype=dtype))
    else:
        value = _array(getattr(module, name), dtype)
    if prune_zeros:
        kept = (value != 0) if kept is None else (kept & (value != 0))
    return value, kept


def _refuse_pruned_bias(module) -> None:
    if hasattr(module, "bias_mask"):
        raise TypeError(f"{type(module).__name__} has a pruned bias (bias_mask): sparseconv's biases are one dense "
                        "value per output channel; make the pruning permanent with "
                        "torch.nn.utils.prune.remove(module, 'bias') first")


def _bn_scale_shift(bn) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode batch norm as ``y = scale * x + shift`` per channel, computed in float64."""
    var = _array(bn.running_var, np.dtype(np.float64))
    mean = _array(bn.running_mean, np.dtype(np.float64))
    scale = 1.0 / np.sqrt(var + bn.eps)
    if bn.affine:
        scale = scale * _array(bn.weight, np.dtype(np.float64))
    shift = -mean * scale
    if bn.affine:
        shift = shift + _array(bn.bias, np.dtype(np.float64))
    return scale, shift


def _check_batchnorm(bn) -> None:
    name = type(bn).__name__
    if bn.training:
        raise TypeError(f"{name} is in training mode (it normalises by batch statistics and updates its running "
                        "averages): call module.eval() before from_torch to use the running statistics")
    if not bn.track_running_stats or bn.running_mean is None:
        raise TypeError(f"{name} with track_running_stats=False normalises by batch statistics even in eval mode; "
                        "it has no fixed per-channel map to convert")


def _channel_affine(bn, input_shape: tuple[int, ...], dtype: np.dtype, torch) -> Module:
    """An eval-mode batch norm that has no layer to fold into: a per-channel affine layer."""
    _check_batchnorm(bn)
    if not input_shape or input_shape[0] != bn.num_features:
        raise TypeError(f"{type(bn).__name__}({bn.num_features}) cannot take samples of shape {tuple(input_shape)}")
    scale, shift = _bn_scale_shift(bn)
    return ours.ChannelAffine(scale.astype(dtype), shift.astype(dtype), dtype=dtype)


def _fold(weight: np.ndarray, bias: Optional[np.ndarray], scale: np.ndarray, shift: np.ndarray, out_axis: int,
          groups: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``scale * (W x + b) + shift`` as one layer: scale the output channels of ``W`` and ``b``.

    ``out_axis`` is the weight axis that indexes output channels: 0 for convolutions and linear
    layers; 1 for transposed convolutions, whose weight ``(C_in, C_out // groups, *k)`` holds
    output channel ``g * C_out // groups + j`` at ``[i, j]`` for input channel ``i`` of group ``g``.
    """
    w = weight.astype(np.float64)
    if out_axis == 0:
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        c_in, per_group = w.shape[:2]
        group_of_input = np.arange(c_in) // (c_in // groups)
        s = scale.reshape(groups, per_group)[group_of_input]
        w = w * s.reshape(s.shape + (1,) * (w.ndim - 2))
    b = np.zeros_like(scale) if bias is None else bias.astype(np.float64)
    return w.astype(dtype), (b * scale + shift).astype(dtype)


def _make_conv_layer(cls, module, options: dict, weight: np.ndarray, bias: Optional[np.ndarray],
                     kept: Optional[np.ndarray], input_shape: tuple[int, ...], dtype: np.dtype) -> Module:
    """A convolution layer with the given values and kept-tap mask, built for ``input_shape``."""
    layer = cls(module.in_channels, module.out_channels, tuple(module.kernel_size), **options,
                bias=bias is not None, weight_mask=kept, dtype=dtype)
    layer.params["weight"].data = weight
    if bias is not None:
        layer.params["bias"].data = bias
    layer.build(input_shape)
    return layer


def _convert_layer(module, bn, input_shape: tuple[int, ...], dtype: np.dtype, prune_zeros: bool, torch) -> Module:
    """A convolution, transposed convolution or linear layer, with ``bn`` (or None) folded in."""
    nn = torch.nn
    _refuse_pruned_bias(module)
    # sparseconv's Linear is dense: exact zeros stay values there (prune_zeros is for convolutions);
    # a torch pruning mask still becomes its weight_mask.
    weight, kept = _pruned(module, "weight", dtype, prune_zeros and not isinstance(module, nn.Linear))
    bias = None if module.bias is None else _array(module.bias, dtype)
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    if bn is not None:
        scale, shift = _bn_scale_shift(bn)
        groups = getattr(module, "groups", 1)
        weight, bias = _fold(weight, bias, scale, shift, 1 if transposed else 0, groups, dtype)
    if isinstance(module, nn.Linear):
        layer = ours.Linear(module.in_features, module.out_features, bias=bias is not None, weight_mask=kept,
                            dtype=dtype)
        layer.params["weight"].data = weight
        if bias is not None:
            layer.params["bias"].data = bias
        return layer
    ndim = len(module.kernel_size)
    if transposed:
        if module.padding_mode != "zeros":
            raise TypeError(f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported "
                            "(PyTorch itself only implements 'zeros' for transposed convolutions)")
        cls = {1: ours.ConvTranspose1d, 2: ours.ConvTranspose2d, 3: ours.ConvTranspose3d}[ndim]
        options = dict(stride=tuple(module.stride), padding=tuple(module.padding),
                       output_padding=tuple(module.output_padding), dilation=tuple(module.dilation),
                       groups=module.groups)
    else:
        cls = {1: ours.Conv1d, 2: ours.Conv2d, 3: ours.Conv3d}[ndim]
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        options = dict(stride=tuple(module.stride), padding=padding, dilation=tuple(module.dilation),
                       groups=module.groups, padding_mode=module.padding_mode)
    return _make_conv_layer(cls, module, options, weight, bias, kept, input_shape, dtype)


def _pool_args(module, name: str) -> tuple:
    if getattr(module, "ceil_mode", False):
        raise TypeError(f"{name} with ceil_mode=True is not supported (output sizes use floor)")
    return module.kernel_size, module.stride, module.padding


_SUPPORTED = ("Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, BatchNorm1d/2d/3d (eval mode: folded into the "
              "convolution or linear layer before it, else a ChannelAffine layer), AvgPool1d/2d/3d, MaxPool1d/2d/3d, "
              "AdaptiveAvgPool1d/2d/3d, ReLU, LeakyReLU, ELU, GELU, Softplus, Tanh, Sigmoid, Flatten, Dropout and "
              "Identity (eval mode), and Sequential or chain-like containers of them")


def _convert_single(module, input_shape: tuple[int, ...], dtype: np.dtype, prune_zeros: bool, torch) -> Module:
    nn = torch.nn
    name = type(module).__name__
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d, nn.Linear)):
        return _convert_layer(module, None, input_shape, dtype, prune_zeros, torch)
    avg = {nn.AvgPool1d: ours.AvgPool1d, nn.AvgPool2d: ours.AvgPool2d, nn.AvgPool3d: ours.AvgPool3d}
    if type(module) in avg:
        if not module.count_include_pad or getattr(module, "divisor_override", None) is not None:
            raise TypeError(f"{name} is supported with count_include_pad=True and no divisor_override "
                            "(the average of a fixed matrix divides by the full window)")
        kernel, stride, padding = _pool_args(module, name)
        layer = avg[type(module)](kernel, stride, padding, dtype=dtype)
        layer.build(input_shape)
        return layer
    pools = {nn.MaxPool1d: ours.MaxPool1d, nn.MaxPool2d: ours.MaxPool2d, nn.MaxPool3d: ours.MaxPool3d}
    if type(module) in pools:
        if np.any(np.asarray(module.dilation) != 1) or module.return_indices:
            raise TypeError(f"{name} is supported with dilation=1 and return_indices=False")
        kernel, stride, padding = _pool_args(module, name)
        layer = pools[type(module)](kernel, stride, padding, dtype=dtype)
        layer.build(input_shape)
        return layer
    adaptive = {nn.AdaptiveAvgPool1d: ours.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d: ours.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d: ours.AdaptiveAvgPool3d}
    if type(module) in adaptive:
        cls = adaptive[type(module)]
        size = module.output_size
        layer = cls(tuple(size) if isinstance(size, (tuple, list)) else size, dtype=dtype)
        layer.build(input_shape)
        return layer
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise TypeError(f"Flatten is supported with start_dim=1, end_dim=-1; got {module.start_dim}, "
                            f"{module.end_dim}")
        return ours.Flatten()
    if isinstance(module, nn.LeakyReLU):
        return ours.LeakyReLU(module.negative_slope)
    if isinstance(module, nn.ELU):
        return ours.ELU(module.alpha)
    if isinstance(module, nn.GELU):
        return ours.GELU(module.approximate)
    if isinstance(module, nn.Softplus):
        return ours.Softplus(module.beta, module.threshold)
    simple = {nn.ReLU: ours.ReLU, nn.Tanh: ours.Tanh, nn.Sigmoid: ours.Sigmoid}
    if type(module) in simple:
        return simple[type(module)]()
    raise TypeError(f"unsupported torch module {name}: from_torch converts {_SUPPORTED}")


def _is_batchnorm(module, torch) -> bool:
    nn = torch.nn
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


def _convert_chain(children: list, input_shape: tuple[int, ...], dtype: np.dtype, prune_zeros: bool,
                   torch, where: str) -> Sequential:
    """Convert modules applied one after the other; batch norms fold into the layer before them."""
    nn = torch.nn
    foldable = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Linear)
    layers, shape, i = [], tuple(input_shape), 0
    while i < len(children):
        child = children[i]
        following = children[i + 1] if i + 1 < len(children) else None
        if isinstance(child, foldable) and following is not None and _is_batchnorm(following, torch):
            try:
                _check_batchnorm(following)
            except TypeError as err:
                raise TypeError(f"{where} item {i + 1}: {err}") from err
        try:
            if isinstance(child, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                                  nn.Identity)):
                if child.training and not isinstance(child, nn.Identity):
                    raise TypeError(f"{type(child).__name__} is in training mode (it zeroes random activations): "
                                    "call module.eval() before from_torch; in eval mode it is the identity")
                i += 1
                continue
            if _is_batchnorm(child, torch):
                layer = _channel_affine(child, shape, dtype, torch)
                step = 1
            elif isinstance(child, foldable) and following is not None and _is_batchnorm(following, torch):
                layer = _convert_layer(child, following, shape, dtype, prune_zeros, torch)
                step = 2
            else:
                layer = _convert(child, shape, dtype, prune_zeros, torch)
                step = 1
        except TypeError as err:
            raise TypeError(f"{where} item {i}: {err}") from err
        layers.append(layer)
        shape = layer.output_shape(shape)
        i += step
    return Sequential(*layers)


def _verify_chain(module, converted: Module, input_shape: tuple[int, ...], torch) -> None:
    """Refuse a container whose forward is not its children applied in order (checked on one input)."""
    reference = copy.deepcopy(module).double()
    ours = copy.deepcopy(converted)
    x = np.random.default_rng(0).standard_normal((2, *input_shape))
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    got = ours.forward(x.astype(_layer_dtype(ours)))
    rtol, atol = tolerance(got.dtype)
    scale = max(float(np.max(np.abs(expected))), 1.0) if expected.size else 1.0
    # A wrong chain (a skipped functional op, a residual sum) is off by O(1); rounding is not.
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=100 * rtol, atol=100 * atol * scale):
        raise TypeError(f"{type(module).__name__}'s forward is not its children applied in order (checked on a "
                        "random input): from_torch converts a custom module only when its children() form a chain; "
                        "write it as an nn.Sequential")


def _layer_dtype(net: Module) -> np.dtype:
    for p in net.parameters():
        return p.data.dtype
    layers = net.layers if isinstance(net, Sequential) else [net]
    for layer in layers:
        if hasattr(layer, "dtype"):
            return np.dtype(layer.dtype)
    return np.dtype(np.float64)


def _convert(module, input_shape: tuple[int, ...], dtype: np.dtype, prune_zeros: bool, torch) -> Module:
    nn = torch.nn
    if isinstance(module, nn.Sequential):
        return _convert_chain(list(module), input_shape, dtype, prune_zeros, torch, "Sequential")
    children = list(module.children())
    if children and not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                            nn.ConvTranspose3d, nn.Linear)):
        net = _convert_chain(children, input_shape, dtype, prune_zeros, torch, type(module).__name__)
        _verify_chain(module, net, input_shape, torch)
        return net
    if _is_batchnorm(module, torch):
        return _channel_affine(module, input_shape, dtype, torch)
    if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)):
        if module.training and not isinstance(module, nn.Identity):
            raise TypeError(f"{type(module).__name__} is in training mode (it zeroes random activations): "
                            "call module.eval() before from_torch; in eval mode it is the identity")
        return ours.Identity()
    return _convert_single(module, input_shape, dtype, prune_zeros, torch)


def from_torch(module, input_shape: tuple[int, ...], *, dtype: Optional[object] = None,
               prune_zeros: bool = False) -> Module:
    """Convert a ``torch.nn`` module (or a chain of them) to sparseconv layers.

    Parameters
    ----------
    module : torch.nn.Module
        ``Conv1d``/``Conv2d``/``Conv3d`` (every option, padding modes included),
        ``ConvTranspose1d``/``2d``/``3d``, ``Linear``, ``AvgPool1d``/``2d``/``3d``
        (``count_include_pad=True``), ``MaxPool1d``/``2d``/``3d``,
        ``AdaptiveAvgPool1d``/``2d``/``3d`` (a fixed averaging matrix for the input shape),
        ``ReLU``, ``LeakyReLU``, ``ELU``, ``GELU``, ``Softplus``, ``Tanh``, ``Sigmoid``,
        ``Flatten``; ``BatchNorm1d``/``2d``/``3d`` in eval mode, folded exactly into the
        convolution or linear layer right before it in a chain, else a
        :class:`~sparseconv.nn.ChannelAffine` layer; ``Dropout`` and ``Identity`` in eval mode
        (dropped from a chain). A chain is an ``nn.Sequential`` or any module with children
        whose ``forward`` applies its children in registration order; that assumption is
        checked on a random input and the module refused when it does not hold (a residual
        sum, a functional op between children). Pruning masks left by
        ``torch.nn.utils.prune`` on weights become the layers' ``weight_mask``: the pruned taps
        get no entries in the (transposed) convolution matrices, are held at zero in ``Linear``
        layers' dense weights, and get zero gradient.
    input_shape : tuple of int
        One sample's input shape, e.g. ``(3, 32, 32)``; sparse matrices are built for it.
    dtype : {float32, float64}, optional
        Default: float64 when the module has a float64 parameter or buffer, else float32.
        float16 and bfloat16 modules are converted to float32 by default (every such value is
        exactly a float32 value); sparseconv computes in float32 or float64 only.
    prune_zeros : bool, default False
        Also treat convolution weights that are exactly zero as pruned (for a model pruned by
        writing zeros, or after ``torch.nn.utils.prune.remove``). ``Linear`` layers are dense
        in sparseconv and keep their zeros as values.

    Returns
    -------
    Module
        A layer or :class:`~sparseconv.nn.Sequential` with copies of the parameters (a
        parameter pruned by ``torch.nn.utils.prune`` becomes ``weight``, holding
        ``weight_orig * weight_mask``).

    Raises
    ------
    TypeError
        For a module type or option with no sparse equivalent, a training-mode batch norm or
        dropout, a pruned linear layer or bias, or a container that is not a chain, naming it
        and its position.
    ValueError
        For a pruning mask holding values other than 0 and 1.
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    if not isinstance(prune_zeros, bool):
        raise TypeError(f"prune_zeros must be a bool; got {prune_zeros!r}")
    if dtype is None:
        tensors = list(module.parameters()) + list(module.buffers())
        dt = np.dtype(np.float64) if any(t.dtype == torch.float64 for t in tensors) else np.dtype(np.float32)
    else:
        dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64; got {dt}")
    return _convert(module, tuple(input_shape), dt, prune_zeros, torch)


# ====================================================================== sparseconv -> torch
def _effective(tensor, mask: Optional[np.ndarray]) -> np.ndarray:
    """A tensor's values as the layer holds them: masked entries read as zero (a copy)."""
    values = tensor.detach().numpy()
    return values.copy() if mask is None else np.where(mask, values, np.zeros((), dtype=values.dtype))


def _functions(torch):
    """The autograd Functions, defined once torch is imported."""
    if _functions.cache is not None:
        return _functions.cache

    class ConvFunction(torch.autograd.Function):
        """A (transposed) convolution operator: forward, input gradient and kernel gradient from sparseconv."""

        @staticmethod
        def forward(ctx, x, weight, bias, op, mask):
            w = _effective(weight, mask)
            # An O(weights) comparison, cheap next to the O(matrix entries) product. The tensor's
            # version counter is not enough here: writes through .data (gradcheck's) bypass it.
            if not np.array_equal(op.weight, w):
                op.set_weight(w)
            y = op.forward(x.detach().numpy())
            if bias is not None:
                y += bias.detach().numpy().reshape((-1,) + (1,) * (y.ndim - 2))
            ctx.op, ctx.weight, ctx.mask = op, w, mask
            ctx.save_for_backward(x)
            return torch.from_numpy(y)

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            op = ctx.op
            if not np.array_equal(op.weight, ctx.weight):
                op.set_weight(ctx.weight)  # refreshed for another call since this forward
            dyn = np.ascontiguousarray(dy.detach().numpy())
            dx = dw = db = None
            if ctx.needs_input_grad[0]:
                dx = torch.from_numpy(np.ascontiguousarray(op.backward_input(dyn)))
            if ctx.needs_input_grad[1]:
                g = np.ascontiguousarray(op.weight_grad(x.detach().numpy(), dyn))
                if ctx.mask is not None:
                    g[~ctx.mask] = 0
                dw = torch.from_numpy(g)
            if ctx.needs_input_grad[2]:
                db = torch.from_numpy(np.ascontiguousarray(dyn.sum(axis=(0, *range(2, dyn.ndim)))))
            return dx, dw, db, None, None

    class LinearMapFunction(torch.autograd.Function):
        """A fixed linear operator (average, sum or adaptive pooling): forward and its adjoint."""

        @staticmethod
        def forward(ctx, x, op):
            ctx.op = op
            return torch.from_numpy(np.ascontiguousarray(op.forward(x.detach().numpy())))

        @staticmethod
        def backward(ctx, dy):
            dx = ctx.op.backward_input(np.ascontiguousarray(dy.detach().numpy()))
            return torch.from_numpy(np.ascontiguousarray(dx)), None

    class MaxPoolFunction(torch.autograd.Function):
        """Max pooling: each window's winner from sparseconv's operator, the gradient routed to it."""

        @staticmethod
        def forward(ctx, x, op):
            xn = x.detach().numpy()
            win = op.winners(xn)
            n, c = win.shape[:2]
            y = np.take_along_axis(xn.reshape(n, c, -1), win, axis=-1).reshape((n, *op.out_shape))
            ctx.save_for_backward(torch.from_numpy(win))
            ctx.in_shape = tuple(x.shape)
            return torch.from_numpy(y)

        @staticmethod
        def backward(ctx, dy):
            (win,) = ctx.saved_tensors
            n, c = win.shape[:2]
            dx = dy.new_zeros((n, c, int(np.prod(ctx.in_shape[2:]))))
            dx.scatter_add_(2, win, dy.reshape(n, c, -1))
            return dx.reshape(ctx.in_shape), None

    _functions.cache = (ConvFunction, LinearMapFunction, MaxPoolFunction)
    return _functions.cache


_functions.cache = None


def _check_input(x, dtype: np.dtype, owner: str, torch):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: input must be a torch.Tensor; got {type(x).__name__}")
    if x.device.type != "cpu":
        raise TypeError(f"{owner}: sparseconv runs on the CPU; got a tensor on {x.device}")
    expected = getattr(torch, dtype.name)
    if x.dtype != expected:
        raise TypeError(f"{owner}: input must have dtype {expected} (the layer's dtype); got {x.dtype}")
    return x.contiguous()


def _module_classes(torch):
    """The torch.nn.Module wrappers, defined once torch is imported."""
    if _module_classes.cache is not None:
        return _module_classes.cache
    ConvFunction, LinearMapFunction, MaxPoolFunction = _functions(torch)

    class LayerModule(torch.nn.Module):
        """Base: a sparseconv layer (a private copy) with its parameters as torch Parameters.

        Before each forward, a Parameter whose tensor ``_version`` changed since the layer last
        saw it (an optimiser step, any in-place write) is written into the layer
        (``Parameter.assign``), so ``module.layer`` always holds the trained values and
        rebuilds its operators' values from them.
        """

        def __init__(self, layer: Module):
            super().__init__()
            self.layer = layer
            self.dtype_np = _layer_dtype(layer)
            self._seen: dict[str, tuple[int, int]] = {}
            for name, p in layer.params.items():
                self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(np.array(p.data))))

        def _mask(self, name: str) -> Optional[np.ndarray]:
            return self.layer.params[name].mask

        def _sync(self, x, owner: str):
            x = _check_input(x, self.dtype_np, owner, torch)
            for name in self.layer.params:
                tensor = getattr(self, name)
                key = (id(tensor), tensor._version)
                if self._seen.get(name) != key:
                    self.layer.params[name].data = _effective(tensor, self._mask(name))
                    self._seen[name] = key
            return x

        def extra_repr(self) -> str:
            return repr(self.layer)

    class SparseConv(LayerModule):
        """A sparseconv (transposed) convolution layer: its operators through ConvFunction."""

        def forward(self, x):
            x = self._sync(x, type(self.layer).__name__)
            return ConvFunction.apply(x, self.weight, getattr(self, "bias", None),
                                      self.layer.build(tuple(x.shape[1:])), self._mask("weight"))

    class DenseLinear(LayerModule):
        """sparseconv's dense Linear layer: torch's own linear map on the same parameters."""

        def forward(self, x):
            x = self._sync(x, "Linear")
            mask = self._mask("weight")
            # Masked weights read as zero and get zero gradient, as weight_orig * weight_mask does.
            weight = self.weight if mask is None else self.weight * torch.tensor(mask)
            return torch.nn.functional.linear(x, weight, getattr(self, "bias", None))

    class SparseSubsampling(LayerModule):
        """LeNet-5's trainable sub-sampling: a fixed sum-pooling operator, then ``beta * . + bias`` per map."""

        def forward(self, x):
            x = self._sync(x, "Subsampling2d")
            down = LinearMapFunction.apply(x, self.layer.build(tuple(x.shape[1:])))
            return down * self.beta.reshape(-1, 1, 1) + self.bias.reshape(-1, 1, 1)

    class ChannelAffine(LayerModule):
        """Per-channel ``scale * x + shift`` on the same parameters."""

        def forward(self, x):
            x = self._sync(x, "ChannelAffine")
            view = (-1,) + (1,) * (x.ndim - 2)
            return x * self.scale.reshape(view) + self.shift.reshape(view)

    class SparsePool(torch.nn.Module):
        """A fixed pooling operator (average, sum, adaptive average or max) as a torch module."""

        def __init__(self, layer: Module):
            super().__init__()
            self.layer = layer
            self.dtype_np = np.dtype(layer.dtype)

        def forward(self, x):
            x = _check_input(x, self.dtype_np, type(self.layer).__name__, torch)
            op = self.layer.build(tuple(x.shape[1:]))
            if isinstance(self.layer, _MaxPoolNd):
                return MaxPoolFunction.apply(x, op)
            return LinearMapFunction.apply(x, op)

        def extra_repr(self) -> str:
            return repr(self.layer)

    _module_classes.cache = dict(SparseConv=SparseConv, DenseLinear=DenseLinear, SparseSubsampling=SparseSubsampling,
                                 ChannelAffine=ChannelAffine, SparsePool=SparsePool)
    return _module_classes.cache


_module_classes.cache = None


def _to_torch(layer: Module, torch, where: str, made: dict):
    """The torch module of ``layer``; one instance used twice gives one module used twice (tied)."""
    if id(layer) not in made:
        made[id(layer)] = _make_torch(layer, torch, where, made)
    return made[id(layer)]


def _make_torch(layer: Module, torch, where: str, made: dict):
    nn = torch.nn
    classes = _module_classes(torch)
    if isinstance(layer, Sequential):
        return nn.Sequential(*(_to_torch(child, torch, f"{where}Sequential item {i}: ", made)
                               for i, child in enumerate(layer)))
    if isinstance(layer, _ConvBase):
        return classes["SparseConv"](layer)
    if isinstance(layer, ours.Linear):
        return classes["DenseLinear"](layer)
    if isinstance(layer, ours.Subsampling2d):
        return classes["SparseSubsampling"](layer)
    if isinstance(layer, ours.ChannelAffine):
        return classes["ChannelAffine"](layer)
    if isinstance(layer, (ours.AvgPool1d, ours.AvgPool2d, ours.AvgPool3d, ours.SumPool2d, ours.AdaptiveAvgPool1d,
                          ours.AdaptiveAvgPool2d, ours.AdaptiveAvgPool3d, _MaxPoolNd)):
        return classes["SparsePool"](layer)
    if isinstance(layer, ours.LeakyReLU):
        return nn.LeakyReLU(layer.negative_slope)
    if isinstance(layer, ours.ELU):
        return nn.ELU(layer.alpha)
    if isinstance(layer, ours.GELU):
        return nn.GELU(layer.approximate)
    if isinstance(layer, ours.Softplus):
        return nn.Softplus(layer.beta, layer.threshold)
    if isinstance(layer, ours.Dropout):
        return nn.Dropout(layer.p).train(layer.training)
    simple = {ours.ReLU: nn.ReLU, ours.Tanh: nn.Tanh, ours.Sigmoid: nn.Sigmoid, ours.Flatten: nn.Flatten,
              ours.Identity: nn.Identity}
    if type(layer) in simple:
        return simple[type(layer)]()
    raise TypeError(f"{where}to_torch has no torch module for {type(layer).__name__}: it converts convolutions "
                    "and transposed convolutions, Linear, Subsampling2d, ChannelAffine, average, sum, adaptive "
                    "average and max pooling, the activations (ReLU, LeakyReLU, ELU, GELU, Softplus, Tanh, "
                    "Sigmoid), Flatten, Identity, Dropout and Sequential networks of them")


def to_torch(network: Module):
    """A ``torch.nn.Module`` that runs a sparseconv layer or network through its sparse operators.

    Each convolution becomes a module whose forward calls a ``torch.autograd.Function``: the
    output is the operator's ``forward``, the input gradient its ``backward_input`` and the
    kernel gradient its ``weight_grad`` (zero at masked taps, so pruned or unconnected weights
    stay zero under any torch optimiser). Pooling layers run their sparse operators the same
    way; ``Linear`` (dense in sparseconv too) and element-wise layers use torch's own.

    Parameters
    ----------
    network : Module
        A sparseconv layer or :class:`~sparseconv.nn.Sequential`. It is copied: training the
        returned module leaves ``network`` unchanged.

    Returns
    -------
    torch.nn.Module
        Same parameter names as ``network`` (``"0.weight"``...). Each ``torch.nn.Parameter``
        holds its own values; before a forward, every Parameter changed since the last one (an
        optimiser step, any in-place write) is written into the copy's layer (its ``layer``
        attribute), so the copy holds the trained values. Each forward hands the Parameters to the autograd Function, which refreshes the
        operator's values with ``set_weight`` when they changed (an O(weights) comparison, not
        the tensor's version counter, which writes through ``.data`` bypass). Masked taps read
        as zero, as ``weight_orig * weight_mask`` does in ``torch.nn.utils.prune``, and get zero
        gradient. Input: ``(N, *sample)`` tensors on the CPU in the network's dtype; the
        matrices are built per sample shape, as the layers do.

    Raises
    ------
    TypeError
        For a layer with no torch counterpart, naming it and its position; at forward, for an
        input on another device or in another dtype.
    """
    torch = _torch()
    if not isinstance(network, Module):
        raise TypeError(f"network must be a sparseconv Module (a layer or Sequential); got {type(network).__name__}")
    return _to_torch(copy.deepcopy(network), torch, "", {})
