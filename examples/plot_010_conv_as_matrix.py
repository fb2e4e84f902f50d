"""
A convolution is a 4x9 sparse matrix
====================================

The smallest example of the source material (seed 004): a 3x3 image and a 2x2 kernel, stride
1, no padding. The 2x2 output is ``W @ x`` for a 4x9 matrix ``W`` in which each row holds the
four kernel weights at the columns of the pixels its window covers. The same four weights are
repeated in every row: the 16 stored entries are *tied* to 4 parameters, where a fully
connected 9 -> 4 layer would have 36.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc

kernel = np.array([[1.0, 2.0],
                   [3.0, 4.0]])
op = sc.ConvOperator(kernel[None, None], input_shape=(1, 3, 3))    # weight (F, C, KH, KW)
print(op)

# %%
# Every stored entry knows which weight it holds: ``param_index[e]`` indexes
# ``kernel.ravel()``. Printed as the matrix of weight names (``.`` is a structural zero):
W = op.matrix
labels = np.full(W.shape, " .", dtype=object)
rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))
labels[rows, W.indices] = [f"w{p}" for p in op.param_index]
print("\n".join("  ".join(row) for row in labels))
print(f"nnz = {W.nnz}, distinct parameters = {len(np.unique(op.param_index))}, "
      f"fully connected: {W.shape[0] * W.shape[1]}")

# %%
# ``W @ x`` is the convolution: compare with the direct loop of :mod:`sparseconv.reference`.
x = np.arange(9.0).reshape(3, 3)
y_sparse = (W @ x.ravel()).reshape(2, 2)
y_direct = sc.reference.conv_direct(x[None, None], kernel[None, None])[0, 0]
print("W @ x  =", y_sparse.tolist())
print("direct =", y_direct.tolist())

# %%
# The picture: entries coloured by the weight they are tied to; each colour is one diagonal
# band, the Toeplitz structure of a convolution.
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
sc.plot_matrix(op, ax=ax0, title="W (4x9), colour = tied weight")
ax1.imshow(W.toarray(), cmap="Greys", vmin=0, vmax=6)
for (r, c), text in np.ndenumerate(labels):
    ax1.text(c, r, text.strip(), ha="center", va="center", fontsize=11)
ax1.set_title("the same matrix, by weight name")
ax1.set_xticks(range(9))
ax1.set_yticks(range(4))
plt.show()
