"""Losses: the quadratic cost and softmax cross-entropy, each averaged over the batch.

A loss is called with predictions and targets and returns a float; :meth:`backward` then
returns ``dJ/dpred``. Targets are class labels ``(N,)`` of integers in ``[0, K)`` (or, for
:class:`MSELoss`, an array shaped like the predictions).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["MSELoss", "CrossEntropyLoss", "check_labels"]


def check_labels(labels: object, n: int, classes: int, owner: str) -> np.ndarray:
    """Validate integer class labels for a batch of ``n`` predictions over ``classes`` classes."""
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise TypeError(f"{owner}: labels must be integers; got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{owner}: labels must have shape ({n},) to match the predictions; got {y.shape}")
    if n and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{owner}: labels must be in [0, {classes}); got values from {y.min()} to {y.max()}")
    return y


def _check_predictions(pred: object, owner: str) -> np.ndarray:
    p = np.asarray(pred)
    if p.ndim != 2 or p.dtype.kind != "f":
        raise ValueError(f"{owner}: predictions must be a float array of shape (N, K); got {p.dtype} {p.shape}")
    return p


class MSELoss:
    """Quadratic cost ``J = 1/(2N) sum_n ||a_n - y_n||^2``.

    ``target`` is either an array shaped like ``pred`` or integer labels, turned into one-hot
    rows. ``backward()`` returns ``(a - y) / N``.
    """

    def __init__(self) -> None:
        self._diff: Optional[np.ndarray] = None

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> float:
        p = _check_predictions(pred, "MSELoss")
        t = np.asarray(target)
        if t.ndim == 1:
            y = check_labels(t, p.shape[0], p.shape[1], "MSELoss")
            t = np.zeros_like(p)
            t[np.arange(p.shape[0]), y] = 1
        elif t.shape != p.shape:
            raise ValueError(f"MSELoss: target must have the predictions' shape {p.shape} or be labels of shape "
                             f"({p.shape[0]},); got {t.shape}")
        self._diff = p - t.astype(p.dtype, copy=False)
        return float(0.5 * np.sum(self._diff ** 2) / p.shape[0])

    def backward(self) -> np.ndarray:
        if self._diff is None:
            raise ValueError("MSELoss.backward() called before the loss was computed")
        return self._diff / self._diff.shape[0]

    def __repr__(self) -> str:
        return "MSELoss()"


class CrossEntropyLoss:
    """Softmax cross-entropy on logits, ``J = -1/N sum_n log softmax(z_n)[y_n]``.

    The softmax is fused and shifted by the row maximum, so large logits neither overflow
    nor lose the gradient; ``backward()`` returns ``(softmax(z) - onehot(y)) / N``.
    """

    def __init__(self) -> None:
        self._grad: Optional[np.ndarray] = None

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> float:
        z = _check_predictions(logits, "CrossEntropyLoss")
        n, k = z.shape
        y = check_labels(labels, n, k, "CrossEntropyLoss")
        shifted = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_norm
        grad = np.exp(log_p)
        grad[np.arange(n), y] -= 1
        self._grad = grad / n
        return float(-log_p[np.arange(n), y].sum() / n)

    def backward(self) -> np.ndarray:
        if self._grad is None:
            raise ValueError("CrossEntropyLoss.backward() called before the loss was computed")
        return self._grad

    def __repr__(self) -> str:
        return "CrossEntropyLoss()"
