"""The convolution configuration used by the grid tests, with its readable pytest id."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparseconv.geometry import ConvGeometry, conv_geometry


@dataclass(frozen=True)
class Case:
    in_size: tuple
    kernel: tuple
    n: int = 2
    c: int = 2
    f: int = 3
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    padding_mode: str = "zeros"
    flip: bool = False
    dtype: str = "float64"
    opts: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "opts", dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                                              groups=self.groups, padding_mode=self.padding_mode, flip=self.flip))

    @property
    def id(self) -> str:
        def t(v):
            return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
        pad = self.padding if isinstance(self.padding, (int, str)) else str(self.padding).replace(" ", "")
        return (f"d{len(self.in_size)}-N{self.n}-C{self.c}-F{self.f}-{t(self.in_size)}-k{t(self.kernel)}"
                f"-s{t(self.stride)}-p{pad}-d{t(self.dilation)}-g{self.groups}-{self.padding_mode}"
                f"{'-flip' if self.flip else ''}-{self.dtype[5:]}")

    @property
    def weight_shape(self) -> tuple:
        return (self.f, self.c // self.groups, *self.kernel)

    def geometry(self) -> ConvGeometry:
        return conv_geometry(self.weight_shape, (self.c, *self.in_size), **self.opts)

    def valid(self) -> bool:
        try:
            self.geometry()
        except ValueError:
            return False
        return True

    def arrays(self, seed: int = 0):
        """``x``, ``w``, ``b`` and output sensitivities ``dy``, standard normal in the case's dtype."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.n, self.c, *self.in_size)).astype(self.dtype)
        w = rng.standard_normal(self.weight_shape).astype(self.dtype)
        b = rng.standard_normal(self.f).astype(self.dtype)
        dy = rng.standard_normal((self.n, *self.geometry().output_shape)).astype(self.dtype)
        return x, w, b, dy


def supported_engines(op, *products: str) -> list[str]:
    """The registered engines that can run every one of ``products`` on ``op``.

    Always includes ``"csr"`` and ``"factored"`` (they run every layer), so a grid test that
    loops over this list can never loop over nothing.
    """
    from sparseconv.engines import ENGINE_NAMES

    names = [e for e in ENGINE_NAMES if all(op.supports(e, p) for p in products)]
    assert {"csr", "factored"} <= set(names), names
    return names
