"""
Pooling and its up-sampling are sparse matrices too
===================================================

Seed 003's example: a 4x4 map pooled in 2x2 windows receives the sensitivities
``delta = [[2, 8], [4, 6]]``. Backward through pooling "up-samples" them:

- mean pooling is a fixed matrix ``P`` with ``1/4`` in each window, and ``P.T @ delta``
  spreads each value evenly over its window: ``[[0.5, 0.5, 2, 2], ..., [1, 1, 1.5, 1.5]]``;
- max pooling is a 0/1 *selection* matrix ``S`` built from the positions that won the
  forward pass, and ``S.T @ delta`` sends each value to its winner only.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc

delta = np.array([[2.0, 8.0], [4.0, 6.0]])

pool = sc.PoolOperator((1, 4, 4), 2)                      # average pooling, input (C, H, W)
up_mean = (pool.matrix.T @ delta.ravel()).reshape(4, 4)
print("P is", pool.matrix.shape, "with", pool.nnz, "entries of 1/4")
print("mean pooling: P.T @ delta =\n", up_mean)
print("= kron(delta, ones(2, 2)) / 4:", np.array_equal(up_mean, np.kron(delta, np.ones((2, 2))) / 4))

# %%
# Max pooling: a map whose window maxima sit at (0, 0), (1, 3), (2, 1) and (3, 2), as in the
# seed. ``forward`` records the winners; the selection matrix and the backward pass use them.
x = np.zeros((4, 4))
for r, c in [(0, 0), (1, 3), (2, 1), (3, 2)]:
    x[r, c] = 1.0
maxpool = sc.MaxPoolOperator((1, 4, 4), 2)
print("pooled:", maxpool.forward(x[None, None])[0, 0].tolist())
S = maxpool.selection_matrix()
up_max = (S.T @ delta.ravel()).reshape(4, 4)
print("max pooling: S.T @ delta =\n", up_max)
print("backward_input agrees:", np.array_equal(maxpool.backward_input(delta[None, None])[0, 0], up_max))

# %%
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2), layout="constrained")
sc.plot_matrix(pool, ax=axes[0], title="P (4x16): mean pooling")
sc.plot_matrix(S, ax=axes[1], title="S (4x16): max pooling")
for ax, (array, title) in zip(axes[2:], [(up_mean, "P.T @ delta"), (up_max, "S.T @ delta")]):
    ax.imshow(array, cmap="Purples", vmin=0, vmax=1.6 * array.max())   # light enough to read the numbers
    for (r, c), v in np.ndenumerate(array):
        ax.text(c, r, f"{v:g}", ha="center", va="center")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
