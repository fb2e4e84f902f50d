"""
Benchmarking your own layer
===========================

Is the sparse lowering fast for *your* layer? Build its operator and time the three products
a training step needs, next to the same products computed the im2col way (unrolled patches
and one GEMM, :mod:`sparseconv.reference`). The recipe is the usual one: check the results
first, warm up outside the timed region, repeat, and report the best (least disturbed) time.
For the project's full suites -- against dense, FFT, direct and PyTorch, with JSON reports --
run ``sparseconv bench --suite smoke`` (seconds) or ``--suite cifar``.
"""

import timeit

import matplotlib.pyplot as plt
import numpy as np

import sparseconv as sc
from sparseconv import reference as ref

# The layer: edit these. float32, as in training.
batch, channels, filters, size, kernel = 16, 16, 16, 32, 3
options = dict(stride=1, padding=1)

rng = np.random.default_rng(0)
weight = rng.standard_normal((filters, channels, kernel, kernel)).astype(np.float32)
x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
op = sc.ConvOperator(weight, input_shape=x.shape[1:], **options)
dy = rng.standard_normal((batch, *op.out_shape)).astype(np.float32)
print(op)

# %%
# Both ways must give the same numbers before their times mean anything.
dx_ref, dw_ref, _ = ref.conv_im2col_backward(x, weight, dy, **options)
sc.testing.assert_allclose(op.forward(x), ref.conv_im2col(x, weight, **options))
sc.testing.assert_allclose(op.backward_input(dy), dx_ref)
sc.testing.assert_allclose(op.weight_grad(x, dy), dw_ref)

products = {
    "forward": (lambda: op.forward(x), lambda: ref.conv_im2col(x, weight, **options)),
    "input gradient": (lambda: op.backward_input(dy), lambda: ref.conv_im2col_backward(x, weight, dy, **options)),
    "kernel gradient": (lambda: op.weight_grad(x, dy), lambda: ref.conv_im2col_backward(x, weight, dy, **options)),
}


def best_ms(fn, repeats=5):
    """Best of ``repeats`` timings in milliseconds, after one warm-up call."""
    fn()
    number = max(1, int(0.05 / max(timeit.timeit(fn, number=1), 1e-6)))   # about 50 ms per repeat
    return 1e3 * min(timeit.repeat(fn, number=number, repeat=repeats)) / number


# %%
# The im2col backward computes both gradients in one call, so its time is shown for each of
# the two; compare the sum of the sparse gradient times with it. The reference im2col is
# written to be obviously right rather than fast (its col2im is a loop over kernel taps): for
# a tuned comparison use ``sparseconv bench``, which also times PyTorch when it is installed.
times = {name: (best_ms(sparse), best_ms(im2col)) for name, (sparse, im2col) in products.items()}
for name, (t_sparse, t_im2col) in times.items():
    print(f"{name:<16} sparse {t_sparse:8.3f} ms   im2col {t_im2col:8.3f} ms   ratio {t_sparse / t_im2col:.2f}")

fig, ax = plt.subplots(figsize=(8, 3.5), layout="constrained")
idx = np.arange(len(times))
ax.bar(idx - 0.2, [t[0] for t in times.values()], 0.4, label="sparse operator")
ax.bar(idx + 0.2, [t[1] for t in times.values()], 0.4, label="im2col reference")
ax.set_xticks(idx, list(times))
ax.set_ylabel("ms (best of 5)")
ax.set_title(f"{channels}->{filters} channels, {kernel}x{kernel}, {size}x{size}, batch {batch}, float32, "
             "this machine", fontsize=10)
ax.legend()
plt.show()
