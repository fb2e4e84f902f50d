"""
Backward: ``W.T @ delta`` is the full convolution with ``rot180(w)``
====================================================================

Seed 000's backward example: a 3x3 input, the 2x2 kernel ``w = [[0.2, 0.3], [0.5, 0.6]]``
and the output sensitivities ``delta = [[1, 1], [2, 3]]``. The textbook rule pads ``delta``
to "full" size and correlates it with the kernel rotated by 180 degrees, giving
``[[0.2, 0.5, 0.3], [0.9, 2.3, 1.5], [1.0, 2.7, 1.8]]``. In the matrix view there is no rule
to remember: the input gradient is ``W.T @ delta``, each sensitivity sent back along the
entries it came through, and the rotation is simply what the transpose does.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc

w = np.array([[0.2, 0.3], [0.5, 0.6]])
delta = np.array([[1.0, 1.0], [2.0, 3.0]])
expected = np.array([[0.2, 0.5, 0.3], [0.9, 2.3, 1.5], [1.0, 2.7, 1.8]])

op = sc.ConvOperator(w[None, None], input_shape=(1, 3, 3))
dx_matrix = (op.matrix.T @ delta.ravel()).reshape(3, 3)
dx_rule = sc.reference.conv_direct(delta[None, None], w[::-1, ::-1][None, None].copy(), padding="full")[0, 0]
print("W.T @ delta =\n", dx_matrix)
print("full correlation with rot180(w) =\n", dx_rule)
print("max |difference| vs the worked example:", np.abs(dx_matrix - expected).max())

# %%
# The centre value ``2.3`` is column 4 of ``W`` (the centre pixel) dotted with ``delta``:
# the centre pixel meets each output through a different weight.
column = op.matrix[:, [4]].toarray().ravel()
print("column 4 of W:", column, " ->  2.3 =", " + ".join(f"{d:g}*{c:g}" for d, c in zip(delta.ravel(), column)))

# %%
# ``op.backward_input`` is the batched form, used by the layers.
print("backward_input agrees:", np.allclose(op.backward_input(delta[None, None])[0, 0], expected))

# %%
padded = np.pad(delta, 1)
fig, axes = plt.subplots(1, 4, figsize=(11, 3), layout="constrained")
for ax, (array, title) in zip(axes, [(delta, "delta (2x2)"), (padded, "delta, full padding"),
                                     (w[::-1, ::-1], "rot180(w)"), (dx_matrix, "W.T @ delta (3x3)")]):
    ax.imshow(array, cmap="Oranges", vmin=0, vmax=1.6 * array.max())   # light enough to read the numbers
    for (r, c), v in np.ndenumerate(array):
        ax.text(c, r, f"{v:g}", ha="center", va="center")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
