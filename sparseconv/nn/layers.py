"""Layers: convolutions and pooling through sparse operators, plus dense and element-wise layers.

Every layer takes and returns batches (``N`` first) in NCHW layout and computes in its own
dtype (float64 unless asked; float32 stays float32). Convolution and pooling layers build
their sparse operator for the input size they first see (or the ``input_size`` given) and
rebuild it only if that size changes; ``set_weight`` refreshes the values when an optimiser
has changed the weights.

Each linear layer can also describe itself as a matrix on flattened samples
(:meth:`export`), which is how :func:`sparseconv.to_mlp` turns a network into an MLP.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp

from ..conv import ConvOperator
from ..geometry import IntOrTuple, PaddingSpec, check_batch, normalize_tuple
from ..pooling import MaxPoolOperator, PoolOperator
from .module import Module, Parameter

__all__ = [
    "ACTIVATIONS",
    "check_sample_shape",
    "Activation",
    "AvgPool2d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Flatten",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "Sigmoid",
    "Subsampling2d",
    "SumPool2d",
    "Tanh",
]

Seed = Union[None, int, np.random.Generator]


def _float_dtype(dtype: object) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64; got {dt}")
    return dt


def _uniform(rng: Seed, bound: float, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.random.default_rng(rng).uniform(-bound, bound, size=shape).astype(dtype)


def check_sample_shape(input_shape: tuple[int, ...], ndim: int, channels: Optional[int] = None) -> None:
    """Reject a sample shape that is not ``(channels, *spatial)`` with ``ndim`` spatial dims."""
    if len(input_shape) != ndim + 1 or (channels is not None and input_shape[0] != channels):
        expected = ", ".join([str(channels) if channels is not None else "C"] + ["*"] * ndim)
        raise ValueError(f"expected input of shape (N, {expected}) ({ndim} spatial dims); "
                         f"got a sample of shape {tuple(input_shape)}")


def _require_forward(cache: object, layer: Module) -> None:
    if cache is None:
        raise ValueError(f"{layer!r}: backward() called before forward()")


# ---------------------------------------------------------------------- convolution
class _ConvNd(Module):
    """Shared implementation of :class:`Conv1d`, :class:`Conv2d` and :class:`Conv3d`."""

    ndim = 0
    # Options left out of the repr when they have these values.
    _option_defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "padding_mode": "zeros",
                        "flip": False}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
                 padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1, padding_mode: str = "zeros",
                 flip: bool = False, bias: bool = True, connection: Optional[np.ndarray] = None,
                 input_size: Optional[Sequence[int]] = None, dtype: object = np.float64, rng: Seed = None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not isinstance(groups, (int, np.integer)) or groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must be a positive int dividing in_channels={in_channels} and "
                             f"out_channels={out_channels}; got {groups!r}")
        self.dtype = _float_dtype(dtype)
        kernel = normalize_tuple(kernel_size, self.ndim, "kernel_size")
        self.options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                            padding_mode=padding_mode, flip=flip)
        shape = (out_channels, in_channels // groups, *kernel)
        mask = None
        if connection is not None:
            table = np.asarray(connection)
            if table.dtype != bool or table.shape != (out_channels, in_channels):
                raise ValueError(f"connection must be a bool table of shape (out_channels, in_channels) = "
                                 f"{(out_channels, in_channels)}; got {table.dtype} array of shape {table.shape}")
            if groups != 1:
                raise ValueError(f"connection tables need groups=1; got groups={groups}")
            mask = np.broadcast_to(table.reshape(table.shape + (1,) * self.ndim), shape).copy()
        # fan-in counts only the connected inputs, so partially connected maps start at the
        # same scale as fully connected ones (LeCun 1998 sets the range by fan-in too).
        fan_in = (mask.reshape(out_channels, -1).sum(axis=1).min() if mask is not None
                  else int(np.prod(shape[1:])))
        bound = 1.0 / np.sqrt(max(int(fan_in), 1))
        rng = np.random.default_rng(rng)
        weight = _uniform(rng, bound, shape, self.dtype)
        if mask is not None:
            weight[~mask] = 0
        self.params["weight"] = Parameter(weight, mask)
        if bias:
            self.params["bias"] = Parameter(_uniform(rng, bound, (out_channels,), self.dtype))
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.op: Optional[ConvOperator] = None
        self._x: Optional[np.ndarray] = None
        if input_size is not None:
            self.build((in_channels, *normalize_tuple(input_size, self.ndim, "input_size")))

    @property
    def weight(self) -> Parameter:
        return self.params["weight"]

    @property
    def bias(self) -> Optional[Parameter]:
        return self.params.get("bias")

    def build(self, input_shape: tuple[int, ...]) -> ConvOperator:
        """The sparse operator for one sample's input shape ``(C, *in)``, built once per shape."""
        input_shape = tuple(input_shape)
        if self.op is None or self.op.input_shape != input_shape:
            check_sample_shape(input_shape, self.ndim, self.in_channels)
            self.op = self._make_operator(input_shape)
        elif not np.array_equal(self.op.weight, self.weight.data):
            # The optimiser changed the weights in place: refresh the values, keep the pattern.
            self.op.set_weight(self.weight.data)
        return self.op

    def _make_operator(self, input_shape: tuple[int, ...]) -> ConvOperator:
        return ConvOperator(self.weight.data, input_shape, weight_mask=self.weight.mask, **self.options)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.build(input_shape).out_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        op = self.build(x.shape[1:])
        self._x = check_batch(x, op.input_shape, self.dtype, "x")
        z = op.forward(self._x)
        if self.bias is not None:
            z += self.bias.data.reshape((-1,) + (1,) * self.ndim)
        return z

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _require_forward(self._x, self)
        self.weight.grad += self.op.weight_grad(self._x, dy)
        if self.bias is not None:
            self.bias.grad += self.op.bias_grad(dy)
        return self.op.backward_input(dy)

    def export(self, input_shape: tuple[int, ...]) -> tuple[sp.csr_array, Optional[np.ndarray]]:
        """The layer as ``(matrix, bias)`` on flattened samples (bias repeated per position)."""
        op = self.build(input_shape)
        bias = None
        if self.bias is not None:
            bias = np.repeat(self.bias.data, int(np.prod(op.out_shape[1:])))
        return op.matrix.copy(), bias

    def connections(self, input_shape: tuple[int, ...]) -> int:
        """LeCun's connection count: ``nnz`` of the matrix plus the biased outputs."""
        op = self.build(input_shape)
        return op.nnz + (int(np.prod(op.out_shape)) if self.bias is not None else 0)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v != self._option_defaults[k])
        conn = ", connection=table" if self.weight.mask is not None else ""
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
                f"{', ' + opts if opts else ''}{conn}{'' if self.bias is not None else ', bias=False'})")


class Conv1d(_ConvNd):
    """1-D convolution through its sparse matrix.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or tuple of int
    stride, padding, dilation, groups, padding_mode, flip
        As for :class:`sparseconv.ConvOperator`.
    bias : bool, default True
    connection : ndarray of bool, shape (out_channels, in_channels), optional
        Which (output map, input map) pairs are connected; unconnected pairs have no entries
        in the matrix and no trainable weights (LeNet-5's C3). Needs ``groups=1``.
    input_size : tuple of int, optional
        Build the matrix now instead of at the first forward.
    dtype : {float64, float32}
    rng : int or numpy Generator, optional
        Seeds the uniform ``+-1/sqrt(fan_in)`` initialisation.

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
class Linear(Module):
    """Fully connected layer ``y = x @ W.T + b``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    dtype : {float64, float32}
    rng : int or numpy Generator, optional

    Notes
    -----
    ``x : ndarray of shape (N, in_features)`` -> ``(N, out_features)``; weight
    ``(out_features, in_features)``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, dtype: object = np.float64,
                 rng: Seed = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.dtype = _float_dtype(dtype)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / np.sqrt(in_features)
        rng = np.random.default_rng(rng)
        self.params["weight"] = Parameter(_uniform(rng, bound, (out_features, in_features), self.dtype))
        if bias:
            self.params["bias"] = Parameter(_uniform(rng, bound, (out_features,), self.dtype))
        self._x: Optional[np.ndarray] = None

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"expected samples of shape ({self.in_features},); got {tuple(input_shape)}")
        return (self.out_features,)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = check_batch(x, (self.in_features,), self.dtype, "x")
        y = self._x @ self.params["weight"].data.T
        if "bias" in self.params:
            y += self.params["bias"].data
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _require_forward(self._x, self)
        dy = check_batch(dy, (self.out_features,), self.dtype, "dy")
        self.params["weight"].grad += dy.T @ self._x
        if "bias" in self.params:
            self.params["bias"].grad += dy.sum(axis=0)
        return dy @ self.params["weight"].data

    def export(self, input_shape: tuple[int, ...]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        self.output_shape(input_shape)
        bias = self.params["bias"].data.copy() if "bias" in self.params else None
        return self.params["weight"].data.copy(), bias

    def connections(self, input_shape: tuple[int, ...]) -> int:
        self.output_shape(input_shape)
        return self.in_features * self.out_features + (self.out_features if "bias" in self.params else 0)

    def __repr__(self) -> str:
        return (f"Linear({self.in_features}, {self.out_features}"
                f"{'' if 'bias' in self.params else ', bias=False'})")


# ---------------------------------------------------------------------- pooling
class _Pool2d(Module):
    """Average / sum pooling through a fixed sparse matrix."""

    kind = ""

    def __init__(self, kernel_size: IntOrTuple, stride: Optional[IntOrTuple] = None, padding: PaddingSpec = 0, *,
                 dtype: object = np.float64):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dtype = _float_dtype(dtype)
        self.op: Optional[PoolOperator] = None
        self._batch: Optional[int] = None

    def build(self, input_shape: tuple[int, ...]) -> PoolOperator:
        input_shape = tuple(input_shape)
        if self.op is None or self.op.input_shape != input_shape:
            check_sample_shape(input_shape, 2)
            self.op = PoolOperator(input_shape, self.kernel_size, stride=self.stride, padding=self.padding,
                                   kind=self.kind, dtype=self.dtype)
        return self.op

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.build(input_shape).out_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        self._batch = x.shape[0] if x.ndim else None
        return self.build(x.shape[1:]).forward(x)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _require_forward(self._batch, self)
        return self.op.backward_input(dy)

    def export(self, input_shape: tuple[int, ...]) -> tuple[sp.csr_array, None]:
        return self.build(input_shape).matrix.copy(), None

    def connections(self, input_shape: tuple[int, ...]) -> int:
        return self.build(input_shape).nnz

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size!r}, stride={self.stride!r}, padding={self.padding!r})"


class AvgPool2d(_Pool2d):
    """Average pooling, ``x : (N, C, H, W) -> (N, C, Ho, Wo)``; zero padding counts in the mean."""

    kind = "avg"


class SumPool2d(_Pool2d):
    """Sum pooling, ``x : (N, C, H, W) -> (N, C, Ho, Wo)``."""

    kind = "sum"


class MaxPool2d(Module):
    """Max pooling through a per-batch selection matrix.

    Ties go to the first position of the window in row-major order (see
    :class:`sparseconv.pooling.MaxPoolOperator`). Max pooling is not linear, so
    :func:`sparseconv.to_mlp` refuses it.
    """

    def __init__(self, kernel_size: IntOrTuple, stride: Optional[IntOrTuple] = None, padding: PaddingSpec = 0, *,
                 dtype: object = np.float64):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dtype = _float_dtype(dtype)
        self.op: Optional[MaxPoolOperator] = None
        self._fresh = False

    def build(self, input_shape: tuple[int, ...]) -> MaxPoolOperator:
        input_shape = tuple(input_shape)
        if self.op is None or self.op.input_shape != input_shape:
            check_sample_shape(input_shape, 2)
            self.op = MaxPoolOperator(input_shape, self.kernel_size, stride=self.stride, padding=self.padding,
                                      dtype=self.dtype)
        return self.op

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.build(input_shape).out_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        y = self.build(x.shape[1:]).forward(x)
        self._fresh = True
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _require_forward(self.op if self._fresh else None, self)
        return self.op.backward_input(dy)

    def __repr__(self) -> str:
        return f"MaxPool2d(kernel_size={self.kernel_size!r}, stride={self.stride!r}, padding={self.padding!r})"


class Subsampling2d(Module):
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
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int; got {channels!r}")
        self.dtype = _float_dtype(dtype)
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        window = int(np.prod(normalize_tuple(kernel_size, 2, "kernel_size")))
        self.params["beta"] = Parameter(np.full(channels, 1.0 / window, dtype=self.dtype))
        self.params["bias"] = Parameter(np.zeros(channels, dtype=self.dtype))
        self.op: Optional[PoolOperator] = None
        self._down: Optional[np.ndarray] = None

    def build(self, input_shape: tuple[int, ...]) -> PoolOperator:
        input_shape = tuple(input_shape)
        if self.op is None or self.op.input_shape != input_shape:
            check_sample_shape(input_shape, 2, self.channels)
            self.op = PoolOperator(input_shape, self.kernel_size, stride=self.stride, kind="sum", dtype=self.dtype)
        return self.op

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.build(input_shape).out_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        self._down = self.build(x.shape[1:]).forward(x)
        beta, b = self.params["beta"].data, self.params["bias"].data
        return self._down * beta[:, None, None] + b[:, None, None]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _require_forward(self._down, self)
        dy = check_batch(dy, self.op.out_shape, self.dtype, "dy")
        self.params["beta"].grad += (dy * self._down).sum(axis=(0, 2, 3))
        self.params["bias"].grad += dy.sum(axis=(0, 2, 3))
        return self.op.backward_input(dy * self.params["beta"].data[:, None, None])

    def export(self, input_shape: tuple[int, ...]) -> tuple[sp.csr_array, np.ndarray]:
        """``diag(beta per map) @ P_sum``: each entry is tied to its map's ``beta``."""
        op = self.build(input_shape)
        per_map = int(np.prod(op.out_shape[1:]))
        scale = sp.diags_array(np.repeat(self.params["beta"].data, per_map)).tocsr()
        return (scale @ op.matrix).tocsr(), np.repeat(self.params["bias"].data, per_map)

    def connections(self, input_shape: tuple[int, ...]) -> int:
        op = self.build(input_shape)
        return op.nnz + int(np.prod(op.out_shape))

    def __repr__(self) -> str:
        return f"Subsampling2d({self.channels}, kernel_size={self.kernel_size!r})"


# ---------------------------------------------------------------------- element-wise
def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Two branches so that exp never overflows for large |z|.
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


# name -> (f(z), f'(z) expressed through z and a = f(z))
ACTIVATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "relu": (lambda z: np.maximum(z, 0), lambda z, a: (z > 0).astype(z.dtype)),
    "sigmoid": (_sigmoid, lambda z, a: a * (1 - a)),
    "tanh": (np.tanh, lambda z, a: 1 - a * a),
}


class Activation(Module):
    """An element-wise activation from :data:`ACTIVATIONS`; any input shape."""

    name = ""

    def __init__(self) -> None:
        super().__init__()
        self._z: Optional[np.ndarray] = None
        self._a: Optional[np.ndarray] = None

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{type(self).__name__} needs a floating input; got dtype {x.dtype}")
        self._z = x
        self._a = ACTIVATIONS[self.name][0](x)
        return self._a

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _require_forward(self._z, self)
        if np.shape(dy) != self._z.shape:
            raise ValueError(f"{type(self).__name__}: dy must have shape {self._z.shape}; got {np.shape(dy)}")
        return dy * ACTIVATIONS[self.name][1](self._z, self._a)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReLU(Activation):
    """``max(z, 0)``."""

    name = "relu"


class Sigmoid(Activation):
    """``1 / (1 + exp(-z))``, computed without overflow."""

    name = "sigmoid"


class Tanh(Activation):
    """``tanh(z)``."""

    name = "tanh"


class Flatten(Module):
    """``(N, *shape) -> (N, prod(shape))`` in C order (a no-op on flattened samples)."""

    def __init__(self) -> None:
        super().__init__()
        self._shape: Optional[tuple[int, ...]] = None

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(np.prod(input_shape)),)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"Flatten needs a batch of shape (N, ...); got shape {x.shape}")
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        _require_forward(self._shape, self)
        return np.asarray(dy).reshape(self._shape)

    def __repr__(self) -> str:
        return "Flatten()"
