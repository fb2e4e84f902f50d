"""Shapes, output sizes and validation of every convolution and pooling option.

This module is the single source of truth for how an option is spelled, what it means and
which values are rejected. Everything else (the sparse builder, the references, the layers)
asks it for a :class:`ConvGeometry` and never re-derives a size on its own.

Notation
--------
``N`` batch, ``C`` input channels, ``F`` output channels (filters), ``G`` groups,
``i`` input size, ``k`` kernel size, ``s`` stride, ``d`` dilation, ``p_lo``/``p_hi``
padding before/after, ``o`` output size, along each spatial dimension::

    o = floor((i + p_lo + p_hi - d * (k - 1) - 1) / s) + 1
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

__all__ = [
    "PADDING_MODES",
    "PADDING_STRINGS",
    "IntOrTuple",
    "PaddingSpec",
    "ConvGeometry",
    "conv_geometry",
    "output_size",
    "conv_transpose_output_size",
    "normalize_tuple",
    "normalize_padding",
    "resolve_dtype",
    "check_array_dtype",
    "check_batch",
    "default_memory_budget",
]

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
PADDING_STRINGS = ("valid", "same", "full")

IntOrTuple = Union[int, Sequence[int]]
PaddingSpec = Union[int, str, Sequence[Union[int, Sequence[int]]]]


def output_size(in_size: int, kernel: int, stride: int = 1, pad_lo: int = 0,
                pad_hi: int = 0, dilation: int = 1) -> int:
    """Output length along one spatial dimension.

    Parameters
    ----------
    in_size, kernel, stride, pad_lo, pad_hi, dilation : int
        Input length, kernel length, stride, padding before and after, dilation.

    Returns
    -------
    int
        ``floor((in_size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) / stride) + 1``.
        It is below 1 when the dilated kernel does not fit in the padded input.
    """
    return (in_size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(in_size: int, kernel: int, stride: int = 1, pad_lo: int = 0, pad_hi: int = 0,
                               dilation: int = 1, output_padding: int = 0) -> int:
    """Output length of a transposed convolution along one spatial dimension.

    Parameters
    ----------
    in_size, kernel, stride, pad_lo, pad_hi, dilation, output_padding : int

    Returns
    -------
    int
        ``(in_size - 1) * stride - pad_lo - pad_hi + dilation * (kernel - 1) + output_padding + 1``
        (PyTorch's formula, with ``2 * padding`` split into its two sides). It is below 1
        when the padding crops away more than the layer produces.
    """
    return (in_size - 1) * stride - pad_lo - pad_hi + dilation * (kernel - 1) + output_padding + 1


def _is_int(value: object) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool)


def normalize_tuple(value: IntOrTuple, ndim: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Expand an int or a per-dimension sequence to a tuple of ``ndim`` ints.

    Raises
    ------
    TypeError
        If ``value`` is not an int or a sequence of ints.
    ValueError
        If the sequence has the wrong length or an entry is below ``minimum``.
    """
    if _is_int(value):
        out = (int(value),) * ndim
    elif isinstance(value, (tuple, list, np.ndarray)):
        if len(value) != ndim:
            raise ValueError(
                f"{name} must be an int or a sequence of {ndim} ints (one per spatial "
                f"dimension); got {value!r} with {len(value)} entries")
        if not all(_is_int(v) for v in value):
            raise TypeError(f"{name} must contain ints; got {value!r}")
        out = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name} must be an int or a sequence of {ndim} ints; got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{name} must be >= {minimum} in every dimension; got {value!r}")
    return out


def normalize_padding(padding: PaddingSpec, kernel: Sequence[int], stride: Sequence[int],
                      dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Turn any padding spelling into one ``(low, high)`` pair per spatial dimension.

    Parameters
    ----------
    padding : int, str or sequence
        ``int`` (same on both sides of every dimension); a sequence of ints (one per
        dimension, both sides); a sequence of ``(low, high)`` pairs; or one of
        ``"valid"`` (no padding), ``"same"`` (stride 1 only: the output has the input's size;
        an odd total puts the extra row/column at the end) and ``"full"``
        (``d * (k - 1)`` on both sides, every partial overlap).
    kernel, stride, dilation : sequence of int
        Already normalised, one per spatial dimension.

    Returns
    -------
    tuple of (int, int)
    """
    ndim = len(kernel)
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(
                f"padding must be one of {PADDING_STRINGS}, an int or per-dimension values; "
                f"got {padding!r}")
        extents = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if padding == "valid":
            return tuple((0, 0) for _ in range(ndim))
        if padding == "full":
            return tuple((e, e) for e in extents)
        if any(s != 1 for s in stride):
            raise ValueError(f"padding='same' requires stride 1 in every dimension; got stride={tuple(stride)}")
        return tuple((e // 2, e - e // 2) for e in extents)
    if _is_int(padding):
        pairs = [(int(padding), int(padding))] * ndim
    elif isinstance(padding, (tuple, list)):
        if len(padding) != ndim:
            raise ValueError(
                f"padding must have {ndim} entries (one per spatial dimension); got {padding!r}")
        pairs = []
        for entry in padding:
            if _is_int(entry):
                pairs.append((int(entry), int(entry)))
            elif isinstance(entry, (tuple, list)) and len(entry) == 2 and all(_is_int(v) for v in entry):
                pairs.append((int(entry[0]), int(entry[1])))
            else:
                raise TypeError(
                    f"each padding entry must be an int or a (low, high) pair of ints; got {entry!r} "
                    f"in padding={padding!r}")
    else:
        raise TypeError(f"padding must be an int, a string or a sequence; got {padding!r}")
    if any(v < 0 for pair in pairs for v in pair):
        raise ValueError(f"padding must be non-negative; got {padding!r}")
    return tuple(pairs)


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def resolve_dtype(array: np.ndarray, name: str) -> np.dtype:
    """The floating dtype an operator built from ``array`` computes in.

    float32 and float64 are kept; integers and booleans become float64. Anything else
    (complex, float16, object, strings) raises ``TypeError``.
    """
    dtype = np.asarray(array).dtype
    if dtype in _FLOAT_DTYPES:
        return dtype
    if dtype.kind in "biu":
        return np.dtype(np.float64)
    raise TypeError(
        f"{name} must have dtype float32 or float64 (integers are converted to float64); "
        f"got dtype {dtype}")


def check_array_dtype(array: object, dtype: np.dtype, name: str) -> np.ndarray:
    """Return ``array`` as an ndarray of ``dtype`` without a silent change of precision.

    Integers and booleans are converted. A floating array of another precision raises
    ``TypeError`` instead of being up- or down-cast behind the caller's back.
    """
    arr = np.asarray(array)
    if arr.dtype == dtype:
        return arr
    if arr.dtype.kind in "biu":
        return arr.astype(dtype)
    raise TypeError(
        f"{name} has dtype {arr.dtype} but the operator computes in {np.dtype(dtype)}; "
        f"convert it explicitly, e.g. {name}.astype(np.{np.dtype(dtype).name})")


def check_batch(x: object, sample_shape: Sequence[int], dtype: np.dtype, name: str = "x") -> np.ndarray:
    """Validate a batch of shape ``(N, *sample_shape)`` and return it as an ndarray of ``dtype``."""
    arr = check_array_dtype(x, dtype, name)
    expected = tuple(sample_shape)
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
        hint = " (a single sample needs a leading batch axis: x[None])" if arr.shape == expected else ""
        raise ValueError(
            f"{name} must have shape (N, {', '.join(map(str, expected))}); got {arr.shape}{hint}")
    if arr.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one sample; got shape {arr.shape}")
    return arr


def default_memory_budget() -> int:
    """Bytes a single sparse matrix may occupy before construction refuses.

    The ``SPARSECONV_MEMORY_BUDGET`` environment variable (bytes) wins; otherwise half of
    the physical memory.
    """
    env = os.environ.get("SPARSECONV_MEMORY_BUDGET")
    if env:
        try:
            value = int(float(env))
        except ValueError:
            raise ValueError(f"SPARSECONV_MEMORY_BUDGET must be a number of bytes; got {env!r}") from None
        if value <= 0:
            raise ValueError(f"SPARSECONV_MEMORY_BUDGET must be positive; got {env!r}")
        return value
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 * 2**30
    return physical // 2


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a convolution except the weight values.

    Attributes
    ----------
    in_channels, out_channels, groups : int
        ``C``, ``F`` and ``G``; each group maps ``C // G`` input to ``F // G`` output channels.
    in_size, kernel_size, out_size : tuple of int
        Spatial sizes, one entry per spatial dimension.
    stride, dilation : tuple of int
    padding : tuple of (int, int)
        ``(low, high)`` per spatial dimension.
    padding_mode : {"zeros", "circular", "reflect", "replicate"}
    flip : bool
        True for a true convolution (kernel rotated 180 degrees), False for correlation.
    """

    in_channels: int
    out_channels: int
    groups: int
    in_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    padding_mode: str
    flip: bool
    out_size: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (1, 2 or 3)."""
        return len(self.in_size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, *in_size)``: one sample's input."""
        return (self.in_channels, *self.in_size)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """``(F, *out_size)``: one sample's output."""
        return (self.out_channels, *self.out_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """``(F, C // G, *kernel_size)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def n_in(self) -> int:
        """Matrix columns: ``C * prod(in_size)``."""
        return int(np.prod(self.input_shape))

    @property
    def n_out(self) -> int:
        """Matrix rows: ``F * prod(out_size)``."""
        return int(np.prod(self.output_shape))

    @property
    def n_params(self) -> int:
        """Number of kernel weights, ``F * C // G * prod(kernel_size)``."""
        return int(np.prod(self.weight_shape))

    @property
    def padded_size(self) -> tuple[int, ...]:
        """Spatial size of the input after padding."""
        return tuple(i + lo + hi for i, (lo, hi) in zip(self.in_size, self.padding))

    def describe(self) -> str:
        """A short id such as ``C3-8x8-F4-k3x3-s2-p1-d1-g1-zeros``."""
        def dims(t: Sequence[int]) -> str:
            return "x".join(map(str, t))
        pads = ",".join(f"{lo}" if lo == hi else f"{lo}:{hi}" for lo, hi in self.padding)
        return (f"C{self.in_channels}-{dims(self.in_size)}-F{self.out_channels}-k{dims(self.kernel_size)}"
                f"-s{dims(self.stride)}-p{pads}-d{dims(self.dilation)}-g{self.groups}-{self.padding_mode}"
                + ("-flip" if self.flip else ""))


def conv_geometry(weight_shape: Sequence[int], input_shape: Sequence[int], *, stride: IntOrTuple = 1,
                  padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                  padding_mode: str = "zeros", flip: bool = False) -> ConvGeometry:
    """Validate every convolution option and compute the output size.

    Parameters
    ----------
    weight_shape : sequence of int
        ``(F, C // groups, *kernel)`` with 1, 2 or 3 kernel dimensions.
    input_shape : sequence of int
        ``(C, *spatial)``, one sample, with as many spatial dimensions as the kernel.
    stride, dilation : int or sequence of int
        Positive, per spatial dimension.
    padding : int, str or sequence
        See :func:`normalize_padding`.
    groups : int
        Positive divisor of both ``C`` and ``F``.
    padding_mode : {"zeros", "circular", "reflect", "replicate"}
        How padded positions are filled. ``reflect`` needs each padding below the input size,
        ``circular`` at most the input size (the rules PyTorch uses).
    flip : bool
        Rotate the kernel by 180 degrees (true convolution) instead of correlating.

    Returns
    -------
    ConvGeometry

    Raises
    ------
    ValueError, TypeError
        With the argument's name, the expected and the given value.
    """
    weight_shape = tuple(weight_shape)
    if len(weight_shape) not in (3, 4, 5):
        raise ValueError(
            "weight must have shape (F, C // groups, *kernel) with 1, 2 or 3 kernel dimensions "
            f"(3 to 5 axes); got shape {weight_shape}")
    if not all(_is_int(v) and v >= 1 for v in weight_shape):
        raise ValueError(f"weight must have positive sizes on every axis; got shape {weight_shape}")
    ndim = len(weight_shape) - 2
    if not isinstance(input_shape, (tuple, list, np.ndarray)) or not all(_is_int(v) for v in input_shape):
        raise TypeError(f"input_shape must be a sequence of ints (C, *spatial); got {input_shape!r}")
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != ndim + 1:
        raise ValueError(
            f"input_shape must be (C, *spatial) with {ndim} spatial dimension(s) to match the "
            f"weight of shape {weight_shape}; got {input_shape}")
    if any(v < 1 for v in input_shape):
        raise ValueError(f"input_shape must be positive on every axis; got {input_shape}")
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    groups = int(groups)
    out_channels, cin_per_group = weight_shape[:2]
    in_channels = input_shape[0]
    if in_channels % groups:
        raise ValueError(f"groups={groups} must divide the input channels C={in_channels}")
    if out_channels % groups:
        raise ValueError(f"groups={groups} must divide the output channels F={out_channels} (weight.shape[0])")
    if cin_per_group != in_channels // groups:
        raise ValueError(
            f"weight.shape[1] must be C // groups = {in_channels} // {groups} = {in_channels // groups} "
            f"for input_shape {input_shape}; got weight of shape {weight_shape}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}; got {padding_mode!r}")
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"flip must be a bool; got {flip!r}")
    kernel = weight_shape[2:]
    in_size = input_shape[1:]
    stride_t = normalize_tuple(stride, ndim, "stride")
    dilation_t = normalize_tuple(dilation, ndim, "dilation")
    pads = normalize_padding(padding, kernel, stride_t, dilation_t)
    for axis, (i, (lo, hi)) in enumerate(zip(in_size, pads)):
        if padding_mode == "reflect" and max(lo, hi) >= i:
            raise ValueError(
                f"padding_mode='reflect' needs padding < input size in every dimension; spatial "
                f"dimension {axis} has size {i} and padding {(lo, hi)}")
        if padding_mode == "circular" and max(lo, hi) > i:
            raise ValueError(
                f"padding_mode='circular' needs padding <= input size in every dimension; spatial "
                f"dimension {axis} has size {i} and padding {(lo, hi)}")
    out = []
    for axis, (i, k, s, d, (lo, hi)) in enumerate(zip(in_size, kernel, stride_t, dilation_t, pads)):
        o = output_size(i, k, s, lo, hi, d)
        if o < 1:
            raise ValueError(
                f"kernel extent {d * (k - 1) + 1} (kernel {k}, dilation {d}) is larger than the padded "
                f"input {i + lo + hi} (size {i}, padding {(lo, hi)}) along spatial dimension {axis}: "
                f"the output size would be {o} < 1")
        out.append(o)
    return ConvGeometry(in_channels=in_channels, out_channels=out_channels, groups=groups,
                        in_size=in_size, kernel_size=kernel, stride=stride_t, dilation=dilation_t,
                        padding=pads, padding_mode=padding_mode, flip=bool(flip), out_size=tuple(out))
