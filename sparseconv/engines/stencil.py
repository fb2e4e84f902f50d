"""The ``"stencil"`` engine: direct compiled convolution of zero-padded, stride-1 image layers.

1-D/2-D, zero padding, stride 1 (any dilation, groups, mask): no matrix at all; each output
row is accumulated in vector registers over the kernel's taps from a zero-padded copy of the
input, and the adjoint is the same loop on the padded output sensitivities with the rotated,
channel-transposed kernel, so it costs what the forward costs. It serves image operators (one
or a few channels, large kernels) applied one vector at a time, as ``lsqr``/``cg`` apply a
``LinearOperator``, where a CSR kernel does one multiply-add per stored entry and vector.

numba is optional (see :mod:`sparseconv.engines.numba`, whose availability and thread helpers
this module shares). :class:`StencilEngine` is built from a geometry and a weight; ``ENGINE``
(module attribute) is the same engine behind the operators' engine protocol.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..geometry import ConvGeometry
from .base import Structure
from .numba import CompiledEngine, _check_weight, _compute_dtype, _launch, _require, _threads, available

__all__ = ["ENGINE", "StencilEngine", "StencilProtocolEngine"]


class StencilEngine:
    """Direct compiled convolution of zero-padded, stride-1, 1-D or 2-D layers (``"stencil"``).

    Holds no matrix: only the kernel (and its rotated, channel-transposed copy for the
    adjoint). Each output row is accumulated in vector registers over every tap; the adjoint
    runs the same loop on the zero-padded output sensitivities with the rotated kernel, so it
    costs what the forward costs.

    Parameters
    ----------
    geometry : ConvGeometry
        Must satisfy :meth:`applicable`.
    weight : ndarray of shape ``geometry.weight_shape``, float32 or float64
        Masked taps simply hold zero weights.
    weight_mask : ndarray of bool, shape ``geometry.weight_shape``, optional
        Weights left out (False): the kernel gradient is zero there.

    Attributes
    ----------
    name : str
        ``"stencil"``.
    shape : (int, int)
        ``(geometry.n_out, geometry.n_in)``.
    dtype : numpy.dtype
    weight_shape : tuple of int

    Raises
    ------
    ImportError
        When numba is not available.
    ValueError
        When the geometry is not one :meth:`applicable` accepts.
    """

    name = "stencil"

    @property
    def _k(self) -> Any:
        """The kernel module (looked up, not stored: engines stay picklable and deep-copyable)."""
        return _require()

    def __init__(self, geometry: ConvGeometry, weight: np.ndarray, *, weight_mask: Optional[np.ndarray] = None) -> None:
        _require()
        if not self.applicable(geometry):
            raise ValueError(f"the stencil engine runs 1-D/2-D stride-1 convolutions with zero padding; got "
                             f"{geometry.describe()}")
        w = _check_weight(weight)
        if weight_mask is not None:
            weight_mask = np.asarray(weight_mask)
            if weight_mask.dtype != bool or weight_mask.shape != tuple(geometry.weight_shape):
                raise ValueError(f"weight_mask must be a bool array of shape {geometry.weight_shape}; "
                                 f"got {weight_mask.dtype} array of shape {weight_mask.shape}")
        self._mask = weight_mask
        self.geometry = geometry
        self.dtype = w.dtype
        self.weight_shape = tuple(geometry.weight_shape)
        self.shape = (geometry.n_out, geometry.n_in)
        g = geometry
        # Everything as 2-D: a 1-D layer is one row.
        two = (lambda t: (1, *t)) if g.ndim == 1 else (lambda t: tuple(t))
        self._in = two(g.in_size)
        self._out = two(g.out_size)
        self._ksize = two(g.kernel_size)
        self._dil = two(g.dilation)
        self._pad_lo = (0, g.padding[0][0]) if g.ndim == 1 else (g.padding[0][0], g.padding[1][0])
        self._kern = np.empty((g.out_channels, g.in_channels // g.groups, *self._ksize), dtype=self.dtype)
        self._kern_t = np.empty((g.in_channels, g.out_channels // g.groups, *self._ksize), dtype=self.dtype)
        self.refresh(w)

    @classmethod
    def applicable(cls, geometry: ConvGeometry) -> bool:
        """numba available, 1 or 2 spatial dimensions, stride 1, zero padding.

        Parameters
        ----------
        geometry : ConvGeometry

        Returns
        -------
        bool
        """
        return (available() and geometry.ndim in (1, 2) and geometry.padding_mode == "zeros"
                and all(s == 1 for s in geometry.stride))

    @classmethod
    def estimate_nbytes(cls, geometry: ConvGeometry, dtype: Any) -> int:
        """Bytes the engine holds: the kernel twice (as given and rotated for the adjoint).

        Parameters
        ----------
        geometry : ConvGeometry
        dtype : dtype

        Returns
        -------
        int
        """
        return 2 * geometry.n_params * np.dtype(dtype).itemsize

    @property
    def nbytes(self) -> int:
        """Bytes the engine holds (scratch for padded copies is allocated per call)."""
        return int(self._kern.nbytes + self._kern_t.nbytes)

    def refresh(self, weight: np.ndarray) -> None:
        """Take new weight values.

        Parameters
        ----------
        weight : ndarray of shape :attr:`weight_shape`, the engine's dtype
        """
        w = _check_weight(weight, shape=self.weight_shape, dtype=self.dtype)
        g = self.geometry
        kern = w.reshape(self._kern.shape)
        # The correlation kernel: a true convolution reads the weight rotated by 180 degrees.
        if g.flip:
            kern = kern[:, :, ::-1, ::-1]
        self._kern[...] = kern
        # Adjoint: within each group, output and input channels swap and the kernel rotates.
        fg = g.out_channels // g.groups
        cg = g.in_channels // g.groups
        rot = self._kern[:, :, ::-1, ::-1]
        for grp in range(g.groups):
            self._kern_t[grp * cg:(grp + 1) * cg] = rot[grp * fg:(grp + 1) * fg].swapaxes(0, 1)

    def _planes(self, a: np.ndarray, channels: int, size: tuple[int, int], name: str) -> tuple[np.ndarray, bool]:
        """``(N, channels, *size)`` C-contiguous samples from a column block, and whether 1-D."""
        block_rows = channels * size[0] * size[1]
        a = np.asarray(a)
        if a.ndim not in (1, 2) or a.shape[0] != block_rows:
            raise ValueError(f"{name} must have shape ({block_rows}, N) or ({block_rows},); got {a.shape}")
        vector = a.ndim == 1
        # One vector is a view; a block of N columns is transposed once into N planes.
        planes = np.ascontiguousarray(a.reshape(block_rows, -1).T, dtype=_compute_dtype(a, self.dtype, name))
        return planes.reshape(-1, channels, *size), vector

    def _correlate(self, planes: np.ndarray, kern: np.ndarray, shift: tuple[int, int], out_size: tuple[int, int],
                   threads: Optional[int]) -> np.ndarray:
        """Stencil over every sample: pad by ``shift``, correlate with ``kern``; ``(in, N)`` result."""
        (kh, kw), (dh, dw) = self._ksize, self._dil
        kern = kern.astype(planes.dtype, copy=False)
        padded = np.empty((planes.shape[1], out_size[0] + (kh - 1) * dh, out_size[1] + (kw - 1) * dw),
                          dtype=planes.dtype)
        out = np.empty((planes.shape[0], kern.shape[0], *out_size), dtype=planes.dtype)
        nt = _threads(threads)
        n_bands = max(1, min(nt, out_size[0]))
        for i, sample in enumerate(planes):
            self._k.shift_pad(sample, padded, shift[0], shift[1])
            _launch(self._k.stencil_forward, nt, padded, kern, out[i], self.geometry.groups, dh, dw, n_bands)
        return out.reshape(out.shape[0], -1).T

    def _finish(self, out: np.ndarray, vector: bool) -> np.ndarray:
        return out[:, 0] if vector else np.ascontiguousarray(out)

    def matmat(self, X: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
        """``Y = W @ X``.

        Parameters
        ----------
        X : ndarray of shape (in_size, N) or (in_size,)
            Computed in the engine's dtype, or in float64 for a float64 block on a float32
            engine (as for :meth:`NumbaEngine.matmat`).
        threads : int, optional
            Threads over bands of output rows; default :func:`sparseconv.parallel.get_threads`.

        Returns
        -------
        ndarray of shape (out_size, N) (or (out_size,))
        """
        g = self.geometry
        planes, vector = self._planes(X, g.in_channels, self._in, "X")
        return self._finish(self._correlate(planes, self._kern, self._pad_lo, self._out, threads), vector)

    def rmatmat(self, D: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
        """``Z = W.T @ D``: the full correlation of ``D`` with the rotated kernel, cropped.

        Parameters
        ----------
        D : ndarray of shape (out_size, N) or (out_size,)
        threads : int, optional

        Returns
        -------
        ndarray of shape (in_size, N) (or (in_size,))
        """
        g = self.geometry
        planes, vector = self._planes(D, g.out_channels, self._out, "D")
        (kh, kw), (dh, dw) = self._ksize, self._dil
        shift = ((kh - 1) * dh - self._pad_lo[0], (kw - 1) * dw - self._pad_lo[1])
        return self._finish(self._correlate(planes, self._kern_t, shift, self._in, threads), vector)

    def weight_grad(self, X: np.ndarray, D: np.ndarray, threads: Optional[int] = None) -> np.ndarray:
        """Kernel gradient ``sum_n dL/dw`` for the samples (columns) of ``X`` and ``D``.

        Parameters
        ----------
        X : ndarray of shape (in_size, N)
        D : ndarray of shape (out_size, N)
        threads : int, optional
            Threads over taps.

        Returns
        -------
        ndarray of shape :attr:`weight_shape`, the engine's dtype
            Summed in float64; each tap by one thread in a fixed order (independent of the
            thread count). Zero at masked weights.
        """
        g = self.geometry
        xs, _ = self._planes(X, g.in_channels, self._in, "X")
        ds, _ = self._planes(D, g.out_channels, self._out, "D")
        if xs.shape[0] != ds.shape[0]:
            raise ValueError(f"X and D must hold the same number of vectors; got {xs.shape[0]} and {ds.shape[0]}")
        if xs.dtype != ds.dtype:  # one of them float64 on a float32 engine
            xs, ds = xs.astype(np.float64, copy=False), ds.astype(np.float64, copy=False)
        (kh, kw), (dh, dw) = self._ksize, self._dil
        padded = np.empty((g.in_channels, self._out[0] + (kh - 1) * dh, self._out[1] + (kw - 1) * dw),
                          dtype=xs.dtype)
        grad = np.zeros(self._kern.size)
        nt = _threads(threads)
        for xi, di in zip(xs, ds):
            self._k.shift_pad(xi, padded, self._pad_lo[0], self._pad_lo[1])
            _launch(self._k.stencil_grad, nt, padded, di, grad, self._kern.shape[1], kh, kw, g.groups, dh, dw)
        grad = grad.reshape(self._kern.shape)
        if g.flip:
            grad = grad[:, :, ::-1, ::-1]
        grad = np.ascontiguousarray(grad, dtype=self.dtype).reshape(self.weight_shape)
        if self._mask is not None:
            grad[~self._mask] = 0
        return grad

    def __repr__(self) -> str:
        return f"StencilEngine({self.geometry.describe()}, dtype={self.dtype})"


# ---------------------------------------------------------------------- the engine protocol
class StencilProtocolEngine(CompiledEngine):
    """The ``"stencil"`` engine on a ``Structure`` (no pattern data: only the kernel, twice).

    Parameters
    ----------
    structure : Structure
    """

    name = "stencil"

    @classmethod
    def applicable(cls, structure: Structure, product: str) -> bool:
        """numba available, 1 or 2 spatial dimensions, stride 1, zero padding."""
        return StencilEngine.applicable(structure.geometry)

    @classmethod
    def estimate_nbytes(cls, structure: Structure, product: str) -> int:
        """The padded kernels the stencil keeps."""
        return StencilEngine.estimate_nbytes(structure.geometry, structure.dtype)

    def prepare(self, product: str) -> None:
        """Build the stencil on first use (every product shares it)."""
        if self.kernel is None:
            s = self.structure
            s.reserve(StencilEngine.estimate_nbytes(s.geometry, s.dtype), "the stencil engine's kernels")
            self.kernel = StencilEngine(s.geometry, s.weight, weight_mask=s.mask)


#: The class the registry of :mod:`sparseconv.engines` imports as ``"stencil"``.
ENGINE = StencilProtocolEngine
