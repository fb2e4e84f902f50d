"""sparseconv: convolution layers as exact, tied-parameter scipy.sparse matrices.

A convolution layer is an MLP layer whose weight matrix is sparse and weight-shared. This
package builds that matrix for 1-D, 2-D and 3-D convolutions with every common option, and
uses it for forward products, adjoints and gradients, checked against independent references.
"""

from .conv import ConvOperator, SparseLinearOperator, conv_matrix
from .geometry import ConvGeometry, conv_geometry, output_size
from .pattern import MemoryBudgetError

__all__ = [
    "ConvGeometry",
    "ConvOperator",
    "MemoryBudgetError",
    "SparseLinearOperator",
    "conv_geometry",
    "conv_matrix",
    "output_size",
]
__version__ = "0.1.0"
