"""Transposed convolution: the transpose of a forward convolution's tied-parameter matrix.

A transposed ("fractionally strided", "deconvolution") layer is defined as the adjoint of a
convolution: its matrix is ``W.T`` for the ``W`` of the convolution it undoes the shape of.
:class:`ConvTransposeOperator` therefore builds that forward :class:`~sparseconv.conv.ConvOperator`
and delegates every product to it -- the transposed layer's forward pass is the convolution's
``backward_input`` and vice versa -- so no index arithmetic is repeated here. Weights and
options follow PyTorch's ``ConvTranspose1d/2d/3d``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from .conv import ConvOperator, MatrixOperator
from .geometry import (IntOrTuple, PaddingSpec, check_array_dtype, check_batch, conv_transpose_output_size,
                       normalize_padding, normalize_tuple, resolve_dtype)

__all__ = ["ConvTransposeOperator", "conv_transpose_matrix"]



def _transposed_geometry(weight_shape: tuple[int, ...], input_shape: tuple[int, ...], stride: IntOrTuple,
                         padding: PaddingSpec, output_padding: IntOrTuple, dilation: IntOrTuple,
                         groups: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...],
                                               tuple[int, ...], tuple[int, ...]]:
    """Validate a transposed convolution's options in its own terms; return the normalised
    ``(stride, padding pairs, output_padding, dilation, output size)``."""
    if len(weight_shape) not in (3, 4, 5):
        raise ValueError("weight must have shape (C_in, C_out // groups, *kernel) with 1, 2 or 3 kernel "
                         f"dimensions (3 to 5 axes); got shape {weight_shape}")
    ndim = len(weight_shape) - 2
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != ndim + 1
            or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in input_shape)):
        raise ValueError(f"input_shape must be (C_in, *spatial), {ndim + 1} positive ints to match the weight "
                         f"of shape {weight_shape}; got {input_shape!r}")
    if input_shape[0] != weight_shape[0]:
        raise ValueError(f"input_shape[0] (C_in) must equal weight.shape[0] = {weight_shape[0]} for a weight of "
                         f"shape (C_in, C_out // groups, *kernel) = {weight_shape}; got input_shape {input_shape}")
    if isinstance(padding, str):
        raise ValueError("padding of a transposed convolution must be an int, per-dimension ints or (low, high) "
                         f"pairs (PyTorch has no string spelling for it); got {padding!r}")
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
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    if weight_shape[0] % groups:
        raise ValueError(f"groups={groups} must divide C_in = weight.shape[0] = {weight_shape[0]}")
    return stride_t, pads, extra, dilation_t, tuple(out)


class ConvTransposeOperator(MatrixOperator):
    """An N-d transposed convolution as the transpose of a forward convolution's sparse matrix.

    Parameters
    ----------
    weight : ndarray of shape (C_in, C_out // groups, *kernel)
        PyTorch's ``ConvTranspose`` layout; 1, 2 or 3 kernel dimensions; float32 or float64
        (integers become float64).
    input_shape : tuple of int
        One sample's shape ``(C_in, *in)``.
    stride, dilation : int or tuple of int, default 1
    padding : int, tuple of int, or tuple of (int, int), default 0
        Cropped from both ends of the output (per dimension, or ``(low, high)`` per
        dimension). The strings ``"same"``/``"valid"``/``"full"`` of convolutions are
        rejected, as in PyTorch.
    output_padding : int or tuple of int, default 0
        Extra positions at the high end of the output, ``0 <= output_padding <
        max(stride, dilation)`` (PyTorch's rule).
    groups : int, default 1
        Must divide ``C_in``; each group maps ``C_in // groups`` to ``C_out // groups`` channels.
    bias : ndarray of shape (C_out,), optional
    memory_budget : int, optional
        Bytes the forward convolution's matrix may use (see :class:`ConvOperator`).

    Attributes
    ----------
    matrix : scipy.sparse.csr_array of shape (C_out * prod(out), C_in * prod(in))
        Kept in sync with :meth:`set_weight`.
    conv : ConvOperator
        The forward convolution ``(C_out, *out) -> (C_in, *out_conv)`` with the same weight,
        stride, padding and dilation; ``matrix`` is the transpose of its matrix.
    out_shape : tuple of int
        ``(C_out, *out)``.

    Notes
    -----
    Along each spatial dimension

    .. math:: o = (i - 1) s - p_{lo} - p_{hi} + d (k - 1) + \\mathrm{output\\_padding} + 1,

    and the layer scatters every input value through the kernel,

    .. math:: y[c_o, j s - p_{lo} + t d] \\mathrel{+}= w[c_i, c_o - g C_{out}/G, t]\\, x[c_i, j]

    for ``c_i`` in group ``g``, keeping the positions inside ``[0, o)``. That is ``W.T @ x``
    for the matrix ``W`` of the convolution with the same weight read as ``(F, C // G, *k) =
    (C_in, C_out // G, *k)`` on inputs of size ``o``, whose output size is
    ``floor(((i - 1) s + output_padding) / s) + 1``: exactly ``i`` when
    ``output_padding < s``. PyTorch also allows ``s <= output_padding < d``; the convolution
    then has ``i + 1`` output positions along that dimension and the layer uses the rows of
    the first ``i`` (the transpose of the convolution restricted to them). Hence:

    - forward ``y = W.T x`` is the convolution's ``backward_input`` (zero-extended ``x``);
    - ``dJ/dx = W dy`` is the convolution's ``forward``, cropped to ``in``;
    - ``dJ/dw`` is the convolution's ``weight_grad`` with the roles swapped:
      ``conv.weight_grad(dy, x)``, since ``<dy, W.T x> = <W dy, x>``;
    - ``dJ/db[c_o]`` is ``dy`` summed over the batch and the positions of channel ``c_o``.

    Examples
    --------
    >>> import numpy as np
    >>> from sparseconv.transpose import ConvTransposeOperator
    >>> op = ConvTransposeOperator(np.ones((1, 1, 2, 2)), (1, 2, 2), stride=2)
    >>> op.out_shape, op.matrix.shape
    ((1, 4, 4), (16, 4))
    >>> op.forward(np.arange(4.0).reshape(1, 1, 2, 2))[0, 0]
    array([[0., 0., 1., 1.],
           [0., 0., 1., 1.],
           [2., 2., 3., 3.],
           [2., 2., 3., 3.]])
    """

    def __init__(self, weight: np.ndarray, input_shape: tuple[int, ...], *, stride: IntOrTuple = 1,
                 padding: PaddingSpec = 0, output_padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 groups: int = 1, bias: Optional[np.ndarray] = None, memory_budget: Optional[int] = None):
        resolve_dtype(weight, "weight")
        weight = np.asarray(weight)
        stride_t, pads, extra, dilation_t, out = _transposed_geometry(weight.shape, input_shape, stride, padding,
                                                                     output_padding, dilation, groups)
        in_size = tuple(int(v) for v in input_shape[1:])
        c_out = weight.shape[1] * int(groups)
        self.conv = ConvOperator(weight, (c_out, *out), stride=stride_t, padding=pads, dilation=dilation_t,
                                 groups=groups, memory_budget=memory_budget)
        self.dtype = self.conv.dtype
        self.stride, self.dilation, self.padding, self.output_padding = stride_t, dilation_t, pads, extra
        self._input_shape = (int(input_shape[0]), *in_size)
        conv_out = self.conv.geometry.out_size
        assert all(c >= i for c, i in zip(conv_out, in_size)), "conv output must cover the transposed input"
        # Rows of the convolution that are this layer's inputs: all of them unless
        # output_padding >= stride gave the convolution extra output positions.
        if conv_out == in_size:
            self._rows = None
        else:
            grid = np.arange(self.conv.geometry.n_out).reshape(self.conv.out_shape)
            self._rows = grid[(slice(None), *(slice(0, i) for i in in_size))].ravel()
        # The transpose's CSR structure, with the position of each of its entries in the
        # convolution's value array, so that set_weight is one gather.
        nnz = self.conv.nnz
        fwd = self.conv.matrix
        # Positions are stored 1-based so that none is an explicit zero a conversion may drop.
        positions = sp.csr_array((np.arange(1, nnz + 1, dtype=np.int64), fwd.indices, fwd.indptr), shape=fwd.shape)
        if self._rows is not None:
            positions = positions[self._rows]
        transposed = positions.T.tocsr()
        self._perm = transposed.data - 1
        self.matrix = sp.csr_array((self.conv.matrix.data[self._perm], transposed.indices, transposed.indptr),
                                   shape=transposed.shape)
        self.bias: Optional[np.ndarray] = None
        if bias is not None:
            self.set_bias(bias)

    # ------------------------------------------------------------------ structure
    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C_in, *in)``."""
        return self._input_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        """``(C_out, *out)``."""
        return self.conv.input_shape

    @property
    def weight(self) -> np.ndarray:
        """A read-only view of the weight, shape (C_in, C_out // groups, *kernel)."""
        return self.conv.weight

    # ------------------------------------------------------------------ values
    def set_weight(self, weight: np.ndarray) -> None:
        """Refresh the stored values from a new weight of shape (C_in, C_out // groups, *kernel)."""
        self.conv.set_weight(weight)
        np.take(self.conv.matrix.data, self._perm, out=self.matrix.data)

    def set_bias(self, bias: Optional[np.ndarray]) -> None:
        """Set (or, with None, remove) the per-channel bias of shape (C_out,)."""
        if bias is None:
            self.bias = None
            return
        bias = check_array_dtype(bias, self.dtype, "bias")
        if bias.shape != (self.out_shape[0],):
            raise ValueError(f"bias must have shape ({self.out_shape[0]},) (C_out); got {bias.shape}")
        self.bias = bias.copy()

    # ------------------------------------------------------------------ products
    def _as_conv_output(self, x: np.ndarray, name: str) -> np.ndarray:
        """A batch of this layer's inputs, zero-extended to the convolution's output size."""
        x = check_batch(x, self.input_shape, self.dtype, name)
        if self._rows is None:
            return x
        full = np.zeros((x.shape[0], *self.conv.out_shape), dtype=self.dtype)
        full[(slice(None), slice(None), *(slice(0, i) for i in self.input_shape[1:]))] = x
        return full

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``y = W.T @ x + b`` for every sample.

        Parameters
        ----------
        x : ndarray of shape (N, C_in, *in)

        Returns
        -------
        ndarray of shape (N, C_out, *out)
        """
        y = self.conv.backward_input(self._as_conv_output(x, "x"))
        if self.bias is not None:
            y += self.bias.reshape((-1,) + (1,) * (len(self.out_shape) - 1))
        return y

    def backward_input(self, dy: np.ndarray) -> np.ndarray:
        """``dJ/dx = W @ dy`` for every sample: the forward convolution of ``dy``.

        Parameters
        ----------
        dy : ndarray of shape (N, C_out, *out)

        Returns
        -------
        ndarray of shape (N, C_in, *in)
        """
        dx = self.conv.forward(dy)
        return dx[(slice(None), slice(None), *(slice(0, i) for i in self.input_shape[1:]))]

    def weight_grad(self, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """Kernel gradient ``dJ/dw``, the convolution's with the roles of input and sensitivity swapped.

        Parameters
        ----------
        x : ndarray of shape (N, C_in, *in)
        dy : ndarray of shape (N, C_out, *out)

        Returns
        -------
        ndarray of shape (C_in, C_out // groups, *kernel)
        """
        return self.conv.weight_grad(dy, self._as_conv_output(x, "x"))

    def __repr__(self) -> str:
        def dims(t: tuple[int, ...]) -> str:
            return "x".join(map(str, t))
        return (f"ConvTransposeOperator({dims(self.input_shape)} -> {dims(self.out_shape)}, "
                f"k{dims(self.weight.shape[2:])}-s{dims(self.stride)}-d{dims(self.dilation)}"
                f"-op{dims(self.output_padding)}-g{self.conv.geometry.groups}, nnz={self.nnz}, dtype={self.dtype})")


def conv_transpose_matrix(weight: np.ndarray, input_shape: tuple[int, ...], *, stride: IntOrTuple = 1,
                          padding: PaddingSpec = 0, output_padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                          groups: int = 1, memory_budget: Optional[int] = None) -> sp.csr_array:
    """The sparse matrix of a transposed convolution (PyTorch's ``conv_transpose1d/2d/3d``).

    Parameters
    ----------
    weight : ndarray of shape (C_in, C_out // groups, *kernel)
    input_shape : tuple of int
        ``(C_in, *in)``: the transposed convolution's input.
    stride, padding, output_padding, dilation, groups, memory_budget
        As for :class:`ConvTransposeOperator`.

    Returns
    -------
    scipy.sparse.csr_array of shape (C_out * prod(out), C_in * prod(in))
        ``conv_matrix(weight, (C_out, *out), stride=stride, padding=padding,
        dilation=dilation, groups=groups).T`` (restricted to the rows of the first ``in``
        positions when ``output_padding >= stride``), with ``out`` from
        :func:`conv_transpose_output_size`.

    Examples
    --------
    >>> import numpy as np
    >>> from sparseconv.transpose import conv_transpose_matrix
    >>> conv_transpose_matrix(np.array([[[1.0, 2.0]]]), (1, 2)).toarray()
    array([[1., 0.],
           [2., 1.],
           [0., 2.]])
    """
    return ConvTransposeOperator(weight, input_shape, stride=stride, padding=padding, output_padding=output_padding,
                                 dilation=dilation, groups=groups, memory_budget=memory_budget).matrix
