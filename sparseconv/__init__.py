"""sparseconv: convolution layers as exact, tied-parameter scipy.sparse matrices.

A convolution layer is an MLP layer whose weight matrix is sparse and weight-shared. This
package builds that matrix for 1-D, 2-D and 3-D convolutions with every common option, and
uses it for forward products, adjoints and gradients, checked against independent references
(:mod:`sparseconv.reference`) with the checkers in :mod:`sparseconv.testing`.
"""

from . import models, nn, reference, testing
from .conv import ConvOperator, SparseLinearOperator, conv_matrix
from .export import MLP, Stage, to_mlp
from .geometry import ConvGeometry, conv_geometry, output_size
from .pattern import MemoryBudgetError
from .plotting import plot_history, plot_matrix
from .pooling import MaxPoolOperator, PoolOperator, pool_matrix

__all__ = [
    "ConvGeometry",
    "ConvOperator",
    "MLP",
    "MaxPoolOperator",
    "MemoryBudgetError",
    "PoolOperator",
    "SparseLinearOperator",
    "Stage",
    "conv_geometry",
    "conv_matrix",
    "models",
    "nn",
    "output_size",
    "plot_history",
    "plot_matrix",
    "pool_matrix",
    "reference",
    "testing",
    "to_mlp",
]
__version__ = "0.1.0"
