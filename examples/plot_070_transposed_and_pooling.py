"""
Transposed convolution and pooling: transposes of matrices
==========================================================

A transposed convolution ("deconvolution", the up-sampling layer of decoders) is literally
the transpose of a convolution's matrix: ``ConvTransposeOperator(w, ...)`` holds
``conv.matrix.T`` for the convolution with the same weight, stride and padding. Its forward
pass is therefore the convolution's input gradient -- the rot180 rule of the reference --
and a stride-2 layer maps a 3x3 input to 7x7.

Likewise the up-sampling of average pooling is ``P.T``: a Kronecker product with a block of
ones, divided by the window size.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc

rng = np.random.default_rng(0)
weight = rng.standard_normal((2, 1, 3, 3))          # (C_in, C_out // groups, KH, KW), PyTorch's layout
up = sc.ConvTransposeOperator(weight, input_shape=(2, 3, 3), stride=2)
print(up)
print("output shape per sample:", up.out_shape)
print("matrix == conv.matrix.T:", (up.matrix != up.conv.matrix.T).nnz == 0)

# %%
# Forward of the transposed layer == input gradient of the convolution, computed by the
# reference's direct rule (full correlation with the rotated kernel, strides re-inserted).
x = rng.standard_normal((5, 2, 3, 3))
y = up.forward(x)
x_conv = np.zeros((5, 1, 7, 7))                   # the convolution's input: the transposed layer's output
dx_ref, _, _ = sc.reference.conv_direct_backward(x_conv, weight, x, stride=2)
print("forward vs reference input gradient, max |diff|:", np.abs(y - dx_ref).max())

# %%
# Pooling: ``pool_matrix`` returns the average-pooling matrix itself; its transpose is the
# up-sampling.
P = sc.pool_matrix((1, 4, 4), 2)
delta = np.array([[2.0, 8.0], [4.0, 6.0]])
print("P.T @ delta == kron(delta, ones) / 4:",
      np.array_equal((P.T @ delta.ravel()).reshape(4, 4), np.kron(delta, np.ones((2, 2))) / 4))

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
sc.plot_matrix(up.conv, ax=axes[0], title="convolution W (18x49)")
sc.plot_matrix(up.matrix, ax=axes[1], title="transposed convolution = W.T (49x18)")
sc.plot_matrix(P.T, ax=axes[2], title="average-pooling up-sampling P.T (16x4)")
plt.show()
