"""
Pruning a network and its speed-up
==================================

Magnitude pruning removes a network's smallest convolution weights. In sparseconv a pruned
weight is not a stored zero: :func:`sparseconv.prune.prune` rebuilds each convolution with a
``weight_mask``, so its sparse matrix keeps only the entries of the kept taps, and every
product (forward, input gradient, kernel gradient) does proportionally less work. Here
LeNet-5, trained briefly on the bundled digits, is pruned to several sparsities and
fine-tuned with the masks fixed; we count stored entries, measure test accuracy, and time
inference against the unpruned network. ``python -m sparseconv prune`` runs the same
experiment at full length (and against PyTorch) from the command line.
"""

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc
from sparseconv.bench import measure_interleaved, thread_limits
from sparseconv.data import load_digits
from sparseconv.prune import mask_summary, prune
from sparseconv.train import evaluate, train

# Everything runs on one thread (sparseconv's pool and BLAS), as the ``prune`` command times
# by default: on a shared machine, idle BLAS workers spinning for a core cost more than a
# second thread gains on layers this small.
data = load_digits(seed=0)  # scikit-learn's digits as 32x32 LeNet-5 input, float32
net = sc.models.lenet5(seed=0, classes=data.classes)
with thread_limits(1, use_torch=False):
    train(net, data, epochs=5, batch_size=32, lr=0.05, progress=False, log=None)  # a few seconds
dense_accuracy = evaluate(net, data.x_test, data.y_test)
print(data)
print(f"unpruned LeNet-5: test accuracy {dense_accuracy:.4f}")

# %%
# Prune 90% of every convolution's weights (``scope="layer"``; ``"global"`` would use one
# magnitude threshold over all of them). The network is copied, never changed in place.
# Before timing anything, check what the pruned network computes: the unpruned architecture
# holding the same weights, pruned ones as zeros, must give the same outputs.
pruned, masks = prune(net, 0.9, scope="layer")
with_zeros = sc.models.lenet5(seed=0, classes=data.classes)
with_zeros.load_state_dict(pruned.state_dict())  # every tap stored, the pruned ones as 0
x = data.x_test
sc.testing.assert_allclose(pruned.forward(x), with_zeros.forward(x))

unpruned, summary = mask_summary(net), mask_summary(pruned)
for name, layer in summary["layers"].items():
    print(f"{name:9s} weights kept {layer['kept']:5,} of {layer['weights']:6,}   stored entries "
          f"{layer['entries']:7,} (unpruned {unpruned['layers'][name]['entries']:7,})")

# %%
# The sweep: prune the trained network to each sparsity, fine-tune one epoch with the masks
# fixed (the kernel gradient is zero at pruned taps, so they stay out), and time one
# inference over the test set, the pruned and the unpruned network in turn
# (:func:`sparseconv.bench.measure_interleaved`; medians of interleaved repeats).
sparsities = [0.5, 0.75, 0.9, 0.95]
rows = []
for sparsity in sparsities:
    pruned, _ = prune(net, sparsity, scope="layer")
    before = evaluate(pruned, x, data.y_test)
    with thread_limits(1, use_torch=False):
        train(pruned, data, epochs=1, batch_size=32, lr=0.02, progress=False, log=None)
        times = measure_interleaved({"pruned": lambda: pruned.forward(x), "unpruned": lambda: net.forward(x)},
                                    repeats=5, max_seconds=1.0)
    after = evaluate(pruned, x, data.y_test)
    speedup = times["unpruned"]["median_s"] / times["pruned"]["median_s"]
    entries = mask_summary(pruned)["entries"]
    rows.append((sparsity, before, after, entries, speedup))
    print(f"sparsity {sparsity:.2f}: accuracy {before:.4f} pruned, {after:.4f} fine-tuned; stored entries "
          f"{entries:,} of {unpruned['entries']:,}; inference {times['pruned']['median_s'] * 1e3:.1f} ms vs "
          f"{times['unpruned']['median_s'] * 1e3:.1f} ms unpruned ({speedup:.2f}x)")

# %%
# Accuracy survives heavy pruning once the network is fine-tuned. The speed-up grows with the
# cut in stored entries but stays below their ratio: the dense ``Linear`` layers, the pooling
# and the activations are not pruned, and a sparse product has a fixed cost per output as well.
# At 50% the engine policy still runs C3 and C5 with the factored engine, a GEMM that
# multiplies masked taps as zeros, so little time is saved; from 75% C3 runs on its sparse
# matrix (C5 from 90%) and the time drops. (Times taken on a busy machine are noisy: read the trend, not the
# second digit.)
s, before, after, entries, speedup = (np.array(column) for column in zip(*rows))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
ax1.plot(100 * s, before, "o--", label="pruned")
ax1.plot(100 * s, after, "o-", label="pruned, fine-tuned 1 epoch")
ax1.axhline(dense_accuracy, color="gray", linestyle=":", label="unpruned")
ax1.set(xlabel="convolution weights pruned (%)", ylabel="test accuracy", title="accuracy")
ax1.legend()
ax2.plot(100 * s, unpruned["entries"] / entries, "s--", label="stored entries, unpruned / pruned")
ax2.plot(100 * s, speedup, "o-", label="measured inference speed-up")
ax2.axhline(1, color="black", linewidth=0.8)
ax2.set(xlabel="convolution weights pruned (%)", ylabel="ratio", yscale="log",
        title="LeNet-5 inference, 359 test images, 1 thread")
ax2.legend()
plt.show()
