"""
A CNN exported as an MLP of sparse matrices
===========================================

:func:`sparseconv.to_mlp` turns a network of convolutions, pooling, linear layers and
element-wise activations into a plain multilayer perceptron: a list of stages
``a = activation(matrix @ x + bias)`` on flattened samples. Every matrix is an ordinary
``scipy.sparse`` array, so it can be saved with :func:`scipy.sparse.save_npz` and run by any
code that can do a sparse matrix-vector product -- no sparseconv needed at inference time.
"""

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import scipy.sparse as sp

import sparseconv as sc

net = sc.models.lenet5(dtype=np.float64, seed=0)
mlp = sc.to_mlp(net, (1, 32, 32))
for stage in mlp.stages:
    print(stage)

# %%
# The MLP computes the network: same outputs, to rounding.
x = np.random.default_rng(1).standard_normal((8, 1, 32, 32))
print("max |net - mlp|:", np.abs(net.forward(x) - mlp.forward(x.reshape(8, -1))).max())

# %%
# Save the stages with scipy alone, load them back and run the MLP with nothing but numpy and
# scipy. LeNet-5 has a tanh after every stage but the last (the ``activation`` printed above).
with tempfile.TemporaryDirectory() as tmp:
    for i, stage in enumerate(mlp.stages):
        sp.save_npz(Path(tmp) / f"stage{i}.npz", sp.csr_matrix(stage.matrix))
        np.save(Path(tmp) / f"bias{i}.npy", stage.bias)
    a = x.reshape(8, -1).T                           # columns are samples
    for i in range(len(mlp.stages)):
        z = sp.load_npz(Path(tmp) / f"stage{i}.npz") @ a + np.load(Path(tmp) / f"bias{i}.npy")[:, None]
        a = np.tanh(z) if i < len(mlp.stages) - 1 else z
print("reloaded MLP vs network, max |diff|:", np.abs(a.T - net.forward(x)).max())

# %%
# What the sparse matrices save: stored entries against the entries of dense layers with the
# same shapes.
labels = [s.source.split(":")[1] + f"\n{s.shape[0]}x{s.shape[1]}" for s in mlp.stages]
fig, ax = plt.subplots(figsize=(9, 3.5), layout="constrained")
idx = np.arange(len(mlp.stages))
ax.bar(idx - 0.2, [s.shape[0] * s.shape[1] for s in mlp.stages], 0.4, label="dense entries")
ax.bar(idx + 0.2, [s.nnz for s in mlp.stages], 0.4, label="stored entries (nnz)")
ax.set_xticks(idx, labels, fontsize=8)
ax.set_yscale("log")
ax.legend()
ax.set_title("LeNet-5 as an MLP: stage sizes")
plt.show()
