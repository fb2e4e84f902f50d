"""
Forward: ``W @ x`` on the worked example
========================================

Seed 001's forward example: a 5x5 input correlated with a 3x3 kernel (stride 1, no padding,
the "convolution" of deep-learning libraries) gives the 3x3 output
``[[12, 12, 17], [10, 17, 19], [9, 6, 14]]``. Lowered to a sparse matrix, the same numbers
come out of one sparse matrix-vector product: ``W`` is 9x25, each row one placement of the
kernel.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc

x = np.array([[3, 3, 2, 1, 0],
              [0, 0, 1, 3, 1],
              [3, 1, 2, 2, 3],
              [2, 0, 0, 2, 2],
              [2, 0, 0, 0, 1]], dtype=float)
k = np.array([[0, 1, 2],
              [2, 2, 0],
              [0, 1, 2]], dtype=float)
expected = np.array([[12, 12, 17], [10, 17, 19], [9, 6, 14]], dtype=float)

op = sc.ConvOperator(k[None, None], input_shape=(1, 5, 5))
y = (op.matrix @ x.ravel()).reshape(3, 3)          # one sample: flatten, multiply, reshape
print(op)
print("W @ x =\n", y)
print("matches the worked example:", np.array_equal(y, expected))

# %%
# ``op.forward`` does the same on a batch ``(N, C, H, W)``, and the direct loop of
# :mod:`sparseconv.reference` agrees.
y_batch = op.forward(x[None, None])
print("forward == direct:", np.array_equal(y_batch, sc.reference.conv_direct(x[None, None], k[None, None])))

# %%
# Row 0 of ``W`` is the first kernel placement: the top-left 3x3 window of the input.
row = op.matrix[[0]].toarray().reshape(5, 5)
fig, axes = plt.subplots(1, 4, figsize=(11, 3), layout="constrained")
for ax, (array, title) in zip(axes, [(x, "input x (5x5)"), (k, "kernel (3x3)"),
                                     (row, "row 0 of W, as an image"), (y, "W @ x (3x3)")]):
    ax.imshow(array, cmap="Blues", vmin=0, vmax=1.6 * array.max())   # light enough to read the numbers
    for (r, c), v in np.ndenumerate(array):
        ax.text(c, r, f"{v:g}", ha="center", va="center")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
