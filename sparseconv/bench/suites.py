"""The benchmarked layers: suites of 2-D convolution layers, and each layer's data with its reference results.

A :class:`Layer` describes one convolution (shape, options, mask, how it is called); a suite
is a list of them (:func:`suite_layers`); :func:`make_case` draws the layer's data from a
fixed seed and computes the float64 results every method is checked against, with
:mod:`sparseconv.reference` (independent of the code under test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from .. import reference as ref
from ..geometry import output_size

__all__ = [
    "PASSES",
    "LINEAR_OPERATOR_PASSES",
    "INTERFACES",
    "PRUNE_BY",
    "SUITES",
    "TOLERANCES",
    "PRUNED_SPARSITIES",
    "Layer",
    "Case",
    "suite_layers",
    "layer_mask",
    "make_case",
]

# The products of a layer, named as the operator names them: W @ x, W.T @ dy, and the
# kernel gradient over the tying map.
PASSES = ("forward", "adjoint", "weight_grad")
# What an iterative solver (lsqr, cg) calls: one vector at a time through a LinearOperator.
LINEAR_OPERATOR_PASSES = ("forward", "adjoint")
INTERFACES = ("batch", "linear_operator")
PRUNE_BY = ("random", "magnitude")
SUITES = ("smoke", "lenet", "cifar", "imagenet", "pruned", "image", "grouped", "scaling")
# Fractions of kernel weights set to zero (and left out of the sparse matrix) in the pruned suite.
PRUNED_SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95, 0.99)
# Largest relative error (max |result - reference| / max |reference|) accepted per dtype.
# float32 sums of up to ~10^5 products, in any order, stay well inside 1e-4.
TOLERANCES = {"float32": 1e-4, "float64": 1e-10}
# The float64 reference uses the window-by-window direct convolution unless its Python loop
# would run more than this many (position, group) iterations; im2col in float64 then, unless
# its unrolled buffer would exceed _IM2COL_REFERENCE_MAX_BYTES (large single-channel images).
_DIRECT_REFERENCE_MAX_ITERATIONS = 200_000
_IM2COL_REFERENCE_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class Layer:
    """One benchmarked 2-D convolution: square images and kernels, zero padding.

    Attributes
    ----------
    name : str
        Unique within its suite, e.g. ``"C3 N64"``.
    batch, in_channels, out_channels, size, kernel : int
        ``N``, ``C``, ``F``, the image side ``H = W`` and the kernel side ``k``.
    stride, padding, dilation, groups : int
    prune : float
        Fraction of kernel weights set to zero and left out of the sparse matrix through
        ``weight_mask`` (the other methods multiply the zeros), in ``[0, 1)``.
    prune_by : {"random", "magnitude"}
        Which weights are pruned: a random choice (fixed seed), or the smallest in magnitude.
    table : bool
        Use LeNet-5's C3 connection table as the mask (needs C=6, F=16).
    flip : bool
        True convolution (kernel rotated 180 degrees), as image operators use; only with
        ``interface="linear_operator"`` (no kernel gradient is timed there).
    interface : {"batch", "linear_operator"}
        ``"batch"``: NCHW batches through the three passes of :data:`PASSES`.
        ``"linear_operator"``: one flattened sample at a time through a
        ``scipy.sparse.linalg.LinearOperator``'s ``matvec`` / ``rmatvec``, as ``lsqr`` and
        ``cg`` call it (:data:`LINEAR_OPERATOR_PASSES`; needs ``batch == 1``).
    sweep : (str, int) or None
        For the scaling suite: which quantity this layer varies, and its value.
    """

    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    prune: float = 0.0
    prune_by: str = "random"
    table: bool = False
    flip: bool = False
    interface: str = "batch"
    sweep: Optional[tuple[str, int]] = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune < 1.0:
            raise ValueError(f"prune must be in [0, 1); got {self.prune} for layer {self.name!r}")
        if self.prune_by not in PRUNE_BY:
            raise ValueError(f"prune_by must be one of {PRUNE_BY}; got {self.prune_by!r} for layer {self.name!r}")
        if self.interface not in INTERFACES:
            raise ValueError(f"interface must be one of {INTERFACES}; got {self.interface!r} for layer {self.name!r}")
        if self.interface == "linear_operator" and self.batch != 1:
            raise ValueError(f"interface='linear_operator' takes one sample at a time (batch=1); got batch="
                             f"{self.batch} for layer {self.name!r}")
        if self.flip and self.interface != "linear_operator":
            raise ValueError(f"flip=True layers are image operators: they need interface='linear_operator'; "
                             f"got interface={self.interface!r} for layer {self.name!r}")

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes timed on this layer: :data:`PASSES`, or :data:`LINEAR_OPERATOR_PASSES`."""
        return PASSES if self.interface == "batch" else LINEAR_OPERATOR_PASSES

    @property
    def out_size(self) -> int:
        """Output side ``floor((H + 2p - d(k - 1) - 1) / s) + 1``."""
        return output_size(self.size, self.kernel, self.stride, self.padding, self.padding, self.dilation)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One sample ``(C, H, W)``."""
        return (self.in_channels, self.size, self.size)

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        """``(N, C, H, W)``."""
        return (self.batch, *self.input_shape)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        """``(N, F, Ho, Wo)``."""
        return (self.batch, self.out_channels, self.out_size, self.out_size)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """``(F, C // groups, k, k)``."""
        return (self.out_channels, self.in_channels // self.groups, self.kernel, self.kernel)

    @property
    def macs(self) -> int:
        """Multiply-adds of the dense convolution, ``N F Ho Wo (C / G) k^2``, for any pass."""
        n, f, ho, wo = self.y_shape
        return n * f * ho * wo * (self.in_channels // self.groups) * self.kernel ** 2

    @property
    def options(self) -> dict:
        """Keyword options for :class:`~sparseconv.ConvOperator` and :mod:`sparseconv.reference`."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    flip=self.flip)

    def describe(self, *, pruning: bool = True) -> str:
        """A compact id such as ``N64-C6-14x14-F16-k5-s1-p0``.

        Parameters
        ----------
        pruning : bool, default True
            False leaves the pruning out: the id of the layer's shape, shared by every
            point of a sparsity sweep.
        """
        text = (f"N{self.batch}-C{self.in_channels}-{self.size}x{self.size}-F{self.out_channels}"
                f"-k{self.kernel}-s{self.stride}-p{self.padding}")
        if self.dilation != 1:
            text += f"-d{self.dilation}"
        if self.groups != 1:
            text += f"-g{self.groups}"
        if self.prune and pruning:
            text += f"-pruned{round(self.prune * 100)}%" + ("-magnitude" if self.prune_by == "magnitude" else "")
        if self.table:
            text += "-table"
        if self.flip:
            text += "-flip"
        if self.interface == "linear_operator":
            text += "-linop"
        return text


def _lenet() -> list[Layer]:
    layers = []
    for n in (1, 64, 256):
        layers += [
            Layer(f"C1 N{n}", n, 1, 6, 32, 5),
            Layer(f"C3 N{n}", n, 6, 16, 14, 5),
            Layer(f"C3-table N{n}", n, 6, 16, 14, 5, table=True),
            Layer(f"C5 N{n}", n, 16, 120, 5, 5),
        ]
    return layers


def _cifar() -> list[Layer]:
    # ResNet-20 (He et al. 2016, section 4.2): three stages of 16, 32 and 64 channels on 32x32,
    # 16x16 and 8x8 maps; each stage after the first opens with a stride-2 3x3 convolution.
    shapes = [("16->16 32x32", 16, 16, 32, 1), ("16->32 s2 32x32", 16, 32, 32, 2),
              ("32->32 16x16", 32, 32, 16, 1), ("32->64 s2 16x16", 32, 64, 16, 2),
              ("64->64 8x8", 64, 64, 8, 1)]
    return [Layer(f"{label} N{n}", n, c, f, size, 3, stride=s, padding=1)
            for n in (1, 32) for label, c, f, size, s in shapes]


def _imagenet() -> list[Layer]:
    shapes = [("conv1 3->64 7x7 s2 224", 3, 64, 224, 7, 2, 3), ("64->64 56x56", 64, 64, 56, 3, 1, 1),
              ("64->128 s2 56x56", 64, 128, 56, 3, 2, 1), ("128->128 28x28", 128, 128, 28, 3, 1, 1),
              ("256->256 14x14", 256, 256, 14, 3, 1, 1), ("512->512 7x7", 512, 512, 7, 3, 1, 1)]
    return [Layer(f"{label} N{n}", n, c, f, size, k, stride=s, padding=p)
            for n in (1, 8) for label, c, f, size, k, s, p in shapes]


def _pruned() -> list[Layer]:
    # Issue 11's crossover: magnitude pruning (the smallest weights of a fixed-seed draw) of a
    # 64->64 3x3 layer on 32x32 maps at batch 32, and of LeNet-5's C3 and C5 at batch 64.
    bases = [("64->64 3x3 32x32 N32", 32, 64, 64, 32, 3, 1), ("C3 N64", 64, 6, 16, 14, 5, 0),
             ("C5 N64", 64, 16, 120, 5, 5, 0)]
    return [Layer(f"{label} zero {round(q * 100)}%", n, c, f, size, k, padding=p, prune=q, prune_by="magnitude")
            for label, n, c, f, size, k, p in bases for q in PRUNED_SPARSITIES]


def _image() -> list[Layer]:
    # The inverse-problem use (PyLops' Convolve2D): one 512x512 image, a true convolution with
    # 'same' zero padding, one vector at a time through the LinearOperator.
    return [Layer(f"image 512x512 k{k}", 1, 1, 1, 512, k, padding=k // 2, flip=True, interface="linear_operator")
            for k in (7, 15)]


def _grouped() -> list[Layer]:
    return [
        Layer("depthwise 32 32x32", 16, 32, 32, 32, 3, padding=1, groups=32),
        Layer("depthwise 32 s2 32x32", 16, 32, 32, 32, 3, stride=2, padding=1, groups=32),
        Layer("depthwise 128 16x16", 16, 128, 128, 16, 3, padding=1, groups=128),
        Layer("grouped 64 g4 16x16", 16, 64, 64, 16, 3, padding=1, groups=4),
        Layer("grouped 64 g16 16x16", 16, 64, 64, 16, 3, padding=1, groups=16),
    ]


def _scaling() -> list[Layer]:
    # Sweeps around one base layer (N=8, C=F=16, 16x16, 3x3, "same" padding).
    layers = [Layer(f"size {s}", 8, 16, 16, s, 3, padding=1, sweep=("image size", s)) for s in (8, 16, 32, 64)]
    layers += [Layer(f"channels {c}", 8, c, c, 16, 3, padding=1, sweep=("channels", c)) for c in (4, 8, 16, 32, 64)]
    layers += [Layer(f"batch {n}", n, 16, 16, 16, 3, padding=1, sweep=("batch", n)) for n in (1, 4, 16, 64)]
    layers += [Layer(f"kernel {k}", 8, 16, 16, 16, k, padding=k // 2, sweep=("kernel size", k)) for k in (1, 3, 5, 7)]
    return layers


def _smoke() -> list[Layer]:
    # Tiny, but through every code path: padding, stride, groups, dilation, a random and a
    # magnitude mask, and a flipped single-channel image through the LinearOperator.
    return [
        Layer("smoke 3x3", 2, 2, 3, 8, 3, padding=1),
        Layer("smoke s2 g2", 2, 4, 4, 9, 3, stride=2, padding=1, groups=2),
        Layer("smoke d2 pruned", 2, 2, 2, 10, 3, padding=2, dilation=2, prune=0.5),
        Layer("smoke pruned magnitude", 2, 4, 4, 6, 3, padding=1, prune=0.75, prune_by="magnitude"),
        Layer("smoke image k5", 1, 1, 1, 16, 5, padding=2, flip=True, interface="linear_operator"),
    ]


_SUITE_BUILDERS: dict[str, Callable[[], list[Layer]]] = {
    "smoke": _smoke, "lenet": _lenet, "cifar": _cifar, "imagenet": _imagenet, "pruned": _pruned,
    "image": _image, "grouped": _grouped, "scaling": _scaling,
}


def suite_layers(name: str) -> list[Layer]:
    """The layers of a suite.

    Parameters
    ----------
    name : {"smoke", "lenet", "cifar", "imagenet", "pruned", "image", "grouped", "scaling"}

    Returns
    -------
    list of Layer
    """
    if name not in _SUITE_BUILDERS:
        raise ValueError(f"suite must be one of {SUITES} (or 'all' for run_suite); got {name!r}")
    return _SUITE_BUILDERS[name]()


@dataclass
class Case:
    """One layer's data in one dtype, with its float64 reference results.

    Attributes
    ----------
    layer : Layer
    dtype : numpy.dtype
    x : ndarray of shape (N, C, H, W)
    w : ndarray of shape (F, C // groups, k, k)
        Zero wherever ``mask`` is False; rotated by the operator when ``layer.flip``.
    dy : ndarray of shape (N, F, Ho, Wo)
    mask : ndarray of bool, shape like ``w``, or None
    expected : dict of str to ndarray
        float64 results of each of ``layer.passes``, computed from ``x``, ``w``, ``dy`` cast
        to float64; the weight gradient is multiplied by ``mask``.
    reference : str
        Which reference produced ``expected`` ("direct", "im2col", or "none" when not computed).
    """

    layer: Layer
    dtype: np.dtype
    x: np.ndarray
    w: np.ndarray
    dy: np.ndarray
    mask: Optional[np.ndarray]
    expected: dict[str, np.ndarray]
    reference: str

    @property
    def kernel(self) -> np.ndarray:
        """The cross-correlation kernel: ``w``, rotated 180 degrees when ``layer.flip``.

        Methods that only correlate (im2col, FFT, direct, PyTorch) run on this one.
        """
        return np.ascontiguousarray(self.w[:, :, ::-1, ::-1]) if self.layer.flip else self.w


def layer_mask(layer: Layer, w: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """The layer's weight mask (True: kept), or None for a layer without one.

    Parameters
    ----------
    layer : Layer
    w : ndarray of shape ``layer.weight_shape``, optional
        The weights magnitude pruning ranks; needed when ``layer.prune_by == "magnitude"``.

    Returns
    -------
    ndarray of bool of shape ``layer.weight_shape``, or None
        Exactly ``round(prune * size)`` weights are False.
    """
    shape = layer.weight_shape
    if layer.table:
        from ..models import C3_TABLE  # rows: input maps, columns: output maps
        if shape[:2] != (C3_TABLE.shape[1], C3_TABLE.shape[0]):
            raise ValueError(f"table=True needs LeNet-5's C3 shape (F, C) = (16, 6); got layer {layer.describe()}")
        return np.broadcast_to(C3_TABLE.T[:, :, None, None], shape).copy()
    if not layer.prune:
        return None
    size = int(np.prod(shape))
    if layer.prune_by == "magnitude":
        if w is None or w.shape != shape:
            raise ValueError(f"magnitude pruning needs the weights of shape {shape}; got "
                             f"{None if w is None else w.shape}")
        order = np.argsort(np.abs(w).ravel(), kind="stable")  # smallest first
    else:
        order = np.random.default_rng(1).permutation(size)
    mask = np.ones(size, dtype=bool)
    mask[order[:round(layer.prune * size)]] = False
    return mask.reshape(shape)


def make_case(layer: Layer, dtype: Union[str, np.dtype], *, reference: bool = True) -> Case:
    """Random data for a layer and its float64 reference results.

    The same seed is used for every dtype, so float32 and float64 cases hold the same
    numbers up to rounding.

    Parameters
    ----------
    layer : Layer
    dtype : {"float32", "float64"}
    reference : bool, default True
        False skips the reference results (``expected`` empty, ``reference="none"``): for
        timing-only scripts that check nothing.

    Returns
    -------
    Case
    """
    dtype = np.dtype(dtype)
    if dtype.name not in TOLERANCES:
        raise ValueError(f"dtype must be one of {tuple(TOLERANCES)}; got {dtype.name!r}")
    rng = np.random.default_rng(0)
    fan_in = layer.weight_shape[1] * layer.kernel ** 2
    w = rng.standard_normal(layer.weight_shape) / math.sqrt(fan_in)
    mask = layer_mask(layer, w)
    if mask is not None:
        w[~mask] = 0.0
    x = rng.standard_normal(layer.x_shape).astype(dtype)
    w = w.astype(dtype)
    dy = rng.standard_normal(layer.y_shape).astype(dtype)
    if not reference:
        return Case(layer=layer, dtype=dtype, x=x, w=w, dy=dy, mask=mask, expected={}, reference="none")
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    positions = (layer.size + 2 * layer.padding + 2 * layer.dilation * (layer.kernel - 1)) ** 2
    unrolled = layer.batch * layer.out_size ** 2 * layer.in_channels * layer.kernel ** 2 * 8
    if positions * layer.groups <= _DIRECT_REFERENCE_MAX_ITERATIONS or unrolled > _IM2COL_REFERENCE_MAX_BYTES:
        reference = "direct"
        y = ref.conv_direct(x64, w64, **layer.options)
        dx, dw, _ = ref.conv_direct_backward(x64, w64, dy64, **layer.options)
    else:
        reference = "im2col"
        y = ref.conv_im2col(x64, w64, **layer.options)
        dx, dw, _ = ref.conv_im2col_backward(x64, w64, dy64, **layer.options)
    if mask is not None:
        dw = dw * mask
    results = {"forward": y, "adjoint": dx, "weight_grad": dw}
    return Case(layer=layer, dtype=dtype, x=x, w=w, dy=dy, mask=mask,
                expected={name: results[name] for name in layer.passes}, reference=reference)
