"""Benchmark harness: the sparse matrix against dense, im2col, direct, FFT and PyTorch, in one run.

Every method computes the three passes of a 2-D convolution layer -- the forward product, the
input gradient ``dJ/dx`` and the weight gradient ``dJ/dw`` -- on the same data, in the same
process, under the same thread limits. Each result is checked against an independent
float64 reference (:mod:`sparseconv.reference`) *before* it is timed; a method whose answer
is wrong is recorded as failed and not timed, one that cannot run (optional package missing,
memory budget exceeded, too slow) is recorded as skipped with the reason.

Methods
-------
sparse
    :class:`sparseconv.ConvOperator` with its defaults: ``forward`` and ``backward_input``
    with ``method="auto"`` (the factored gather + GEMM of :mod:`sparseconv.factored` or the
    CSR kernel, by the layer's shape; the choice is recorded) and the tap-grouped weight
    gradient. The pattern and the gather tables are built once (their construction is timed
    separately, and the tables count in the method's buffer).
csr
    The same operator held to the literal matrix: ``W @ x`` and ``W.T @ dy`` with scipy's
    CSR kernels (``method="csr"``) and the kernel gradient as the per-entry scatter-add over
    the tying map (``weight_grad(method="entries")``).
dense
    The same matrix stored dense: one GEMM per pass; the weight gradient is the dense
    ``dy.T @ x`` reduced through the tying map, as a fully connected layer would do it.
im2col
    Patches unrolled as rows ``(N * L, C * k * k)`` by one copy through
    ``sliding_window_view``, then one GEMM per group; col2im for the input gradient adds the
    ``k * k`` strided slices back (``reference.col2im`` uses ``np.add.at``, exact but several
    times slower, which would flatter the other methods).
direct
    ``scipy.signal.correlate`` / ``convolve`` with ``method="direct"``, one call per (filter,
    channel) pair with the batch as a leading axis. scipy has no stride or dilation: every
    position is computed and then subsampled, the kernel is dilated with zeros. This N-d
    path is slower per multiply-add than ``correlate2d`` on single images, which would need
    ``N`` times more Python calls; either way it is a reference point, not a contender.
fft
    ``scipy.fft.rfft2`` of the padded input and the kernel, a complex GEMM over channels at
    every frequency, ``irfft2``; the weight gradient evaluates its inverse transform at the
    ``k * k`` taps only (one GEMM with an inverse-DFT basis). The kernel spectrum is cached like
    the sparse matrix's values (its cost is ``refresh_s``); ``workers`` follows the threads.
torch
    ``torch.nn.functional.conv2d`` under ``torch.no_grad()`` for the forward pass and
    ``torch.autograd.grad`` on a recorded graph for each gradient (optional).

Measurements
------------
Median and minimum over repeats after a warm-up outside the timed region (fast calls are
looped so that one repeat lasts a few milliseconds, as ``timeit`` does); useful GFLOP/s,
``2 * MACs / median`` with the MACs of the dense convolution; the bytes of each method's main
buffer and the numpy allocations traced by ``tracemalloc`` during one call; construction
time; and for every row the ratio to im2col measured in the same run. BLAS and OpenMP pools
are limited with threadpoolctl, torch with ``torch.set_num_threads``, ``scipy.fft`` with
``workers``; sparseconv's own pool with :func:`sparseconv.parallel.threads`.

Examples
--------
>>> from sparseconv.bench import run_suite
>>> result = run_suite("smoke", dtypes=("float64",), threads=(1,), repeats=2,
...                    out_dir="results", progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import reference as ref
from .conv import ConvOperator
from .geometry import default_memory_budget, output_size
from .parallel import get_threads as sparse_threads_in_force
from .parallel import threads as sparse_threads
from .pattern import MemoryBudgetError

__all__ = [
    "PASSES",
    "METHODS",
    "SUITES",
    "TOLERANCES",
    "DEFAULT_MEMORY_BUDGET",
    "NOISY_SPREAD",
    "Layer",
    "Case",
    "Prepared",
    "MethodSkipped",
    "suite_layers",
    "make_case",
    "prepare_method",
    "verify",
    "measure",
    "measure_interleaved",
    "thread_limits",
    "environment_info",
    "run_suite",
    "format_table",
    "format_markdown",
    "parse_threads",
    "parse_dtypes",
    "parse_bytes",
    "add_arguments",
    "run_from_args",
]

PASSES = ("forward", "input_grad", "weight_grad")
METHODS = ("sparse", "csr", "dense", "im2col", "direct", "fft", "torch")
SUITES = ("smoke", "lenet", "cifar", "imagenet", "pruned", "grouped", "scaling")
# Largest relative error (max |result - reference| / max |reference|) accepted per dtype.
# float32 sums of up to ~10^5 products, in any order, stay well inside 1e-4.
TOLERANCES = {"float32": 1e-4, "float64": 1e-10}
# Bytes any one method's main buffer may take; also capped at half the physical memory.
DEFAULT_MEMORY_BUDGET = 1 << 30
# scipy.signal's N-d direct correlation runs at well under 0.1 GMAC/s: beyond this many
# multiply-adds per pass (stride and dilation waste included) it would dominate the run.
DEFAULT_MAX_DIRECT_MACS = 30_000_000
DEFAULT_MAX_SECONDS = 3.0
# One timed repeat loops a fast call until it lasts this long, so timer resolution and
# call overhead do not dominate microsecond-scale passes.
_MIN_REPEAT_SECONDS = 0.005
_MAX_NUMBER = 10_000
# A pass whose median is this many times its minimum was disturbed by other work while it ran;
# the summary counts such measurements so that an unreliable configuration says so.
NOISY_SPREAD = 1.5
# The float64 reference uses the window-by-window direct convolution unless its Python loop
# would run more than this many (position, group) iterations; im2col in float64 then.
_DIRECT_REFERENCE_MAX_ITERATIONS = 200_000

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------- layers and suites
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
        ``weight_mask`` (the other methods multiply the zeros).
    table : bool
        Use LeNet-5's C3 connection table as the mask (needs C=6, F=16).
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
    table: bool = False
    sweep: Optional[tuple[str, int]] = None

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
        """Keyword options for :class:`ConvOperator` and :mod:`sparseconv.reference`."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def describe(self) -> str:
        """A compact id such as ``N64-C6-14x14-F16-k5-s1-p0``."""
        text = (f"N{self.batch}-C{self.in_channels}-{self.size}x{self.size}-F{self.out_channels}"
                f"-k{self.kernel}-s{self.stride}-p{self.padding}")
        if self.dilation != 1:
            text += f"-d{self.dilation}"
        if self.groups != 1:
            text += f"-g{self.groups}"
        if self.prune:
            text += f"-pruned{round(self.prune * 100)}%"
        if self.table:
            text += "-table"
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
    return [Layer(f"32->32 16x16 pruned {round(q * 100)}%", 16, 32, 32, 16, 3, padding=1, prune=q)
            for q in (0.0, 0.5, 0.8, 0.9, 0.95)]


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
    # Tiny, but through every code path: padding, stride, groups, dilation and a mask.
    return [
        Layer("smoke 3x3", 2, 2, 3, 8, 3, padding=1),
        Layer("smoke s2 g2", 2, 4, 4, 9, 3, stride=2, padding=1, groups=2),
        Layer("smoke d2 pruned", 2, 2, 2, 10, 3, padding=2, dilation=2, prune=0.5),
    ]


_SUITE_BUILDERS: dict[str, Callable[[], list[Layer]]] = {
    "smoke": _smoke, "lenet": _lenet, "cifar": _cifar, "imagenet": _imagenet,
    "pruned": _pruned, "grouped": _grouped, "scaling": _scaling,
}


def suite_layers(name: str) -> list[Layer]:
    """The layers of a suite.

    Parameters
    ----------
    name : {"smoke", "lenet", "cifar", "imagenet", "pruned", "grouped", "scaling"}

    Returns
    -------
    list of Layer
    """
    if name not in _SUITE_BUILDERS:
        raise ValueError(f"suite must be one of {SUITES} (or 'all' for run_suite); got {name!r}")
    return _SUITE_BUILDERS[name]()


# ---------------------------------------------------------------------- data
@dataclass
class Case:
    """One layer's data in one dtype, with its float64 reference results.

    Attributes
    ----------
    layer : Layer
    dtype : numpy.dtype
    x : ndarray of shape (N, C, H, W)
    w : ndarray of shape (F, C // groups, k, k)
        Zero wherever ``mask`` is False.
    dy : ndarray of shape (N, F, Ho, Wo)
    mask : ndarray of bool, shape like ``w``, or None
    expected : dict of str to ndarray
        float64 results of each pass, computed from ``x``, ``w``, ``dy`` cast to float64;
        the weight gradient is multiplied by ``mask``.
    reference : str
        Which reference produced ``expected`` ("direct" or "im2col").
    """

    layer: Layer
    dtype: np.dtype
    x: np.ndarray
    w: np.ndarray
    dy: np.ndarray
    mask: Optional[np.ndarray]
    expected: dict[str, np.ndarray]
    reference: str


def _layer_mask(layer: Layer) -> Optional[np.ndarray]:
    shape = layer.weight_shape
    if layer.table:
        from .models import C3_TABLE  # rows: input maps, columns: output maps
        if shape[:2] != (C3_TABLE.shape[1], C3_TABLE.shape[0]):
            raise ValueError(f"table=True needs LeNet-5's C3 shape (F, C) = (16, 6); got layer {layer.describe()}")
        return np.broadcast_to(C3_TABLE.T[:, :, None, None], shape).copy()
    if layer.prune:
        if not 0.0 < layer.prune < 1.0:
            raise ValueError(f"prune must be in [0, 1); got {layer.prune} for layer {layer.name!r}")
        size = int(np.prod(shape))
        mask = np.ones(size, dtype=bool)
        mask[np.random.default_rng(1).permutation(size)[:round(layer.prune * size)]] = False
        return mask.reshape(shape)
    return None


def make_case(layer: Layer, dtype: Union[str, np.dtype]) -> Case:
    """Random data for a layer and its float64 reference results.

    The same seed is used for every dtype, so float32 and float64 cases hold the same
    numbers up to rounding.

    Parameters
    ----------
    layer : Layer
    dtype : {"float32", "float64"}

    Returns
    -------
    Case
    """
    dtype = np.dtype(dtype)
    if dtype.name not in TOLERANCES:
        raise ValueError(f"dtype must be one of {tuple(TOLERANCES)}; got {dtype.name!r}")
    rng = np.random.default_rng(0)
    mask = _layer_mask(layer)
    fan_in = layer.weight_shape[1] * layer.kernel ** 2
    w = rng.standard_normal(layer.weight_shape) / math.sqrt(fan_in)
    if mask is not None:
        w[~mask] = 0.0
    x = rng.standard_normal(layer.x_shape).astype(dtype)
    w = w.astype(dtype)
    dy = rng.standard_normal(layer.y_shape).astype(dtype)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    positions = (layer.size + 2 * layer.padding + 2 * layer.dilation * (layer.kernel - 1)) ** 2
    if positions * layer.groups <= _DIRECT_REFERENCE_MAX_ITERATIONS:
        reference = "direct"
        y = ref.conv_direct(x64, w64, **layer.options)
        dx, dw, _ = ref.conv_direct_backward(x64, w64, dy64, **layer.options)
    else:
        reference = "im2col"
        y = ref.conv_im2col(x64, w64, **layer.options)
        dx, dw, _ = ref.conv_im2col_backward(x64, w64, dy64, **layer.options)
    if mask is not None:
        dw = dw * mask
    return Case(layer=layer, dtype=dtype, x=x, w=w, dy=dy, mask=mask,
                expected={"forward": y, "input_grad": dx, "weight_grad": dw}, reference=reference)


# ---------------------------------------------------------------------- methods
class MethodSkipped(Exception):
    """A method cannot run on a case; the message says why (recorded as the skip reason)."""


@dataclass
class Prepared:
    """A method set up for one case: a zero-argument callable per pass.

    Attributes
    ----------
    method : str
    passes : dict of str to callable
        ``"forward"``, ``"input_grad"``, ``"weight_grad"``; each returns its result (an
        ndarray, or a torch tensor).
    to_numpy : callable
        Converts a pass's result to an ndarray (outside the timed region).
    buffer_name : str
        What the method's main buffer is.
    buffer_bytes : int or None
        Its size in bytes (None when the method's allocator is not visible to us).
    build_s : float or None
        One-time set-up: the pattern and values of the matrix, the kernel spectrum.
    refresh : callable or None
        Re-applies the current weights to the prepared structure (the per-training-step cost
        a changed weight incurs: ``set_weight``, a new kernel spectrum).
    traced : bool
        True when the method allocates through numpy, so ``tracemalloc`` sees its buffers.
    info : dict
        Extra facts for the JSON (matrix shape, nnz, FFT size, ...).
    """

    method: str
    passes: dict[str, Callable[[], Any]]
    to_numpy: Callable[[Any], np.ndarray] = np.asarray
    buffer_name: str = ""
    buffer_bytes: Optional[int] = None
    build_s: Optional[float] = None
    refresh: Optional[Callable[[], Any]] = None
    traced: bool = True
    info: dict = field(default_factory=dict)


def _format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _check_budget(need: int, what: str, budget: int) -> None:
    if need > budget:
        raise MethodSkipped(f"{what} would need {_format_bytes(need)}, over the memory budget of "
                            f"{_format_bytes(budget)} (--memory-budget)")


def _dilated_kernel(w: np.ndarray, dilation: int) -> np.ndarray:
    """``(F, Cg, k, k)`` -> ``(F, Cg, e, e)`` with ``e = d (k - 1) + 1``, zeros between taps."""
    if dilation == 1:
        return w
    f, cg, k, _ = w.shape
    extent = dilation * (k - 1) + 1
    out = np.zeros((f, cg, extent, extent), dtype=w.dtype)
    out[:, :, ::dilation, ::dilation] = w
    return out


def _pad(x: np.ndarray, p: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x


def _build_operator(case: Case, budget: int) -> ConvOperator:
    layer = case.layer
    try:
        return ConvOperator(case.w, layer.input_shape, weight_mask=case.mask, memory_budget=budget,
                            **layer.options)
    except MemoryBudgetError as err:
        raise MethodSkipped(str(err)) from None


def _matrix_bytes(op: ConvOperator) -> int:
    m = op.matrix
    return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + op.param_index.nbytes)


def _build_with_tables(case: Case, budget: int) -> tuple[ConvOperator, int]:
    """The operator plus the gather tables its default products use (part of its set-up),
    and the bytes of those tables."""
    op = _build_operator(case, budget)
    tables = []
    if "taps" in (op.method("forward"), op.method("adjoint")):
        tables.append(op.tap_table())
    if op.method("adjoint") == "taps":
        adjoint = op.adjoint_tables()
        tables += [a for p in adjoint.phases for a in (p.table, p.taps)] + list(adjoint.scatter_rounds)
    return op, int(sum(a.nbytes for a in tables))


def _prepare_sparse(case: Case, *, threads: int, budget: int, repeats: int, max_seconds: float,
                    max_direct_macs: int) -> Prepared:
    op, table_bytes = _build_with_tables(case, budget)
    build = measure(lambda: _build_with_tables(case, budget), repeats=min(repeats, 3), max_seconds=max_seconds,
                    warmup=False)
    x, w, dy = case.x, case.w, case.dy
    return Prepared(
        method="sparse",
        passes={"forward": lambda: op.forward(x), "input_grad": lambda: op.backward_input(dy),
                "weight_grad": lambda: op.weight_grad(x, dy)},
        buffer_name="sparse matrix (values, indices, indptr, param_index) and gather tables",
        buffer_bytes=_matrix_bytes(op) + table_bytes,
        build_s=build["median_s"], refresh=lambda: op.set_weight(w),
        info={"matrix_shape": list(op.shape), "nnz": op.nnz, "forward_method": op.method("forward"),
              "input_grad_method": op.method("adjoint"), "weight_grad_method": "taps",
              "density": op.nnz / (op.shape[0] * op.shape[1])})


def _prepare_csr(case: Case, *, threads: int, budget: int, repeats: int, max_seconds: float,
                 max_direct_macs: int) -> Prepared:
    op = _build_operator(case, budget)
    build = measure(lambda: _build_operator(case, budget), repeats=min(repeats, 3), max_seconds=max_seconds,
                    warmup=False)
    x, w, dy = case.x, case.w, case.dy
    return Prepared(
        method="csr",
        passes={"forward": lambda: op.forward(x, method="csr"),
                "input_grad": lambda: op.backward_input(dy, method="csr"),
                "weight_grad": lambda: op.weight_grad(x, dy, method="entries")},
        buffer_name="sparse matrix (values, indices, indptr, param_index)", buffer_bytes=_matrix_bytes(op),
        build_s=build["median_s"], refresh=lambda: op.set_weight(w),
        info={"matrix_shape": list(op.shape), "nnz": op.nnz, "weight_grad_method": "entries",
              "density": op.nnz / (op.shape[0] * op.shape[1])})


def _prepare_dense(case: Case, *, threads: int, budget: int, repeats: int, max_seconds: float,
                   max_direct_macs: int) -> Prepared:
    layer = case.layer
    rows = int(np.prod(layer.y_shape[1:]))
    cols = int(np.prod(layer.input_shape))
    # The matrix itself plus the dense (rows x cols) weight-gradient product.
    _check_budget(2 * rows * cols * case.dtype.itemsize,
                  f"the dense {rows}x{cols} {case.dtype.name} matrix and its gradient", budget)

    def build() -> tuple[ConvOperator, np.ndarray]:
        op = _build_operator(case, budget)
        return op, op.matrix.toarray()

    op, dense = build()
    timing = measure(build, repeats=min(repeats, 3), max_seconds=max_seconds, warmup=False)
    n = layer.batch
    flat = (np.repeat(np.arange(rows, dtype=np.int64), np.diff(op.matrix.indptr)) * cols
            + op.matrix.indices)
    param_index = op.param_index
    n_params = op.n_params
    x2, dy2 = case.x.reshape(n, -1), case.dy.reshape(n, -1)
    dense_flat = dense.reshape(-1)
    w_flat = case.w.reshape(-1)

    def weight_grad() -> np.ndarray:
        full = dy2.T @ x2
        grad = np.bincount(param_index, weights=full.reshape(-1)[flat], minlength=n_params)
        return grad.astype(case.dtype).reshape(layer.weight_shape)

    def refresh() -> None:
        dense_flat[flat] = w_flat[param_index]

    return Prepared(
        method="dense",
        passes={"forward": lambda: (x2 @ dense.T).reshape(layer.y_shape),
                "input_grad": lambda: (dy2 @ dense).reshape(layer.x_shape),
                "weight_grad": weight_grad},
        buffer_name="dense matrix", buffer_bytes=int(dense.nbytes), build_s=timing["median_s"],
        refresh=refresh, info={"matrix_shape": [rows, cols]})


def _prepare_im2col(case: Case, *, threads: int, budget: int, repeats: int, max_seconds: float,
                    max_direct_macs: int) -> Prepared:
    layer = case.layer
    n, c, h, _ = layer.x_shape
    f, cg, k, _ = layer.weight_shape
    g, fg = layer.groups, f // layer.groups
    s, p, d, o = layer.stride, layer.padding, layer.dilation, layer.out_size
    extent = d * (k - 1) + 1
    kg = cg * k * k
    cols_bytes = n * o * o * c * k * k * case.dtype.itemsize
    _check_budget(cols_bytes, f"the im2col buffer ({n * o * o} x {c * k * k})", budget)
    wmat = case.w.reshape(g, fg, kg)
    x, dy = case.x, case.dy

    def unroll(xb: np.ndarray) -> np.ndarray:
        # (N, C, Ho, Wo, k, k) view -> rows (n, oy, ox), columns (c, ky, kx): the one copy.
        win = sliding_window_view(_pad(xb, p), (extent, extent), axis=(2, 3))[:, :, ::s, ::s, ::d, ::d]
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * o * o, g, kg)

    def dy_rows() -> np.ndarray:
        return dy.transpose(0, 2, 3, 1).reshape(n * o * o, g, fg)

    def forward() -> np.ndarray:
        y = np.matmul(unroll(x).transpose(1, 0, 2), wmat.transpose(0, 2, 1))  # (G, N*L, Fg)
        y = y.transpose(1, 0, 2).reshape(n, o * o, f).transpose(0, 2, 1)
        return np.ascontiguousarray(y).reshape(layer.y_shape)

    def input_grad() -> np.ndarray:
        dcols = np.matmul(dy_rows().transpose(1, 0, 2), wmat)  # (G, N*L, Kg)
        dcols = dcols.transpose(1, 0, 2).reshape(n, o, o, c, k, k)
        dxp = np.zeros((n, c, h + 2 * p, h + 2 * p), dtype=case.dtype)
        span = s * (o - 1) + 1
        for ky in range(k):
            for kx in range(k):
                dxp[:, :, ky * d:ky * d + span:s, kx * d:kx * d + span:s] += \
                    dcols[:, :, :, :, ky, kx].transpose(0, 3, 1, 2)
        return np.ascontiguousarray(dxp[:, :, p:p + h, p:p + h])

    def weight_grad() -> np.ndarray:
        grad = np.matmul(dy_rows().transpose(1, 2, 0), unroll(x).transpose(1, 0, 2))  # (G, Fg, Kg)
        return grad.reshape(layer.weight_shape)

    return Prepared(method="im2col", passes={"forward": forward, "input_grad": input_grad,
                                             "weight_grad": weight_grad},
                    buffer_name="im2col buffer (N*Ho*Wo x C*k*k)", buffer_bytes=int(cols_bytes))


def _prepare_direct(case: Case, *, threads: int, budget: int, repeats: int, max_seconds: float,
                    max_direct_macs: int) -> Prepared:
    from scipy import signal

    layer = case.layer
    n, c, h, _ = layer.x_shape
    f, cg, k, _ = layer.weight_shape
    fg = f // layer.groups
    s, p, d, o = layer.stride, layer.padding, layer.dilation, layer.out_size
    extent = d * (k - 1) + 1
    hp = h + 2 * p
    valid = hp - extent + 1
    work = n * f * cg * valid * valid * extent * extent
    if work > max_direct_macs:
        raise MethodSkipped(
            f"scipy.signal's direct correlation would do {work:,} multiply-adds per pass (every position "
            f"before striding, zeros of the dilated kernel included), over max_direct_macs={max_direct_macs:,} "
            f"(--max-direct-macs); it runs at well under 0.1 GMAC/s")
    wd = _dilated_kernel(case.w, d)
    x, dy = case.x, case.dy
    span = s * (o - 1) + 1

    def dilate_dy() -> np.ndarray:
        out = np.zeros((n, f, span, span), dtype=case.dtype)
        out[:, :, ::s, ::s] = dy
        return out

    def forward() -> np.ndarray:
        xp = _pad(x, p)
        y = np.zeros((n, f, valid, valid), dtype=case.dtype)
        for fi in range(f):
            c0 = (fi // fg) * cg
            for ci in range(cg):
                y[:, fi] += signal.correlate(xp[:, c0 + ci], wd[fi, ci][None], mode="valid", method="direct")
        return np.ascontiguousarray(y[:, :, ::s, ::s])

    def input_grad() -> np.ndarray:
        dyd = dilate_dy()
        full = span + extent - 1
        dxp = np.zeros((n, c, hp, hp), dtype=case.dtype)
        for fi in range(f):
            c0 = (fi // fg) * cg
            for ci in range(cg):
                dxp[:, c0 + ci, :full, :full] += signal.convolve(dyd[:, fi], wd[fi, ci][None], mode="full",
                                                                method="direct")
        return np.ascontiguousarray(dxp[:, :, p:p + h, p:p + h])

    def weight_grad() -> np.ndarray:
        xp, dyd = _pad(x, p), dilate_dy()
        grad = np.empty(layer.weight_shape, dtype=case.dtype)
        for fi in range(f):
            c0 = (fi // fg) * cg
            for ci in range(cg):
                full = signal.correlate(xp[:, c0 + ci], dyd[:, fi], mode="valid", method="direct")
                grad[fi, ci] = full[0, :extent:d, :extent:d]
        return grad

    return Prepared(method="direct", passes={"forward": forward, "input_grad": input_grad,
                                             "weight_grad": weight_grad},
                    buffer_name="padded input", buffer_bytes=int(n * c * hp * hp * case.dtype.itemsize),
                    info={"calls_per_pass": f * cg, "multiply_adds_per_pass": work})


def _prepare_fft(case: Case, *, threads: int, budget: int, repeats: int, max_seconds: float,
                 max_direct_macs: int) -> Prepared:
    from scipy import fft as sfft

    layer = case.layer
    n, c, h, _ = layer.x_shape
    f, cg, k, _ = layer.weight_shape
    g, fg = layer.groups, f // layer.groups
    s, p, d, o = layer.stride, layer.padding, layer.dilation, layer.out_size
    extent = d * (k - 1) + 1
    hp = h + 2 * p
    valid = hp - extent + 1
    span = s * (o - 1) + 1
    # The padded input's size is enough: a valid correlation never wraps around it.
    size = sfft.next_fast_len(hp, real=True)
    shape2 = (size, size)
    n_freq = size * (size // 2 + 1)
    complex_dtype = np.result_type(case.dtype, np.complex64)
    spectra = (n * c + f * cg + n * f) * n_freq * complex_dtype.itemsize
    _check_budget(spectra, "the input, kernel and output spectra", budget)
    x, w, dy = case.x, case.w, case.dy
    state: dict[str, np.ndarray] = {}

    def to_freq_major(a: np.ndarray, groups: int, per_group: int) -> np.ndarray:
        # (B, groups * per_group, S, S//2+1) -> (freq, groups, B, per_group), contiguous so that
        # each frequency's small matrix product goes to BLAS.
        return np.ascontiguousarray(a.reshape(a.shape[0], groups, per_group, n_freq).transpose(3, 1, 0, 2))

    def from_freq_major(a: np.ndarray, batch: int, channels: int) -> np.ndarray:
        # (freq, G, B, per_group) -> (B, channels, S, S//2+1)
        return np.ascontiguousarray(a.transpose(2, 1, 3, 0)).reshape(batch, channels, size, size // 2 + 1)

    def weight_spectrum() -> None:
        spec = sfft.rfft2(_dilated_kernel(w, d), s=shape2, workers=threads)  # (F, Cg, S, S//2+1)
        state["w"] = np.ascontiguousarray(spec.reshape(g, fg, cg, n_freq).transpose(3, 0, 2, 1))  # (freq, G, Cg, Fg)
        state["w_conj"] = state["w"].conj()

    def input_spectrum() -> np.ndarray:
        return to_freq_major(sfft.rfft2(_pad(x, p), s=shape2, workers=threads), g, cg)  # (freq, G, N, Cg)

    def dy_spectrum() -> np.ndarray:
        dyd = np.zeros((n, f, span, span), dtype=case.dtype)
        dyd[:, :, ::s, ::s] = dy
        return to_freq_major(sfft.rfft2(dyd, s=shape2, workers=threads), g, fg)  # (freq, G, N, Fg)

    def forward() -> np.ndarray:
        # Correlation: the product with the conjugate kernel spectrum.
        y = np.matmul(input_spectrum(), state["w_conj"])  # (freq, G, N, Fg)
        y = sfft.irfft2(from_freq_major(y, n, f), s=shape2, workers=threads)
        return np.ascontiguousarray(y[:, :, :valid:s, :valid:s])

    def input_grad() -> np.ndarray:
        # The adjoint is the full convolution: the product with the kernel spectrum itself.
        dx = np.matmul(dy_spectrum(), state["w"].transpose(0, 1, 3, 2))  # (freq, G, N, Cg)
        dx = sfft.irfft2(from_freq_major(dx, n, c), s=shape2, workers=threads)
        return np.ascontiguousarray(dx[:, :, p:p + h, p:p + h])

    # Only the k x k taps of each (filter, channel) correlation are needed, so the weight
    # gradient's inverse transform is evaluated at those points alone: one GEMM with this
    # (k*k, freq) inverse-DFT basis instead of F*C/G full inverse FFTs (which cost ~10x more).
    # Half-spectrum columns other than 0 and S/2 stand for their conjugate twin too, hence 2.
    u = np.arange(size)[:, None]
    v = np.arange(size // 2 + 1)
    v_weight = np.where((v == 0) | (2 * v == size), 1.0, 2.0)
    taps = np.arange(k) * d
    rows = np.exp(2j * np.pi * u * taps[None, :] / size)  # (S, k): e^{2 pi i u a / S}
    cols = v_weight[:, None] * np.exp(2j * np.pi * v[:, None] * taps[None, :] / size)  # (S//2+1, k)
    basis = (np.einsum("ua,vb->abuv", rows, cols) / size ** 2).reshape(k * k, n_freq).astype(complex_dtype)

    def weight_grad() -> np.ndarray:
        # Correlation of the padded input with the dilated dy, summed over the batch by the GEMM.
        gw = np.matmul(dy_spectrum().conj().transpose(0, 1, 3, 2), input_spectrum())  # (freq, G, Fg, Cg)
        gw = (basis @ gw.reshape(n_freq, f * cg)).real  # (k*k, F*Cg)
        return np.ascontiguousarray(gw.reshape(k, k, f, cg).transpose(2, 3, 0, 1))

    weight_spectrum()
    timing = measure(weight_spectrum, repeats=min(repeats, 3), max_seconds=max_seconds, warmup=False)
    return Prepared(method="fft", passes={"forward": forward, "input_grad": input_grad,
                                          "weight_grad": weight_grad},
                    buffer_name="input, kernel and output spectra", buffer_bytes=int(spectra),
                    build_s=timing["median_s"], refresh=weight_spectrum,
                    info={"fft_size": [size, size], "workers": threads})


def _prepare_torch(case: Case, *, threads: int, budget: int, repeats: int, max_seconds: float,
                   max_direct_macs: int) -> Prepared:
    try:
        import torch
        import torch.nn.functional as tf
    except ImportError as err:
        raise MethodSkipped(f"PyTorch is not installed ({err}); pip install torch to compare") from None
    layer = case.layer
    xt, wt, dyt = (torch.from_numpy(np.ascontiguousarray(a)) for a in (case.x, case.w, case.dy))

    def conv(inp, weight):
        return tf.conv2d(inp, weight, None, stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation, groups=layer.groups)

    def forward():
        with torch.no_grad():
            return conv(xt, wt)

    # Each gradient is timed as the backward call alone, on a graph recorded once, with only
    # the argument of interest requiring a gradient (so autograd computes just that one).
    x_leaf = xt.detach().clone().requires_grad_(True)
    y_x = conv(x_leaf, wt)
    w_leaf = wt.detach().clone().requires_grad_(True)
    y_w = conv(xt, w_leaf)
    return Prepared(
        method="torch",
        passes={"forward": forward,
                "input_grad": lambda: torch.autograd.grad(y_x, x_leaf, dyt, retain_graph=True)[0],
                "weight_grad": lambda: torch.autograd.grad(y_w, w_leaf, dyt, retain_graph=True)[0]},
        to_numpy=lambda t: t.detach().numpy(), buffer_name="n/a (torch's own allocator)", traced=False,
        info={"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "mkldnn": bool(torch.backends.mkldnn.is_available())})


# Every preparer takes the same keywords and uses those it needs.
_PREPARERS = {"sparse": _prepare_sparse, "csr": _prepare_csr, "dense": _prepare_dense, "im2col": _prepare_im2col,
              "direct": _prepare_direct, "fft": _prepare_fft, "torch": _prepare_torch}


def prepare_method(method: str, case: Case, *, threads: int = 1, memory_budget: Optional[int] = None,
                   repeats: int = 3, max_seconds: float = DEFAULT_MAX_SECONDS,
                   max_direct_macs: int = DEFAULT_MAX_DIRECT_MACS) -> Prepared:
    """Set a method up for a case (construction is timed here).

    Parameters
    ----------
    method : {"sparse", "csr", "dense", "im2col", "direct", "fft", "torch"}
    case : Case
    threads : int, default 1
        ``scipy.fft`` workers; BLAS and torch threads are set by :func:`thread_limits`.
    memory_budget : int, optional
        Bytes the method's main buffer may take; default :data:`DEFAULT_MEMORY_BUDGET`.
    repeats : int, default 3
        Repeats of the construction timing (at most 3).
    max_seconds : float
        Time budget of the construction timing.
    max_direct_macs : int
        Largest per-pass work the ``direct`` method is allowed.

    Returns
    -------
    Prepared

    Raises
    ------
    MethodSkipped
        With the reason the method cannot run here.
    """
    if method not in _PREPARERS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    budget = _resolve_budget(memory_budget)
    return _PREPARERS[method](case, threads=threads, budget=budget, repeats=repeats, max_seconds=max_seconds,
                              max_direct_macs=max_direct_macs)


def _resolve_budget(memory_budget: Optional[int]) -> int:
    if memory_budget is None:
        return min(DEFAULT_MEMORY_BUDGET, default_memory_budget())
    if not isinstance(memory_budget, (int, np.integer)) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes; got {memory_budget!r}")
    return int(memory_budget)


# ---------------------------------------------------------------------- verify and time
def verify(prepared: Prepared, case: Case) -> dict[str, dict]:
    """Run each pass once and compare it with the case's float64 reference.

    Parameters
    ----------
    prepared : Prepared
    case : Case

    Returns
    -------
    dict of str to dict
        Per pass: ``ok``, ``max_abs_err``, ``rel_err`` (max abs error / max abs reference),
        ``tol``, ``reference``, ``traced_peak_bytes`` (numpy allocations during the call, or
        None when the method's allocator is not traced) and ``first_call_s``.
    """
    tol = TOLERANCES[case.dtype.name]
    report = {}
    for name in PASSES:
        peak, first_s, out = _traced_call(prepared.passes[name], prepared.traced)
        got = np.asarray(prepared.to_numpy(out), dtype=np.float64)
        want = case.expected[name]
        if got.shape != want.shape:
            report[name] = {"ok": False, "error": f"shape {got.shape}, expected {want.shape}", "tol": tol,
                            "reference": case.reference, "traced_peak_bytes": peak, "first_call_s": first_s}
            continue
        if name == "weight_grad" and case.mask is not None:
            got = got * case.mask
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        rel = err / scale if scale > 0 else err
        report[name] = {"ok": bool(np.isfinite(rel) and rel <= tol), "max_abs_err": err, "rel_err": rel,
                        "tol": tol, "reference": case.reference, "traced_peak_bytes": peak,
                        "first_call_s": first_s}
    return report


def _traced_call(fn: Callable[[], Any], traced: bool) -> tuple[Optional[int], float, Any]:
    if not traced:
        t0 = time.perf_counter()
        out = fn()
        return None, time.perf_counter() - t0, out
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    return int(peak), elapsed, out


def _calibrate(fn: Callable[[], Any], warmup: bool) -> tuple[int, float, list[float]]:
    """Warm ``fn`` up and choose its calls per repeat: ``(number, seconds per call, times so far)``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if not warmup:
        return 1, first, [first]
    # Size the loop from the fastest of up to three warm-up calls: one call stalled by another
    # process must not turn a microsecond pass into a single-call measurement.
    spent = first
    for _ in range(2):
        if spent > _MIN_REPEAT_SECONDS * 4:
            break
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        first, spent = min(first, elapsed), spent + elapsed
    return max(1, min(_MAX_NUMBER, int(_MIN_REPEAT_SECONDS / max(first, 1e-9)))), first, []


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5,
                        max_seconds: float = DEFAULT_MAX_SECONDS, warmup: bool = True) -> dict[str, dict]:
    """Median and minimum wall time of several callables, their repeats taken in turn.

    Each callable is warmed up (outside the timed region) and its loop sized: a call shorter
    than a few milliseconds is repeated ``number`` times per timed repeat, as ``timeit`` does,
    and a slow call gets fewer repeats so that its measurement stays within ``max_seconds``
    (at least one). The repeats are then taken round-robin -- one repeat of each callable,
    then the next round -- so that a burst of load from other processes lands on every
    callable alike instead of on whichever happened to be running: ratios between them stay
    meaningful on a shared machine.

    Parameters
    ----------
    fns : dict of str to callable
    repeats : int, default 5
    max_seconds : float
    warmup : bool, default True
        False for one-off work such as construction: every call, the first included, is a
        timed repeat of one call.

    Returns
    -------
    dict of str to dict
        Per key: ``median_s``, ``min_s``, ``times_s`` (seconds per call, one per repeat),
        ``repeats`` (as run), ``number`` (calls per repeat).
    """
    plan = {}
    for key, fn in fns.items():
        number, per_call, times = _calibrate(fn, warmup)
        plan[key] = (number, max(1, min(repeats, int(max_seconds / max(per_call * number, 1e-9)))), times)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside one repeat is noise
    try:
        for _ in range(max(n for _, n, _ in plan.values())):
            for key, fn in fns.items():
                number, n_repeats, times = plan[key]
                if len(times) >= n_repeats:
                    continue
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                times.append((time.perf_counter() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {key: {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "times_s": times,
                  "repeats": len(times), "number": number} for key, (number, _, times) in plan.items()}


def measure(fn: Callable[[], Any], *, repeats: int = 5, max_seconds: float = DEFAULT_MAX_SECONDS,
            warmup: bool = True) -> dict:
    """Median and minimum wall time of ``fn()``: :func:`measure_interleaved` of one callable.

    Parameters
    ----------
    fn : callable
    repeats, max_seconds, warmup
        As for :func:`measure_interleaved`.

    Returns
    -------
    dict
        ``median_s``, ``min_s``, ``times_s``, ``repeats``, ``number``.
    """
    return measure_interleaved({"fn": fn}, repeats=repeats, max_seconds=max_seconds, warmup=warmup)["fn"]


@contextlib.contextmanager
def thread_limits(threads: int, *, use_torch: bool = True) -> Iterator[dict]:
    """Run sparseconv, BLAS / OpenMP pools (threadpoolctl) and torch on ``threads`` inside the block.

    Parameters
    ----------
    threads : int
    use_torch : bool, default True
        Also set ``torch.set_num_threads`` when PyTorch is installed.

    Yields
    ------
    dict
        What was in force: ``threads``, ``sparseconv_threads`` (its own pool for sparse
        products), ``pools`` (threadpoolctl's view of each loaded library) or ``pools_note``
        when threadpoolctl is missing, ``torch_threads``.
    """
    state: dict[str, Any] = {"threads": threads, "torch_threads": None}
    with contextlib.ExitStack() as stack:
        stack.enter_context(sparse_threads(threads))
        state["sparseconv_threads"] = sparse_threads_in_force()
        if use_torch:
            # Imported first: threadpoolctl only limits the libraries loaded when it is entered,
            # and torch brings its own OpenMP runtime.
            try:
                import torch
            except ImportError:
                pass
            else:
                previous = torch.get_num_threads()
                torch.set_num_threads(threads)
                stack.callback(torch.set_num_threads, previous)
                state["torch_threads"] = torch.get_num_threads()
        try:
            import threadpoolctl
        except ImportError as err:
            state["pools"] = None
            state["pools_note"] = (f"threadpoolctl is not installed ({err}): BLAS runs with its default "
                                   f"thread count, the requested {threads} is not enforced")
        else:
            stack.enter_context(threadpoolctl.threadpool_limits(limits=threads))
            state["pools"] = [{k: info.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                                         "num_threads", "threading_layer")}
                              for info in threadpoolctl.threadpool_info()]
        yield state


# ---------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages: how busy the machine was with other work."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _source_digest() -> str:
    """SHA-256 of the package's Python sources: ties a result to the code that produced it."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def environment_info() -> dict:
    """Library versions, CPU, core counts, load and threading environment, for the JSON."""
    import scipy

    from . import __version__

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "load_average": _load_average(),
        "sparseconv_source_sha256": _source_digest(),
        "versions": {"sparseconv": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
                     **{name: _version(name) for name in ("torch", "threadpoolctl", "matplotlib", "tqdm")}},
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                      "MKL_NUM_THREADS", "SPARSECONV_MEMORY_BUDGET")},
        "scipy_threading": ("scipy.sparse's own kernels are single-threaded; sparseconv splits the "
                            "sparse products into row blocks on its own thread pool (sparseconv.parallel), "
                            "which the thread setting sizes, as it does BLAS and OpenMP pools "
                            "(threadpoolctl: dense, im2col, the GEMMs of the sparse weight gradient), "
                            "scipy.fft workers and torch"),
    }


# ---------------------------------------------------------------------- one suite
def _prepare_row(method: str, case: Case, *, threads: int, budget: int, repeats: int, max_seconds: float,
                 max_direct_macs: int) -> tuple[dict, Optional[Prepared]]:
    """Set a method up and verify it: its result row, and the prepared method if it may be timed."""
    layer = case.layer
    row: dict[str, Any] = {
        "layer": layer.name, "layer_id": layer.describe(), "method": method, "dtype": case.dtype.name,
        "threads": threads, "status": "skipped", "reason": None, "macs": layer.macs,
        "shapes": {"x": list(layer.x_shape), "w": list(layer.weight_shape), "y": list(layer.y_shape)},
        "buffer_name": None, "buffer_bytes": None, "build_s": None, "refresh_s": None, "verification": None,
        "timing": None, "info": {},
    }
    try:
        prepared = prepare_method(method, case, threads=threads, memory_budget=budget, repeats=repeats,
                                  max_seconds=max_seconds, max_direct_macs=max_direct_macs)
    except MethodSkipped as err:
        row["reason"] = str(err)
        return row, None
    row.update(buffer_name=prepared.buffer_name, buffer_bytes=prepared.buffer_bytes, build_s=prepared.build_s,
               info=prepared.info)
    check = verify(prepared, case)
    row["verification"] = check
    failed = [name for name in PASSES if not check[name]["ok"]]
    if failed:
        row["status"] = "failed"
        row["reason"] = "; ".join(
            f"{name}: " + (check[name].get("error") or
                           f"relative error {check[name]['rel_err']:.2e} > tolerance {check[name]['tol']:.0e}")
            for name in failed) + " (not timed: a fast wrong answer is not a result)"
        return row, None
    if prepared.refresh is not None:
        row["refresh_s"] = measure(prepared.refresh, repeats=min(repeats, 3), max_seconds=max_seconds)["median_s"]
    return row, prepared


def _run_group(case: Case, methods: Sequence[str], *, threads: int, budget: int, repeats: int,
               max_seconds: float, max_direct_macs: int) -> list[dict]:
    """Every method on one case at one thread count: verify each, then time them interleaved."""
    rows, timed = [], {}
    for method in methods:
        row, prepared = _prepare_row(method, case, threads=threads, budget=budget, repeats=repeats,
                                     max_seconds=max_seconds, max_direct_macs=max_direct_macs)
        rows.append(row)
        if prepared is not None:
            timed[method] = (row, prepared)
    timings: dict[str, dict] = {method: {} for method in timed}
    for name in PASSES:
        results = measure_interleaved({m: prepared.passes[name] for m, (_, prepared) in timed.items()},
                                      repeats=repeats, max_seconds=max_seconds)
        for method, result in results.items():
            result["gflops"] = 2 * case.layer.macs / result["median_s"] / 1e9
            result["spread"] = result["median_s"] / result["min_s"]
            timings[method][name] = result
    for method, (row, _) in timed.items():
        timing = timings[method]
        total = sum(timing[name]["median_s"] for name in PASSES)
        timing["total"] = {"median_s": total, "min_s": sum(timing[name]["min_s"] for name in PASSES),
                           "gflops": 3 * 2 * case.layer.macs / total / 1e9}
        row.update(timing=timing, status="ok")
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Ratio of every timed row to im2col (and to torch) of the same layer, dtype and threads.

    ``ratio_to_X`` divides medians, ``ratio_to_X_min`` minima (the less noise-sensitive one).
    """
    by_key = {(r["layer"], r["dtype"], r["threads"], r["method"]): r for r in rows}
    for r in rows:
        if r["status"] != "ok":
            continue
        for other in ("im2col", "torch"):
            base = by_key.get((r["layer"], r["dtype"], r["threads"], other))
            ok = base is not None and base["status"] == "ok"
            for name in (*PASSES, "total"):
                mine = r["timing"][name]
                r["timing"][name][f"ratio_to_{other}"] = (
                    mine["median_s"] / base["timing"][name]["median_s"] if ok else None)
                r["timing"][name][f"ratio_to_{other}_min"] = (
                    mine["min_s"] / base["timing"][name]["min_s"] if ok else None)


def _geomean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def _summarise(rows: list[dict], dtypes: Sequence[str], threads: Sequence[int]) -> dict:
    """Per (dtype, threads): sparse's ratios to im2col and torch, per layer and as geometric means."""
    configs = []
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    keys = [f"sparse_over_{other}{suffix}" for other in ("im2col", "torch") for suffix in ("", "_min")]
    for dt in dtypes:
        for t in threads:
            per_layer = []
            for name in layers:
                group = {r["method"]: r for r in rows if r["layer"] == name and r["dtype"] == dt
                         and r["threads"] == t}
                timed = {m: r["timing"]["total"]["median_s"] for m, r in group.items() if r["status"] == "ok"}
                sparse = group.get("sparse")
                timing = sparse["timing"] if sparse and sparse["status"] == "ok" else None
                entry = {"layer": name, "total_s": timed, "fastest": min(timed, key=timed.get) if timed else None}
                for other in ("im2col", "torch"):
                    for suffix in ("", "_min"):
                        entry[f"sparse_over_{other}{suffix}"] = (
                            timing["total"][f"ratio_to_{other}{suffix}"] if timing else None)
                    entry[f"sparse_over_{other}_by_pass"] = (
                        {p: timing[p][f"ratio_to_{other}"] for p in PASSES} if timing else None)
                per_layer.append(entry)
            spreads = [r["timing"][p]["spread"] for r in rows if r["dtype"] == dt and r["threads"] == t
                       and r["status"] == "ok" for p in PASSES]
            config: dict[str, Any] = {"dtype": dt, "threads": t, "layers": per_layer,
                                      "noisy_measurements": sum(v > NOISY_SPREAD for v in spreads),
                                      "measurements": len(spreads)}
            for key in keys:
                config[f"geomean_{key}"] = _geomean([e[key] for e in per_layer])
            for other in ("im2col", "torch"):
                values = [e[f"sparse_over_{other}"] for e in per_layer if e[f"sparse_over_{other}"] is not None]
                config[f"sparse_faster_than_{other}"] = sum(v < 1 for v in values)
                config[f"compared_with_{other}"] = len(values)
                by_pass = [e[f"sparse_over_{other}_by_pass"] for e in per_layer
                           if e[f"sparse_over_{other}_by_pass"] and None not in e[f"sparse_over_{other}_by_pass"].values()]
                config[f"geomean_sparse_over_{other}_by_pass"] = {
                    p: _geomean([b[p] for b in by_pass]) for p in PASSES}
            configs.append(config)
    return {"configs": configs}


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None, None
    try:
        from tqdm import tqdm
    except ImportError as err:
        return None, f"no progress bar: tqdm is not installed ({err})"
    return tqdm(total=total, desc=desc, unit="config", file=sys.stderr), None


def _check_settings(dtypes: Sequence[str], threads: Sequence[int], repeats: int,
                    methods: Sequence[str]) -> tuple[list[str], list[int], list[str]]:
    dtypes = [np.dtype(d).name if isinstance(d, (type, np.dtype)) else str(d) for d in dtypes]
    for d in dtypes:
        if d not in TOLERANCES:
            raise ValueError(f"dtypes must be among {tuple(TOLERANCES)}; got {d!r}")
    if not dtypes:
        raise ValueError("dtypes must name at least one dtype; got an empty sequence")
    threads = list(threads)
    if not threads or not all(isinstance(t, (int, np.integer)) and t >= 1 for t in threads):
        raise ValueError(f"threads must be a non-empty sequence of positive ints; got {threads!r}")
    if not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be a positive int; got {repeats!r}")
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}; got {methods!r}")
    return dtypes, [int(t) for t in threads], methods


def run_suite(name: str, *, dtypes: Sequence[str] = ("float32", "float64"), threads: Sequence[int] = (1,),
              repeats: int = 5, out_dir: Optional[PathLike] = "results", progress: bool = True,
              methods: Sequence[str] = METHODS, memory_budget: Optional[int] = None,
              max_seconds: float = DEFAULT_MAX_SECONDS, max_direct_macs: int = DEFAULT_MAX_DIRECT_MACS,
              plots: bool = True, verbose: bool = True) -> dict:
    """Run a benchmark suite: verify, time and compare every method on every layer.

    Parameters
    ----------
    name : {"smoke", "lenet", "cifar", "imagenet", "pruned", "grouped", "scaling", "all"}
        ``"all"`` runs every suite except ``smoke``, each writing its own files.
    dtypes : sequence of {"float32", "float64"}
    threads : sequence of int
        Thread counts to run at (BLAS / OpenMP, scipy.fft workers, torch).
    repeats : int, default 5
        Timed repeats per pass (fewer for calls slower than ``max_seconds / repeats``).
    out_dir : path or None
        Where ``<suite>.json``, ``<suite>.md`` and the PNG plots go; None writes nothing.
    progress : bool, default True
        A tqdm progress bar over (layer, dtype, threads) when tqdm is installed.
    methods : sequence of str, default all of :data:`METHODS`
        im2col is always run when another method is (every ratio needs it).
    memory_budget : int, optional
        Bytes one method's main buffer may take; default 1 GiB (at most half the RAM).
    max_seconds : float
        Time budget of one pass's measurement.
    max_direct_macs : int
        The ``direct`` method is skipped beyond this many multiply-adds per pass.
    plots : bool, default True
        Draw PNGs with matplotlib when it is installed.
    verbose : bool, default True
        Print the table and the paths written.

    Returns
    -------
    dict
        ``suite``, ``settings``, ``environment``, ``layers``, ``results`` (one row per layer,
        dtype, threads and method: ``status`` "ok" / "skipped" / "failed" with ``reason``,
        ``verification`` per pass, ``timing`` per pass and ``total`` with ``median_s``,
        ``min_s``, ``gflops``, ``ratio_to_im2col``, ``ratio_to_torch``), ``summary``,
        ``notes`` and ``files``. For ``"all"``: ``{"suite": "all", "suites": {name: dict}}``.
    """
    if name == "all":
        return {"suite": "all", "suites": {
            s: run_suite(s, dtypes=dtypes, threads=threads, repeats=repeats, out_dir=out_dir, progress=progress,
                         methods=methods, memory_budget=memory_budget, max_seconds=max_seconds,
                         max_direct_macs=max_direct_macs, plots=plots, verbose=verbose)
            for s in SUITES if s != "smoke"}}
    layers = suite_layers(name)
    dtypes, threads, methods = _check_settings(dtypes, threads, repeats, methods)
    if "im2col" not in methods:
        methods = ["im2col", *methods]
    budget = _resolve_budget(memory_budget)
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if verbose:
            print(f"note: {text}", file=sys.stderr)

    bar, reason = _progress(len(layers) * len(dtypes) * len(threads), progress, f"bench {name}")
    if reason:
        note(reason)
    rows: list[dict] = []
    thread_configs: dict[str, dict] = {}
    environment = environment_info()  # before the run: its load average is the starting load
    started = time.perf_counter()
    try:
        for layer in layers:
            for dt in dtypes:
                case = make_case(layer, dt)
                for t in threads:
                    if bar is not None:
                        bar.set_postfix_str(f"{layer.name} {dt} t={t}")
                    with thread_limits(t, use_torch="torch" in methods) as state:
                        thread_configs.setdefault(str(t), state)
                        rows += _run_group(case, methods, threads=t, budget=budget, repeats=repeats,
                                           max_seconds=max_seconds, max_direct_macs=max_direct_macs)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for state in thread_configs.values():
        if state.get("pools_note") and state["pools_note"] not in notes:
            note(state["pools_note"])
    for text in sorted({r["reason"] for r in rows if r["method"] == "torch" and r["status"] == "skipped"}):
        note(f"torch skipped: {text}")
    _add_ratios(rows)
    result = {
        "schema": "sparseconv.bench/1",
        "suite": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.perf_counter() - started,
        "load_average_end": _load_average(),
        "settings": {"dtypes": dtypes, "threads": threads, "repeats": repeats, "methods": methods,
                     "passes": list(PASSES), "memory_budget": budget, "max_seconds": max_seconds,
                     "max_direct_macs": max_direct_macs, "tolerances": TOLERANCES,
                     "min_repeat_seconds": _MIN_REPEAT_SECONDS},
        "environment": environment,
        "thread_configs": thread_configs,
        "layers": [{**asdict(layer), "id": layer.describe(), "macs": layer.macs, "out_size": layer.out_size}
                   for layer in layers],
        "results": rows,
        "summary": _summarise(rows, dtypes, threads),
        "notes": notes,
        "files": {},
    }
    if verbose:
        print(format_table(result))
    if out_dir is not None:
        _write_outputs(result, Path(out_dir), plots=plots, verbose=verbose)
    return result


# ---------------------------------------------------------------------- reports
def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(result: dict) -> str:
    """The suite's results as a plain-text table, one block per (dtype, threads)."""
    lines = []
    head = (f"{'layer':<28}{'method':<8}{'fwd ms':>10}{'dx ms':>10}{'dw ms':>10}{'total ms':>10}"
            f"{'GFLOP/s':>9}{'/im2col':>9}{'buffer':>11}  status")
    for config in result["summary"]["configs"]:
        dt, t = config["dtype"], config["threads"]
        lines += ["", f"== {result['suite']}  {dt}  threads={t}", head]
        for r in result["results"]:
            if r["dtype"] != dt or r["threads"] != t:
                continue
            if r["status"] == "ok":
                tm = r["timing"]
                lines.append(
                    f"{r['layer'][:27]:<28}{r['method']:<8}{_ms(tm['forward']['median_s']):>10}"
                    f"{_ms(tm['input_grad']['median_s']):>10}{_ms(tm['weight_grad']['median_s']):>10}"
                    f"{_ms(tm['total']['median_s']):>10}{tm['total']['gflops']:>9.2f}"
                    f"{_ratio(tm['total']['ratio_to_im2col']):>9}{_format_bytes(r['buffer_bytes']):>11}  verified")
            else:
                reason = r["reason"] if len(r["reason"]) < 90 else r["reason"][:87] + "..."
                lines.append(f"{r['layer'][:27]:<28}{r['method']:<8}  {r['status']}: {reason}")
        g = config
        lines.append(f"-- geometric mean of sparse/im2col (fwd+dx+dw): {_ratio(g['geomean_sparse_over_im2col'])}"
                     f" ({g['sparse_faster_than_im2col']}/{g['compared_with_im2col']} layers faster); "
                     f"sparse/torch: {_ratio(g['geomean_sparse_over_torch'])}"
                     f" ({g['sparse_faster_than_torch']}/{g['compared_with_torch']} faster); "
                     f"noisy measurements: {g['noisy_measurements']}/{g['measurements']}")
    return "\n".join(lines)


def _load_text(load: Optional[list[float]]) -> str:
    return "unknown" if load is None else " / ".join(f"{v:.1f}" for v in load) + " (1 / 5 / 15 min)"


def _command(result: dict) -> str:
    """The command line that reruns a suite with the same settings."""
    st = result["settings"]
    parts = ["python -m sparseconv bench", f"--suite {result['suite']}", f"--dtype {','.join(st['dtypes'])}",
             f"--threads {','.join(map(str, st['threads']))}", f"--repeats {st['repeats']}"]
    if set(st["methods"]) != set(METHODS):
        parts.append(f"--methods {','.join(st['methods'])}")
    if st["memory_budget"] != DEFAULT_MEMORY_BUDGET:
        parts.append(f"--memory-budget {st['memory_budget']}")
    if result["files"].get("json"):
        parts.append(f"--out {Path(result['files']['json']).parent}")
    return " ".join(parts)


def format_markdown(result: dict) -> str:
    """A Markdown summary: settings, key ratios, a table per configuration, skips and failures."""
    env = result["environment"]
    settings = result["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v is not None)
    missing = [k for k, v in env["versions"].items() if v is None]
    out = [
        f"# sparseconv benchmark: `{result['suite']}`", "",
        f"Generated {result['created']} in {result['wall_s']:.0f} s; regenerate with", "",
        f"    {_command(result)}", "",
        f"- CPU: {env['cpu']} ({env['cpus_available']} of {env['cpu_count']} cores available), {env['platform']}",
        f"- Versions: {versions}" + (f"; not installed: {', '.join(missing)}" if missing else ""),
        f"- dtypes {', '.join(settings['dtypes'])}; threads {', '.join(map(str, settings['threads']))}; "
        f"{settings['repeats']} repeats (median reported); memory budget {_format_bytes(settings['memory_budget'])}",
        f"- Threading: {env['scipy_threading']}.",
        "- Every result was checked against a float64 reference before it was timed (relative "
        "tolerance " + ", ".join(f"{k} {v:.0e}" for k, v in settings["tolerances"].items()) + ").",
        "- Noise: the machine is shared (load average "
        f"{_load_text(env['load_average'])} at the start, {_load_text(result['load_average_end'])} at the end, "
        f"on {env['cpu_count']} cores). Repeats of all methods are interleaved so that load hits them "
        "alike, but differences under about 20% are not meaningful, and runs with as many threads as "
        "cores suffer most (spinning BLAS / OpenMP threads are descheduled by other work).",
        "", "## Key ratios", "",
        "Time of sparse divided by time of the other method for fwd + dx + dw, geometric mean over the "
        "layers (< 1: sparse is faster); \"median\" divides median times, \"min\" minimum times (less "
        "sensitive to other processes). Per pass: fwd / dx / dw, medians. Noisy: measurements whose "
        f"median exceeds {NOISY_SPREAD}x their minimum (disturbed while running); a configuration with "
        "many of them is not to be trusted.", "",
        "| dtype | threads | sparse/im2col median | min | faster on | per pass | sparse/torch median | min "
        "| faster on | per pass | noisy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["summary"]["configs"]:
        cells = []
        for other in ("im2col", "torch"):
            by_pass = c[f"geomean_sparse_over_{other}_by_pass"]
            cells += [_ratio(c[f"geomean_sparse_over_{other}"]), _ratio(c[f"geomean_sparse_over_{other}_min"]),
                      f"{c[f'sparse_faster_than_{other}']}/{c[f'compared_with_{other}']}",
                      " / ".join(_ratio(by_pass[p]) for p in PASSES)]
        cells.append(f"{c['noisy_measurements']}/{c['measurements']}")
        out.append(f"| {c['dtype']} | {c['threads']} | " + " | ".join(cells) + " |")
    methods = settings["methods"]
    for c in result["summary"]["configs"]:
        out += ["", f"## {c['dtype']}, {c['threads']} thread(s): total ms (ratio to im2col)", "",
                "| layer | " + " | ".join(methods) + " | fastest |", "|---" * (len(methods) + 2) + "|"]
        for entry in c["layers"]:
            cells = []
            for m in methods:
                row = next(r for r in result["results"] if r["layer"] == entry["layer"] and r["method"] == m
                           and r["dtype"] == c["dtype"] and r["threads"] == c["threads"])
                if row["status"] == "ok":
                    total = row["timing"]["total"]
                    cells.append(f"{_ms(total['median_s'])} ({_ratio(total['ratio_to_im2col'])})")
                else:
                    cells.append(row["status"])
            out.append(f"| {entry['layer']} | " + " | ".join(cells) + f" | {entry['fastest'] or '-'} |")
    out += ["", "## Where sparse wins and loses", ""]
    for c in result["summary"]["configs"]:
        rated = [(e["sparse_over_im2col"], e["layer"]) for e in c["layers"] if e["sparse_over_im2col"] is not None]
        if not rated:
            continue
        best, worst = min(rated), max(rated)
        wins = [layer for v, layer in rated if v < 1]
        out.append(f"- {c['dtype']}, {c['threads']} thread(s): sparse beats im2col on {len(wins)} of {len(rated)} "
                   f"layers; best {best[0]:.2f}x ({best[1]}), worst {worst[0]:.2f}x ({worst[1]}).")
    skipped = [r for r in result["results"] if r["status"] != "ok"]
    out += ["", "## Skipped and failed", ""]
    if not skipped:
        out.append("None: every method ran and was verified on every layer.")
    for reason in dict.fromkeys((r["method"], r["status"], r["reason"]) for r in skipped):
        layers = sorted({r["layer"] for r in skipped if (r["method"], r["status"], r["reason"]) == reason})
        out.append(f"- **{reason[0]}** {reason[1]} on {', '.join(layers)}: {reason[2]}")
    if result["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    plots = result["files"].get("plots", [])
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def _write_outputs(result: dict, out_dir: Path, *, plots: bool, verbose: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["suite"]
    files = result["files"]
    files["json"] = str(out_dir / f"{name}.json")
    files["markdown"] = str(out_dir / f"{name}.md")
    files["plots"] = []
    if plots:
        try:
            files["plots"] = _plot(result, out_dir)
        except ImportError as err:
            files["plots_skipped"] = f"plots skipped: matplotlib is not installed ({err})"
            result["notes"].append(files["plots_skipped"])
            if verbose:
                print(f"note: {files['plots_skipped']}", file=sys.stderr)
    else:
        files["plots_skipped"] = "plots skipped: disabled (--no-plots)"
    Path(files["markdown"]).write_text(format_markdown(result), encoding="utf-8")
    Path(files["json"]).write_text(json.dumps(result, indent=1, allow_nan=False), encoding="utf-8")
    if verbose:
        print(f"wrote {files['json']}, {files['markdown']}" + "".join(f", {p}" for p in files["plots"]))


def _differ_only_in_pruning(layers: list[dict]) -> bool:
    def shape(layer: dict) -> tuple:
        return tuple(v for k, v in sorted(layer.items()) if k not in ("name", "prune", "id"))
    return len(layers) > 1 and len({shape(layer) for layer in layers}) == 1


def _plot(result: dict, out_dir: Path) -> list[str]:
    """One PNG per (dtype, threads): crossover lines for sweeps, else ratio bars per layer."""
    from matplotlib.figure import Figure  # without pyplot: no backend or global state touched

    paths = []
    methods = result["settings"]["methods"]
    layers = {layer["name"]: layer for layer in result["layers"]}
    for config in result["summary"]["configs"]:
        dt, t = config["dtype"], config["threads"]
        rows = [r for r in result["results"] if r["dtype"] == dt and r["threads"] == t]
        totals = {(r["layer"], r["method"]): r["timing"]["total"]["median_s"] for r in rows if r["status"] == "ok"}
        sweeps = list(dict.fromkeys(tuple(layer["sweep"])[0] for layer in layers.values() if layer["sweep"]))
        tag = f"{result['suite']}_{dt}_t{t}"
        if sweeps:
            fig = Figure(figsize=(4.2 * len(sweeps), 3.8), layout="constrained")
            axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
            for ax, sweep in zip(axes, sweeps):
                members = [name for name, layer in layers.items() if layer["sweep"] and layer["sweep"][0] == sweep]
                for m in methods:
                    pts = [(layers[name]["sweep"][1], totals[(name, m)]) for name in members if (name, m) in totals]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=m)
                ax.set(xscale="log", yscale="log", xlabel=sweep, ylabel="fwd+dx+dw time (s)")
                ax.minorticks_off()  # log-axis minor labels would overprint the swept values
                ax.set_xticks([layers[name]["sweep"][1] for name in members],
                              [str(layers[name]["sweep"][1]) for name in members])
            axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
            fig.suptitle(f"{result['suite']}: where the curves cross ({dt}, {t} thread(s))")
            tag = f"{result['suite']}_crossover_{dt}_t{t}"
        elif _differ_only_in_pruning(list(layers.values())):
            fig = Figure(figsize=(6, 4), layout="constrained")
            ax = fig.subplots()
            for m in methods:
                pts = [(layer["prune"] * 100, totals[(name, m)]) for name, layer in layers.items()
                       if (name, m) in totals]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set(yscale="log", xlabel="kernel weights pruned (%)", ylabel="fwd+dx+dw time (s)",
                   title=f"{result['suite']} ({dt}, {t} thread(s))")
            ax.legend(fontsize="small")
        else:
            names = list(layers)
            fig = Figure(figsize=(7, 0.35 * len(names) * len(methods) / 3 + 1.5), layout="constrained")
            ax = fig.subplots()
            height = 0.8 / len(methods)
            for i, m in enumerate(methods):
                ratios = [totals.get((name, m), np.nan) / totals[(name, "im2col")] if (name, "im2col") in totals
                          else np.nan for name in names]
                ax.barh(np.arange(len(names)) + i * height, ratios, height=height, label=m)
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names, fontsize="small")
            ax.invert_yaxis()
            ax.set(xscale="log", xlabel="fwd+dx+dw time / im2col time (< 1: faster than im2col)",
                   title=f"{result['suite']} ({dt}, {t} thread(s))")
            ax.legend(fontsize="small")
        path = out_dir / f"{tag}.png"
        fig.savefig(path, dpi=110)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------- command line
def parse_threads(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``; ``"all"`` is ``os.cpu_count()``; ``"1,all"`` both."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if part == "all":
            out.append(os.cpu_count() or 1)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise ValueError(f"threads must be a comma-separated list of positive ints or 'all'; got {text!r}")
    return list(dict.fromkeys(out))


def parse_dtypes(text: str) -> list[str]:
    """``"float32,float64"`` -> ``["float32", "float64"]`` (also ``f32`` / ``f64``)."""
    aliases = {"f32": "float32", "f64": "float64", "float32": "float32", "float64": "float64"}
    out = []
    for part in str(text).split(","):
        if part.strip() not in aliases:
            raise ValueError(f"dtype must be a comma-separated list of float32 / float64; got {text!r}")
        out.append(aliases[part.strip()])
    return list(dict.fromkeys(out))


def parse_bytes(text: str) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"2e9"`` -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "b": 1}
    lowered = str(text).strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            number, factor = lowered[:-len(unit)], scale
            break
    else:
        number, factor = lowered, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"memory budget must be a number of bytes such as 1GiB or 5e8; got {text!r}") from None
    if value <= 0:
        raise ValueError(f"memory budget must be positive; got {text!r}")
    return value


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = parse.__name__
    return convert


def _parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a comma-separated subset of {', '.join(METHODS)}; got {text!r}")
    return methods


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to a parser (or sub-parser) and return it."""
    parser.add_argument("--suite", default="lenet", choices=[*SUITES, "all"],
                        help="which layers to run (default: lenet; 'all' runs every suite but smoke)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="directory for <suite>.json, <suite>.md and PNG plots (default: %(default)s)")
    parser.add_argument("--dtype", type=_arg_type(parse_dtypes), default=["float32", "float64"],
                        help="comma-separated dtypes (default: float32,float64)")
    parser.add_argument("--threads", type=_arg_type(parse_threads), default=parse_threads("1,all"),
                        help="comma-separated thread counts, 'all' = every core (default: 1,all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per pass (default: 5)")
    parser.add_argument("--methods", type=_arg_type(_parse_methods), default=list(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--memory-budget", type=_arg_type(parse_bytes), default=None,
                        help="bytes one method's main buffer may take, e.g. 2GiB (default: 1GiB)")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                        help=f"time budget per pass measurement (default: {DEFAULT_MAX_SECONDS})")
    parser.add_argument("--max-direct-macs", type=float, default=DEFAULT_MAX_DIRECT_MACS,
                        help=f"skip 'direct' beyond this many multiply-adds per pass (default: "
                             f"{DEFAULT_MAX_DIRECT_MACS:.0e})")
    parser.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the suite the parsed ``bench`` options describe; returns the exit code (1 on a failed check)."""
    result = run_suite(args.suite, dtypes=args.dtype, threads=args.threads, repeats=args.repeats, out_dir=args.out,
                       progress=not args.no_progress, methods=args.methods, memory_budget=args.memory_budget,
                       max_seconds=args.max_seconds, max_direct_macs=int(args.max_direct_macs),
                       plots=not args.no_plots)
    suites = result["suites"].values() if result["suite"] == "all" else [result]
    return int(any(r["status"] == "failed" for s in suites for r in s["results"]))
