"""sparseconv: convolution layers as exact, tied-parameter scipy.sparse matrices.

A convolution layer is an MLP layer whose weight matrix is sparse and weight-shared. This
package builds that matrix for 1-D, 2-D and 3-D convolutions with every common option, and
uses it for forward products, adjoints and gradients, checked against independent references
(:mod:`sparseconv.reference`) with the checkers in :mod:`sparseconv.testing`.
"""

from . import engines, models, nn, reference, testing
from .conv import ConvOperator, conv_matrix
from .engines.base import MatrixModifiedError
from .export import MLP, Stage, to_mlp
from .geometry import ConvGeometry, conv_geometry, conv_transpose_output_size, output_size
from .pattern import MemoryBudgetError
from .plotting import plot_history, plot_matrix
from .pooling import MaxPoolOperator, PoolOperator, pool_matrix
from .spectral import composed_norm, fft_singular_values, network_lipschitz_bound, singular_values, spectral_norm
from .torch_bridge import from_torch
from .transpose import ConvTransposeOperator, conv_transpose_matrix

__all__ = [
    "ConvGeometry",
    "ConvOperator",
    "ConvTransposeOperator",
    "MLP",
    "MatrixModifiedError",
    "MaxPoolOperator",
    "MemoryBudgetError",
    "PoolOperator",
    "Stage",
    "conv_geometry",
    "composed_norm",
    "conv_matrix",
    "conv_transpose_matrix",
    "conv_transpose_output_size",
    "engines",
    "fft_singular_values",
    "from_torch",
    "models",
    "network_lipschitz_bound",
    "nn",
    "output_size",
    "plot_history",
    "plot_matrix",
    "pool_matrix",
    "reference",
    "singular_values",
    "spectral_norm",
    "testing",
    "to_mlp",
]
__version__ = "0.1.0"
