"""Mini-batch training and evaluation of a :class:`~sparseconv.nn.Sequential` classifier."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .data import Dataset, batches
from .nn import SGD, CrossEntropyLoss, MSELoss, Sequential

__all__ = ["TrainingDiverged", "History", "train", "evaluate"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class History:
    """Per-epoch training record.

    Attributes
    ----------
    train_loss, train_accuracy, test_accuracy, seconds, samples_per_second : list of float
        One entry per epoch; accuracies are fractions in [0, 1].
    """

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    samples_per_second: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.__dict__.items()}


def evaluate(net: Sequential, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> float:
    """Classification accuracy of ``net`` on ``x : (N, ...)`` with integer labels ``y : (N,)``.

    Raises
    ------
    ValueError
        If there are no samples (an accuracy of nothing is undefined).
    """
    if len(y) == 0:
        raise ValueError("evaluate needs at least one sample; got an empty set")
    correct = 0
    for xb, yb in batches(x, y, batch_size, shuffle=False):
        correct += int(np.sum(np.argmax(net.forward(xb), axis=1) == yb))
    return correct / len(y)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="sample", leave=False)


def train(net: Sequential, data: Dataset, *, epochs: int = 10, batch_size: int = 16, lr: float = 0.02,
          momentum: float = 0.9, weight_decay: float = 2e-3, schedule: str = "cosine", shift: int = 1,
          loss: str = "cross_entropy", seed: int = 0, progress: bool = True, log=print) -> History:
    """Train ``net`` with SGD and report test accuracy after each epoch.

    Parameters
    ----------
    net : Sequential
        Maps ``(N, *data.x_train.shape[1:])`` to class scores ``(N, data.classes)``.
    data : Dataset
    epochs, batch_size : int
    lr, momentum, weight_decay : float
        See :class:`~sparseconv.nn.SGD`.
    schedule : {"cosine", "constant"}
        ``"cosine"`` decays the learning rate from ``lr`` towards 0 over all steps.
    shift : int
        Augmentation: each mini-batch is shifted by a random whole number of pixels in
        ``[-shift, shift]`` along each spatial axis (0 disables it). LeNet inputs have a
        2-pixel background border, so shifts up to 2 lose no part of the digit.
    loss : {"cross_entropy", "mse"}
    seed : int
        Seeds the mini-batch order; with a seeded network the run is reproducible.
    progress : bool
        Show a tqdm bar (loss, accuracy, samples/s) when tqdm is installed.
    log : callable or None
        Receives one line per epoch.

    Returns
    -------
    History

    Raises
    ------
    TrainingDiverged
        When the loss becomes NaN or infinite, naming the epoch and step.
    ValueError, TypeError
        For a bad option or an empty training or test split, before any work is done.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int; got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    for split in ("train", "test"):
        if len(getattr(data, f"y_{split}")) == 0:
            raise ValueError(f"the {split} split of the dataset is empty (data.x_{split} has shape "
                             f"{np.shape(getattr(data, f'x_{split}'))}); train needs at least one sample in each")
    losses = {"cross_entropy": CrossEntropyLoss, "mse": MSELoss}
    if loss not in losses:
        raise ValueError(f"loss must be one of {sorted(losses)}; got {loss!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant'; got {schedule!r}")
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be a non-negative int; got {shift!r}")
    criterion = losses[loss]()
    opt = SGD(net.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    history = History()
    n = len(data.y_train)
    total_steps = epochs * -(-n // batch_size)
    spatial_axes = tuple(range(2, data.x_train.ndim))
    global_step = 0
    for epoch in range(1, epochs + 1):
        bar = _progress(n, progress, f"epoch {epoch}/{epochs}")
        t0 = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        for step, (xb, yb) in enumerate(batches(data.x_train, data.y_train, batch_size, rng=rng), start=1):
            if shift:
                xb = np.roll(xb, tuple(rng.integers(-shift, shift + 1, size=len(spatial_axes))), axis=spatial_axes)
            if schedule == "cosine":
                opt.lr = lr * 0.5 * (1 + np.cos(np.pi * global_step / total_steps))
            global_step += 1
            opt.zero_grad()
            scores = net.forward(xb)
            value = criterion(scores, yb)
            if not np.isfinite(value):
                if bar is not None:
                    bar.close()
                raise TrainingDiverged(f"the loss became {value} at epoch {epoch}, step {step} (lr={lr}); "
                                       f"try a lower learning rate, e.g. --lr {lr / 10:g}")
            if type(net).backward is Sequential.backward:  # parameter gradients only (not a subclass's own backward)
                net.backward(criterion.backward(), input_grad=False)
            else:
                net.backward(criterion.backward())
            opt.step()
            total_loss += value * len(yb)
            correct += int(np.sum(np.argmax(scores, axis=1) == yb))
            seen += len(yb)
            if bar is not None:
                elapsed = time.perf_counter() - t0
                bar.update(len(yb))
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}",
                                samples_s=f"{seen / max(elapsed, 1e-9):.0f}")
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        history.train_loss.append(total_loss / seen)
        history.train_accuracy.append(correct / seen)
        history.test_accuracy.append(evaluate(net, data.x_test, data.y_test))
        history.seconds.append(seconds)
        history.samples_per_second.append(seen / seconds)
        if log is not None:
            log(f"epoch {epoch:>3}/{epochs}: loss {history.train_loss[-1]:.4f}  "
                f"train acc {history.train_accuracy[-1]:.4f}  test acc {history.test_accuracy[-1]:.4f}  "
                f"{seconds:.1f}s ({history.samples_per_second[-1]:.0f} samples/s)")
    return history
