"""Stochastic gradient descent with momentum and weight decay."""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import numpy as np

from .module import Parameter

__all__ = ["SGD"]


def _hyperparameter(value: object, name: str) -> float:
    """A finite, non-negative real number (PyTorch's rule for lr, momentum, weight_decay)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return v


class SGD:
    """Mini-batch SGD: ``v = momentum * v + (grad + weight_decay * p)``; ``p -= lr * v``.

    Parameters
    ----------
    params : iterable of Parameter
        Each parameter once (a duplicate is refused: it would be stepped twice).
    lr : float
        Learning rate, finite and ``>= 0`` (PyTorch's rule; 0 leaves the weights unchanged).
    momentum : float, default 0
        Finite and ``>= 0``.
    weight_decay : float, default 0
        L2 penalty coefficient, finite and ``>= 0``.

    Notes
    -----
    Masked entries (unconnected or pruned weights) get zero gradient, zero decay, zero
    velocity and zero update, so they stay exactly zero. Every step bumps each parameter's
    :attr:`~sparseconv.nn.Parameter.version`. The hyper-parameters may be changed between
    steps (a schedule sets ``opt.lr``); they are validated on every assignment.
    """

    def __init__(self, params: Iterable[Parameter], lr: float, *, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params or not all(isinstance(p, Parameter) for p in self.params):
            raise TypeError("SGD needs a non-empty iterable of Parameter objects (e.g. net.parameters())")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("params lists a Parameter more than once; it would be updated twice per step")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._velocity = [np.zeros_like(p.grad) for p in self.params]

    @property
    def lr(self) -> float:
        """Learning rate."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _hyperparameter(value, "lr")

    @property
    def momentum(self) -> float:
        """Momentum coefficient."""
        return self._momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self._momentum = _hyperparameter(value, "momentum")

    @property
    def weight_decay(self) -> float:
        """L2 penalty coefficient."""
        return self._weight_decay

    @weight_decay.setter
    def weight_decay(self, value: float) -> None:
        self._weight_decay = _hyperparameter(value, "weight_decay")

    def step(self) -> None:
        """Update every parameter in place from its accumulated gradient."""
        for p in self.params:
            if np.shape(p.grad) != p.shape:
                raise ValueError(f"a parameter's grad must have its shape {p.shape}; got {np.shape(p.grad)} "
                                 "(nothing was updated)")
        for p, v in zip(self.params, self._velocity):
            g = p.grad if self.weight_decay == 0 else p.grad + self.weight_decay * p.data
            if p.mask is not None:
                # np.where(p.mask, g, 0) through the kept indices (no pass over the inverted mask).
                kept, masked = p.kept_indices(), np.zeros(p.shape, dtype=np.result_type(g))
                masked.reshape(-1)[kept] = np.reshape(g, -1)[kept]
                g = masked
            if self.momentum:
                v *= self.momentum
                v += g
                g = v
            p._update(self.lr * g)

    def zero_grad(self) -> None:
        """Clear the accumulated gradient of every parameter."""
        for p in self.params:
            p.zero_grad()

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay})"
