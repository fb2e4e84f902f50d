"""Which engine runs which product: one rule, from the layer's shape, mask and memory budget only.

The factored product wins when BLAS gets wide enough operands and few of the gathered taps
are explicit zeros; this rule encodes the measurements in ``benchmarks/bench_speed.py`` (the
factored forward runs at 33-87 GFLOP/s where the CSR kernel runs at about 15 per core). It
never looks at timing, so results are reproducible.

When numba is importable (the ``fast`` extra), the compiled engines join: ``"numba"`` runs the
same CSR products as scipy's kernel with the batch innermost in vector registers, so it takes
every product the CSR kernel would have taken, and every product of a layer with at most half of
its weights kept (pruned or partially connected), where it does only the stored work; the
kernel gradient of such a layer is computed only at the kept taps; where the matrix those CSR
kernels run on (with its transpose for the adjoint, its entry order for the kernel gradient)
would not fit the layer's memory budget, a zero-padded layer runs on ``"implicit"`` instead,
the same loops over per-filter tap lists with no matrix stored (as fast on isolated layers
within 0-20%, slower on the adjoint of valid convolutions, whose positions are mostly borders
checked tap by tap). ``"stencil"`` takes the
single-channel image operators of inverse problems (one input and one output channel per group,
zero padding, stride 1, no mask), which a direct loop over the kernel runs fastest one vector at
a time. Dense multi-channel layers keep the factored engine (BLAS GEMMs).
"""

from __future__ import annotations

import os

import numpy as np

from ..factored import adjoint_plan
from .base import PRODUCTS, Structure

__all__ = ["choose_engine", "default_engine", "ENV_VAR"]

#: The environment variable that, when set, replaces ``"auto"`` as every operator's default.
ENV_VAR = "SPARSECONV_ENGINE"

# When the factored product is used: at least this many channels per group on the gathered
# side (each gathered row is one contiguous run of them), this many on the GEMM's output
# side, and at least this fraction of the gathered taps real (not padding, not masked, not a
# hole between strided outputs). With 16 or more channels on both sides the factored product
# does a tap 5-7x faster than the CSR kernel does an entry (32->32 3x3 layer: 1.05 ms against
# 6.9 ms), so it still wins with three taps in four masked out; narrower layers need half the
# taps real.
_MIN_GATHER_CHANNELS = 4
_MIN_OUTPUT_CHANNELS = {"forward": 4, "adjoint": 8}
_WIDE_CHANNELS = 16
_MIN_FILL = 0.5
_MIN_FILL_WIDE = 0.25
# At most this fraction of the weights kept: the compiled CSR engine takes every product.
_COMPILED_MAX_KEPT = 0.5


def _compiled_available() -> bool:
    """Whether the compiled engines can run here (numba imports); imported only when asked."""
    from . import numba as compiled

    return compiled.available()


def _choose_compiled(structure: Structure, product: str, uncompiled: str) -> str:
    """The engine when numba is available, given the choice without it."""
    geom = structure.geometry
    if (structure.mask is None and geom.in_channels == geom.groups and geom.out_channels == geom.groups):
        from .stencil import ENGINE as stencil

        if stencil.applicable(structure, product):
            return "stencil"
    if structure.mask_fraction <= _COMPILED_MAX_KEPT or uncompiled == "csr":
        from .implicit import ENGINE as implicit
        from .numba import ENGINE as numba

        # Decided for the layer, not per product: the products' engines share one budget, so
        # the test is whether the numba engine could build everything a training step needs.
        if implicit.applicable(structure, product) and numba.full_nbytes(structure) > structure.memory_budget:
            return "implicit"
        return "numba"
    return uncompiled


def choose_engine(structure: Structure, product: str) -> str:
    """The engine for one product of one layer (see the module docstring for the rule).

    Parameters
    ----------
    structure : Structure
        The layer's geometry, spatial pattern and mask.
    product : {"forward", "adjoint", "weight_grad"}

    Returns
    -------
    str
        ``"csr"`` or ``"factored"``; with numba importable also ``"numba"``, ``"implicit"`` or
        ``"stencil"``.

    Raises
    ------
    ValueError
        For an unknown ``product``.
    """
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}; got {product!r}")
    uncompiled = _choose_uncompiled(structure, product)
    return _choose_compiled(structure, product, uncompiled) if _compiled_available() else uncompiled


def _choose_uncompiled(structure: Structure, product: str) -> str:
    """``"factored"`` or ``"csr"``: the rule with scipy and numpy only."""
    if product == "weight_grad":
        return "factored"
    geom, spatial = structure.geometry, structure.spatial
    cin_g, f_per_g = geom.in_channels // geom.groups, geom.out_channels // geom.groups
    gathered, produced = (cin_g, f_per_g) if product == "forward" else (f_per_g, cin_g)
    if gathered < _MIN_GATHER_CHANNELS or produced < _MIN_OUTPUT_CHANNELS[product]:
        return "csr"
    if product == "forward":
        slots = int(np.prod(geom.out_size)) * int(np.prod(geom.kernel_size))
    else:
        slots = adjoint_plan(geom, spatial)[1]
    fill = structure.mask_fraction * spatial.n_items / max(slots, 1)
    wide = min(gathered, produced) >= _WIDE_CHANNELS
    return "factored" if fill >= (_MIN_FILL_WIDE if wide else _MIN_FILL) else "csr"


def default_engine() -> str:
    """The engine an operator uses when none is named: ``$SPARSECONV_ENGINE``, else ``"auto"``."""
    return os.environ.get(ENV_VAR) or "auto"
