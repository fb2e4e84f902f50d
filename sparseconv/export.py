"""Conv-as-MLP export: a network of linear layers and activations as plain matrices.

:func:`to_mlp` walks a :class:`~sparseconv.nn.Sequential` and turns every linear layer
(convolution, dense, average/sum pooling, trainable sub-sampling) into one *stage*: a matrix
on flattened C-order samples (``scipy.sparse`` for the convolutional ones, a dense ndarray for
``Linear``), a bias vector and the element-wise activation that follows it. The resulting
:class:`MLP` computes the same outputs and input gradients as the network, with nothing
but matrix products -- the statement "a CNN is an MLP with sparse, tied weights", executable.

Max pooling is data dependent (its selection matrix changes with every input), so it has no
fixed matrix: :func:`to_mlp` refuses it. For one given batch, its selection matrix is
available from :meth:`sparseconv.pooling.MaxPoolOperator.selection_matrix`. Dropout in
training mode is random, so it is refused too; in evaluation mode it is the identity and,
like ``Identity`` and ``Flatten``, contributes no stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp

from .nn import Activation, Dropout, Flatten, Identity, Module, Sequential
from .nn.layers import _MaxPoolNd

__all__ = ["Stage", "MLP", "to_mlp"]

Matrix = Union[np.ndarray, sp.csr_array]


@dataclass
class Stage:
    """One MLP layer: ``a = activation(matrix @ x + bias)`` on flattened samples.

    Attributes
    ----------
    matrix : scipy.sparse.csr_array or ndarray of shape (n_out, n_in)
    bias : ndarray of shape (n_out,) or None
    activation : Activation or None
        The activation layer that follows (its ``name``, e.g. ``"tanh"``, says which; its
        options, e.g. ``LeakyReLU``'s slope, are kept).
    source : str
        The layer(s) this stage came from.
    """

    matrix: Matrix
    bias: Optional[np.ndarray]
    activation: Optional[Activation]
    source: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def nnz(self) -> int:
        return int(self.matrix.nnz) if sp.issparse(self.matrix) else int(np.count_nonzero(self.matrix))

    def __repr__(self) -> str:
        kind = "sparse" if sp.issparse(self.matrix) else "dense"
        return (f"Stage({self.source}: {kind} {self.shape[0]}x{self.shape[1]}, nnz={self.nnz}, "
                f"bias={'yes' if self.bias is not None else 'no'}, activation={self.activation!r})")


class MLP:
    """A multilayer perceptron of explicit matrices, as produced by :func:`to_mlp`.

    Parameters
    ----------
    stages : list of Stage
    input_shape : tuple of int
        One sample's shape in the original network (for reference; the MLP works on
        flattened samples).
    """

    def __init__(self, stages: list[Stage], input_shape: tuple[int, ...]):
        self.stages = stages
        self.input_shape = tuple(input_shape)
        self.n_in = int(np.prod(self.input_shape))
        self.n_out = int(stages[-1].shape[0]) if stages else self.n_in
        self._cache: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x : ndarray of shape (N, n_in)`` -> ``(N, n_out)`` of the last stage."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"x must have shape (N, {self.n_in}) (flattened samples); got {x.shape}")
        self._cache = []
        for st in self.stages:
            z = np.asarray((st.matrix @ x.T).T)
            if st.bias is not None:
                z = z + st.bias
            a = z if st.activation is None else st.activation.function(z)
            self._cache.append((x, z, a))
            x = a
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Input gradient ``dJ/dx`` of shape (N, n_in) for ``dy = dJ/d(output)``."""
        if not self._cache:
            raise ValueError("MLP.backward() called before forward()")
        n = self._cache[0][0].shape[0]
        dy = np.asarray(dy)
        if dy.shape != (n, self.n_out):
            raise ValueError(f"MLP.backward: dy must have the shape of the matching forward's output, "
                             f"{(n, self.n_out)}; got {dy.shape}")
        for st, (_, z, a) in zip(reversed(self.stages), reversed(self._cache)):
            if st.activation is not None:
                dy = dy * st.activation.derivative(z, a)
            dy = np.asarray((st.matrix.T @ dy.T).T)
        return dy

    def __repr__(self) -> str:
        inner = "\n".join(f"  {s!r}" for s in self.stages)
        return f"MLP(input {self.n_in}, {len(self.stages)} stages:\n{inner}\n)"


def _compose(first: Stage, second: Stage) -> Stage:
    """``second(first(x))`` for a first stage without activation, as one matrix."""
    matrix = second.matrix @ first.matrix
    if sp.issparse(matrix):
        matrix = sp.csr_array(matrix)
    bias = second.bias
    if first.bias is not None:
        carried = np.asarray(second.matrix @ first.bias)
        bias = carried if bias is None else bias + carried
    return Stage(matrix, bias, second.activation, f"{first.source}+{second.source}")


def _flatten(net: Module) -> list[Module]:
    """The layers of ``net`` in order, nested Sequentials expanded."""
    if not isinstance(net, Sequential):
        return [net]
    return [layer for child in net for layer in _flatten(child)]


def _network_dtype(layers: list[Module]) -> np.dtype:
    for layer in layers:
        dtype = getattr(layer, "dtype", None)
        if dtype is not None:
            return np.dtype(dtype)
        for p in layer.params.values():
            return p.dtype
    return np.dtype(np.float64)


def to_mlp(net: Module, input_shape: tuple[int, ...], *, compose: bool = False) -> MLP:
    """Export a network of linear layers and element-wise activations as an :class:`MLP`.

    Parameters
    ----------
    net : Sequential or a single layer
    input_shape : tuple of int
        One sample's input shape, e.g. ``(1, 32, 32)``.
    compose : bool, default False
        Multiply adjacent linear stages with no activation between them into one matrix.

    Returns
    -------
    MLP

    Raises
    ------
    ValueError
        For a layer with no fixed matrix (max pooling, dropout in training mode) or an
        unsupported layer type.

    Notes
    -----
    An activation with no linear stage before it (the first layer, or two activations in a
    row) gets an identity stage in the network's dtype (that of its first parameter or
    operator layer; float64 when it has none).
    """
    layers = _flatten(net)
    dtype = _network_dtype(layers)
    shape = tuple(input_shape)
    stages: list[Stage] = []
    for i, layer in enumerate(layers):
        name = f"{i}:{type(layer).__name__}"
        if isinstance(layer, _MaxPoolNd):
            raise ValueError(f"layer {name} is max pooling, which has no fixed matrix (its selection matrix depends "
                             "on the input); replace it with AvgPool/SumPool2d/Subsampling2d to export, or use "
                             "MaxPoolOperator.selection_matrix(x) for one given batch")
        if isinstance(layer, Dropout) and not layer.is_identity:
            raise ValueError(f"layer {name} is dropout in training mode, which is random and has no fixed matrix; "
                             "call net.eval() first (dropout is then the identity)")
        if isinstance(layer, Activation):
            if not stages or stages[-1].activation is not None:
                n = int(np.prod(shape))
                stages.append(Stage(sp.eye_array(n, dtype=dtype, format="csr"), None, None, f"{i}:identity"))
            stages[-1].activation = layer
        elif isinstance(layer, (Flatten, Identity, Dropout)):
            pass
        elif hasattr(layer, "export"):
            matrix, bias = layer.export(shape)
            stage = Stage(matrix, bias, None, name)
            if compose and stages and stages[-1].activation is None:
                stage = _compose(stages.pop(), stage)
            stages.append(stage)
        else:
            raise ValueError(f"layer {name} cannot be exported: to_mlp handles convolutions (also transposed), "
                             "Linear, AvgPool/SumPool2d, AdaptiveAvgPool, Subsampling2d, ChannelAffine, "
                             "activations, Flatten, Identity and Dropout in eval mode")
        shape = layer.output_shape(shape)
    return MLP(stages, input_shape)
