"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998) built from sparse-matrix layers.

Layer table (NOTES section 4): input 32x32; C1 6 maps 5x5 -> 28x28; S2 trainable 2x2
sub-sampling -> 14x14; C3 16 maps 5x5, partially connected to S2 by the table below ->
10x10; S4 -> 5x5; C5 120 maps 5x5 -> 1x1; F6 84 units; output 10 classes. Each layer is
followed by tanh, as in the paper (its scaled tanh is a plain tanh here; the output layer is
a linear layer for softmax cross-entropy instead of the paper's RBF units).
"""

from __future__ import annotations

from typing import Union

import numpy as np

from .nn import Conv2d, Flatten, Linear, OperatorLayer, Sequential, Subsampling2d, Tanh

__all__ = ["C3_TABLE", "LENET5_TABLE", "lenet5"]

# Rows: S2 maps 0..5; columns: C3 maps 0..15 (LeCun et al. 1998, Table I).
C3_TABLE = np.array([
    [1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1],
    [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1],
    [1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1],
    [0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1],
    [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1],
    [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1],
], dtype=bool)

# Layer name -> (trainable parameters, connections) from the paper; connections include the
# bias links, so in the sparse formulation they equal nnz(W) + biased outputs. S4 has 16 maps
# with one beta and one bias each: 32 parameters, as the paper says (NOTES.md's table has 12,
# S2's count, by mistake).
LENET5_TABLE = {
    "C1": (156, 122_304),
    "S2": (12, 5_880),
    "C3": (1_516, 151_600),
    "S4": (32, 2_000),
    "C5": (48_120, 48_120),
    "F6": (10_164, 10_164),
}

# Positions of the named layers inside the Sequential returned by lenet5().
LENET5_LAYERS = {"C1": 0, "S2": 2, "C3": 4, "S4": 6, "C5": 8, "F6": 11, "OUT": 13}


def lenet5(*, classes: int = 10, dtype: object = np.float32, seed: Union[None, int, np.random.Generator] = 0,
           build: bool = True, layout: str = "columns") -> Sequential:
    """LeNet-5 with C3's partial connection table, every convolution a sparse matrix.

    Parameters
    ----------
    classes : int, default 10
        Output units.
    dtype : {float32, float64}, default float32
        float32 is what :func:`sparseconv.train.train` and the command line train in.
    seed : int or numpy Generator, optional
        Seeds the initialisation; the same seed gives the same network.
    build : bool, default True
        Build every sparse matrix now for 32x32 inputs rather than at the first forward.
    layout : {"columns", "batch_first"}, default "columns"
        How the network carries batches between layers (see
        :class:`~sparseconv.nn.Sequential`); both give the same results to rounding.

    Returns
    -------
    Sequential
        ``x : ndarray of shape (N, 1, 32, 32)`` -> logits ``(N, classes)``. The named layers
        sit at the positions given by ``LENET5_LAYERS``.
    """
    rng = np.random.default_rng(seed)
    net = Sequential(
        Conv2d(1, 6, 5, dtype=dtype, rng=rng),
        Tanh(),
        Subsampling2d(6, 2, dtype=dtype),
        Tanh(),
        Conv2d(6, 16, 5, connection=C3_TABLE.T.copy(), dtype=dtype, rng=rng),
        Tanh(),
        Subsampling2d(16, 2, dtype=dtype),
        Tanh(),
        Conv2d(16, 120, 5, dtype=dtype, rng=rng),
        Tanh(),
        Flatten(),
        Linear(120, 84, dtype=dtype, rng=rng),
        Tanh(),
        Linear(84, classes, dtype=dtype, rng=rng),
        layout=layout,
    )
    if build:
        shape: tuple[int, ...] = (1, 32, 32)
        for layer in net:
            if isinstance(layer, OperatorLayer):
                layer.build(shape)
            shape = layer.output_shape(shape)
    return net
