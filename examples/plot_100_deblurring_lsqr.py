"""
Deblurring an image: an inverse problem with ``lsqr``
=====================================================

A blur is a convolution, so a blurred image is ``b = W x + noise`` with ``W`` the blur's
sparse matrix. Recovering ``x`` is a linear least-squares problem that scipy's iterative
solvers handle directly, because ``W`` is an explicit sparse matrix (or a
``LinearOperator`` with exact adjoint products).

Solved naively, the problem is ill-conditioned: a Gaussian blur almost annihilates high
frequencies, and dividing them back out amplifies the noise. Tikhonov regularisation,
``min ||W x - b||^2 + lambda^2 ||x||^2``, is ``lsqr``'s ``damp=lambda``.
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy.sparse.linalg import lsqr

import sparseconv as sc

# A 64x64 test image: a few flat shapes with sharp edges.
n = 64
yy, xx = np.mgrid[:n, :n]
image = np.zeros((n, n))
image[10:30, 8:28] = 1.0
image[(yy - 42) ** 2 + (xx - 40) ** 2 < 14 ** 2] = 0.6
image[40:56, 8:12] = 0.8
image[8:12, 36:58] = 0.4

# A normalised 9x9 Gaussian blur, sigma 2 pixels; "same" padding keeps the image size and
# "replicate" extends the border rather than darkening it.
t = np.arange(-4, 5)
g = np.exp(-t ** 2 / (2 * 2.0 ** 2))
kernel = np.outer(g, g) / np.outer(g, g).sum()
blur = sc.ConvOperator(kernel[None, None], input_shape=(1, n, n), padding="same", padding_mode="replicate")
W = blur.matrix
print(blur)

rng = np.random.default_rng(0)
b = W @ image.ravel() + 0.003 * rng.standard_normal(n * n)

# %%
# Least squares without and with regularisation. Unregularised, the iterations first
# sharpen, then fit the noise: the result gets worse the longer ``lsqr`` runs.
def error(x):
    return np.linalg.norm(x - image.ravel()) / np.linalg.norm(image)


naive = lsqr(W, b, atol=0, btol=0, iter_lim=500)[0]
tikhonov = lsqr(W, b, damp=0.02, atol=0, btol=0, iter_lim=500)[0]
print(f"relative error: blurred {error(b):.3f}, least squares {error(naive):.3f}, "
      f"Tikhonov (damp=0.02) {error(tikhonov):.3f}")

# %%
# The regularisation weight trades noise for blur; a sweep shows the usual minimum.
damps = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
errors = [error(lsqr(W, b, damp=d, atol=0, btol=0, iter_lim=500)[0]) for d in damps]
for d, e in zip(damps, errors):
    print(f"damp {d:<6} relative error {e:.3f}")

# %%
fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
for ax, (img, title) in zip(axes, [(image, "original"), (b, f"blurred + noise ({error(b):.2f})"),
                                   (naive, f"least squares ({error(naive):.2f})"),
                                   (tikhonov, f"Tikhonov, damp 0.02 ({error(tikhonov):.2f})")]):
    ax.imshow(np.reshape(img, (n, n)), cmap="gray", vmin=-0.2, vmax=1.2)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
