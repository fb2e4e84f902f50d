"""
A pruned CNN in the column layout
=================================

A network of sparse layers is fastest when the batch is innermost: each activation is a
column block ``X`` of shape ``(C*H*W, N)``, the layout of ``W @ X`` in the MLP view, so every
stored entry of a layer's matrix multiplies an ``N``-wide row. ``Sequential`` runs that way
by default (``layout="columns"``): the NCHW batch becomes one column block at the input, every
layer works on column blocks, and a convolution followed by a ``ReLU`` is one product whose
rows are stored with the bias added and the maximum taken. ``layout="batch_first"`` runs
every layer's own NCHW ``forward`` instead; both give the same numbers.

Here a small CNN is pruned to 90% zeros; we check that both layouts compute the same outputs
and gradients, see which engine runs each product, and time both layouts.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc
from sparseconv.bench import measure_interleaved, thread_limits
from sparseconv.nn import Conv2d, ReLU, Sequential
from sparseconv.prune import prune

rng = np.random.default_rng(0)
net = Sequential(Conv2d(16, 32, 3, padding=1, dtype=np.float32, rng=rng), ReLU(),
                 Conv2d(32, 32, 3, padding=1, dtype=np.float32, rng=rng), ReLU(),
                 Conv2d(32, 16, 3, padding=1, dtype=np.float32, rng=rng))
pruned, masks = prune(net, 0.9, scope="layer")
print(pruned.layout)
x = rng.standard_normal((32, 16, 24, 24)).astype(np.float32)

# %%
# The same network, batch-first: the same outputs, input gradients and kernel gradients.
first = Sequential(*pruned.layers, layout="batch_first")
dy = rng.standard_normal((32, 16, 24, 24)).astype(np.float32)
results = {}
for name, model in (("columns", pruned), ("batch_first", first)):
    model.zero_grad()
    y = np.array(model.forward(x))
    dx = model.backward(dy)
    results[name] = (y, dx, [p.grad.copy() for p in model.parameters()])
(y_c, dx_c, g_c), (y_b, dx_b, g_b) = results["columns"], results["batch_first"]
sc.testing.assert_allclose(y_c, y_b)
sc.testing.assert_allclose(dx_c, dx_b)
for a, b in zip(g_c, g_b):
    sc.testing.assert_allclose(a, b)
print("same outputs and gradients in both layouts")

# %%
# Which engine runs each product: with the ``fast`` extra (numba), the compiled engine takes
# every product of a layer that keeps at most half its weights; without it, scipy's CSR kernel
# or the factored GEMM products (``sparseconv/engines/policy.py``).
for i, layer in enumerate(pruned.layers):
    if isinstance(layer, Conv2d):
        op = layer.op
        kept = layer.weight.mask.mean()
        print(f"layer {i}: {kept:.0%} of the weights kept; forward {op.engine('forward')}, "
              f"adjoint {op.engine('adjoint')}, kernel gradient {op.engine('weight_grad')}")

# %%
# Inference in both layouts, repeats taken in turn (medians; times depend on the machine).
with thread_limits(2, use_torch=False):
    timings = measure_interleaved({"columns": lambda: pruned.forward(x),
                                   "batch_first": lambda: first.forward(x)}, repeats=7, max_seconds=3)
ms = {k: 1e3 * v["median_s"] for k, v in timings.items()}
for k, v in ms.items():
    print(f"{k:12s} {v:6.2f} ms")

fig, ax = plt.subplots(figsize=(5, 2.5))
ax.barh(list(ms), list(ms.values()), color=["tab:blue", "tab:gray"])
ax.set_xlabel("inference time, ms (median)")
ax.set_title("90%-pruned CNN, N = 32, two threads")
fig.tight_layout()
