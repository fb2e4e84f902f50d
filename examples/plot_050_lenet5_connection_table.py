"""
LeNet-5's connection table as a sparse matrix
=============================================

In LeNet-5 (LeCun et al. 1998) layer C3 does not connect each of its 16 maps to all 6 maps of
S2: a table says which pairs are connected, to break symmetry and save parameters. As a sparse
matrix the table is simply a block pattern: block ``(f, c)`` of C3's 1600x1176 matrix is a
Toeplitz band when map ``f`` reads map ``c``, and empty otherwise. Counting the stored entries
reproduces the paper's connection counts.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc
from sparseconv.models import C3_TABLE, LENET5_TABLE

print("C3 connection table (rows: S2 maps, columns: C3 maps)")
for c, row in enumerate(C3_TABLE):
    print(f"S2 {c}:  " + " ".join("X" if v else "." for v in row))

# %%
# Build LeNet-5 and walk its layers, each exported as its matrix. A layer's connections are
# its stored entries plus one bias link per biased output, which is how the paper counts them.
net = sc.models.lenet5(dtype=np.float64)
names = {0: "C1", 2: "S2", 4: "C3", 6: "S4", 8: "C5", 11: "F6"}
shape = (1, 32, 32)
print(f"{'layer':<6}{'matrix':>12}{'nnz':>9}{'params':>8}{'connections':>13}{'paper':>18}")
for i, layer in enumerate(net):
    if i in names:
        stage = sc.to_mlp(layer, shape).stages[0]
        if names[i] == "C3":
            c3_matrix = stage.matrix
        params, connections = layer.n_params(), layer.connections(shape)
        paper = LENET5_TABLE[names[i]]
        print(f"{names[i]:<6}{stage.shape[0]:>6}x{stage.shape[1]:<5}{stage.nnz:>9,}{params:>8,}{connections:>13,}"
              f"{str(paper):>18}  {'ok' if (params, connections) == paper else 'DIFFERENT'}")
    shape = layer.output_shape(shape)

# %%
# Left, the table; right, C3's matrix as a density view: 16 row blocks (C3 maps) by 6 column
# blocks (S2 maps), each a band where the table has an X. The whole 1600x1176 matrix is drawn;
# ``rows=`` and ``cols=`` would zoom on a block.
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 5), layout="constrained",
                               gridspec_kw={"width_ratios": [0.45, 1]})
ax0.imshow(C3_TABLE.T, cmap="Greys")                   # black: connected
ax0.set_xlabel("S2 map (input)")
ax0.set_ylabel("C3 map (output)")
ax0.set_title("connection table (transposed)")
sc.plot_matrix(c3_matrix, ax=ax1, bins=120, title="C3's matrix, 1600x1176")
plt.show()
