"""
Spectral norms and the Lipschitz bound of a CNN
===============================================

A layer's spectral norm ``||W||_2`` (its largest singular value) is how much it can stretch
an input difference; with 1-Lipschitz activations (tanh, ReLU) the product of the layers'
norms bounds the whole network's Lipschitz constant. Because ``W`` is an explicit sparse
matrix, scipy computes each norm for any stride, padding or groups; for a circular,
stride-1 layer the FFT formula of Sedghi et al. (2019) gives all singular values in closed
form, a cross-check.

The bound is usually loose: below, no pair of inputs comes near it, and the norm of the
composed linear maps (the network with its activations removed) is far smaller.
"""

import matplotlib.pyplot as plt
import numpy as np
import scipy.sparse as sp

import sparseconv as sc
from sparseconv import nn

net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, rng=0), nn.Tanh(),
                    nn.Conv2d(8, 8, 3, stride=2, padding=1, rng=1), nn.Tanh(),
                    nn.Flatten(), nn.Linear(8 * 8 * 8, 10, rng=2))
input_shape = (1, 16, 16)
linear = [stage.matrix for stage in sc.to_mlp(net, input_shape).stages]
norms = [sc.spectral_norm(m) for m in linear]
for stage, norm in zip(sc.to_mlp(net, input_shape).stages, norms):
    print(f"{stage.source:<10} {stage.shape[0]:>5}x{stage.shape[1]:<5} ||W||_2 = {norm:.6f}")

bound = sc.network_lipschitz_bound(linear)
composed = sc.composed_norm(linear)
print(f"product bound {bound:.4f}, composed linear maps {composed:.4f}")

# %%
# Cross-check with the FFT formula: the first layer's kernel with circular padding.
w1 = net[0].weight.data
circular = sc.ConvOperator(w1, input_shape, padding="same", padding_mode="circular")
print(f"circular layer: sparse {sc.spectral_norm(circular):.10f}, "
      f"FFT {sc.fft_singular_values(w1, input_shape)[0]:.10f}")

# %%
# How close does the network come to the bound? Its exact local stretch at an input ``x`` is
# the norm of its Jacobian ``J(x) = W3 D2 W2 D1 W1``, where ``D = diag(tanh'(z))`` holds the
# activations' slopes at ``x``: the same sparse matrices, with diagonal matrices between them.
# The Lipschitz constant is the largest ``||J(x)||`` over all inputs.
stages = sc.to_mlp(net, input_shape).stages
rng = np.random.default_rng(3)
local = []
for scale in np.repeat([0.0, 0.1, 0.3, 1.0], 25):
    a = scale * rng.standard_normal(int(np.prod(input_shape)))
    factors = []
    for stage in stages:
        z = stage.matrix @ a + stage.bias
        factors.append(stage.matrix)
        if stage.activation is not None:                # tanh, the only activation here
            a = np.tanh(z)
            factors.append(sp.diags_array(1 - a ** 2))
    local.append(sc.composed_norm(factors))
local = np.array(local)
print(f"largest local stretch ||J(x)|| found {local.max():.4f} <= bound {bound:.4f}")

fig, ax = plt.subplots(figsize=(8, 3.5), layout="constrained")
ax.hist(local, bins=np.linspace(0, 1.05 * bound, 80), color="0.6", label="||J(x)|| at random inputs x")
ax.axvline(composed, color="C0", label=f"norm of composed linear maps ({composed:.2f})")
ax.axvline(bound, color="C3", label=f"product of layer norms ({bound:.2f})")
ax.set_xlabel("local stretch factor")
ax.set_ylabel("inputs")
ax.legend(fontsize=8)
plt.show()
