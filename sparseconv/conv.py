"""The convolution operator: a tied-parameter linear map with forward, adjoint and gradients.

A convolution with weight ``w`` of shape ``(F, C // G, *kernel)`` on one sample of shape
``(C, *in)`` is the matrix-vector product ``z = W @ x.ravel()`` with ``W`` of shape
``(F * prod(out), C * prod(in))``. ``W`` is sparse (each row holds at most
``C // G * prod(kernel)`` entries) and its entries are *tied*: each is one weight (or, for
repeating padding modes on tiny inputs, a sum of weights), recorded in a tying map.

:class:`ConvOperator` is a scipy ``LinearOperator`` for ``W`` whose products run on *engines*
(:mod:`sparseconv.engines`): scipy's CSR kernel on the explicit matrix (``"csr"``) or the
factored form the tying gives it, ``W = (I ⊗ B) S`` -- a gather of the inputs each tap
reads, then one BLAS GEMM (``"factored"``, :mod:`sparseconv.factored`). ``"auto"`` (the
default) picks per product at construction by the layer's shape: the factored form where BLAS
gets wide operands, the CSR kernel where the matrix is much sparser than its taps (pruned or
partially connected kernels) or channels are few. The explicit matrix is built only when an
engine needs it or :attr:`ConvOperator.matrix` is read.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from .engines import PRODUCTS, Engine, Structure, choose_engine, default_engine, engine_class, resolve_engine_name
from .engines.base import nonzero_outside
from .geometry import (FLOAT_DTYPES, ConvGeometry, IntOrTuple, PaddingSpec, check_array_dtype, check_batch,
                       conv_geometry, resolve_dtype)

__all__ = ["ConvOperator", "MatrixOperator", "conv_matrix"]

_LAYOUTS = ("batch_first", "columns")


def _engine_argument(engine: Optional[str]) -> Optional[str]:
    """A product's ``engine=`` keyword, checked: None, ``"auto"`` or a registered name.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    return None if engine is None else resolve_engine_name(engine, "engine")


class MatrixOperator(LinearOperator):
    """What the convolution, transposed-convolution and pooling operators share.

    A scipy ``LinearOperator`` of shape ``(prod(out_shape), prod(input_shape))`` on flattened
    samples, whose products go to :meth:`_columns_product` (the subclass's engines). Blocks of
    any real dtype are accepted: a float32 operator given a float64 block computes in float64
    with its float32 values (exact, no rounding of the input), integer blocks take the
    operator's dtype as numpy's promotion rules give it, and complex blocks are applied to
    their real and imaginary parts. Empty blocks (no columns) give empty results.

    Subclasses set ``geometry`` (or override :attr:`input_shape` and :attr:`out_shape`) and
    implement :meth:`_columns_product` and :attr:`matrix`.
    """

    geometry: ConvGeometry

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's input shape, ``(C, *in)``."""
        return self.geometry.input_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        """One sample's output shape, ``(F, *out)``."""
        return self.geometry.output_shape

    @property
    def matrix(self) -> sp.csr_array:
        """The explicit matrix (read-only arrays), built on first access."""
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        """Stored entries of the matrix (the layer's multiply-accumulates per sample)."""
        return int(self.matrix.nnz)

    def bias_grad(self, dy: np.ndarray) -> np.ndarray:
        """``dJ/db[f]``: ``dy`` summed over the batch and every position of output channel ``f``.

        Parameters
        ----------
        dy : ndarray of shape (N, F, *out)

        Returns
        -------
        ndarray of shape (F,)
        """
        dy = check_batch(dy, self.out_shape, self.dtype, "dy")
        return dy.sum(axis=(0, *range(2, dy.ndim)))

    def set_bias(self, bias: Optional[np.ndarray]) -> None:
        """Set (or, with None, remove) the per-channel bias of shape ``(out_shape[0],)``, added by ``forward``."""
        if bias is None:
            self.bias = None
            return
        bias = check_array_dtype(bias, self.dtype, "bias")
        if bias.shape != (self.out_shape[0],):
            raise ValueError(f"bias must have shape ({self.out_shape[0]},); got {bias.shape}")
        self.bias = bias.copy()

    def _columns_product(self, a: np.ndarray, adjoint: bool, engine: Optional[str],
                         threads: Optional[int]) -> np.ndarray:
        """``W @ a`` (or ``W.T @ a``) for a real block of the operator's dtype or float64, N >= 1."""
        raise NotImplementedError

    def _compute_dtype(self, a: np.ndarray) -> np.dtype:
        """The dtype a real block computes in (the class docstring's rules), or ``TypeError``."""
        if a.dtype.kind not in "biuf":
            raise TypeError(f"this operator multiplies real or complex blocks; got dtype {a.dtype}")
        dtype = np.result_type(self.dtype, a.dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"this operator computes in float32 or float64; a {a.dtype} block would be rounded "
                            f"(convert it to float64 explicitly)")
        return dtype

    def _apply(self, a: np.ndarray, adjoint: bool, engine: Optional[str] = None,
               threads: Optional[int] = None) -> np.ndarray:
        """Columns of ``a`` through the product, after the dtype rules of the class docstring."""
        a = np.asarray(a)
        if np.iscomplexobj(a):
            return (self._apply(a.real, adjoint, engine, threads)
                    + 1j * self._apply(a.imag, adjoint, engine, threads))
        dtype = self._compute_dtype(a)
        rows = self.shape[1] if adjoint else self.shape[0]
        if a.shape[1] == 0:
            return np.zeros((rows, 0), dtype=dtype)
        return self._columns_product(a.astype(dtype, copy=False), adjoint, engine, threads)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, adjoint=False)

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        return self._apply(y, adjoint=True)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(np.reshape(x, (-1, 1)), adjoint=False)[:, 0]

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self._apply(np.reshape(y, (-1, 1)), adjoint=True)[:, 0]

    def as_linear_operator(self, engine: Optional[str] = None) -> LinearOperator:
        """A view of this operator whose products all run on one engine.

        The operator is a ``LinearOperator`` itself (``op @ v``, ``op.H``, ``svds(op, ...)``)
        with its products on the engines :meth:`engine` reports; this view pins every product
        to one engine instead, e.g. to check or time that engine alone on the same structure.

        Parameters
        ----------
        engine : str, optional
            A registered engine name (see :mod:`sparseconv.engines`). None or ``"auto"``:
            the operator itself.

        Returns
        -------
        LinearOperator of shape :attr:`shape`

        Raises
        ------
        ValueError
            For an unknown engine name.
        """
        name = _engine_argument(engine)
        if name is None or name == "auto":
            return self
        return _PinnedOperator(self, name)

    def to_dense(self) -> np.ndarray:
        """The matrix as a dense ndarray (small layers only)."""
        return self.matrix.toarray()


class _PinnedOperator(LinearOperator):
    """An operator's products on one named engine (what ``as_linear_operator(engine)`` returns)."""

    def __init__(self, op: MatrixOperator, engine: str) -> None:
        super().__init__(dtype=op.dtype, shape=op.shape)
        self.op, self.engine = op, engine

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return self.op._apply(x, False, self.engine)

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        return self.op._apply(y, True, self.engine)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(x, (-1, 1)))[:, 0]

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self._rmatmat(np.reshape(y, (-1, 1)))[:, 0]


class ConvOperator(MatrixOperator):
    """An N-d convolution lowered to a tied-parameter ``scipy.sparse`` matrix.

    Parameters
    ----------
    weight : ndarray of shape (F, C // groups, *kernel)
        1, 2 or 3 kernel dimensions; float32 or float64 (integers become float64). The
        operator computes in this dtype.
    input_shape : tuple of int
        One sample's shape ``(C, *in)``.
    stride, dilation : int or tuple of int, default 1
    padding : int, tuple, or {"valid", "same", "full"}, default 0
        Int, per-dimension ints, per-dimension ``(low, high)`` pairs, or a string; see
        :func:`sparseconv.geometry.normalize_padding`.
    groups : int, default 1
    padding_mode : {"zeros", "circular", "reflect", "replicate"}, default "zeros"
    flip : bool, default False
        True for a true convolution (kernel rotated 180 degrees), False for the
        cross-correlation deep-learning libraries call convolution.
    bias : ndarray of shape (F,), optional
        Added to every output position of its map by :meth:`forward`.
    weight_mask : ndarray of bool, shape like ``weight``, optional
        Weights left out of the matrix (a connection table, or pruning). Masked weights
        must be zero.
    memory_budget : int or str, optional
        Bytes the operator's built structures (the CSR matrix, tap tables) may use, or a
        string such as ``"1GiB"`` (see :func:`~sparseconv.geometry.parse_memory_budget`); a
        structure that would exceed it raises :class:`~sparseconv.pattern.MemoryBudgetError`
        before it is allocated. Default: half the physical memory, or
        ``SPARSECONV_MEMORY_BUDGET``.
    engine : {"auto", "csr", "factored"}, optional
        The engine of every product (see :mod:`sparseconv.engines`). ``"auto"`` (the
        default, unless the ``SPARSECONV_ENGINE`` environment variable names another) picks
        one per product from the layer's shape and mask; :meth:`engine` reports the choice.
        The engines of the forward and adjoint products are built at construction, the
        kernel gradient's at its first call (or at :meth:`prepare`).

    Attributes
    ----------
    geometry : ConvGeometry
    shape : (int, int)
        ``(F * prod(out), C * prod(in))``: the operator is a scipy ``LinearOperator`` on
        flattened samples (``op @ v``, ``op @ X`` for blocks of shape ``(C * prod(in), N)``,
        ``op.H``, composition), without the bias.
    dtype : numpy.dtype

    Notes
    -----
    Along each spatial dimension the output size is

    .. math:: o = \\lfloor (i + p_{lo} + p_{hi} - d (k - 1) - 1) / s \\rfloor + 1.

    Row ``(f, *o)`` holds, at column ``(c, *(o s - p_lo + k d))``, the weight
    ``w[f, c - g C/G, *k]`` (rotated when ``flip``) for every tap inside the input. With
    ``delta = dJ/dz``:

    - ``dJ/dx = W.T @ delta``: the adjoint of a correlation is the full convolution
      (correlation with the rotated kernel);
    - ``dJ/dw[p] = sum_e [param(e) == p] delta[row(e)] x[col(e)]``, summed over the batch
      (a scatter-add over the tying map);
    - ``dJ/db[f] = sum of delta over map f``.

    Examples
    --------
    >>> import numpy as np, sparseconv as sc
    >>> op = sc.ConvOperator(np.ones((1, 1, 2, 2)), input_shape=(1, 3, 3))
    >>> op.matrix.shape, op.nnz
    ((4, 9), 16)
    >>> (op @ np.ones(9)).tolist()
    [4.0, 4.0, 4.0, 4.0]
    """

    def __init__(self, weight: np.ndarray, input_shape: tuple[int, ...], *, stride: IntOrTuple = 1,
                 padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                 padding_mode: str = "zeros", flip: bool = False, bias: Optional[np.ndarray] = None,
                 weight_mask: Optional[np.ndarray] = None, memory_budget: object = None,
                 engine: Optional[str] = None):
        dtype = resolve_dtype(weight, "weight")
        weight = np.asarray(weight)
        geometry = conv_geometry(weight.shape, input_shape, stride=stride, padding=padding, dilation=dilation,
                                 groups=groups, padding_mode=padding_mode, flip=flip)
        named = _engine_argument(engine)
        default = resolve_engine_name(default_engine(), "SPARSECONV_ENGINE") if named is None else named
        super().__init__(dtype=dtype, shape=(geometry.n_out, geometry.n_in))
        self.geometry: ConvGeometry = geometry
        self._structure = Structure(geometry, dtype, weight_mask=weight_mask, memory_budget=memory_budget)
        self._structure.weight[...] = self._checked_weight(weight)
        self._auto = {p: choose_engine(self._structure, p) for p in PRODUCTS}
        self._choice = {p: self._auto[p] if default == "auto" else default for p in PRODUCTS}
        self._engines: dict[str, Engine] = {}
        self._applicable: set[tuple[str, str]] = set()
        self.bias: Optional[np.ndarray] = None
        if bias is not None:
            self.set_bias(bias)
        for product in ("forward", "adjoint"):
            self._engine(product)

    # ------------------------------------------------------------------ structure
    @property
    def n_params(self) -> int:
        """Number of kernel weights (masked ones included)."""
        return self.geometry.n_params

    @property
    def weight(self) -> np.ndarray:
        """A read-only view of the current weight (it follows :meth:`set_weight`)."""
        return self._structure.public_weight

    @property
    def weight_mask(self) -> Optional[np.ndarray]:
        """A read-only copy of the mask given at construction (False: weight left out), or None."""
        return self._structure.mask

    @property
    def nnz(self) -> int:
        """Stored entries of the matrix (the layer's multiply-accumulates per sample), counted
        without building it where every entry is one weight."""
        return self._structure.nnz

    @property
    def nbytes(self) -> int:
        """Bytes charged to the memory budget so far: built pattern data, tables, matrix values."""
        return self._structure.built_bytes

    @property
    def matrix(self) -> sp.csr_array:
        """The explicit matrix, built on first access (then ``conv_matrix`` of the same layer).

        Its arrays are read-only and shared with the ``"csr"`` engine; :meth:`set_weight`
        updates its values in place. To edit it, edit a copy (``op.matrix.copy()``).

        Raises
        ------
        sparseconv.engines.base.MatrixModifiedError
            When its arrays were replaced since it was handed out (see :meth:`release_matrix`).
        sparseconv.pattern.MemoryBudgetError
            When it does not fit in the memory budget (before allocating it).
        """
        return self._engine("forward", "csr").matrix

    def release_matrix(self) -> None:
        """Detach the matrix :attr:`matrix` handed out: it keeps its current values and arrays,
        the operator writes later weights elsewhere, and :attr:`matrix` returns a fresh one."""
        csr = self._engines.get("csr")
        if csr is not None:
            csr.release()

    @property
    def param_index(self) -> np.ndarray:
        """Index into ``weight.ravel()`` of the weight each stored entry holds, shape (nnz,), read-only.

        Raises
        ------
        ValueError
            When some entry is a sum of several weights (repeating padding on an input smaller
            than the kernel's reach); use :attr:`tying` then.
        """
        index = self._structure.pattern().param_index
        if index is None:
            raise ValueError(
                "some entries of this matrix hold a sum of several weights (padding_mode "
                f"{self.geometry.padding_mode!r} wraps the kernel onto the same input position), so "
                "there is no single param_index; use .tying, a sparse (nnz, n_params) matrix")
        return index[...]

    @property
    def tying(self) -> sp.csr_array:
        """The tying map: a 0/1 ``csr_array`` of shape (nnz, n_params) with
        ``matrix.data == tying @ weight.ravel()``."""
        p = self._structure.pattern()
        if p.tying is not None:
            return p.tying.copy()
        nnz = p.param_index.size
        return sp.csr_array((np.ones(nnz), p.param_index.copy(), np.arange(nnz + 1)), shape=(nnz, self.n_params))

    # ------------------------------------------------------------------ engines
    def supports(self, engine: str, product: str) -> bool:
        """Whether ``engine`` can run ``product`` on this layer (its geometry, mask, dtype).

        An engine whose optional dependency is missing (``"numba"``, ``"stencil"`` without
        numba) supports nothing.

        Parameters
        ----------
        engine : str
            ``"auto"`` or a registered engine name (see :mod:`sparseconv.engines`).
        product : {"forward", "adjoint", "weight_grad"}

        Returns
        -------
        bool

        Raises
        ------
        ValueError
            For an unknown ``engine`` or ``product``.
        """
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}; got {product!r}")
        name = resolve_engine_name(engine)
        if name == "auto":
            return True
        try:
            return bool(engine_class(name).applicable(self._structure, product))
        except ImportError:
            return False

    def engine(self, product: str) -> str:
        """The engine a product runs on when no ``engine=`` is passed to it.

        Parameters
        ----------
        product : {"forward", "adjoint", "weight_grad"}

        Returns
        -------
        str
            A registered engine name (see :mod:`sparseconv.engines`).

        Raises
        ------
        ValueError
            For an unknown ``product``.
        """
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}; got {product!r}")
        return self._choice[product]

    def prepare(self, *products: str) -> None:
        """Build the engines of ``products`` now rather than at their first call.

        Construction prepares the ``"forward"`` and ``"adjoint"`` engines; the kernel
        gradient's is otherwise built when :meth:`weight_grad` first runs. Building charges
        the memory budget (:attr:`nbytes`) as a first call would.

        Parameters
        ----------
        *products : {"forward", "adjoint", "weight_grad"}
            Default: all three.

        Raises
        ------
        ValueError
            For an unknown product.
        sparseconv.pattern.MemoryBudgetError
            When an engine's structures would exceed the memory budget.
        """
        for product in products or PRODUCTS:
            if product not in PRODUCTS:
                raise ValueError(f"product must be one of {PRODUCTS}; got {product!r}")
        for product in products or PRODUCTS:
            self._engine(product)

    def _engine(self, product: str, name: Optional[str] = None) -> Engine:
        """The engine for ``product`` (``name`` None: the operator's choice), prepared for it."""
        if name is None:
            name = self._choice[product]
        elif name == "auto":
            name = self._auto[product]
        with self._structure.lock:
            engine = self._engines.get(name)
            if (name, product) not in self._applicable:
                cls = engine_class(name)
                if not cls.applicable(self._structure, product):
                    why = cls.unavailable_reason()
                    raise ValueError(f"engine {name!r} cannot run the {product} product of this layer "
                                     f"({self.geometry.describe()})" + (f": {why}" if why else ""))
                self._applicable.add((name, product))
            if engine is None:
                engine = engine_class(name)(self._structure)
            engine.prepare(product)
            self._engines[name] = engine
        return engine

    # ------------------------------------------------------------------ values
    def _checked_weight(self, weight: object) -> np.ndarray:
        weight = check_array_dtype(weight, self.dtype, "weight")
        if weight.shape != self.geometry.weight_shape:
            raise ValueError(f"weight must have shape {self.geometry.weight_shape}; got {weight.shape}")
        kept = self._structure.kept_indices()
        if kept is not None and nonzero_outside(weight, kept):
            raise ValueError("weight has non-zero values where weight_mask is False; those weights have "
                             "no entries in the matrix (build a new operator to change the mask)")
        return weight

    def set_weight(self, weight: np.ndarray) -> None:
        """Refresh the weight and every engine's values from it, keeping the structure.

        O(nnz) for the CSR engine's value array, written in place (see
        :meth:`sparseconv.engines.csr.CsrEngine.refresh`); nothing for the factored engine,
        which reads the weight at each product.

        Parameters
        ----------
        weight : ndarray of shape (F, C // groups, *kernel)

        Raises
        ------
        sparseconv.engines.base.MatrixModifiedError
            When the arrays of :attr:`matrix` were replaced by the caller; nothing is changed.
        """
        weight = self._checked_weight(weight)
        for engine in self._engines.values():
            engine.check()
        self._structure.weight[...] = weight
        for engine in self._engines.values():
            engine.refresh(self._structure.weight)

    # ------------------------------------------------------------------ products
    def _columns_product(self, a: np.ndarray, adjoint: bool, engine: Optional[str],
                         threads: Optional[int]) -> np.ndarray:
        if adjoint:
            return self._engine("adjoint", engine).rmatmat(a, threads)
        return self._engine("forward", engine).matmat(a, threads)

    def _batch_product(self, batch: np.ndarray, adjoint: bool, engine: Optional[str],
                       threads: Optional[int]) -> np.ndarray:
        """``W @ x`` (or ``W.T @ dy``) for a checked batch, through column blocks (views)."""
        n = batch.shape[0]
        shape = self.input_shape if adjoint else self.out_shape
        if n == 0:
            return np.zeros((0, *shape), dtype=self.dtype)
        columns = self._columns_product(batch.reshape(n, -1).T, adjoint, engine, threads)
        return columns.T.reshape((n, *shape))

    def forward(self, x: np.ndarray, *, engine: Optional[str] = None, threads: Optional[int] = None) -> np.ndarray:
        """``z = W @ x + b`` for every sample.

        Parameters
        ----------
        x : ndarray of shape (N, C, *in)
            ``N = 0`` gives an empty result.
        engine : {"auto", "csr", "factored"}, optional
            Default :meth:`engine` ``("forward")``. ``"csr"`` multiplies by the matrix with
            scipy's CSR kernel, row blocks on threads. ``"factored"`` evaluates the same
            product as a gather of the inputs each kernel tap reads and one BLAS GEMM per group
            (:mod:`sparseconv.factored`), multiplying padding and masked weights as explicit
            zeros -- a non-finite input or weight can then give NaN where the CSR product,
            having no such entries, does not.
        threads : int, optional
            Threads for the CSR row blocks or the gathers; default
            :func:`sparseconv.parallel.get_threads` (every core). BLAS uses its own pool.

        Returns
        -------
        ndarray of shape (N, F, *out)
            ``"csr"`` results do not depend on ``threads``; ``"factored"`` results agree with
            them to rounding.
        """
        name = _engine_argument(engine)
        z = self._batch_product(check_batch(x, self.input_shape, self.dtype, "x"), False, name, threads)
        if self.bias is not None:
            z += self.bias.reshape((-1,) + (1,) * self.geometry.ndim)
        return z

    def affine(self, X: np.ndarray, bias: Optional[np.ndarray] = None, *, relu: bool = False,
               engine: Optional[str] = None, threads: Optional[int] = None) -> np.ndarray:
        """``W @ X + bias`` on a column block, optionally through ReLU: a layer's forward in one call.

        The column-layout counterpart of :meth:`forward` (``X`` holds one sample per column,
        as for ``op @ X``), with the bias and the activation of a ``Conv -> ReLU`` pair. The
        compiled engines (``"numba"``, ``"implicit"``) add the bias and take the maximum as
        each output row leaves the registers, so the layer costs one pass over memory; the
        other engines compute ``W @ X`` and then make one in-place pass per step. Either way
        the bits are those of ``np.maximum(op @ X + bias_per_row, 0)`` on the same engine.

        Parameters
        ----------
        X : ndarray of shape (C * prod(in), N)
            Real; a float64 block on a float32 operator computes in float64 (as ``op @ X``).
        bias : ndarray of shape (F,), optional
            Added to every row of output channel ``f``. The operator's own :attr:`bias` is not
            implied: pass ``op.bias`` to use it.
        relu : bool, default False
            Return ``max(W @ X + bias, 0)`` (NaN stays NaN, as with ``np.maximum``).
        engine : str, optional
            As for :meth:`forward` (default :meth:`engine` ``("forward")``).
        threads : int, optional

        Returns
        -------
        ndarray of shape (F * prod(out), N)

        Raises
        ------
        ValueError
            For a block or bias of the wrong shape.
        TypeError
            For a non-real block, a bias of another floating dtype than the operator's, or a
            ``relu`` that is not a bool.
        """
        name = _engine_argument(engine)
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[0] != self.shape[1]:
            raise ValueError(f"X must be a column block of shape ({self.shape[1]}, N); got an array of shape {X.shape}")
        if np.iscomplexobj(X):
            raise TypeError(f"X must be a real array; got dtype {X.dtype}")
        dtype = self._compute_dtype(X)
        if bias is not None:
            bias = check_array_dtype(bias, self.dtype, "bias")
            if bias.shape != (self.out_shape[0],):
                raise ValueError(f"bias must have shape ({self.out_shape[0]},); got {bias.shape}")
        if not isinstance(relu, (bool, np.bool_)):
            raise TypeError(f"relu must be a bool; got {relu!r}")
        if X.shape[1] == 0:
            return np.zeros((self.shape[0], 0), dtype=dtype)
        return self._engine("forward", name).matmat_bias_relu(X.astype(dtype, copy=False), threads, bias, bool(relu))

    def backward_input(self, dy: np.ndarray, *, engine: Optional[str] = None,
                       threads: Optional[int] = None) -> np.ndarray:
        """``dJ/dx = W.T @ dy`` for every sample (the full convolution with the rotated kernel).

        Parameters
        ----------
        dy : ndarray of shape (N, F, *out)
        engine : {"auto", "csr", "factored"}, optional
            Default :meth:`engine` ``("adjoint")``. ``"csr"``: row blocks of ``W`` scatter
            into per-thread buffers that are then summed (no transpose of ``W`` is stored);
            bit-identical to scipy's ``W.T @ dy`` on one thread, equal to rounding on more.
            ``"factored"``: a gather of ``dy`` through the inverse tap table and one GEMM per
            group (see :meth:`forward` for what explicit zeros mean).
        threads : int, optional
            As for :meth:`forward`.

        Returns
        -------
        ndarray of shape (N, C, *in)
        """
        name = _engine_argument(engine)
        return self._batch_product(check_batch(dy, self.out_shape, self.dtype, "dy"), True, name, threads)

    def weight_grad(self, x: np.ndarray, dy: np.ndarray, *, engine: Optional[str] = None,
                    threads: Optional[int] = None, layout: str = "batch_first") -> np.ndarray:
        """Kernel gradient: the scatter-add of ``dy[row(e)] * x[col(e)]`` over the tying map.

        Parameters
        ----------
        x : ndarray of shape (N, C, *in), or (C * prod(in), N) with ``layout="columns"``
        dy : ndarray of shape (N, F, *out), or (F * prod(out), N) with ``layout="columns"``
        engine : {"auto", "csr", "factored"}, optional
            Default :meth:`engine` ``("weight_grad")`` (``"factored"`` unless chosen
            otherwise). ``"csr"`` is the literal definition: for each stored entry ``e`` the
            batch sum ``g[e] = sum_n dy[n, row(e)] x[n, col(e)]`` is formed in bounded chunks
            and scatter-added to the weight(s) ``e`` is tied to. ``"factored"`` performs the
            same sum grouped by kernel tap: the entries tied to tap ``t`` of every (filter,
            channel) pair share one list of (output, input) positions, so gathering each tap's
            input positions once (a zero where the tap reads padding) turns the whole sum into
            one ``(F/G, N*m) @ (N*m, taps*C/G)`` product per group -- BLAS speed, no
            ``(nnz, N)`` scratch. It runs in chunks of samples (or, for huge layers, output
            positions) of about :data:`sparseconv.factored.CHUNK_ELEMENTS` gathered elements.
        threads : int, optional
            Threads for the gather; default every core. The BLAS product runs on BLAS's own
            pool (limit it with ``threadpoolctl``).
        layout : {"batch_first", "columns"}, default "batch_first"
            ``"columns"`` takes the column blocks the LinearOperator products use (flattened
            samples as columns), with no transpose or copy on the caller's side.

        Returns
        -------
        ndarray of shape (F, C // groups, *kernel)
            Zero for masked weights; zero for an empty batch.
        """
        name = _engine_argument(engine)
        if layout == "batch_first":
            x = check_batch(x, self.input_shape, self.dtype, "x")
            dy = check_batch(dy, self.out_shape, self.dtype, "dy")
            n = x.shape[0]
            xs, ds = x.reshape(n, self.shape[1]).T, dy.reshape(dy.shape[0], self.shape[0]).T
        elif layout == "columns":
            xs = _check_columns(x, self.shape[1], self.dtype, "x")
            ds = _check_columns(dy, self.shape[0], self.dtype, "dy")
        else:
            raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout!r}")
        if xs.shape[1] != ds.shape[1]:
            raise ValueError(f"x and dy must hold the same number of samples; got {xs.shape[1]} (x) and "
                             f"{ds.shape[1]} (dy)")
        if xs.shape[1] == 0:
            return np.zeros(self.geometry.weight_shape, dtype=self.dtype)
        return self._engine("weight_grad", name).weight_grad(xs, ds, threads)

    def __repr__(self) -> str:
        g = self.geometry
        return (f"ConvOperator({g.describe()}, matrix {self.shape[0]}x{self.shape[1]}, nnz={self.nnz}, "
                f"params={self.n_params}, dtype={self.dtype})")


def _check_columns(a: object, rows: int, dtype: np.dtype, name: str) -> np.ndarray:
    """A block of flattened samples as columns, ``(rows, N)``, in ``dtype``."""
    arr = check_array_dtype(a, dtype, name)
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows}, N) with layout='columns'; got {arr.shape}")
    return arr


def conv_matrix(weight: np.ndarray, input_shape: tuple[int, ...], *, stride: IntOrTuple = 1,
                padding: PaddingSpec = 0, dilation: IntOrTuple = 1, groups: int = 1,
                padding_mode: str = "zeros", flip: bool = False,
                memory_budget: object = None) -> sp.csr_array:
    """The explicit sparse matrix of a convolution.

    Like :func:`scipy.linalg.convolution_matrix`, but N-d, strided, multi-channel and sparse.

    Parameters
    ----------
    weight : ndarray of shape (F, C // groups, *kernel)
    input_shape : tuple of int
        ``(C, *in)`` with 1, 2 or 3 spatial dimensions.
    stride, padding, dilation, groups, padding_mode, flip, memory_budget
        As for :class:`ConvOperator`.

    Returns
    -------
    scipy.sparse.csr_array of shape (F * prod(out), C * prod(in))
        Rows ordered ``(F, *out)`` and columns ``(C, *in)``, both C order, so that
        ``(W @ x.reshape(N, -1).T).T.reshape(N, F, *out)`` is the layer's output.

    Examples
    --------
    >>> import numpy as np, sparseconv as sc
    >>> W = sc.conv_matrix(np.array([[[[1., 2.], [3., 4.]]]]), (1, 3, 3))
    >>> W.toarray()[0]
    array([1., 2., 0., 3., 4., 0., 0., 0., 0.])
    """
    op = ConvOperator(weight, input_shape, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      padding_mode=padding_mode, flip=flip, memory_budget=memory_budget, engine="csr")
    # The operator is discarded: its matrix is handed over writeable, not copied.
    return op._engine("forward", "csr").hand_over()
