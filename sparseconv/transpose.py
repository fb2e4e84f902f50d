"""Transposed convolution: the transpose of a forward convolution's tied-parameter matrix.

A transposed ("fractionally strided", "deconvolution") layer is defined as the adjoint of a
convolution: its matrix is ``W.T`` for the ``W`` of the convolution it undoes the shape of.
:class:`ConvTransposeOperator` therefore builds that forward :class:`~sparseconv.conv.ConvOperator`
and delegates every product to its engines -- the transposed layer's forward pass is the
convolution's adjoint and vice versa -- so no index arithmetic is repeated here. Its own
explicit matrix (the transpose, stored as CSR) is built only when :attr:`ConvTransposeOperator.matrix`
is read; geometry and validation are :func:`~sparseconv.geometry.conv_transpose_geometry`'s. Weights and
options follow PyTorch's ``ConvTranspose1d/2d/3d``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from .conv import ConvOperator, MatrixOperator
from .engines.base import GuardedMatrix, freeze
from .geometry import IntOrTuple, PaddingSpec, check_batch, conv_transpose_geometry, resolve_dtype

__all__ = ["ConvTransposeOperator", "conv_transpose_matrix"]


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
    weight_mask : ndarray of bool, shape like ``weight``, optional
        Weights left out of the matrix (pruning); masked weights must be zero and get zero
        kernel gradient. Handed to the forward convolution, whose weight has the same layout.
    memory_budget : int or str, optional
        Bytes the structures of the forward convolution and this operator may use (see
        :class:`~sparseconv.conv.ConvOperator`).
    engine : {"auto", "csr", "factored"}, optional
        The forward convolution's engines (this layer's forward runs on its adjoint).

    Attributes
    ----------
    shape : (int, int)
        ``(C_out * prod(out), C_in * prod(in))``: a scipy ``LinearOperator`` on flattened
        samples (no bias).
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
                 groups: int = 1, bias: Optional[np.ndarray] = None, weight_mask: Optional[np.ndarray] = None,
                 memory_budget: object = None, engine: Optional[str] = None):
        resolve_dtype(weight, "weight")
        weight = np.asarray(weight)
        tg = conv_transpose_geometry(weight.shape, input_shape, stride=stride, padding=padding,
                                     output_padding=output_padding, dilation=dilation, groups=groups)
        in_size = tuple(int(v) for v in input_shape[1:])
        c_out = weight.shape[1] * int(groups)
        self.conv = ConvOperator(weight, (c_out, *tg.out_size), stride=tg.stride, padding=tg.padding,
                                 dilation=tg.dilation, groups=groups, weight_mask=weight_mask,
                                 memory_budget=memory_budget, engine=engine)
        self._input_shape = (int(input_shape[0]), *in_size)
        super().__init__(dtype=self.conv.dtype, shape=(self.conv.shape[1], int(np.prod(self._input_shape))))
        self.stride, self.dilation, self.padding, self.output_padding = tg.stride, tg.dilation, tg.padding, \
            tg.output_padding
        conv_out = self.conv.geometry.out_size
        if not all(c >= i for c, i in zip(conv_out, in_size)):
            raise AssertionError("the convolution's output must cover the transposed input")
        # Rows of the convolution that are this layer's inputs: all of them unless
        # output_padding >= stride gave the convolution extra output positions.
        if conv_out == in_size:
            self._rows = None
        else:
            grid = np.arange(self.conv.geometry.n_out).reshape(self.conv.out_shape)
            self._rows = grid[(slice(None), *(slice(0, i) for i in in_size))].ravel()
        self._matrix: Optional[GuardedMatrix] = None
        self._perm: Optional[np.ndarray] = None
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

    @property
    def weight_mask(self) -> Optional[np.ndarray]:
        """A read-only copy of the mask given at construction (False: weight left out), or None."""
        return self.conv.weight_mask

    @property
    def nnz(self) -> int:
        """Stored entries of the matrix."""
        return self.conv.nnz if self._rows is None else int(self.matrix.nnz)

    @property
    def matrix(self) -> sp.csr_array:
        """The explicit matrix of shape (C_out * prod(out), C_in * prod(in)), built on first access.

        Read-only arrays, kept in sync by :meth:`set_weight` (see
        :attr:`sparseconv.conv.ConvOperator.matrix` for what may and may not be done with it).
        """
        with self.conv._structure.lock:
            if self._matrix is None:
                self._build_matrix()
        return self._matrix.public()

    def release_matrix(self) -> None:
        """Detach the matrix :attr:`matrix` handed out (see :meth:`ConvOperator.release_matrix`)."""
        if self._matrix is not None:
            self._matrix.detach()

    def _build_matrix(self) -> None:
        """The transpose's CSR structure, with the position of each of its entries in the
        convolution's value array, so that :meth:`set_weight` is one gather."""
        fwd = self.conv._engine("forward", "csr").private
        nnz = fwd.nnz
        # The transpose's values, indices and row pointers, plus the int64 gather positions.
        self.conv._structure.reserve(nnz * (fwd.data.itemsize + fwd.indices.itemsize + 8)
                                     + (self.shape[0] + 1) * fwd.indptr.itemsize, "the transposed matrix")
        # Positions are stored 1-based so that none is an explicit zero a conversion may drop.
        positions = sp.csr_array((np.arange(1, nnz + 1, dtype=np.int64), fwd.indices, fwd.indptr), shape=fwd.shape)
        if self._rows is not None:
            positions = positions[self._rows]
        transposed = positions.T.tocsr()
        self._perm = freeze(transposed.data - 1)
        self._matrix = GuardedMatrix(fwd.data[self._perm], freeze(transposed.indices), freeze(transposed.indptr),
                                     transposed.shape)

    # ------------------------------------------------------------------ engines
    def supports(self, engine: str, product: str) -> bool:
        """Whether ``engine`` can run ``product``: this layer's forward is the convolution's adjoint.

        Parameters
        ----------
        engine : str
        product : {"forward", "adjoint", "weight_grad"}

        Returns
        -------
        bool
        """
        swapped = {"forward": "adjoint", "adjoint": "forward"}.get(product, product)
        return self.conv.supports(engine, swapped)

    def engine(self, product: str) -> str:
        """The engine a product runs on: this layer's forward is the convolution's adjoint.

        Parameters
        ----------
        product : {"forward", "adjoint", "weight_grad"}

        Returns
        -------
        str
        """
        swap = {"forward": "adjoint", "adjoint": "forward"}
        return self.conv.engine(swap.get(product, product))

    # ------------------------------------------------------------------ values
    def set_weight(self, weight: np.ndarray) -> None:
        """Refresh the values from a new weight of shape (C_in, C_out // groups, *kernel).

        Raises
        ------
        sparseconv.engines.base.MatrixModifiedError
            When the arrays of :attr:`matrix` were replaced by the caller; nothing is changed.
        """
        if self._matrix is not None:
            self._matrix.check()
        self.conv.set_weight(weight)
        if self._matrix is not None:
            np.take(self.conv._engine("forward", "csr").private.data, self._perm, out=self._matrix.writer)

    # ------------------------------------------------------------------ products
    def _columns_product(self, a: np.ndarray, adjoint: bool, engine: Optional[str],
                         threads: Optional[int]) -> np.ndarray:
        if adjoint:
            out = self.conv._columns_product(a, False, engine, threads)
            return out if self._rows is None else out[self._rows]
        if self._rows is not None:
            full = np.zeros((self.conv.shape[0], a.shape[1]), dtype=a.dtype)
            full[self._rows] = a
            a = full
        return self.conv._columns_product(a, True, engine, threads)

    def _as_conv_output(self, x: np.ndarray) -> np.ndarray:
        """A checked batch of this layer's inputs, zero-extended to the convolution's output size."""
        if self._rows is None:
            return x
        full = np.zeros((x.shape[0], *self.conv.out_shape), dtype=self.dtype)
        full[(slice(None), slice(None), *(slice(0, i) for i in self.input_shape[1:]))] = x
        return full

    def forward(self, x: np.ndarray, *, engine: Optional[str] = None, threads: Optional[int] = None) -> np.ndarray:
        """``y = W.T @ x + b`` for every sample.

        Parameters
        ----------
        x : ndarray of shape (N, C_in, *in)
        engine, threads
            As for :meth:`ConvOperator.backward_input`, which this runs.

        Returns
        -------
        ndarray of shape (N, C_out, *out)
        """
        x = check_batch(x, self.input_shape, self.dtype, "x")
        y = self.conv.backward_input(self._as_conv_output(x), engine=engine, threads=threads)
        if self.bias is not None:
            y += self.bias.reshape((-1,) + (1,) * (len(self.out_shape) - 1))
        return y

    def backward_input(self, dy: np.ndarray, *, engine: Optional[str] = None,
                       threads: Optional[int] = None) -> np.ndarray:
        """``dJ/dx = W @ dy`` for every sample: the forward convolution of ``dy``.

        Parameters
        ----------
        dy : ndarray of shape (N, C_out, *out)
        engine, threads
            As for :meth:`ConvOperator.forward`, which this runs.

        Returns
        -------
        ndarray of shape (N, C_in, *in)
        """
        dy = check_batch(dy, self.out_shape, self.dtype, "dy")
        dx = self.conv.forward(dy, engine=engine, threads=threads)
        return dx[(slice(None), slice(None), *(slice(0, i) for i in self.input_shape[1:]))]

    def weight_grad(self, x: np.ndarray, dy: np.ndarray, *, engine: Optional[str] = None,
                    threads: Optional[int] = None) -> np.ndarray:
        """Kernel gradient ``dJ/dw``, the convolution's with the roles of input and sensitivity swapped.

        Parameters
        ----------
        x : ndarray of shape (N, C_in, *in)
        dy : ndarray of shape (N, C_out, *out)
        engine, threads
            As for :meth:`ConvOperator.weight_grad`.

        Returns
        -------
        ndarray of shape (C_in, C_out // groups, *kernel)
        """
        x = check_batch(x, self.input_shape, self.dtype, "x")
        dy = check_batch(dy, self.out_shape, self.dtype, "dy")
        if x.shape[0] != dy.shape[0]:
            raise ValueError(f"x and dy must hold the same number of samples; got {x.shape[0]} (x) and "
                             f"{dy.shape[0]} (dy)")
        return self.conv.weight_grad(dy, self._as_conv_output(x), engine=engine, threads=threads)

    def __repr__(self) -> str:
        def dims(t: tuple[int, ...]) -> str:
            return "x".join(map(str, t))
        return (f"ConvTransposeOperator({dims(self.input_shape)} -> {dims(self.out_shape)}, "
                f"k{dims(self.weight.shape[2:])}-s{dims(self.stride)}-d{dims(self.dilation)}"
                f"-op{dims(self.output_padding)}-g{self.conv.geometry.groups}, nnz={self.nnz}, dtype={self.dtype})")


def conv_transpose_matrix(weight: np.ndarray, input_shape: tuple[int, ...], *, stride: IntOrTuple = 1,
                          padding: PaddingSpec = 0, output_padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                          groups: int = 1, memory_budget: object = None) -> sp.csr_array:
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
    op = ConvTransposeOperator(weight, input_shape, stride=stride, padding=padding, output_padding=output_padding,
                               dilation=dilation, groups=groups, memory_budget=memory_budget, engine="csr")
    op._build_matrix()
    # The operator is discarded: its matrix is handed over writeable, not copied.
    return op._matrix.hand_over()
