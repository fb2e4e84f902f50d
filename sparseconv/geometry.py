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
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

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
    "FLOAT_DTYPES",
    "check_float_dtype",
    "default_memory_budget",
    "parse_memory_budget",
    "validate_conv_options",
    "pool_geometry",
    "TransposedGeometry",
    "conv_transpose_geometry",
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


#: The dtypes an operator computes in: the one float32/float64 policy of the package.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT_DTYPES = FLOAT_DTYPES


def check_float_dtype(dtype: object, name: str = "dtype") -> np.dtype:
    """``dtype`` as a numpy dtype, if it is float32 or float64.

    Raises
    ------
    TypeError
        For any other dtype (or something that is not one).
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64; got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64; got {dt}")
    return dt


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
    """Validate a batch of shape ``(N, *sample_shape)`` and return it as an ndarray of ``dtype``.

    ``N = 0`` is a valid (empty) batch: products then return empty batches of the right shape.
    """
    arr = check_array_dtype(x, dtype, name)
    expected = tuple(sample_shape)
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
        hint = " (a single sample needs a leading batch axis: x[None])" if arr.shape == expected else ""
        raise ValueError(
            f"{name} must have shape (N, {', '.join(map(str, expected))}); got {arr.shape}{hint}")
    return arr


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
               "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_BYTES_RE = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_memory_budget(value: object, name: str = "memory_budget") -> int:
    """A memory budget in bytes from an int or a string such as ``"1GiB"``, ``"512 MB"``, ``"1e9"``.

    Parameters
    ----------
    value : int, float, str or None
        A positive number of bytes; a float must be a whole number. Strings take an optional
        unit: ``B``, ``KB``/``MB``/``GB``/``TB`` (powers of 1000) or ``KiB``/``MiB``/``GiB``/``TiB``
        (powers of 1024), case-insensitive. None gives :func:`default_memory_budget`.
    name : str
        The argument's name, for error messages.

    Returns
    -------
    int
        Positive.

    Raises
    ------
    TypeError
        For a bool or a value of another type.
    ValueError
        For a string that does not parse, an unknown unit, or a value below one byte.

    Examples
    --------
    >>> parse_memory_budget("1GiB"), parse_memory_budget("1.5 kB"), parse_memory_budget(4096)
    (1073741824, 1500, 4096)
    """
    if value is None:
        return default_memory_budget()
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive number of bytes or a string such as '1GiB'; got {value!r}")
    if _is_int(value):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        if not np.isfinite(value) or not float(value).is_integer():
            raise ValueError(f"{name} must be a whole, finite number of bytes; got {value!r}")
        number = int(value)
    elif isinstance(value, str):
        match = _BYTES_RE.fullmatch(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _BYTE_UNITS:
            raise ValueError(f"{name} must be a number of bytes with an optional unit (B, KB, MB, GB, TB, KiB, "
                             f"MiB, GiB, TiB), such as '1GiB' or '500MB'; got {value!r}")
        number = int(float(match.group(1)) * _BYTE_UNITS[unit])
    else:
        raise TypeError(f"{name} must be a positive number of bytes or a string such as '1GiB'; "
                        f"got {type(value).__name__} {value!r}")
    if number < 1:
        raise ValueError(f"{name} must be positive (at least one byte); got {value!r}")
    return number


def default_memory_budget() -> int:
    """Bytes the structures one operator builds may occupy before construction refuses.

    The ``SPARSECONV_MEMORY_BUDGET`` environment variable (bytes, or a string with a unit such
    as ``"4GiB"``; see :func:`parse_memory_budget`) wins; otherwise half of the physical memory.
    """
    env = os.environ.get("SPARSECONV_MEMORY_BUDGET")
    if env:
        return parse_memory_budget(env, "SPARSECONV_MEMORY_BUDGET")
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 * 2**30
    return physical // 2


def _check_groups(groups: object) -> int:
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    return int(groups)


def _check_padding_mode(padding_mode: object) -> str:
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}; got {padding_mode!r}")
    return padding_mode


def _check_flip(flip: object) -> bool:
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"flip must be a bool; got {flip!r}")
    return bool(flip)


def _check_padding_spelling(padding: PaddingSpec, ndim: int, transposed: bool) -> None:
    """Padding checks that need no kernel size (strings are resolved later, with the kernel)."""
    if isinstance(padding, str):
        if transposed:
            raise ValueError("padding of a transposed convolution must be an int, per-dimension ints or (low, high) "
                             f"pairs (PyTorch has no string spelling for it); got {padding!r}")
        if padding not in PADDING_STRINGS:
            raise ValueError(
                f"padding must be one of {PADDING_STRINGS}, an int or per-dimension values; got {padding!r}")
        return
    # Any kernel works for checking the non-string spellings: they do not depend on it.
    normalize_padding(padding, (1,) * ndim, (1,) * ndim, (1,) * ndim)


def validate_conv_options(ndim: int, *, kernel_size: Optional[IntOrTuple] = None, stride: IntOrTuple = 1,
                          padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                          padding_mode: str = "zeros", flip: bool = False,
                          output_padding: Optional[IntOrTuple] = None, in_channels: Optional[int] = None,
                          out_channels: Optional[int] = None) -> None:
    """Check a convolution's options without an input shape (for a layer's constructor).

    Everything :func:`conv_geometry` (or, with ``output_padding``, :func:`conv_transpose_geometry`)
    would refuse without knowing the input size is refused here, with the same messages;
    what depends on the input size (the output size, reflect/circular padding limits) is
    checked when the geometry is built.

    Parameters
    ----------
    ndim : int
        Spatial dimensions, 1, 2 or 3.
    kernel_size : int or tuple of int, optional
        Checked when given (positive ints).
    stride, dilation : int or tuple of int
        Positive.
    padding : int, tuple or str
        Any spelling :func:`normalize_padding` takes; strings must be ``"valid"``, ``"same"``
        or ``"full"`` (and are refused for a transposed convolution); ``"same"`` needs stride 1.
    groups : int
        Positive; must divide ``in_channels`` and ``out_channels`` when those are given.
    padding_mode : {"zeros", "circular", "reflect", "replicate"}
    flip : bool
    output_padding : int or tuple of int, optional
        Given for a transposed convolution: ``0 <= output_padding < max(stride, dilation)``
        per dimension.
    in_channels, out_channels : int, optional
        Positive; checked against ``groups`` when given.

    Raises
    ------
    TypeError, ValueError
        Naming the argument, the expected and the given value.

    Examples
    --------
    >>> validate_conv_options(2, stride=0)
    Traceback (most recent call last):
    ...
    ValueError: stride must be >= 1 in every dimension; got 0
    """
    if not _is_int(ndim) or ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3 (spatial dimensions); got {ndim!r}")
    if kernel_size is not None:
        normalize_tuple(kernel_size, ndim, "kernel_size")
    stride_t = normalize_tuple(stride, ndim, "stride")
    dilation_t = normalize_tuple(dilation, ndim, "dilation")
    transposed = output_padding is not None
    _check_padding_spelling(padding, ndim, transposed)
    if padding == "same" and any(s != 1 for s in stride_t):
        raise ValueError(f"padding='same' requires stride 1 in every dimension; got stride={stride_t}")
    groups = _check_groups(groups)
    _check_padding_mode(padding_mode)
    _check_flip(flip)
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if channels is None:
            continue
        if not _is_int(channels) or channels < 1:
            raise ValueError(f"{name} must be a positive int; got {channels!r}")
        if channels % groups:
            raise ValueError(f"groups={groups} must divide {name}={channels}")
    if transposed:
        extra = normalize_tuple(output_padding, ndim, "output_padding", minimum=0)
        for axis, (e, s, d) in enumerate(zip(extra, stride_t, dilation_t)):
            if e >= max(s, d):
                raise ValueError(
                    f"output_padding must be smaller than max(stride, dilation) in every dimension (PyTorch's "
                    f"rule); spatial dimension {axis} has output_padding={e}, stride={s}, dilation={d}")


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
    groups = _check_groups(groups)
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
    _check_padding_mode(padding_mode)
    flip = _check_flip(flip)
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


def pool_geometry(input_shape: Sequence[int], kernel_size: IntOrTuple, *, stride: Optional[IntOrTuple] = None,
                  padding: PaddingSpec = 0) -> ConvGeometry:
    """The geometry of a pooling window: a depthwise convolution with one filter per channel.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, *in)`` with 1, 2 or 3 spatial dimensions.
    kernel_size : int or tuple of int
    stride : int or tuple of int, optional
        Defaults to the kernel size (non-overlapping windows).
    padding : int, tuple or str
        As for convolutions.

    Returns
    -------
    ConvGeometry
    """
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) not in (2, 3, 4):
        raise ValueError(f"input_shape must be (C, *spatial) with 1, 2 or 3 spatial dimensions; got {input_shape!r}")
    ndim = len(input_shape) - 1
    kernel = normalize_tuple(kernel_size, ndim, "kernel_size")
    stride = kernel if stride is None else stride
    channels = input_shape[0]
    return conv_geometry((channels, 1, *kernel), input_shape, stride=stride, padding=padding, groups=channels)


class TransposedGeometry(NamedTuple):
    """A transposed convolution's options, normalised, and its output size.

    Attributes
    ----------
    stride, output_padding, dilation, out_size : tuple of int
        One entry per spatial dimension.
    padding : tuple of (int, int)
        ``(low, high)`` per spatial dimension, cropped from the output.
    """

    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    out_size: tuple[int, ...]


def conv_transpose_geometry(weight_shape: Sequence[int], input_shape: Sequence[int], *, stride: IntOrTuple = 1,
                            padding: PaddingSpec = 0, output_padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                            groups: int = 1) -> TransposedGeometry:
    """Validate a transposed convolution's options in its own terms and compute its output size.

    Parameters
    ----------
    weight_shape : sequence of int
        ``(C_in, C_out // groups, *kernel)`` (PyTorch's ``ConvTranspose`` layout).
    input_shape : sequence of int
        ``(C_in, *in)``.
    stride, padding, output_padding, dilation, groups
        As for :class:`~sparseconv.transpose.ConvTransposeOperator`.

    Returns
    -------
    TransposedGeometry
        With ``out_size`` from :func:`conv_transpose_output_size`.

    Raises
    ------
    TypeError, ValueError
        With the argument's name, the expected and the given value.
    """
    weight_shape = tuple(weight_shape)
    if len(weight_shape) not in (3, 4, 5):
        raise ValueError("weight must have shape (C_in, C_out // groups, *kernel) with 1, 2 or 3 kernel "
                         f"dimensions (3 to 5 axes); got shape {weight_shape}")
    ndim = len(weight_shape) - 2
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != ndim + 1
            or not all(_is_int(v) and v >= 1 for v in input_shape)):
        raise ValueError(f"input_shape must be (C_in, *spatial), {ndim + 1} positive ints to match the weight "
                         f"of shape {weight_shape}; got {input_shape!r}")
    if input_shape[0] != weight_shape[0]:
        raise ValueError(f"input_shape[0] (C_in) must equal weight.shape[0] = {weight_shape[0]} for a weight of "
                         f"shape (C_in, C_out // groups, *kernel) = {weight_shape}; got input_shape {input_shape}")
    _check_padding_spelling(padding, ndim, transposed=True)
    kernel = weight_shape[2:]
    stride_t = normalize_tuple(stride, ndim, "stride")
    dilation_t = normalize_tuple(dilation, ndim, "dilation")
    extra = normalize_tuple(output_padding, ndim, "output_padding", minimum=0)
    pads = normalize_padding(padding, kernel, stride_t, dilation_t)
    in_size = tuple(int(v) for v in input_shape[1:])
    out = []
    for axis, (i, k, s, d, (lo, hi), e) in enumerate(zip(in_size, kernel, stride_t, dilation_t, pads, extra)):
        if e >= max(s, d):
            raise ValueError(
                f"output_padding must be smaller than max(stride, dilation) in every dimension (PyTorch's "
                f"rule); spatial dimension {axis} has output_padding={e}, stride={s}, dilation={d}")
        o = conv_transpose_output_size(i, k, s, lo, hi, d, e)
        if o < 1:
            raise ValueError(
                f"padding {(lo, hi)} crops the whole output along spatial dimension {axis}: input size {i}, "
                f"kernel {k}, stride {s}, dilation {d}, output_padding {e} give output size {o} < 1")
        out.append(o)
    groups = _check_groups(groups)
    if weight_shape[0] % groups:
        raise ValueError(f"groups={groups} must divide C_in = weight.shape[0] = {weight_shape[0]}")
    return TransposedGeometry(stride_t, pads, extra, dilation_t, tuple(out))
