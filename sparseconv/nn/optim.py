"""Stochastic gradient descent with momentum and weight decay."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .module import Parameter

__all__ = ["SGD"]


class SGD:
    """Mini-batch SGD: ``v = momentum * v + (grad + weight_decay * p)``; ``p -= lr * v``.

    Parameters
    ----------
    params : iterable of Parameter
    lr : float
        Learning rate, positive.
    momentum : float, default 0
        In ``[0, 1)``.
    weight_decay : float, default 0
        L2 penalty coefficient, non-negative.

    Notes
    -----
    Masked entries (unconnected weights) have zero gradient, zero decay and zero velocity,
    so they stay exactly zero.
    """

    def __init__(self, params: Iterable[Parameter], lr: float, *, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params or not all(isinstance(p, Parameter) for p in self.params):
            raise TypeError("SGD needs a non-empty iterable of Parameter objects (e.g. net.parameters())")
        if not np.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a positive number; got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self._velocity = [np.zeros_like(p.data) for p in self.params]

    def step(self) -> None:
        """Update every parameter in place from its accumulated gradient."""
        for p, v in zip(self.params, self._velocity):
            g = p.grad if self.weight_decay == 0 else p.grad + self.weight_decay * p.data
            if self.momentum:
                v *= self.momentum
                v += g
                g = v
            p.data -= self.lr * g

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad[...] = 0

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay})"
