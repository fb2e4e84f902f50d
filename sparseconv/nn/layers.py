"""Layers: convolutions and pooling through sparse operators, plus dense and element-wise layers.

Every layer takes and returns batches (``N`` first, ``N = 0`` allowed) in NC... layout and
computes in its own dtype (float64 unless asked; float32 stays float32).

Layers that own a sparse operator (convolutions, pooling, sub-sampling) derive from
:class:`OperatorLayer`: one operator per input shape, built on first use and kept in a small
cache; shape queries (:meth:`~OperatorLayer.output_shape`) are answered from the geometry
alone, without building anything; an operator's values are refreshed only when a parameter's
:attr:`~sparseconv.nn.Parameter.version` says they changed. Each forward call keeps its own
context (see :class:`~sparseconv.nn.Module`), so one instance may appear several times in a
network.

Each linear layer can also describe itself as a matrix on flattened samples
(:meth:`export`), which is how :func:`sparseconv.to_mlp` turns a network into an MLP.

Every layer also computes on *column blocks* ``(prod(sample), N)`` -- flattened samples as
columns, the layout of ``W @ X`` -- through ``forward_columns(X, shape)`` and
``backward_columns(D, shape)`` (see :class:`~sparseconv.nn.Module`): convolutions and
pooling as ``op @ X``, ``op.H @ D`` and the column-layout kernel gradient of their operator,
per-channel terms broadcast over the ``(C, prod(spatial), N)`` view, element-wise layers
unchanged. A :class:`~sparseconv.nn.Sequential` runs its layers this way by default.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
from scipy.special import erf

from ..conv import ConvOperator
from ..engines.base import aligned_empty, bias_relu_inplace
from ..engines.elementwise import (channel_affine, channel_affine_grad, channel_sums, sigmoid_grad, sigmoid_slope,
                                   tanh_grad, tanh_slope, window_affine, window_affine_grad)
from ..engines.numba import c_order
from ..geometry import (FLOAT_DTYPES, IntOrTuple, PaddingSpec, check_array_dtype, conv_geometry, normalize_padding,
                        normalize_tuple, parse_memory_budget, validate_conv_options)
from ..pooling import MaxPoolOperator, PoolOperator, pool_geometry
from .module import Module, Parameter

__all__ = [
    "ACTIVATIONS",
    "check_sample_shape",
    "adaptive_avg_pool_matrix",
    "OperatorLayer",
    "Activation",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "ChannelAffine",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Dropout",
    "ELU",
    "Flatten",
    "GELU",
    "Identity",
    "LeakyReLU",
    "Linear",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "ReLU",
    "Sigmoid",
    "Softplus",
    "Subsampling2d",
    "SumPool2d",
    "Tanh",
]

Seed = Union[None, int, np.random.Generator]


# ---------------------------------------------------------------------- validation helpers
def _float_dtype(dtype: object) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64; got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64; got {dt}")
    return dt


def _is_int(value: object) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _positive_int(value: object, name: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def _real(value: object, name: str, *, minimum: Optional[float] = None, strict: bool = False) -> float:
    """A finite real number (not a bool), optionally bounded below."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if minimum is not None and (v < minimum or (strict and v == minimum)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}; got {value!r}")
    return v


def _memory_budget(value: object) -> Optional[int]:
    """None (the operator's default budget) or bytes, parsed by :func:`~sparseconv.geometry.parse_memory_budget`."""
    return None if value is None else parse_memory_budget(value)


def _uniform(rng: np.random.Generator, bound: float, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def check_sample_shape(input_shape: tuple[int, ...], ndim: int, channels: Optional[int] = None) -> None:
    """Reject a sample shape that is not ``(channels, *spatial)`` with ``ndim`` spatial dims."""
    if len(input_shape) != ndim + 1 or (channels is not None and input_shape[0] != channels):
        expected = ", ".join([str(channels) if channels is not None else "C"] + ["*"] * ndim)
        raise ValueError(f"expected input of shape (N, {expected}) ({ndim} spatial dims); "
                         f"got a sample of shape {tuple(input_shape)}")


def _as_batch(x: object, dtype: Optional[np.dtype], name: str = "x") -> np.ndarray:
    """``x`` as an ndarray with a batch axis (``N = 0`` allowed), in ``dtype`` when given."""
    arr = np.asarray(x)
    if arr.ndim < 1:
        raise ValueError(f"{name} must be a batch of shape (N, ...); got a scalar")
    if dtype is None:
        if arr.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating array; got dtype {arr.dtype}")
        return arr
    return check_array_dtype(arr, dtype, name)


def _check_dy(layer: Module, dy: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The one check every ``backward`` makes: ``dy`` has the shape its forward produced."""
    arr = np.asarray(dy)
    if arr.shape != tuple(shape):
        raise ValueError(f"{type(layer).__name__}.backward: dy must have the shape of the matching forward's "
                         f"output, {tuple(shape)}; got {arr.shape}")
    return check_array_dtype(arr, dtype, "dy")


def _channel_view(values: np.ndarray, ndim: int) -> np.ndarray:
    """Per-channel values shaped to broadcast over ``(N, C, *spatial)`` with ``ndim`` spatial axes."""
    return values.reshape((-1,) + (1,) * ndim)


def _size(shape: Sequence[int]) -> int:
    """Entries of one sample of ``shape`` (1 for ``()``)."""
    return math.prod(int(v) for v in shape)


def _as_columns(X: object, shape: tuple[int, ...], dtype: Optional[np.dtype], name: str = "X") -> np.ndarray:
    """``X`` as a column block of samples of ``shape``: ``(prod(shape), N)``, in ``dtype`` when given."""
    arr = np.asarray(X)
    if dtype is None:
        if arr.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating array; got dtype {arr.dtype}")
    else:
        arr = check_array_dtype(arr, dtype, name)
    if arr.ndim != 2 or arr.shape[0] != _size(shape):
        raise ValueError(f"{name} must be a column block of shape ({_size(shape)}, N) for samples of shape "
                         f"{tuple(shape)}; got an array of shape {arr.shape}")
    return arr


def _check_columns_dy(layer: Module, D: object, shape: tuple[int, ...], given: Sequence[int], n: int,
                      dtype: np.dtype) -> np.ndarray:
    """The check every ``backward_columns`` makes: ``D`` is the block its forward produced."""
    arr = np.asarray(D)
    if tuple(given) != tuple(shape) or arr.shape != (_size(shape), n):
        raise ValueError(f"{type(layer).__name__}.backward_columns: D must have the shape of the matching "
                         f"forward's output, ({_size(shape)}, {n}) for samples of shape {tuple(shape)}; got "
                         f"{arr.shape} for samples of shape {tuple(given)}")
    return check_array_dtype(arr, dtype, "D")


# Engines that compute on the batch-first view of a column block (``X.T`` as ``(N, C, *in)``)
# and so run fastest when each sample is contiguous (the block F-contiguous); the others (the
# CSR kernel, compiled kernels) multiply N-wide rows and want it C-contiguous. On a 64->64 3x3
# 32x32 layer at N = 32 the factored products take 1.4-2x as long on a C-contiguous block as
# on an F-contiguous one, several times the cost of the copy. The kernel gradient's inputs
# are passed as they come: in a chain of one engine they are in its order already, and on
# the mixed pruned LeNet-5 (CSR products, factored gradient) converting them made the
# training step ~20% slower than not.
_BATCH_FIRST_ENGINES = frozenset({"factored"})


def _for_engine(A: np.ndarray, op: Any, product: str) -> np.ndarray:
    """``A`` in the memory order ``op``'s engine for ``product`` runs fastest on (a copy only if needed).

    A C-order copy is aligned and made by a tiled transpose (:func:`sparseconv.engines.numba.c_order`).
    """
    if op.engine(product) in _BATCH_FIRST_ENGINES:
        return np.asarray(A, order="F")
    return c_order(A)


# ---------------------------------------------------------------------- operator layers
class OperatorLayer(Module):
    """Base of layers that own a sparse operator per input shape.

    Subclasses implement :meth:`_make_operator` (build one for a sample shape),
    :meth:`_check_sample` and :meth:`output_shape` (from geometry, never by building), and,
    when the operator holds parameter values, :meth:`_operator_parameters` and
    :meth:`_refresh`.

    Notes
    -----
    The cache keeps the :data:`CACHE_SIZE` most recently used shapes. Each entry records the
    parameter versions its values were written from; :meth:`build` refreshes an entry whose
    versions are stale. A forward call keeps its entry and versions, so its backward uses the
    operator it ran with even if another shape has been built (or evicted) since, and refuses
    clearly if the parameters were changed between the two.
    """

    CACHE_SIZE = 4

    def __init__(self) -> None:
        super().__init__()
        self._operators: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self._last: Optional[list] = None

    # subclass hooks
    def _make_operator(self, input_shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _check_sample(self, input_shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def _operator_parameters(self) -> tuple[Parameter, ...]:
        """Parameters whose values the operator holds (refreshed when their version changes)."""
        return ()

    def _refresh(self, op: Any) -> None:
        """Write the current parameter values into ``op``."""

    def _versions(self) -> tuple[int, ...]:
        return tuple(p.version for p in self._operator_parameters())

    def _entry(self, input_shape: Sequence[int]) -> list:
        shape = tuple(int(v) for v in input_shape)
        self._check_sample(shape)
        versions = self._versions()
        entry = self._operators.get(shape)
        if entry is None:
            entry = [self._make_operator(shape), versions]
            self._operators[shape] = entry
            while len(self._operators) > self.CACHE_SIZE:
                self._operators.popitem(last=False)
        else:
            self._operators.move_to_end(shape)
            if entry[1] != versions:
                self._refresh(entry[0])
                entry[1] = versions
        self._last = entry
        return entry

    def build(self, input_shape: tuple[int, ...]) -> Any:
        """The sparse operator for one sample's input shape, built once per shape, values current."""
        return self._entry(input_shape)[0]

    @property
    def op(self) -> Any:
        """The operator most recently built or used (None before the first)."""
        return None if self._last is None else self._last[0]

    def _restore_entry(self, layout: str = "batch_first") -> tuple[list, Any]:
        """Pop this call's context and check that its operator still holds the forward's values."""
        entry, versions, ctx = self._restore(layout)
        if entry[1] != versions:
            raise ValueError(f"{self!r}: its parameters were changed between forward() and backward(); run "
                             "forward() again before backward()")
        return entry[0], ctx

    def _forward_batch(self, op: Any, x: np.ndarray) -> np.ndarray:
        """``op.forward(x)``, with an empty batch answered here (operators may refuse ``N = 0``)."""
        if x.shape[0] == 0:
            return np.zeros((0, *op.out_shape), dtype=self.dtype)
        return op.forward(x)

    def _backward_batch(self, op: Any, dy: np.ndarray) -> np.ndarray:
        if dy.shape[0] == 0:
            return np.zeros((0, *op.input_shape), dtype=self.dtype)
        return op.backward_input(dy)

    def export(self, input_shape: tuple[int, ...]) -> tuple[sp.csr_array, Optional[np.ndarray]]:
        """The layer as ``(matrix, bias)`` on flattened samples (a copy; bias None here)."""
        return sp.csr_array(self.build(input_shape).matrix, copy=True), None

    def connections(self, input_shape: tuple[int, ...]) -> int:
        """LeCun's connection count: stored entries of the matrix."""
        return int(self.build(input_shape).nnz)


# ---------------------------------------------------------------------- convolution
def _combined_mask(shape: tuple[int, ...], ndim: int, connection: Optional[np.ndarray],
                   weight_mask: Optional[np.ndarray], groups: int) -> Optional[np.ndarray]:
    """The element-wise mask of a weight of ``shape``: the connection table AND ``weight_mask``."""
    mask = None
    if connection is not None:
        table = np.asarray(connection)
        expected = (shape[0], shape[1] * groups)
        if table.dtype != bool or table.shape != expected:
            raise ValueError(f"connection must be a bool table of shape (out_channels, in_channels) = {expected}; "
                             f"got {table.dtype} array of shape {table.shape}")
        if groups != 1:
            raise ValueError(f"connection tables need groups=1; got groups={groups}")
        mask = np.broadcast_to(table.reshape(table.shape + (1,) * ndim), shape).copy()
    if weight_mask is not None:
        m = np.asarray(weight_mask)
        if m.dtype != bool or m.shape != shape:
            raise ValueError(f"weight_mask must be a bool array of the weight's shape {shape}; got {m.dtype} array "
                             f"of shape {m.shape}")
        mask = m.copy() if mask is None else mask & m
    return mask


class _WeightAndBias:
    """The ``weight`` (possibly masked) and optional ``bias`` parameters of a linear layer,
    initialised uniformly in ``+-1/sqrt(fan_in)`` as PyTorch does; masked weights start at zero
    and their :class:`Parameter` keeps them there."""

    params: dict
    dtype: np.dtype

    def _init_parameters(self, shape: tuple[int, ...], mask: Optional[np.ndarray], fan_in: int, bias: bool,
                         rng: Seed, n_bias: int) -> None:
        bound = 1.0 / np.sqrt(max(int(fan_in), 1))
        gen = np.random.default_rng(rng)
        weight = _uniform(gen, bound, shape, self.dtype)
        if mask is not None:
            weight[~mask] = 0
        self.params["weight"] = Parameter(weight, mask)
        if bias:
            self.params["bias"] = Parameter(_uniform(gen, bound, (n_bias,), self.dtype))

    @property
    def weight(self) -> Parameter:
        """The weight: a convolution's kernel, or a ``Linear`` layer's ``(out, in)`` matrix."""
        return self.params["weight"]

    @property
    def bias(self) -> Optional[Parameter]:
        """The per-channel (or per-output) bias, or None."""
        return self.params.get("bias")

    @property
    def weight_mask(self) -> Optional[np.ndarray]:
        """The element-wise mask in force (read-only; for convolutions the connection table and
        ``weight_mask`` combined), or None."""
        return self.weight.mask


class _ConvBase(_WeightAndBias, OperatorLayer):
    """What convolution and transposed-convolution layers share: weight, bias, mask, cache."""

    ndim = 0
    _option_defaults: dict[str, object] = {}

    def set_weight_mask(self, weight_mask: Optional[np.ndarray]) -> None:
        """Replace the element-wise mask (pruning); the connection table, if any, still applies.

        Weights where the new mask is False are set to zero and stay there; the cached
        operators are dropped and rebuilt with the new mask on next use.

        Parameters
        ----------
        weight_mask : ndarray of bool, shape of the weight, or None
        """
        mask = _combined_mask(self.weight.shape, self.ndim, self._connection, weight_mask, self._groups)
        self.weight._set_mask(mask)
        self._has_weight_mask = weight_mask is not None
        self._operators.clear()
        self._last = None

    def _operator_parameters(self) -> tuple[Parameter, ...]:
        return (self.weight,)

    def _refresh(self, op: Any) -> None:
        op.set_weight(self.weight.data)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, self.dtype)
        check_sample_shape(x.shape[1:], self.ndim, self.in_channels)
        entry = self._entry(x.shape[1:])
        op = entry[0]
        z = self._forward_batch(op, x)
        if self.bias is not None:
            z += _channel_view(self.bias.data, self.ndim)
        self._save((entry, entry[1], x))
        return z

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self._backward(dy, True)

    def parameter_grads(self, dy: np.ndarray) -> None:
        """The kernel and bias gradients of :meth:`backward`, without its adjoint product."""
        self._backward(dy, False)

    def _backward(self, dy: np.ndarray, input_grad: bool) -> Optional[np.ndarray]:
        op, x = self._restore_entry()
        dy = _check_dy(self, dy, (x.shape[0], *op.out_shape), self.dtype)
        self._release()
        if self.bias is not None:
            self.bias.grad += dy.sum(axis=(0, *range(2, dy.ndim)))
        if x.shape[0] == 0:
            return np.zeros(x.shape, dtype=self.dtype) if input_grad else None
        # Zero at masked weights already: the operator holds the same mask.
        self.weight.grad += op.weight_grad(x, dy)
        return op.backward_input(dy) if input_grad else None

    def _weight_grad_columns(self, op: Any, X: np.ndarray, D: np.ndarray) -> np.ndarray:
        """The kernel gradient from column blocks of inputs and output sensitivities."""
        return op.weight_grad(X, D, layout="columns")

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``op @ X`` plus the bias per output channel; see :meth:`~sparseconv.nn.Module.forward_columns`."""
        return self._forward_columns(X, shape, relu=False)

    def forward_columns_relu(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``max(op @ X + bias, 0)``: this layer and a following :class:`ReLU` in one call.

        :class:`~sparseconv.nn.Sequential` calls it for a ``Conv -> ReLU`` pair inside a
        column-layout network (and hands the result to :meth:`ReLU.record_columns` for the
        ReLU's backward) when :meth:`fuses_relu` and the ReLU's ``fusable()`` allow.
        The compiled engines add the bias and take the maximum as each output row is stored,
        so the pair costs one pass over memory; other engines make one in-place pass. Its
        backward is this layer's :meth:`backward_columns` (after the ReLU's).

        Parameters
        ----------
        X : ndarray of shape (prod(shape), N)
        shape : tuple of int
            One input sample's shape.

        Returns
        -------
        A : ndarray of shape (prod(out_shape), N)
        out_shape : tuple of int
        """
        return self._forward_columns(X, shape, relu=True)

    def fuses_relu(self) -> bool:
        """Whether :meth:`forward_columns_relu` is this layer's :meth:`forward_columns` followed by
        a ReLU: True unless a subclass changed what the column forward or backward computes."""
        cls = type(self)
        return (cls.forward_columns is _ConvBase.forward_columns and cls._forward_columns is _ConvBase._forward_columns
                and cls.forward_columns_relu is _ConvBase.forward_columns_relu
                and cls.backward_columns is _ConvBase.backward_columns)

    def _forward_columns(self, X: np.ndarray, shape: tuple[int, ...], relu: bool) -> tuple[np.ndarray, tuple[int, ...]]:
        shape = tuple(shape)
        check_sample_shape(shape, self.ndim, self.in_channels)
        X = _as_columns(X, shape, self.dtype)
        entry = self._entry(shape)
        op = entry[0]
        X = _for_engine(X, op, "forward")
        bias = None if self.bias is None else self.bias.data
        if hasattr(op, "affine"):
            Y = op.affine(X, bias, relu=relu)
        else:  # a transposed convolution: the product, then in place on the fresh block
            Y = bias_relu_inplace(op.matmat(X), bias, relu)
        self._save((entry, entry[1], X), "columns")
        return Y, tuple(op.out_shape)

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``op.H @ D``; adds the kernel gradient (column layout) and the bias gradient."""
        return self._backward_columns(D, shape, True)

    def parameter_grads_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> None:
        """The kernel and bias gradients of :meth:`backward_columns`, without its adjoint product."""
        self._backward_columns(D, shape, False)

    def _backward_columns(self, D: np.ndarray, shape: tuple[int, ...], input_grad: bool) -> Optional[np.ndarray]:
        op, X = self._restore_entry("columns")
        n = X.shape[1]
        D = _check_columns_dy(self, D, op.out_shape, shape, n, self.dtype)
        self._release()
        if self.bias is not None:
            # Summed in float64 (one compiled pass over a C-ordered block).
            self.bias.grad += channel_sums(D, self.out_channels)
        if n == 0:
            return np.zeros(X.shape, dtype=self.dtype) if input_grad else None
        # Zero at masked weights already: the operator holds the same mask.
        self.weight.grad += self._weight_grad_columns(op, X, D)
        return op.rmatmat(_for_engine(D, op, "adjoint")) if input_grad else None

    def export(self, input_shape: tuple[int, ...]) -> tuple[sp.csr_array, Optional[np.ndarray]]:
        """The layer as ``(matrix, bias)`` on flattened samples (bias repeated per position)."""
        op = self.build(input_shape)
        bias = None
        if self.bias is not None:
            bias = np.repeat(self.bias.data, int(np.prod(op.out_shape[1:])))
        return sp.csr_array(op.matrix, copy=True), bias

    def connections(self, input_shape: tuple[int, ...]) -> int:
        """LeCun's connection count: ``nnz`` of the matrix plus the biased outputs."""
        op = self.build(input_shape)
        return int(op.nnz) + (int(np.prod(op.out_shape)) if self.bias is not None else 0)

    def _check_sample(self, input_shape: tuple[int, ...]) -> None:
        check_sample_shape(input_shape, self.ndim, self.in_channels)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v != self._option_defaults[k])
        extras = ""
        if self._connection is not None:
            extras += ", connection=table"
        if self._has_weight_mask:
            extras += ", weight_mask=mask"
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
                f"{', ' + opts if opts else ''}{extras}{'' if self.bias is not None else ', bias=False'})")


class _ConvNd(_ConvBase):
    """Shared implementation of :class:`Conv1d`, :class:`Conv2d` and :class:`Conv3d`."""

    _option_defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "padding_mode": "zeros",
                        "flip": False}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
                 padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros",
                 flip: bool = False, bias: bool = True, connection: Optional[np.ndarray] = None,
                 weight_mask: Optional[np.ndarray] = None, input_size: Optional[Sequence[int]] = None,
                 dtype: object = np.float64, rng: Seed = None, memory_budget: Optional[int] = None):
        super().__init__()
        validate_conv_options(self.ndim, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, padding_mode=padding_mode, flip=flip, in_channels=in_channels,
                              out_channels=out_channels)
        in_channels, out_channels, groups = int(in_channels), int(out_channels), int(groups)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool; got {bias!r}")
        self.dtype = _float_dtype(dtype)
        self.memory_budget = _memory_budget(memory_budget)
        kernel = normalize_tuple(kernel_size, self.ndim, "kernel_size")
        self.options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                            padding_mode=padding_mode, flip=flip)
        shape = (out_channels, in_channels // groups, *kernel)
        self._connection = None if connection is None else np.asarray(connection).copy()
        self._groups = groups
        self._has_weight_mask = weight_mask is not None
        mask = _combined_mask(shape, self.ndim, connection, weight_mask, groups)
        # fan-in counts only the connected inputs, so partially connected maps start at the
        # same scale as fully connected ones (LeCun 1998 sets the range by fan-in too); an
        # element-wise weight_mask (pruning) masks an initialisation of the unpruned scale.
        if connection is not None:
            structural = _combined_mask(shape, self.ndim, connection, None, groups)
            fan_in = int(structural.reshape(out_channels, -1).sum(axis=1).min())
        else:
            fan_in = int(np.prod(shape[1:]))
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self._init_parameters(shape, mask, fan_in, bool(bias), rng, out_channels)
        if input_size is not None:
            self.build((in_channels, *normalize_tuple(input_size, self.ndim, "input_size")))

    def _make_operator(self, input_shape: tuple[int, ...]) -> ConvOperator:
        return ConvOperator(self.weight.data, input_shape, weight_mask=self.weight.mask,
                            memory_budget=self.memory_budget, **self.options)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        check_sample_shape(input_shape, self.ndim, self.in_channels)
        return conv_geometry(self.weight.shape, input_shape, **self.options).output_shape


class Conv1d(_ConvNd):
    """1-D convolution through its sparse matrix.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or tuple of int
    stride, padding, dilation, groups, padding_mode, flip
        As for :class:`sparseconv.ConvOperator`; validated at construction.
    bias : bool, default True
    connection : ndarray of bool, shape (out_channels, in_channels), optional
        Which (output map, input map) pairs are connected; unconnected pairs have no entries
        in the matrix and no trainable weights (LeNet-5's C3). Needs ``groups=1``.
    weight_mask : ndarray of bool, shape of the weight ``(F, C // groups, *kernel)``, optional
        Element-wise mask (pruning): weights where it is False have no entries in the matrix,
        are held at exactly zero and get zero gradient. Combined with ``connection`` (both
        must allow a weight).
    input_size : tuple of int, optional
        Build the matrix now instead of at the first forward.
    dtype : {float64, float32}
    rng : int or numpy Generator, optional
        Seeds the uniform ``+-1/sqrt(fan_in)`` initialisation.
    memory_budget : int, optional
        Bytes each operator may use (see :class:`sparseconv.ConvOperator`).

    Notes
    -----
    ``x : ndarray of shape (N, C, L)`` -> ``(N, F, Lo)``.
    """

    ndim = 1


class Conv2d(_ConvNd):
    """2-D convolution through its sparse matrix; parameters as :class:`Conv1d`.

    Notes
    -----
    ``x : ndarray of shape (N, C, H, W)`` -> ``(N, F, Ho, Wo)``.
    """

    ndim = 2


class Conv3d(_ConvNd):
    """3-D convolution through its sparse matrix; parameters as :class:`Conv1d`.

    Notes
    -----
    ``x : ndarray of shape (N, C, D, H, W)`` -> ``(N, F, Do, Ho, Wo)``.
    """

    ndim = 3


# ---------------------------------------------------------------------- dense
class Linear(_WeightAndBias, Module):
    """Fully connected layer ``y = x @ W.T + b``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    weight_mask : ndarray of bool, shape (out_features, in_features), optional
        Element-wise mask (pruning): weights where it is False are held at exactly zero
        (assigning or loading non-zero values there is refused) and get zero gradient, as
        ``weight_orig * weight_mask`` does in ``torch.nn.utils.prune``. The matrix stays dense.
    dtype : {float64, float32}
    rng : int or numpy Generator, optional

    Notes
    -----
    ``x : ndarray of shape (N, in_features)`` -> ``(N, out_features)``; weight
    ``(out_features, in_features)``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 weight_mask: Optional[np.ndarray] = None, dtype: object = np.float64, rng: Seed = None):
        super().__init__()
        in_features = _positive_int(in_features, "in_features")
        out_features = _positive_int(out_features, "out_features")
        shape = (out_features, in_features)
        if weight_mask is not None:
            mask = np.asarray(weight_mask)
            if mask.dtype != bool or mask.shape != shape:
                raise ValueError(f"weight_mask must be a bool array of the weight's shape (out_features, "
                                 f"in_features) = {shape}; got {mask.dtype} array of shape {mask.shape}")
            weight_mask = mask.copy()
        self.dtype = _float_dtype(dtype)
        self.in_features, self.out_features = in_features, out_features
        self._init_parameters(shape, weight_mask, in_features, bias, rng, out_features)

    def _add_weight_grad(self, grad: np.ndarray) -> None:
        """Accumulate a weight gradient, zero at masked weights."""
        if self.weight.mask is not None:
            grad[~self.weight.mask] = 0
        self.weight.grad += grad

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"expected samples of shape ({self.in_features},); got {tuple(input_shape)}")
        return (self.out_features,)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, self.dtype)
        if x.shape[1:] != (self.in_features,):
            raise ValueError(f"x must have shape (N, {self.in_features}); got {x.shape}")
        y = x @ self.params["weight"].data.T
        if "bias" in self.params:
            y += self.params["bias"].data
        self._save((x, self.params["weight"].version))
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self._backward(dy, True)

    def parameter_grads(self, dy: np.ndarray) -> None:
        """The weight and bias gradients of :meth:`backward`, without ``dy @ W``."""
        self._backward(dy, False)

    def _backward(self, dy: np.ndarray, input_grad: bool) -> Optional[np.ndarray]:
        x, version = self._restore()
        if version != self.params["weight"].version:
            raise ValueError(f"{self!r}: its parameters were changed between forward() and backward(); run "
                             "forward() again before backward()")
        dy = _check_dy(self, dy, (x.shape[0], self.out_features), self.dtype)
        self._release()
        self._add_weight_grad(dy.T @ x)
        if "bias" in self.params:
            self.params["bias"].grad += dy.sum(axis=0)
        return dy @ self.params["weight"].data if input_grad else None

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``W @ X + b``; see :meth:`~sparseconv.nn.Module.forward_columns`."""
        if tuple(shape) != (self.in_features,):
            raise ValueError(f"expected samples of shape ({self.in_features},); got {tuple(shape)}")
        X = _as_columns(X, shape, self.dtype)
        Y = self.params["weight"].data @ X
        if "bias" in self.params:
            Y += self.params["bias"].data[:, None]
        self._save((X, self.params["weight"].version), "columns")
        return Y, (self.out_features,)

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``W.T @ D``; adds ``D @ X.T`` to the weight's gradient and ``D``'s row sums to the bias's."""
        return self._backward_columns(D, shape, True)

    def parameter_grads_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> None:
        """The weight and bias gradients of :meth:`backward_columns`, without ``W.T @ D``."""
        self._backward_columns(D, shape, False)

    def _backward_columns(self, D: np.ndarray, shape: tuple[int, ...], input_grad: bool) -> Optional[np.ndarray]:
        X, version = self._restore("columns")
        if version != self.params["weight"].version:
            raise ValueError(f"{self!r}: its parameters were changed between forward() and backward(); run "
                             "forward() again before backward()")
        D = _check_columns_dy(self, D, (self.out_features,), shape, X.shape[1], self.dtype)
        self._release()
        self._add_weight_grad(D @ X.T)
        if "bias" in self.params:
            self.params["bias"].grad += D.sum(axis=1)
        return self.params["weight"].data.T @ D if input_grad else None

    def export(self, input_shape: tuple[int, ...]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """``(W, b)`` as dense arrays (copies)."""
        self.output_shape(input_shape)
        bias = self.params["bias"].data.copy() if "bias" in self.params else None
        return self.params["weight"].data.copy(), bias

    def connections(self, input_shape: tuple[int, ...]) -> int:
        """The unmasked weights (``in * out`` without a mask) plus the biased outputs."""
        self.output_shape(input_shape)
        return self.weight.size + (self.out_features if "bias" in self.params else 0)

    def __repr__(self) -> str:
        return (f"Linear({self.in_features}, {self.out_features}"
                f"{', weight_mask=mask' if self.weight.mask is not None else ''}"
                f"{'' if 'bias' in self.params else ', bias=False'})")


# ---------------------------------------------------------------------- pooling
class _PoolBase(OperatorLayer):
    """Options and shapes shared by the fixed (average/sum) and max pooling layers."""

    ndim = 0

    def __init__(self, kernel_size: IntOrTuple, stride: Optional[IntOrTuple] = None, padding: PaddingSpec = 0, *,
                 dtype: object = np.float64):
        super().__init__()
        self.dtype = _float_dtype(dtype)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        # Validate every option now, on a synthetic input large enough for any window.
        kernel = normalize_tuple(kernel_size, self.ndim, "kernel_size")
        step = kernel if stride is None else normalize_tuple(stride, self.ndim, "stride")
        pads = normalize_padding(padding, kernel, step, (1,) * self.ndim)
        pool_geometry((1, *[k + lo + hi + 1 for k, (lo, hi) in zip(kernel, pads)]), kernel_size, stride=stride,
                      padding=padding)

    def _check_sample(self, input_shape: tuple[int, ...]) -> None:
        check_sample_shape(input_shape, self.ndim)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        self._check_sample(input_shape)
        return pool_geometry(input_shape, self.kernel_size, stride=self.stride, padding=self.padding).output_shape

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kernel_size={self.kernel_size!r}, stride={self.stride!r}, "
                f"padding={self.padding!r})")


class _FixedPool(_PoolBase):
    """Average / sum pooling through a fixed sparse matrix."""

    kind = ""

    def _make_operator(self, input_shape: tuple[int, ...]) -> PoolOperator:
        return PoolOperator(input_shape, self.kernel_size, stride=self.stride, padding=self.padding, kind=self.kind,
                            dtype=self.dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, self.dtype)
        check_sample_shape(x.shape[1:], self.ndim)
        entry = self._entry(x.shape[1:])
        self._save((entry, entry[1], x.shape[0]))
        return self._forward_batch(entry[0], x)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        op, n = self._restore_entry()
        dy = _check_dy(self, dy, (n, *op.out_shape), self.dtype)
        self._release()
        return self._backward_batch(op, dy)

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``op @ X`` (the pooling matrix on every column); see :meth:`~sparseconv.nn.Module.forward_columns`."""
        shape = tuple(shape)
        self._check_sample(shape)
        X = _as_columns(X, shape, self.dtype)
        entry = self._entry(shape)
        op = entry[0]
        if hasattr(op, "engine"):
            X = _for_engine(X, op, "forward")
        self._save((entry, entry[1], X.shape[1]), "columns")
        return op.matmat(X), tuple(op.out_shape)

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``op.H @ D``: each output's sensitivity spread over its window."""
        op, n = self._restore_entry("columns")
        D = _check_columns_dy(self, D, op.out_shape, shape, n, self.dtype)
        self._release()
        return op.rmatmat(_for_engine(D, op, "adjoint") if hasattr(op, "engine") else D)


class AvgPool1d(_FixedPool):
    """Average pooling, ``x : (N, C, L) -> (N, C, Lo)``; zero padding counts in the mean.

    Parameters
    ----------
    kernel_size : int or tuple of int
    stride : int or tuple of int, optional
        Defaults to ``kernel_size``.
    padding : int, tuple or str, default 0
    dtype : {float64, float32}

    Notes
    -----
    PyTorch's ``AvgPool1d/2d/3d`` with ``count_include_pad=True`` and ``ceil_mode=False``.
    """

    ndim = 1
    kind = "avg"


class AvgPool2d(_FixedPool):
    """Average pooling, ``x : (N, C, H, W) -> (N, C, Ho, Wo)``; parameters as :class:`AvgPool1d`."""

    ndim = 2
    kind = "avg"


class AvgPool3d(_FixedPool):
    """Average pooling, ``x : (N, C, D, H, W) -> (N, C, Do, Ho, Wo)``; parameters as :class:`AvgPool1d`."""

    ndim = 3
    kind = "avg"


class SumPool2d(_FixedPool):
    """Sum pooling, ``x : (N, C, H, W) -> (N, C, Ho, Wo)``; parameters as :class:`AvgPool1d`."""

    ndim = 2
    kind = "sum"


class _MaxPoolNd(_PoolBase):
    """Max pooling through a per-batch selection matrix.

    Ties go to the first position of the window in row-major order (see
    :class:`sparseconv.pooling.MaxPoolOperator`). Max pooling is not linear, so
    :func:`sparseconv.to_mlp` refuses it. Each forward keeps its own selection matrix, so one
    instance may be used twice in a network.
    """

    def _make_operator(self, input_shape: tuple[int, ...]) -> MaxPoolOperator:
        return MaxPoolOperator(input_shape, self.kernel_size, stride=self.stride, padding=self.padding,
                               dtype=self.dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, self.dtype)
        check_sample_shape(x.shape[1:], self.ndim)
        entry = self._entry(x.shape[1:])
        op = entry[0]
        if x.shape[0] == 0:
            y, selection = np.zeros((0, *op.out_shape), dtype=self.dtype), None
        else:
            y = op.forward(x)
            selection = op.selection_matrix()
        self._save((entry, entry[1], (x.shape, selection)))
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        op, (x_shape, selection) = self._restore_entry()
        dy = _check_dy(self, dy, (x_shape[0], *op.out_shape), self.dtype)
        self._release()
        if selection is None:
            return np.zeros(x_shape, dtype=self.dtype)
        return np.asarray(selection.T @ dy.reshape(-1)).reshape(x_shape)

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """Each output copies its window's winner; see :meth:`~sparseconv.nn.Module.forward_columns`.

        The winners are the operator's (:meth:`~sparseconv.pooling.MaxPoolOperator.winners`, on
        the batch-first view of ``X``), so ties and NaN are resolved as in :meth:`forward`.
        """
        shape = tuple(shape)
        self._check_sample(shape)
        X = _as_columns(X, shape, self.dtype)
        entry = self._entry(shape)
        op = entry[0]
        n, c = X.shape[1], shape[0]
        out = tuple(op.out_shape)
        if n == 0:
            rows = None
            Y = np.zeros((_size(out), 0), dtype=self.dtype)
        else:
            win = op.winners(X.T.reshape((n, *shape)))
            # The input row each output row copies, per sample: (C * prod(out), N).
            rows = (win.transpose(1, 2, 0) + (np.arange(c) * _size(shape[1:]))[:, None, None]).reshape(_size(out), n)
            Y = X[rows, np.arange(n)]
        self._save((entry, entry[1], (X.shape, rows)), "columns")
        return Y, out

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Each sensitivity routed to the input its output copied (sums where winners are shared)."""
        op, (x_shape, rows) = self._restore_entry("columns")
        D = _check_columns_dy(self, D, op.out_shape, shape, x_shape[1], self.dtype)
        self._release()
        if rows is None:
            return np.zeros(x_shape, dtype=self.dtype)
        n = x_shape[1]
        flat = (rows * n + np.arange(n)).ravel()
        dx = np.bincount(flat, weights=D.ravel(), minlength=x_shape[0] * n)
        return dx.astype(self.dtype, copy=False).reshape(x_shape)


class MaxPool1d(_MaxPoolNd):
    """Max pooling, ``x : (N, C, L) -> (N, C, Lo)``.

    Parameters
    ----------
    kernel_size : int or tuple of int
    stride : int or tuple of int, optional
        Defaults to ``kernel_size``.
    padding : int, tuple or str, default 0
        Padded positions never win.
    dtype : {float64, float32}

    Notes
    -----
    PyTorch's ``MaxPool1d/2d/3d`` with ``dilation=1`` and ``ceil_mode=False``. Ties go to the
    first position of the window in row-major order; not linear, so
    :func:`sparseconv.to_mlp` refuses it.
    """

    ndim = 1


class MaxPool2d(_MaxPoolNd):
    """Max pooling, ``x : (N, C, H, W) -> (N, C, Ho, Wo)``; parameters as :class:`MaxPool1d`."""

    ndim = 2


class MaxPool3d(_MaxPoolNd):
    """Max pooling, ``x : (N, C, D, H, W) -> (N, C, Do, Ho, Wo)``; parameters as :class:`MaxPool1d`."""

    ndim = 3


def adaptive_avg_pool_matrix(in_size: Sequence[int], out_size: Sequence[int], *,
                             dtype: object = np.float64) -> sp.csr_array:
    """The averaging matrix of adaptive average pooling on one channel's spatial positions.

    Parameters
    ----------
    in_size, out_size : sequence of int
        Spatial sizes, one entry per dimension (1 to 3), all positive.
    dtype : {float64, float32}

    Returns
    -------
    scipy.sparse.csr_array of shape (prod(out_size), prod(in_size))
        Row ``o`` averages the window ``[floor(o i / m), ceil((o + 1) i / m))`` along each
        dimension (``i`` input, ``m`` output size): PyTorch's rule for
        ``adaptive_avg_pool1d/2d/3d``. Windows may overlap when ``i`` is not a multiple of
        ``m``; the matrix is the Kronecker product of one such matrix per dimension.

    Examples
    --------
    >>> adaptive_avg_pool_matrix((5,), (3,)).toarray()
    array([[0.5       , 0.5       , 0.        , 0.        , 0.        ],
           [0.        , 0.        , 1.        , 0.        , 0.        ],
           [0.        , 0.        , 0.        , 0.5       , 0.5       ]])
    """
    dt = _float_dtype(dtype)
    in_size, out_size = tuple(in_size), tuple(out_size)
    if len(in_size) != len(out_size) or not 1 <= len(in_size) <= 3:
        raise ValueError(f"in_size and out_size must have the same length, 1 to 3; got {in_size} and {out_size}")
    for name, sizes in (("in_size", in_size), ("out_size", out_size)):
        if not all(_is_int(v) and v >= 1 for v in sizes):
            raise ValueError(f"{name} must hold positive ints; got {sizes}")
    matrix = sp.csr_array(np.ones((1, 1), dtype=dt))
    for i, m in zip(in_size, out_size):
        o = np.arange(m)
        start = (o * i) // m
        end = -((-(o + 1) * i) // m)
        counts = end - start
        rows = np.repeat(o, counts)
        cols = np.concatenate([np.arange(s, e) for s, e in zip(start, end)])
        values = np.repeat(1.0 / counts, counts).astype(dt)
        axis = sp.csr_array((values, (rows, cols)), shape=(m, i))
        matrix = sp.csr_array(sp.kron(matrix, axis, format="csr"))
    return matrix.astype(dt)


class _ChannelwiseOperator:
    """The same spatial matrix applied to every channel of every sample (adaptive pooling)."""

    def __init__(self, spatial: sp.csr_array, input_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.spatial = spatial
        self.spatial_t = sp.csr_array(spatial.T)
        self.input_shape, self.out_shape = input_shape, out_shape
        self.dtype = spatial.dtype

    @property
    def matrix(self) -> sp.csr_array:
        """Block diagonal over channels: ``kron(I_C, spatial)``."""
        return sp.csr_array(sp.kron(sp.eye_array(self.input_shape[0], dtype=self.dtype), self.spatial, format="csr"))

    @property
    def nnz(self) -> int:
        return int(self.spatial.nnz) * self.input_shape[0]

    def forward(self, x: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        y = self.spatial @ x.reshape(n * c, -1).T
        return np.ascontiguousarray(y.T).reshape((n, *self.out_shape))

    def backward_input(self, dy: np.ndarray) -> np.ndarray:
        n, c = dy.shape[:2]
        dx = self.spatial_t @ dy.reshape(n * c, -1).T
        return np.ascontiguousarray(dx.T).reshape((n, *self.input_shape))

    def _blocks(self) -> tuple[sp.csr_array, sp.csr_array]:
        """``kron(I_C, spatial)`` and its transpose, built at the first column product."""
        if getattr(self, "_block_matrices", None) is None:
            m = self.matrix
            self._block_matrices = (m, sp.csr_array(m.T))
        return self._block_matrices

    def matmat(self, X: np.ndarray) -> np.ndarray:
        """The pooling of column blocks, ``(C * prod(in), N) -> (C * prod(out), N)``."""
        return np.asarray(self._blocks()[0] @ X)

    def rmatmat(self, D: np.ndarray) -> np.ndarray:
        """The transpose on column blocks, ``(C * prod(out), N) -> (C * prod(in), N)``."""
        return np.asarray(self._blocks()[1] @ D)


class _AdaptiveAvgPoolNd(_FixedPool):
    """Adaptive average pooling through a fixed averaging matrix per input shape."""

    kind = "adaptive"

    def __init__(self, output_size: Union[int, Sequence[Optional[int]]], *, dtype: object = np.float64):
        OperatorLayer.__init__(self)
        self.dtype = _float_dtype(dtype)
        if _is_int(output_size):
            sizes: tuple = (int(output_size),) * self.ndim
        elif isinstance(output_size, (tuple, list)) and len(output_size) == self.ndim:
            sizes = tuple(None if v is None else v for v in output_size)
        else:
            raise TypeError(f"output_size must be an int or a sequence of {self.ndim} ints (None keeps the "
                            f"input size); got {output_size!r}")
        for v in sizes:
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"output_size must hold positive ints (or None); got {output_size!r}")
        self.output_size = tuple(None if v is None else int(v) for v in sizes)

    def _out_size(self, in_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(i if m is None else m for i, m in zip(in_size, self.output_size))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        self._check_sample(input_shape)
        return (input_shape[0], *self._out_size(input_shape[1:]))

    def _check_sample(self, input_shape: tuple[int, ...]) -> None:
        check_sample_shape(input_shape, self.ndim)
        if any(v < 1 for v in input_shape):
            raise ValueError(f"input sizes must be positive; got a sample of shape {input_shape}")

    def _make_operator(self, input_shape: tuple[int, ...]) -> _ChannelwiseOperator:
        out = self._out_size(input_shape[1:])
        spatial = adaptive_avg_pool_matrix(input_shape[1:], out, dtype=self.dtype)
        return _ChannelwiseOperator(spatial, input_shape, (input_shape[0], *out))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(output_size={self.output_size!r})"


class AdaptiveAvgPool1d(_AdaptiveAvgPoolNd):
    """Adaptive average pooling to a fixed output size, ``x : (N, C, L) -> (N, C, *output_size)``.

    Parameters
    ----------
    output_size : int or tuple of (int or None)
        Output size per spatial dimension; ``None`` keeps that dimension's input size.
    dtype : {float64, float32}

    Notes
    -----
    PyTorch's window rule: output ``o`` of a dimension with input size ``i`` and output size
    ``m`` averages ``[floor(o i / m), ceil((o + 1) i / m))``. For a given input shape this is
    a fixed matrix (:func:`adaptive_avg_pool_matrix` per channel), so
    :func:`sparseconv.to_mlp` exports it.
    """

    ndim = 1


class AdaptiveAvgPool2d(_AdaptiveAvgPoolNd):
    """Adaptive average pooling, ``x : (N, C, H, W) -> (N, C, *output_size)``; see :class:`AdaptiveAvgPool1d`."""

    ndim = 2


class AdaptiveAvgPool3d(_AdaptiveAvgPoolNd):
    """Adaptive average pooling, ``x : (N, C, D, H, W) -> (N, C, *output_size)``; see :class:`AdaptiveAvgPool1d`."""

    ndim = 3


class Subsampling2d(OperatorLayer):
    """LeNet-5 / Bouvrie trainable sub-sampling: ``out[c] = beta[c] * down(x)[c] + b[c]``.

    ``down`` sums each ``kernel_size`` window (non-overlapping by default), as LeNet-5's S2
    and S4 do ("the four inputs are added, multiplied by a trainable coefficient, and added
    to a trainable bias").

    Parameters
    ----------
    channels : int
    kernel_size : int or tuple of int, default 2
    stride : int or tuple of int, optional
        Defaults to ``kernel_size``.
    dtype : {float64, float32}

    Notes
    -----
    ``x : ndarray of shape (N, C, H, W)``. With ``delta = dJ/dout``:
    ``dJ/dbeta[c] = sum(delta[:, c] * down(x)[:, c])``, ``dJ/db[c] = sum(delta[:, c])`` and
    ``dJ/dx = P.T @ (beta * delta)``. ``beta`` starts at ``1 / window`` (an average) and ``b`` at 0.
    """

    def __init__(self, channels: int, kernel_size: IntOrTuple = 2, stride: Optional[IntOrTuple] = None, *,
                 dtype: object = np.float64):
        super().__init__()
        channels = _positive_int(channels, "channels")
        self.dtype = _float_dtype(dtype)
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        kernel = normalize_tuple(kernel_size, 2, "kernel_size")
        step = kernel if stride is None else normalize_tuple(stride, 2, "stride")
        pool_geometry((channels, *[k + s for k, s in zip(kernel, step)]), kernel_size, stride=stride)
        window = int(np.prod(kernel))
        self.params["beta"] = Parameter(np.full(channels, 1.0 / window, dtype=self.dtype))
        self.params["bias"] = Parameter(np.zeros(channels, dtype=self.dtype))

    def _check_sample(self, input_shape: tuple[int, ...]) -> None:
        check_sample_shape(input_shape, 2, self.channels)

    def _make_operator(self, input_shape: tuple[int, ...]) -> PoolOperator:
        return PoolOperator(input_shape, self.kernel_size, stride=self.stride, kind="sum", dtype=self.dtype)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        self._check_sample(input_shape)
        return pool_geometry(input_shape, self.kernel_size, stride=self.stride).output_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, self.dtype)
        self._check_sample(x.shape[1:])
        entry = self._entry(x.shape[1:])
        down = self._forward_batch(entry[0], x)
        beta, b = self.params["beta"].data, self.params["bias"].data
        self._save((entry, entry[1], (down, self.params["beta"].version)))
        return down * beta[:, None, None] + b[:, None, None]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self._backward(dy, True)

    def parameter_grads(self, dy: np.ndarray) -> None:
        """The gradients of ``beta`` and ``b`` of :meth:`backward`, without ``P.T @ (beta * dy)``."""
        self._backward(dy, False)

    def _backward(self, dy: np.ndarray, input_grad: bool) -> Optional[np.ndarray]:
        op, (down, beta_version) = self._restore_entry()
        if beta_version != self.params["beta"].version:
            raise ValueError(f"{self!r}: its parameters were changed between forward() and backward(); run "
                             "forward() again before backward()")
        dy = _check_dy(self, dy, down.shape, self.dtype)
        self._release()
        self.params["beta"].grad += (dy * down).sum(axis=(0, 2, 3))
        self.params["bias"].grad += dy.sum(axis=(0, 2, 3))
        return self._backward_batch(op, dy * self.params["beta"].data[:, None, None]) if input_grad else None

    def _window(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, int], tuple[int, int]]:
        """The output sample shape for input samples of ``shape`` (checked once per shape), the
        window and the stride."""
        cache = self.__dict__.setdefault("_windows", {})
        if shape not in cache:
            out = self.output_shape(shape)
            kernel = normalize_tuple(self.kernel_size, 2, "kernel_size")
            cache[shape] = (out, kernel, kernel if self.stride is None else normalize_tuple(self.stride, 2, "stride"))
        return cache[shape]

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``beta * down(X) + b`` per channel, one pass (:func:`~sparseconv.engines.elementwise.window_affine`);
        see :meth:`~sparseconv.nn.Module.forward_columns`.

        The window sums are the same sums as the pooling matrix's product in :meth:`forward`,
        added in another order (equal to rounding).
        """
        shape = tuple(shape)
        out, kernel, stride = self._window(shape)
        X = _as_columns(X, shape, self.dtype)
        down, Y = window_affine(X, shape, kernel, stride, self.params["beta"].data, self.params["bias"].data)
        self._save((shape, down, self.params["beta"].version), "columns")
        return Y, out

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``P.T @ (beta * D)``; adds the gradients of ``beta`` and ``b`` (summed in float64)."""
        return self._backward_columns(D, shape, True)

    def parameter_grads_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> None:
        """The gradients of ``beta`` and ``b`` of :meth:`backward_columns`, without ``P.T @ (beta * D)``."""
        self._backward_columns(D, shape, False)

    def _backward_columns(self, D: np.ndarray, shape: tuple[int, ...], input_grad: bool) -> Optional[np.ndarray]:
        in_shape, down, beta_version = self._restore("columns")
        if beta_version != self.params["beta"].version:
            raise ValueError(f"{self!r}: its parameters were changed between forward() and backward(); run "
                             "forward() again before backward()")
        out, kernel, stride = self._window(in_shape)
        D = _check_columns_dy(self, D, out, shape, down.shape[1], self.dtype)
        self._release()
        dX, dbeta, dbias = window_affine_grad(D, down, in_shape, kernel, stride, self.params["beta"].data, input_grad)
        self.params["beta"].grad += dbeta
        self.params["bias"].grad += dbias
        return dX

    def export(self, input_shape: tuple[int, ...]) -> tuple[sp.csr_array, np.ndarray]:
        """``diag(beta per map) @ P_sum``: each entry is tied to its map's ``beta``."""
        op = self.build(input_shape)
        per_map = int(np.prod(op.out_shape[1:]))
        scale = sp.diags_array(np.repeat(self.params["beta"].data, per_map)).tocsr()
        return sp.csr_array(scale @ op.matrix), np.repeat(self.params["bias"].data, per_map)

    def connections(self, input_shape: tuple[int, ...]) -> int:
        """Stored entries of the sum matrix plus the biased outputs."""
        op = self.build(input_shape)
        return int(op.nnz) + int(np.prod(op.out_shape))

    def __repr__(self) -> str:
        return f"Subsampling2d({self.channels}, kernel_size={self.kernel_size!r})"


# ---------------------------------------------------------------------- per-channel affine
class ChannelAffine(Module):
    """Per-channel scale and shift, ``y[:, c] = scale[c] * x[:, c] + shift[c]``.

    What a batch-normalisation layer computes in evaluation mode
    (``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``)
    when it cannot be folded into the layer before it. Both are trainable.

    Parameters
    ----------
    scale : array_like of shape (C,)
    shift : array_like of shape (C,), optional
        Default zeros.
    dtype : {float64, float32}, optional
        Default: ``scale``'s dtype when it is float32 or float64, else float64.

    Notes
    -----
    ``x : ndarray of shape (N, C, *spatial)`` with any number (0 to 3) of spatial axes.
    """

    def __init__(self, scale: object, shift: Optional[object] = None, *, dtype: object = None):
        super().__init__()
        s = np.asarray(scale)
        if s.dtype.kind not in "iuf" or s.ndim != 1 or s.size < 1:
            raise ValueError(f"scale must be a real 1-D array with one value per channel; got {s.dtype} array of "
                             f"shape {s.shape}")
        if dtype is None:
            dtype = s.dtype if s.dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.float64
        self.dtype = _float_dtype(dtype)
        self.channels = int(s.size)
        b = np.zeros(self.channels) if shift is None else np.asarray(shift)
        if b.dtype.kind not in "iuf" or b.shape != (self.channels,):
            raise ValueError(f"shift must be a real array of shape ({self.channels},) like scale; got {b.dtype} "
                             f"array of shape {b.shape}")
        for name, v in (("scale", s), ("shift", b)):
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{name} must be finite")
        self.params["scale"] = Parameter(s.astype(self.dtype))
        self.params["shift"] = Parameter(b.astype(self.dtype))

    def _check(self, input_shape: tuple[int, ...]) -> None:
        if not 1 <= len(input_shape) <= 4 or input_shape[0] != self.channels:
            raise ValueError(f"expected input of shape (N, {self.channels}, *spatial) with 0 to 3 spatial dims; got a "
                             f"sample of shape {tuple(input_shape)}")

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        self._check(input_shape)
        return input_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, self.dtype)
        self._check(x.shape[1:])
        nd = x.ndim - 2
        self._save((x, self.params["scale"].version))
        return x * _channel_view(self.params["scale"].data, nd) + _channel_view(self.params["shift"].data, nd)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self._backward(dy, True)

    def parameter_grads(self, dy: np.ndarray) -> None:
        """The gradients of ``scale`` and ``shift`` of :meth:`backward`, without ``scale * dy``."""
        self._backward(dy, False)

    def _backward(self, dy: np.ndarray, input_grad: bool) -> Optional[np.ndarray]:
        x, version = self._restore()
        if version != self.params["scale"].version:
            raise ValueError(f"{self!r}: its parameters were changed between forward() and backward(); run "
                             "forward() again before backward()")
        dy = _check_dy(self, dy, x.shape, self.dtype)
        self._release()
        axes = (0, *range(2, x.ndim))
        self.params["scale"].grad += (dy * x).sum(axis=axes)
        self.params["shift"].grad += dy.sum(axis=axes)
        return dy * _channel_view(self.params["scale"].data, x.ndim - 2) if input_grad else None

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``scale * X + shift`` per channel on the ``(C, positions, N)`` view."""
        shape = tuple(shape)
        self._check(shape)
        X = _as_columns(X, shape, self.dtype)
        self._save((X, shape, self.params["scale"].version), "columns")
        return channel_affine(X, self.params["scale"].data, self.params["shift"].data), shape

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``scale * D`` per channel; adds the gradients of ``scale`` and ``shift`` (summed in float64)."""
        return self._backward_columns(D, shape, True)

    def parameter_grads_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> None:
        """The gradients of ``scale`` and ``shift`` of :meth:`backward_columns`, without ``scale * D``."""
        self._backward_columns(D, shape, False)

    def _backward_columns(self, D: np.ndarray, shape: tuple[int, ...], input_grad: bool) -> Optional[np.ndarray]:
        X, x_shape, version = self._restore("columns")
        if version != self.params["scale"].version:
            raise ValueError(f"{self!r}: its parameters were changed between forward() and backward(); run "
                             "forward() again before backward()")
        D = _check_columns_dy(self, D, x_shape, shape, X.shape[1], self.dtype)
        self._release()
        dX, dscale, dshift = channel_affine_grad(D, X, self.params["scale"].data, input_grad)
        self.params["scale"].grad += dscale
        self.params["shift"].grad += dshift
        return dX

    def export(self, input_shape: tuple[int, ...]) -> tuple[sp.csr_array, np.ndarray]:
        """``diag(scale per position)`` and the shift repeated per position."""
        shape = self.output_shape(input_shape)
        per = int(np.prod(shape[1:]))
        matrix = sp.diags_array(np.repeat(self.params["scale"].data, per)).tocsr()
        return sp.csr_array(matrix), np.repeat(self.params["shift"].data, per)

    def __repr__(self) -> str:
        return f"ChannelAffine({self.channels})"


# ---------------------------------------------------------------------- element-wise
def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Two branches so that exp never overflows for large |z|.
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


# name -> (f(z), f'(z) expressed through z and a = f(z)), for the activations without options
ACTIVATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "relu": (lambda z: np.maximum(z, 0), lambda z, a: (z > 0).astype(z.dtype)),
    "sigmoid": (_sigmoid, lambda z, a: sigmoid_slope(a)),
    "tanh": (np.tanh, lambda z, a: tanh_slope(a)),
}


# name -> f as a ufunc call taking ``out`` (the activations that are one ufunc).
_UFUNCS: dict[str, Callable[..., np.ndarray]] = {"tanh": np.tanh, "relu": lambda z, out: np.maximum(z, 0, out=out)}

# name -> D * f'(z) from f's output in one pass (sparseconv.engines.elementwise), for the
# activations whose derivative is a function of the output alone.
_CHAINED: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"tanh": tanh_grad, "sigmoid": sigmoid_grad}


def _times(d: np.ndarray, D: np.ndarray, fresh: bool) -> np.ndarray:
    """``D * d``; into ``d`` when ``fresh`` (``d`` came from a built-in derivative, which returns a
    new array nothing else holds) and ``d`` has the result's shape and dtype: the activations'
    backward without one more temporary. A subclass's derivative may return an array it keeps
    (a cache, a saved input), so its ``d`` is never written."""
    if fresh and d.shape == np.shape(D) and d.dtype == np.result_type(d, D):
        return np.multiply(d, D, out=d)
    return D * d


class Activation(Module):
    """An element-wise activation; any input shape, computed in the input's floating dtype.

    Subclasses set :attr:`name` (a key of :data:`ACTIVATIONS`) or override :meth:`function`
    and :meth:`derivative`.
    """

    name = ""

    def function(self, z: np.ndarray) -> np.ndarray:
        """``f(z)`` element-wise."""
        return ACTIVATIONS[self.name][0](z)

    def derivative(self, z: np.ndarray, a: np.ndarray) -> np.ndarray:
        """``f'(z)`` element-wise, given ``a = f(z)``."""
        return ACTIVATIONS[self.name][1](z, a)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, None)
        a = self._apply(x)
        self._save((x, a))
        return a

    def _apply(self, z: np.ndarray) -> np.ndarray:
        """``f(z)``; the built-in ufunc activations of a C-contiguous block write into a reused
        aligned block (:func:`~sparseconv.engines.base.aligned_empty`: no fresh pages, same bits)."""
        ufunc = _UFUNCS.get(self.name) if type(self).function is Activation.function else None
        if ufunc is not None and z.flags.c_contiguous and z.dtype.kind == "f":
            return ufunc(z, out=aligned_empty(z.shape, z.dtype))
        return self.function(z)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        z, a = self._restore()
        dy = _check_dy(self, dy, z.shape, z.dtype)
        self._release()
        return self._chain(z, a, dy)

    def _chain(self, z: np.ndarray, a: np.ndarray, D: np.ndarray) -> np.ndarray:
        """``D * f'(z)``: one compiled pass for the built-in tanh and sigmoid derivatives (the
        same bits as numpy's), else the derivative times ``D``."""
        builtin = type(self).derivative is Activation.derivative
        fused = _CHAINED.get(self.name) if builtin else None
        # The compiled passes take native float32/float64 (not float16, longdouble or
        # byte-swapped arrays, which the forward accepts).
        if fused is not None and D.dtype == a.dtype and a.dtype in FLOAT_DTYPES:
            return fused(D, a)
        return _times(self.derivative(z, a), D, builtin)

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``f(X)`` element-wise (the layout does not matter); see :meth:`~sparseconv.nn.Module.forward_columns`."""
        shape = tuple(shape)
        X = _as_columns(X, shape, None)
        a = self._apply(X)
        self._save((X, a, shape), "columns")
        return a, shape

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``D * f'(X)`` element-wise."""
        z, a, z_shape = self._restore("columns")
        D = _check_columns_dy(self, D, z_shape, shape, z.shape[1], z.dtype)
        self._release()
        return self._chain(z, a, D)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReLU(Activation):
    """``max(z, 0)``."""

    name = "relu"

    def record_columns(self, A: np.ndarray, shape: tuple[int, ...]) -> None:
        """Record a forward computed by the layer before it (``A = max(Z, 0)``) for :meth:`backward_columns`.

        What :class:`~sparseconv.nn.Sequential` calls after a fused ``Conv -> ReLU`` pair
        (see :meth:`Conv2d.forward_columns_relu <sparseconv.nn.Conv2d.forward_columns_relu>`):
        the derivative ``Z > 0`` is ``A > 0`` (where ``Z <= 0`` or is NaN, both are False), so
        the output alone serves as the saved input.

        Parameters
        ----------
        A : ndarray of shape (prod(shape), N)
        shape : tuple of int
        """
        shape = tuple(shape)
        self._save((A, A, shape), "columns")

    def recorded_blocks(self) -> list[np.ndarray]:
        """The blocks :meth:`record_columns` saved for backward calls not yet made."""
        return [ctx[0] for layout, ctx in self._saved if layout == "columns" and ctx[0] is ctx[1]]

    def fusable(self) -> bool:
        """Whether the layer before may compute this ReLU itself (:meth:`record_columns`): True
        unless a subclass changed what the forward or the derivative computes."""
        cls = type(self)
        return (self.name == "relu" and cls.function is Activation.function and cls.derivative is Activation.derivative
                and cls.forward_columns is Activation.forward_columns
                and cls.backward_columns is Activation.backward_columns)


class Sigmoid(Activation):
    """``1 / (1 + exp(-z))``, computed without overflow."""

    name = "sigmoid"


class Tanh(Activation):
    """``tanh(z)``."""

    name = "tanh"


class LeakyReLU(Activation):
    """``z`` for ``z > 0``, ``negative_slope * z`` otherwise (PyTorch's ``LeakyReLU``).

    Parameters
    ----------
    negative_slope : float, default 0.01
    """

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = _real(negative_slope, "negative_slope")

    def function(self, z: np.ndarray) -> np.ndarray:
        return np.where(z > 0, z, z * z.dtype.type(self.negative_slope))

    def derivative(self, z: np.ndarray, a: np.ndarray) -> np.ndarray:
        return np.where(z > 0, z.dtype.type(1), z.dtype.type(self.negative_slope))

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope!r})"


class ELU(Activation):
    """``z`` for ``z > 0``, ``alpha * (exp(z) - 1)`` otherwise (PyTorch's ``ELU``).

    Parameters
    ----------
    alpha : float, default 1.0
    """

    name = "elu"

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = _real(alpha, "alpha")

    def function(self, z: np.ndarray) -> np.ndarray:
        alpha = z.dtype.type(self.alpha)
        return np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0)))

    def derivative(self, z: np.ndarray, a: np.ndarray) -> np.ndarray:
        alpha = z.dtype.type(self.alpha)
        return np.where(z > 0, z.dtype.type(1), alpha * np.exp(np.minimum(z, 0)))

    def __repr__(self) -> str:
        return f"ELU(alpha={self.alpha!r})"


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class GELU(Activation):
    """Gaussian error linear unit, ``z * Phi(z)`` (PyTorch's ``GELU``).

    Parameters
    ----------
    approximate : {"none", "tanh"}, default "none"
        ``"none"``: ``0.5 z (1 + erf(z / sqrt 2))``; ``"tanh"``:
        ``0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3)))``.
    """

    name = "gelu"

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh'; got {approximate!r}")
        self.approximate = approximate

    def function(self, z: np.ndarray) -> np.ndarray:
        t = z.dtype.type
        if self.approximate == "tanh":
            u = t(_SQRT_2_OVER_PI) * (z + t(0.044715) * z ** 3)
            return t(0.5) * z * (1 + np.tanh(u))
        return t(0.5) * z * (1 + erf(z / t(math.sqrt(2.0))))

    def derivative(self, z: np.ndarray, a: np.ndarray) -> np.ndarray:
        t = z.dtype.type
        if self.approximate == "tanh":
            u = t(_SQRT_2_OVER_PI) * (z + t(0.044715) * z ** 3)
            th = np.tanh(u)
            du = t(_SQRT_2_OVER_PI) * (1 + t(3 * 0.044715) * z * z)
            return t(0.5) * (1 + th) + t(0.5) * z * (1 - th * th) * du
        cdf = t(0.5) * (1 + erf(z / t(math.sqrt(2.0))))
        pdf = np.exp(t(-0.5) * z * z) / t(math.sqrt(2.0 * math.pi))
        return cdf + z * pdf

    def __repr__(self) -> str:
        return f"GELU(approximate={self.approximate!r})"


class Softplus(Activation):
    """``log(1 + exp(beta z)) / beta``, and ``z`` where ``beta z > threshold`` (PyTorch's ``Softplus``).

    Parameters
    ----------
    beta : float, default 1.0
        Positive.
    threshold : float, default 20.0
    """

    name = "softplus"

    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        super().__init__()
        self.beta = _real(beta, "beta", minimum=0.0, strict=True)
        self.threshold = _real(threshold, "threshold")

    def function(self, z: np.ndarray) -> np.ndarray:
        t = z.dtype.type
        bz = t(self.beta) * z
        return np.where(bz > t(self.threshold), z, np.logaddexp(t(0), bz) / t(self.beta))

    def derivative(self, z: np.ndarray, a: np.ndarray) -> np.ndarray:
        t = z.dtype.type
        bz = t(self.beta) * z
        return np.where(bz > t(self.threshold), t(1), _sigmoid(bz))

    def __repr__(self) -> str:
        return f"Softplus(beta={self.beta!r}, threshold={self.threshold!r})"


# ---------------------------------------------------------------------- shape-only and identity-like
class Flatten(Module):
    """``(N, *shape) -> (N, prod(shape))`` in C order (a no-op on flattened samples)."""

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(np.prod(input_shape)),)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"Flatten needs a batch of shape (N, ...); got shape {x.shape}")
        self._save((x.shape, x.dtype))
        return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        shape, dtype = self._restore()
        dy = _check_dy(self, dy, (shape[0], int(np.prod(shape[1:]))), dtype)
        self._release()
        return dy.reshape(shape)

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``X`` itself: a column block already holds flattened samples."""
        shape = tuple(shape)
        if len(shape) < 1:
            raise ValueError("Flatten needs a batch of shape (N, ...); got samples of shape ()")
        X = _as_columns(X, shape, None)
        self._save((shape, X.shape[1], X.dtype), "columns")
        return X, (_size(shape),)

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``D`` itself."""
        x_shape, n, dtype = self._restore("columns")
        D = _check_columns_dy(self, D, (_size(x_shape),), shape, n, dtype)
        self._release()
        return D

    def __repr__(self) -> str:
        return "Flatten()"


class Identity(Module):
    """``y = x`` for any input (PyTorch's ``Identity``); exported as no stage at all."""

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, None)
        self._save((x.shape, x.dtype))
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        shape, dtype = self._restore()
        dy = _check_dy(self, dy, shape, dtype)
        self._release()
        return dy

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``X`` itself."""
        shape = tuple(shape)
        X = _as_columns(X, shape, None)
        self._save((shape, X.shape[1], X.dtype), "columns")
        return X, shape

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``D`` itself."""
        x_shape, n, dtype = self._restore("columns")
        D = _check_columns_dy(self, D, x_shape, shape, n, dtype)
        self._release()
        return D

    def __repr__(self) -> str:
        return "Identity()"


class Dropout(Module):
    """Inverted dropout: in training mode each entry is zeroed with probability ``p`` and the
    survivors are scaled by ``1 / (1 - p)``; in evaluation mode (:meth:`eval`) the identity.

    Parameters
    ----------
    p : float, default 0.5
        Drop probability in ``[0, 1]`` (``p = 1`` outputs zeros in training mode).
    rng : int or numpy Generator, optional
        Seeds the masks: a seeded layer draws the same sequence of masks in every run.

    Notes
    -----
    The backward pass multiplies ``dy`` by the same mask and scale as its forward call. Only
    in evaluation mode (or with ``p = 0``) is the layer a fixed linear map, so
    :func:`sparseconv.to_mlp` exports it then (as no stage) and refuses it in training mode.
    """

    def __init__(self, p: float = 0.5, *, rng: Seed = None):
        super().__init__()
        p = _real(p, "p", minimum=0.0)
        if p > 1:
            raise ValueError(f"p must be a probability in [0, 1]; got {p!r}")
        self.p = p
        self._rng = np.random.default_rng(rng)

    @property
    def is_identity(self) -> bool:
        """True when the layer currently passes its input through unchanged (eval mode or ``p = 0``)."""
        return not self.training or self.p == 0

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_batch(x, None)
        if self.is_identity:
            self._save((x.shape, x.dtype, None))
            return x
        scale = self._scale(x.shape, x.dtype)
        self._save((x.shape, x.dtype, scale))
        return x * scale

    def backward(self, dy: np.ndarray) -> np.ndarray:
        shape, dtype, scale = self._restore()
        dy = _check_dy(self, dy, shape, dtype)
        self._release()
        return dy if scale is None else dy * scale

    def _scale(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The mask-and-scale array of one training-mode call on a batch of ``shape``."""
        keep = self._rng.random(shape) >= self.p
        if self.p == 1:
            return np.zeros(shape, dtype=dtype)
        return keep.astype(dtype) / dtype.type(1 - self.p)

    def forward_columns(self, X: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``X`` times the mask and scale; see :meth:`~sparseconv.nn.Module.forward_columns`.

        The mask is drawn over the batch-first shape ``(N, *shape)`` and used transposed, so a
        seeded layer drops the same entries in either layout.
        """
        shape = tuple(shape)
        X = _as_columns(X, shape, None)
        n = X.shape[1]
        if self.is_identity:
            self._save((shape, n, X.dtype, None), "columns")
            return X, shape
        scale = self._scale((n, *shape), X.dtype).reshape(n, _size(shape)).T
        self._save((shape, n, X.dtype, scale), "columns")
        return X * scale, shape

    def backward_columns(self, D: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``D`` times the forward call's mask and scale."""
        x_shape, n, dtype, scale = self._restore("columns")
        D = _check_columns_dy(self, D, x_shape, shape, n, dtype)
        self._release()
        return D if scale is None else D * scale

    def __repr__(self) -> str:
        return f"Dropout(p={self.p!r})"
