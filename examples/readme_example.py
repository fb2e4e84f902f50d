"""
The README's example
====================

A strided, padded 2-D convolution as a sparse matrix, checked against the direct reference,
its gradients, and the operator (a scipy ``LinearOperator``) handed to scipy.
"""

import numpy as np
from scipy.sparse.linalg import svds

import sparseconv as sc

rng = np.random.default_rng(0)
weight = rng.standard_normal((4, 3, 3, 3))                  # (F, C, KH, KW)
op = sc.ConvOperator(weight, input_shape=(3, 8, 8), stride=2, padding=1)
print(op)

x = rng.standard_normal((5, 3, 8, 8))                       # (N, C, H, W)
y = op.forward(x)                                           # (N, F, Ho, Wo) = W @ x per sample
dy = rng.standard_normal(y.shape)
dx_ref, dw_ref, db_ref = sc.reference.conv_direct_backward(x, weight, dy, stride=2, padding=1)
print("forward  vs direct:", np.abs(y - sc.reference.conv_direct(x, weight, stride=2, padding=1)).max())
print("W.T @ dy vs rot180 rule:", np.abs(op.backward_input(dy) - dx_ref).max())
print("kernel gradient vs direct:", np.abs(op.weight_grad(x, dy) - dw_ref).max())
print("entries tied to weight[0, 0, 1, 1]:", np.count_nonzero(op.param_index == np.ravel_multi_index((0, 0, 1, 1), weight.shape)))
print("spectral norm:", svds(op, k=1, return_singular_vectors=False, random_state=0)[0])
