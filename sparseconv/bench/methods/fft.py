"""Method ``fft``: ``scipy.fft.rfft2`` of the padded input and the kernel, a complex GEMM over
channels at every frequency, ``irfft2``.

The weight gradient evaluates its inverse transform at the ``k * k`` taps only (one GEMM with
an inverse-DFT basis). The kernel spectrum is cached like the sparse matrix's values (its cost
is ``refresh_s``); ``workers`` follows the threads.
"""

from __future__ import annotations

import numpy as np

from ..suites import Case
from ..timing import measure
from ._base import Prepared, Settings, check_budget, dilated_kernel, pad

__all__ = ["NAME", "RANK", "prepare"]

NAME = "fft"
RANK = 70


def prepare(case: Case, settings: Settings) -> Prepared:
    """Set up the FFT convolution: the kernel spectrum is computed here (timed as the refresh)."""
    from scipy import fft as sfft

    threads = settings.threads

    layer = case.layer
    n, c, h, _ = layer.x_shape
    f, cg, k, _ = layer.weight_shape
    g, fg = layer.groups, f // layer.groups
    s, p, d, o = layer.stride, layer.padding, layer.dilation, layer.out_size
    extent = d * (k - 1) + 1
    hp = h + 2 * p
    valid = hp - extent + 1
    span = s * (o - 1) + 1
    # The padded input's size is enough: a valid correlation never wraps around it.
    size = sfft.next_fast_len(hp, real=True)
    shape2 = (size, size)
    n_freq = size * (size // 2 + 1)
    complex_dtype = np.result_type(case.dtype, np.complex64)
    spectra = (n * c + f * cg + n * f) * n_freq * complex_dtype.itemsize
    check_budget(spectra, "the input, kernel and output spectra", settings.budget)
    x, w, dy = case.x, case.kernel, case.dy
    state: dict[str, np.ndarray] = {}

    def to_freq_major(a: np.ndarray, groups: int, per_group: int) -> np.ndarray:
        # (B, groups * per_group, S, S//2+1) -> (freq, groups, B, per_group), contiguous so that
        # each frequency's small matrix product goes to BLAS.
        return np.ascontiguousarray(a.reshape(a.shape[0], groups, per_group, n_freq).transpose(3, 1, 0, 2))

    def from_freq_major(a: np.ndarray, batch: int, channels: int) -> np.ndarray:
        # (freq, G, B, per_group) -> (B, channels, S, S//2+1)
        return np.ascontiguousarray(a.transpose(2, 1, 3, 0)).reshape(batch, channels, size, size // 2 + 1)

    def weight_spectrum() -> None:
        spec = sfft.rfft2(dilated_kernel(w, d), s=shape2, workers=threads)  # (F, Cg, S, S//2+1)
        state["w"] = np.ascontiguousarray(spec.reshape(g, fg, cg, n_freq).transpose(3, 0, 2, 1))  # (freq, G, Cg, Fg)
        state["w_conj"] = state["w"].conj()

    def input_spectrum() -> np.ndarray:
        return to_freq_major(sfft.rfft2(pad(x, p), s=shape2, workers=threads), g, cg)  # (freq, G, N, Cg)

    def dy_spectrum() -> np.ndarray:
        dyd = np.zeros((n, f, span, span), dtype=case.dtype)
        dyd[:, :, ::s, ::s] = dy
        return to_freq_major(sfft.rfft2(dyd, s=shape2, workers=threads), g, fg)  # (freq, G, N, Fg)

    def forward() -> np.ndarray:
        # Correlation: the product with the conjugate kernel spectrum.
        y = np.matmul(input_spectrum(), state["w_conj"])  # (freq, G, N, Fg)
        y = sfft.irfft2(from_freq_major(y, n, f), s=shape2, workers=threads)
        return np.ascontiguousarray(y[:, :, :valid:s, :valid:s])

    def adjoint() -> np.ndarray:
        # The adjoint is the full convolution: the product with the kernel spectrum itself.
        dx = np.matmul(dy_spectrum(), state["w"].transpose(0, 1, 3, 2))  # (freq, G, N, Cg)
        dx = sfft.irfft2(from_freq_major(dx, n, c), s=shape2, workers=threads)
        return np.ascontiguousarray(dx[:, :, p:p + h, p:p + h])

    # Only the k x k taps of each (filter, channel) correlation are needed, so the weight
    # gradient's inverse transform is evaluated at those points alone: one GEMM with this
    # (k*k, freq) inverse-DFT basis instead of F*C/G full inverse FFTs (which cost ~10x more).
    # Half-spectrum columns other than 0 and S/2 stand for their conjugate twin too, hence 2.
    u = np.arange(size)[:, None]
    v = np.arange(size // 2 + 1)
    v_weight = np.where((v == 0) | (2 * v == size), 1.0, 2.0)
    taps = np.arange(k) * d
    rows = np.exp(2j * np.pi * u * taps[None, :] / size)  # (S, k): e^{2 pi i u a / S}
    cols = v_weight[:, None] * np.exp(2j * np.pi * v[:, None] * taps[None, :] / size)  # (S//2+1, k)
    basis = (np.einsum("ua,vb->abuv", rows, cols) / size ** 2).reshape(k * k, n_freq).astype(complex_dtype)

    def weight_grad() -> np.ndarray:
        # Correlation of the padded input with the dilated dy, summed over the batch by the GEMM.
        gw = np.matmul(dy_spectrum().conj().transpose(0, 1, 3, 2), input_spectrum())  # (freq, G, Fg, Cg)
        gw = (basis @ gw.reshape(n_freq, f * cg)).real  # (k*k, F*Cg)
        return np.ascontiguousarray(gw.reshape(k, k, f, cg).transpose(2, 3, 0, 1))

    weight_spectrum()
    timing = measure(weight_spectrum, repeats=min(settings.repeats, 3), max_seconds=settings.max_seconds,
                     warmup=False)
    return Prepared(method=NAME, passes={"forward": forward, "adjoint": adjoint, "weight_grad": weight_grad},
                    buffer_name="input, kernel and output spectra", buffer_bytes=int(spectra),
                    build_s=timing["median_s"], refresh=weight_spectrum,
                    info={"fft_size": [size, size], "workers": threads})
