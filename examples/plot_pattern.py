"""Draw the sparsity pattern of a small convolution, coloured by tied parameter, as in the README.

Run ``python examples/plot_pattern.py [output.png]`` (needs matplotlib).
"""

import sys

import numpy as np

import sparseconv as sc

out = sys.argv[1] if len(sys.argv) > 1 else "docs/conv_pattern.png"
weight = np.random.default_rng(0).standard_normal((2, 2, 3, 3))      # 2 filters, 2 channels, 3x3
op = sc.ConvOperator(weight, input_shape=(2, 6, 6), padding=1)
sc.plot_matrix(op, out, title="2 -> 2 channels, 3x3 kernel, 6x6 input, padding 1:\n72x72 matrix, 1024 entries, 36 tied weights")
print(f"{op}\nwrote {out}")
